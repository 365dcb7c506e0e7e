"""The cpp backend: ``torch.ops.fastbert.*`` from the C++ extension ``fastbert._C`` (sources in ``csrc/``).

Same functions and signatures as ``fastbert.reference`` (the contract): the torch ops themselves where their
schema already is that signature, a thin wrapper where it is not (see ``linear``). If the extension cannot be
loaded, ``UNAVAILABLE_REASON`` says why, the ops are not defined and ``fastbert.ops`` reports it; nothing here
raises at import.
GEMMs run in oneDNN (through torch's ``mkldnn::_linear_pointwise``) on weights prepacked once by
``prepack_linear``; everything else is fastbert's own C++ (AVX-512 path chosen at run time).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import warnings
from typing import Any

import torch
from torch import Tensor

UNAVAILABLE_REASON: str | None = None
_C = None

# csrc/module.cpp keeps "fastbert-build-torch=<torch.__version__ at build time>" in the library's data.
_BUILD_MARKER = re.compile(rb"fastbert-build-torch=([0-9A-Za-z.+_-]+)\0")


def build_torch_version() -> str | None:
    """The ``torch.__version__`` fastbert._C was compiled against (e.g. "2.13.0+cpu"); None with no extension.

    Read from the loaded module, or, when it could not be loaded, from the marker in the library file itself,
    so the answer comes from the binary and cannot disagree with it.
    """
    if _C is not None:
        return getattr(_C, "BUILD_TORCH_VERSION", None)
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(spec.origin, "rb") as f:
            match = _BUILD_MARKER.search(f.read())
    except OSError:
        return None
    return match.group(1).decode() if match else None


def _release(version: str) -> str:
    """The part of a torch version that fixes its C++ ABI: "2.13.0+cpu" -> "2.13" (see setup.py)."""
    return ".".join(version.split("+", 1)[0].split(".")[:2])


try:
    from . import _C  # importing registers torch.ops.fastbert.*
except Exception as exc:  # ImportError, or an extension built against another torch (undefined symbol)
    UNAVAILABLE_REASON = f"fastbert._C failed to import: {type(exc).__name__}: {exc}"
    _built_for = build_torch_version()
    if _built_for is not None and _release(_built_for) != _release(torch.__version__):
        UNAVAILABLE_REASON = (
            f"fastbert._C was built for torch {_built_for} but torch {torch.__version__} is installed: install "
            f"torch=={_release(_built_for)}.* or rebuild fastbert against this torch (pip install "
            f"--no-build-isolation ...) ({UNAVAILABLE_REASON})"
        )

if UNAVAILABLE_REASON is None:
    _ops = torch.ops.fastbert

    def _fake(name: str):
        """Register a shapes-only implementation (torch.compile / FakeTensor tracing, meta tensors).

        A direct call that mixes meta and real tensors also lands here; it is refused instead of returning
        uninitialised memory on the real tensors' device.
        """

        def register(fn):
            @functools.wraps(fn)
            def checked(*args):
                tensors = [a for a in args if isinstance(a, Tensor)]
                if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
                    devices = ", ".join(str(t.device) for t in tensors)
                    raise ValueError(
                        f"fastbert::{name} got meta tensors mixed with real ones ({devices}); pass all of them on one "
                        "device"
                    )
                return fn(*args)

            torch.library.register_fake(f"fastbert::{name}")(checked)
            return fn

        return register

    @_fake("embeddings")
    def _embeddings_fake(
        input_ids,
        position_ids,
        token_type_ids,
        word_weight,
        position_weight,
        token_type_weight,
        ln_weight,
        ln_bias,
        eps,
    ):
        return word_weight.new_empty(input_ids.shape[0], word_weight.shape[1])

    @_fake("add_layernorm")
    def _add_layernorm_fake(x, residual, ln_weight, ln_bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @_fake("bias_activation")
    def _bias_activation_fake(x, bias, act):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @_fake("bias_residual_layernorm")
    def _bias_residual_layernorm_fake(x, bias, residual, ln_weight, ln_bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @_fake("linear")
    def _linear_fake(x, weight, bias, act=None, packed=None):
        return x.new_empty(x.shape[0], weight.shape[0])

    @_fake("linear_residual_layernorm")
    def _linear_residual_layernorm_fake(x, weight, bias, residual, ln_weight, ln_bias, eps, packed=None):
        return x.new_empty(x.shape[0], weight.shape[0])

    @_fake("attention")
    def _attention_fake(qkv, cu_seqlens, max_seqlen, num_heads, scale):
        return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)

    # Every op's schema (csrc/ops.cpp) is the contract's signature, names, order and defaults: the backend's
    # functions are the torch ops themselves, no Python wrapper per call (but attention, below). The schema takes any Python / numpy
    # number for a ``float`` and an integer for an ``int``, so no casts are needed either.
    embeddings = _ops.embeddings
    add_layernorm = _ops.add_layernorm
    bias_activation = _ops.bias_activation
    bias_residual_layernorm = _ops.bias_residual_layernorm
    linear = _ops.linear
    linear_residual_layernorm = _ops.linear_residual_layernorm

    def attention(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float) -> Tensor:
        """Packed-sequence attention; see ``fastbert.reference.attention``.

        The one wrapper kept: traced (torch.compile / export), ``max_seqlen`` is a symbolic size and the schema's
        ``int`` would specialise the graph on it (one compile per sequence length); 0 makes the op take the
        longest sequence from ``cu_seqlens``, which it reads anyway. (A ``SymInt`` schema would remove this.)
        """
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            max_seqlen = 0
        return _ops.attention(qkv, cu_seqlens, max_seqlen, num_heads, scale)


def isa(name: str = "") -> str:
    """The kernel table in use ("avx512", "avx2" or "base"); ``isa("base")`` switches to the portable baseline."""
    return torch.ops.fastbert._set_isa(name)


_warned_bf16 = False


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX).

    Without them oneDNN emulates bfloat16 GEMMs with float32 arithmetic plus conversions, which is slower than
    plain float32 (on a 2-core AVX-512 Xeon without AVX512-BF16, benchmarks/results/cpu-kernels.md and
    cpu-bf16.md: GEMMs 4.1-4.8x slower, MiniLM-L6 (8,128) 453 ms against 122 ms in float32).
    """
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def warn_if_emulated_bf16() -> None:
    """Warn once when bfloat16 runs on a CPU without bfloat16 matrix instructions (see ``native_bf16``)."""
    global _warned_bf16
    if not _warned_bf16 and not native_bf16():
        _warned_bf16 = True
        warnings.warn(
            "fastbert: this CPU has no bfloat16 matrix instructions (AVX512-BF16 / AMX): bfloat16 GEMMs are "
            "emulated and run slower than float32; use dtype=torch.float32 here",
            stacklevel=4,
        )


def prepack_linear(weight: Tensor) -> Any:
    """The (N, K) weight reordered once into oneDNN's blocked layout (an MkldnnCPU tensor), or None.

    None (the ops then read ``weight`` directly) when this torch has no oneDNN, the weight is not a float32 /
    bfloat16 CPU tensor (the C++ ops raise the clear error for such weights themselves), or it is bfloat16 on a
    CPU where oneDNN has no bfloat16 path (AVX2 only: the ops then run at::linear).
    """
    if not torch.backends.mkldnn.is_available() or weight.device.type != "cpu":
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2:
        return None
    if weight.dtype == torch.bfloat16:
        warn_if_emulated_bf16()
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
