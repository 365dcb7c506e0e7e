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

from . import reference

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

#: Every op has registered gradients (below); ``fastbert.ops.Backend.trains`` reads this.
DIFFERENTIABLE = UNAVAILABLE_REASON is None
#: linear_residual_layernorm takes a bfloat16 x with a float32 residual (bfloat16 GEMM, float32 LayerNorm and output).
FLOAT32_RESIDUAL = True

if UNAVAILABLE_REASON is None:
    _ops = torch.ops.fastbert

    def _fake(name: str):
        """Register a shapes-only implementation (torch.compile / FakeTensor tracing, meta tensors).

        A direct call that mixes meta and real tensors also lands here; it is refused instead of returning
        uninitialised memory on the real tensors' device.
        """

        def register(fn):
            @functools.wraps(fn)
            def checked(*args, **kwargs):
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
                if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
                    devices = ", ".join(str(t.device) for t in tensors)
                    raise ValueError(
                        f"fastbert::{name} got meta tensors mixed with real ones ({devices}); pass all of them on one "
                        "device"
                    )
                return fn(*args, **kwargs)

            torch.library.register_fake(f"fastbert::{name}")(checked)
            return fn

        return register

    def _rows_like(x: Tensor) -> Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _vector(like: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return like.new_empty(n, dtype=dtype)

    # ------------------------------------------------------------------------------------------------------
    # Forward ops: shapes only
    # ------------------------------------------------------------------------------------------------------

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
        return _rows_like(x)

    @_fake("bias_activation")
    def _bias_activation_fake(x, bias, act):
        return _rows_like(x)

    @_fake("bias_residual_layernorm")
    def _bias_residual_layernorm_fake(x, bias, residual, ln_weight, ln_bias, eps):
        return _rows_like(x)

    @_fake("linear")
    def _linear_fake(x, weight, bias, act=None, packed=None):
        return x.new_empty(x.shape[0], weight.shape[0])

    @_fake("linear_residual_layernorm")
    def _linear_residual_layernorm_fake(x, weight, bias, residual, ln_weight, ln_bias, eps, packed=None):
        return residual.new_empty(x.shape[0], weight.shape[0])  # float32 for bfloat16 x with a float32 residual

    @_fake("attention")
    def _attention_fake(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p=0.0, seed=None):
        return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)

    @_fake("attention_with_lse")
    def _attention_with_lse_fake(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p=0.0, seed=None):
        return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3), qkv.new_empty(
            num_heads, qkv.shape[0], dtype=torch.float32
        )

    # ------------------------------------------------------------------------------------------------------
    # Backward ops (csrc/ops.cpp): shapes only. Gradients of per-feature parameters come in the parameter's dtype.
    # ------------------------------------------------------------------------------------------------------

    @_fake("attention_backward")
    def _attention_backward_fake(
        grad_out, qkv, out, lse, cu_seqlens, max_seqlen, num_heads, scale, dropout_p=0.0, seed=None
    ):
        return _rows_like(qkv)

    @_fake("layernorm_backward")
    def _layernorm_backward_fake(grad_out, x, bias, residual, ln_weight, eps):
        n = x.shape[1]
        dbias_dtype = bias.dtype if bias is not None else x.dtype
        return _rows_like(x), _vector(x, n, ln_weight.dtype), _vector(x, n, ln_weight.dtype), _vector(x, n, dbias_dtype)

    @_fake("bias_activation_backward")
    def _bias_activation_backward_fake(grad_out, x, bias, act):
        return _rows_like(x), _vector(x, x.shape[1], bias.dtype if bias is not None else x.dtype)

    @_fake("embeddings_backward")
    def _embeddings_backward_fake(
        grad_out,
        input_ids,
        position_ids,
        token_type_ids,
        word_weight,
        position_weight,
        token_type_weight,
        ln_weight,
        eps,
    ):
        e = word_weight.shape[1]
        type_shape = token_type_weight.shape if token_type_weight is not None else (0, e)
        return (
            _rows_like(word_weight),
            word_weight.new_empty(position_weight.shape),
            word_weight.new_empty(type_shape),
            _vector(word_weight, e, ln_weight.dtype),
            _vector(word_weight, e, ln_weight.dtype),
        )

    @_fake("linear_backward")
    def _linear_backward_fake(grad_out, x, weight, bias, act=None):
        dbias_dtype = bias.dtype if bias is not None else weight.dtype
        return _rows_like(x), _rows_like(weight), _vector(x, weight.shape[0], dbias_dtype)

    @_fake("linear_residual_layernorm_backward")
    def _linear_residual_layernorm_backward_fake(grad_out, x, weight, bias, residual, ln_weight, eps):
        n = weight.shape[0]
        dbias_dtype = bias.dtype if bias is not None else weight.dtype
        return (
            _rows_like(x),
            _rows_like(weight),
            _vector(x, n, dbias_dtype),
            x.new_empty(x.shape[0], n),
            _vector(x, n, ln_weight.dtype),
            _vector(x, n, ln_weight.dtype),
        )

    @_fake("_dropout_bits")
    def _dropout_bits_fake(seed, head, row, col):
        return torch.empty_like(head, memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------------------------------------------
    # Gradients: registered once per op (torch.library.register_autograd), so eager calls of the ops themselves,
    # fastbert._cpp's functions and torch.compile (which traces forward and backward) share them. Each backward
    # calls one C++ backward op, which recomputes what it needs from the saved inputs. ids, cu_seqlens and the
    # seed get no gradient; neither do eps, act, num_heads and the other non-tensors.
    # ------------------------------------------------------------------------------------------------------

    def _autograd(name: str):
        def register(pair):
            setup_context, backward = pair
            torch.library.register_autograd(f"fastbert::{name}", backward, setup_context=setup_context)
            return pair

        return register

    def _save(ctx, *tensors: Tensor | None) -> None:
        ctx.save_for_backward(*tensors)

    def _embeddings_setup(ctx, inputs, output):
        ids, pos, tt, word, posw, ttw, ln_w, _ln_b, eps = inputs
        _save(ctx, ids, pos, tt, word, posw, ttw, ln_w)
        ctx.eps = eps

    def _embeddings_backward(ctx, grad):
        ids, pos, tt, word, posw, ttw, ln_w = ctx.saved_tensors
        d_word, d_pos, d_type, d_g, d_b = _ops.embeddings_backward(grad, ids, pos, tt, word, posw, ttw, ln_w, ctx.eps)
        return None, None, None, d_word, d_pos, d_type if ttw is not None else None, d_g, d_b, None

    _autograd("embeddings")((_embeddings_setup, _embeddings_backward))

    def _add_layernorm_setup(ctx, inputs, output):
        x, residual, ln_w, _ln_b, eps = inputs
        _save(ctx, x, residual, ln_w)
        ctx.eps = eps

    def _add_layernorm_backward(ctx, grad):
        x, residual, ln_w = ctx.saved_tensors
        dx, d_g, d_b, _ = _ops.layernorm_backward(grad, x, None, residual, ln_w, ctx.eps)
        return dx, dx if residual is not None else None, d_g, d_b, None

    _autograd("add_layernorm")((_add_layernorm_setup, _add_layernorm_backward))

    def _bias_residual_layernorm_setup(ctx, inputs, output):
        x, bias, residual, ln_w, _ln_b, eps = inputs
        _save(ctx, x, bias, residual, ln_w)
        ctx.eps = eps

    def _bias_residual_layernorm_backward(ctx, grad):
        x, bias, residual, ln_w = ctx.saved_tensors
        dx, d_g, d_b, d_bias = _ops.layernorm_backward(grad, x, bias, residual, ln_w, ctx.eps)
        return dx, d_bias if bias is not None else None, dx, d_g, d_b, None

    _autograd("bias_residual_layernorm")((_bias_residual_layernorm_setup, _bias_residual_layernorm_backward))

    def _bias_activation_setup(ctx, inputs, output):
        x, bias, act = inputs
        _save(ctx, x, bias)
        ctx.act = act

    def _bias_activation_backward(ctx, grad):
        x, bias = ctx.saved_tensors
        dx, d_bias = _ops.bias_activation_backward(grad, x, bias, ctx.act)
        return dx, d_bias if bias is not None else None, None

    _autograd("bias_activation")((_bias_activation_setup, _bias_activation_backward))

    def _linear_setup(ctx, inputs, output):
        x, weight, bias, act, _packed = inputs  # backward reads the plain weight, never the prepacked copy
        _save(ctx, x, weight, bias)
        ctx.act = act

    def _linear_backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dx, d_w, d_bias = _ops.linear_backward(grad, x, weight, bias, ctx.act)
        return dx, d_w, d_bias if bias is not None else None, None, None

    _autograd("linear")((_linear_setup, _linear_backward))

    def _linear_residual_layernorm_setup(ctx, inputs, output):
        x, weight, bias, residual, ln_w, _ln_b, eps, _packed = inputs
        _save(ctx, x, weight, bias, residual, ln_w)
        ctx.eps = eps

    def _linear_residual_layernorm_backward(ctx, grad):
        x, weight, bias, residual, ln_w = ctx.saved_tensors
        dx, d_w, d_bias, d_res, d_g, d_b = _ops.linear_residual_layernorm_backward(
            grad, x, weight, bias, residual, ln_w, ctx.eps
        )
        return dx, d_w, d_bias if bias is not None else None, d_res, d_g, d_b, None, None

    _autograd("linear_residual_layernorm")((_linear_residual_layernorm_setup, _linear_residual_layernorm_backward))

    def _attention_args(ctx) -> tuple:
        qkv, cu_seqlens, seed = ctx.saved_tensors[:3]
        return qkv, cu_seqlens, ctx.max_seqlen, ctx.num_heads, ctx.scale, ctx.dropout_p, seed

    def _attention_setup(ctx, inputs, output):
        qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed = inputs
        _save(ctx, qkv, cu_seqlens, seed)
        ctx.max_seqlen, ctx.num_heads, ctx.scale, ctx.dropout_p = max_seqlen, num_heads, scale, dropout_p

    def _attention_backward(ctx, grad):
        # The inference op saved no log-sum-exp: recompute it (and the output, bit for bit the forward's).
        qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed = _attention_args(ctx)
        out, lse = _ops.attention_with_lse(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)
        dqkv = _ops.attention_backward(grad, qkv, out, lse, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)
        return dqkv, None, None, None, None, None, None

    _autograd("attention")((_attention_setup, _attention_backward))

    def _attention_with_lse_setup(ctx, inputs, output):
        qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        _save(ctx, qkv, cu_seqlens, seed, out, lse)
        ctx.max_seqlen, ctx.num_heads, ctx.scale, ctx.dropout_p = max_seqlen, num_heads, scale, dropout_p

    def _attention_with_lse_backward(ctx, grad, _grad_lse):
        # ctx.saved_tensors is read once: under activation checkpointing a second unpack is an error.
        qkv, cu_seqlens, seed, out, lse = ctx.saved_tensors
        max_seqlen, num_heads, scale, dropout_p = ctx.max_seqlen, ctx.num_heads, ctx.scale, ctx.dropout_p
        dqkv = _ops.attention_backward(grad, qkv, out, lse, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)
        return dqkv, None, None, None, None, None, None

    _autograd("attention_with_lse")((_attention_with_lse_setup, _attention_with_lse_backward))

    def _refuse_gradient(name: str, why: str) -> None:
        """An op without a gradient of its own: differentiating through it raises at backward time (``why``)
        instead of returning a silently wrong or missing gradient."""

        def setup(ctx, inputs, output):
            pass

        def backward(ctx, *grads):
            raise RuntimeError(f"fastbert::{name} has no gradient: {why}")

        _autograd(name)((setup, backward))

    def _refuse_double_backward(name: str) -> None:
        """The backward ops: double backward (``create_graph=True``) through them raises."""
        _refuse_gradient(
            name,
            "double backward (create_graph=True) through the cpp backend's ops is not supported; use "
            "backend='torch' for higher-order gradients",
        )

    for _name in (
        "attention_backward",
        "layernorm_backward",
        "bias_activation_backward",
        "embeddings_backward",
        "linear_backward",
        "linear_residual_layernorm_backward",
    ):
        _refuse_double_backward(_name)

    # Every op's schema (csrc/ops.cpp) is the contract's signature, names, order and defaults: the backend's
    # functions are the torch ops themselves, no Python wrapper per call (but attention, below). The schema takes
    # any Python / numpy number for a ``float`` and an integer for an ``int``, so no casts are needed either.
    embeddings = _ops.embeddings
    add_layernorm = _ops.add_layernorm
    bias_activation = _ops.bias_activation
    bias_residual_layernorm = _ops.bias_residual_layernorm
    linear = _ops.linear
    linear_residual_layernorm = _ops.linear_residual_layernorm

    # int8 inference (the contract: reference.int8_*). Shapes-only forms for torch.compile / export; no gradients.
    def _quantized_fake(rows, n, like: Tensor):
        return (
            like.new_empty((rows, n), dtype=torch.uint8),
            like.new_empty(rows, dtype=torch.float32),
            like.new_empty(rows, dtype=torch.int32),
        )

    @_fake("int8_quantize")
    def _int8_quantize_fake(x, smooth_inv=None):
        return _quantized_fake(x.shape[0], x.shape[1], x)

    @_fake("int8_prepack")
    def _int8_prepack_fake(weight_q):
        # oneDNN's packed form is shaped (in_features, out_features); without oneDNN it is weight_q itself
        if _ops.int8_info() == "reference" or weight_q.shape[1] == 0:
            return torch.empty_like(weight_q)
        return weight_q.new_empty((weight_q.shape[1], weight_q.shape[0]))

    @_fake("int8_linear")
    def _int8_linear_fake(q, scale, zp, weight_q, weight_scale, weight_sum, bias, act=None, packed=None):
        return q.new_empty((q.shape[0], weight_q.shape[0]), dtype=torch.float32)

    @_fake("int8_linear_quantize")
    def _int8_linear_quantize_fake(
        q, scale, zp, weight_q, weight_scale, weight_sum, bias, act=None, smooth_inv=None, packed=None
    ):
        return _quantized_fake(q.shape[0], weight_q.shape[0], q)

    @_fake("int8_linear_residual_layernorm")
    def _int8_linear_residual_layernorm_fake(
        q, scale, zp, weight_q, weight_scale, weight_sum, bias, residual, ln_weight, ln_bias, eps, packed=None
    ):
        return q.new_empty((q.shape[0], weight_q.shape[0]), dtype=torch.float32)

    @_fake("int8_linear_residual_layernorm_quantize")
    def _int8_linear_residual_layernorm_quantize_fake(
        q,
        scale,
        zp,
        weight_q,
        weight_scale,
        weight_sum,
        bias,
        residual,
        ln_weight,
        ln_bias,
        eps,
        smooth_inv=None,
        packed=None,
    ):
        y = q.new_empty((q.shape[0], weight_q.shape[0]), dtype=torch.float32)
        return (y, *_quantized_fake(q.shape[0], weight_q.shape[0], q))

    for _name in (
        "int8_quantize",
        "int8_linear",
        "int8_linear_quantize",
        "int8_linear_residual_layernorm",
        "int8_linear_residual_layernorm_quantize",
    ):
        _refuse_gradient(_name, "int8 (quantize='int8') is for inference only; train the float model")

    int8_quantize = _ops.int8_quantize
    int8_prepack = _ops.int8_prepack
    int8_linear = _ops.int8_linear
    int8_linear_quantize = _ops.int8_linear_quantize
    int8_linear_residual_layernorm = _ops.int8_linear_residual_layernorm
    int8_linear_residual_layernorm_quantize = _ops.int8_linear_residual_layernorm_quantize
    int8_info = _ops.int8_info

    def attention(
        qkv: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        num_heads: int,
        scale: float,
        dropout_p: float = 0.0,
        seed: Tensor | None = None,
    ) -> Tensor:
        """Packed-sequence attention with optional dropout; see ``fastbert.reference.attention``.

        The one wrapper kept: traced (torch.compile / export), ``max_seqlen`` is a symbolic size and the schema's
        ``int`` would specialise the graph on it (one compile per sequence length); 0 makes the op take the
        longest sequence from ``cu_seqlens``, which it reads anyway. (A ``SymInt`` schema would remove this.)
        In training (grad enabled and ``qkv.requires_grad``) it runs the forward that also saves each row's
        log-sum-exp, so backward recomputes the probabilities without a second forward. The dropout arguments
        are checked as ``reference.check_dropout`` does (ValueError).
        """
        reference.check_dropout(dropout_p, seed, qkv.device)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            max_seqlen = 0
        if torch.is_grad_enabled() and qkv.requires_grad:
            return _ops.attention_with_lse(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)[0]
        return _ops.attention(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)


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


if UNAVAILABLE_REASON is None:
    # Mixed precision: under torch.autocast on the CPU the GEMMs and attention compute in bfloat16 (the low-precision
    # dtype these kernels have; inputs, weights included, are cast per call as autocast casts for torch's own
    # matmuls), while embeddings and every LayerNorm read and write float32, so the residual stream stays float32 as
    # in transformers under autocast. The fused linear + residual + LayerNorm is cast to float32 as a whole (its
    # residual must not be rounded); training runs its GEMM as a separate, bfloat16 ``linear``.
    for _name in ("linear", "bias_activation", "attention", "attention_with_lse"):
        torch.library.register_autocast(f"fastbert::{_name}", "cpu", torch.bfloat16)
    for _name in ("embeddings", "add_layernorm", "bias_residual_layernorm", "linear_residual_layernorm"):
        torch.library.register_autocast(f"fastbert::{_name}", "cpu", torch.float32)
