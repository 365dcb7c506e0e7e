"""The one place that picks a backend for the fused ops.

Three backends implement the same functions with the same signatures (see ``fastbert.reference`` for the
contract and shapes):

- ``torch``: ``fastbert.reference``, plain PyTorch, runs on any device;
- ``cpp``: ``fastbert._cpp``, the C++ extension ``fastbert._C`` (``torch.ops.fastbert.*``), CPU tensors;
- ``triton``: ``fastbert.kernels``, Triton kernels, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

The contract is written once, as the typed protocol ``BackendOps``; ``OPS`` lists its ops. A model resolves its
backend once, when it is built (``resolve_backend``), and calls the returned ``Backend``'s functions in
``forward``; nothing chooses per call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings
from functools import cache
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import Tensor

from . import reference

BACKENDS = ("torch", "cpp", "triton")

#: The parameter dtypes each fused backend computes in; the torch backend (``fastbert.reference``) runs any dtype.
#: ``auto`` skips a backend that does not support the model's dtype (float16 on a CPU runs on torch).
DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpp": (torch.float32, torch.bfloat16),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}


class BackendOps(Protocol):
    """The backend contract: the fused ops every backend module provides, with these names and signatures.

    ``fastbert.reference`` defines what each computes and the tensor shapes; ``fastbert._cpp`` and
    ``fastbert.kernels`` implement the same functions. ``OPS`` (below) is read from this class.

    Every op is differentiable on every backend (training): the torch backend through PyTorch's autograd, the
    cpp and triton backends through gradients registered once per op with ``torch.library.register_autograd``
    (their own backward kernels). Attention's dropout draws its mask from ``reference.dropout_bits``, the same
    counter-based hash on every backend, so backward regenerates it and backends agree bit for bit on it.
    """

    def embeddings(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        token_type_ids: Tensor | None,
        word_weight: Tensor,
        position_weight: Tensor,
        token_type_weight: Tensor | None,
        ln_weight: Tensor,
        ln_bias: Tensor,
        eps: float,
    ) -> Tensor: ...

    def add_layernorm(
        self, x: Tensor, residual: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float
    ) -> Tensor: ...

    def bias_activation(self, x: Tensor, bias: Tensor | None, act: str | None) -> Tensor: ...

    def bias_residual_layernorm(
        self, x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float
    ) -> Tensor: ...

    def prepack_linear(self, weight: Tensor) -> Any: ...

    def linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None, packed: Any = None
    ) -> Tensor: ...

    def linear_residual_layernorm(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        residual: Tensor,
        ln_weight: Tensor,
        ln_bias: Tensor,
        eps: float,
        packed: Any = None,
    ) -> Tensor: ...

    def attention(
        self,
        qkv: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        num_heads: int,
        scale: float,
        dropout_p: float = 0.0,
        seed: Tensor | None = None,
    ) -> Tensor: ...


#: The names of the ops in the contract, in the order ``BackendOps`` declares them (Protocol's own dunder
#: methods left out).
OPS: tuple[str, ...] = tuple(
    name for name, value in vars(BackendOps).items() if inspect.isfunction(value) and not name.startswith("_")
)

#: int8 inference (``quantize="int8"``, fastbert.quantize): optional, not in ``BackendOps``; the torch and cpp
#: backends have them (``reference.int8_*`` is the contract), triton does not (``Backend.int8`` is False).
INT8_OPS: tuple[str, ...] = (
    "int8_quantize",
    "int8_prepack",
    "int8_linear",
    "int8_linear_quantize",
    "int8_linear_residual_layernorm",
    "int8_linear_residual_layernorm_quantize",
    "int8_info",
)

_MODULES = {"torch": "fastbert.reference", "cpp": "fastbert._cpp", "triton": "fastbert.kernels"}


class BackendUnavailable(RuntimeError):
    """A backend was asked for explicitly but cannot run here; the message says why."""


#: Mixed precision (torch.autocast) for a backend whose ops do not register it themselves (triton): GEMMs and
#: attention compute in the autocast dtype, embeddings and LayerNorms in float32 (the residual stream stays float32,
#: as in transformers under autocast). The cpp backend registers the same rule with torch.library.register_autocast.
_AUTOCAST_LOW = ("linear", "bias_activation", "attention")
_AUTOCAST_FLOAT32 = ("embeddings", "add_layernorm", "bias_residual_layernorm", "linear_residual_layernorm")


def _autocasting(fn, low_precision: bool):
    """``fn`` with autocast's casts applied to its floating-point tensor arguments when autocast is on."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        dtype = torch.get_autocast_dtype(device) if low_precision else torch.float32

        def cast(a):
            return a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a

        with torch.autocast(device, enabled=False):
            return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return run


class Backend(BackendOps):
    """The fused ops of one backend, looked up once: ``backend.linear(...)``, ``backend.attention(...)``.

    Each op in ``OPS`` is the backend module's function itself, set on the instance (no wrapper per call), except
    the triton backend's, which apply autocast's casts themselves (``_autocasting``: one check per call).
    """

    def __init__(self, name: str, module: ModuleType):
        self.name = name
        self.module = module
        #: whether every op has registered gradients (the module's ``DIFFERENTIABLE``); models refuse train() otherwise
        self.trains = bool(getattr(module, "DIFFERENTIABLE", False))
        for op in OPS:
            fn = getattr(module, op, None)
            if fn is None:
                raise BackendUnavailable(f"backend {name!r} ({module.__name__}) does not implement op {op!r}")
            if name == "triton" and op in _AUTOCAST_LOW + _AUTOCAST_FLOAT32:
                fn = _autocasting(fn, low_precision=op in _AUTOCAST_LOW)
            setattr(self, op, fn)
        #: whether linear_residual_layernorm takes a bfloat16 x with a float32 residual (and returns float32): the
        #: module's ``FLOAT32_RESIDUAL``; bfloat16 inference then keeps the residual stream in float32
        self.float32_residual = bool(getattr(module, "FLOAT32_RESIDUAL", False))
        #: whether the backend runs int8 models (every op in ``INT8_OPS``)
        self.int8 = all(hasattr(module, op) for op in INT8_OPS)
        if self.int8:
            for op in INT8_OPS:
                setattr(self, op, getattr(module, op))

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    # A Backend is a table of functions: copies of a model (copy.deepcopy, pickling the whole module) share it,
    # and unpickling looks the backend up again by name, where it must be available.
    def __deepcopy__(self, memo: dict) -> Backend:
        return self

    def __reduce__(self):
        return _backend_named, (self.name,)


def _backend_named(name: str) -> Backend:
    """The backend called ``name`` (``_pick`` and unpickling); raises BackendUnavailable if it cannot load here."""
    if name == "torch":
        return Backend("torch", reference)
    module, reason = _import(name)
    if module is None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return Backend(name, module)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _import(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend's module once; return (module or None, reason it cannot be used)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # an ImportError, or an extension built against another torch
        return None, f"{_MODULES[name]} failed to import: {type(exc).__name__}: {exc}"
    reason = getattr(module, "UNAVAILABLE_REASON", None)
    return (None, reason) if reason else (module, "")


def unavailable_reason(
    name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> str | None:
    """Why backend ``name`` cannot run on ``device`` with parameters of ``dtype`` (None when it can).

    ``device`` / ``dtype`` None: not checked.
    """
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    if dtype is not None and name in DTYPES and dtype not in DTYPES[name]:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPES[name])
        return (
            f"the {name} backend computes in {supported}, not {str(dtype).removeprefix('torch.')} "
            "(backend='torch' or 'auto' runs any dtype)"
        )
    dev = torch.device(device) if device is not None else None
    if name == "cpp" and dev is not None and dev.type != "cpu":
        return f"the cpp backend runs on CPU tensors, not {dev.type}"
    if name == "triton":
        if dev is not None and dev.type == "cpu" and not _interpreting():
            return "the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to run kernels on the CPU)"
        if dev is None and not torch.cuda.is_available() and not _interpreting():
            return "the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to run kernels on the CPU)"
    if dev is not None and dev.type not in ("cpu", "cuda"):
        if name != "torch":
            return f"the {name} backend does not run on {dev.type} tensors"
    module, reason = _import(name)
    return reason if module is None else None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backend names usable here (for ``device``, or for any local device when None)."""
    if device is None:
        names = ["torch"]
        if unavailable_reason("cpp", "cpu") is None:
            names.append("cpp")
        if unavailable_reason("triton") is None:
            names.append("triton")
        return names
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


_warned_cpp = False


def resolve_backend(name: str | None, device: torch.device | str, dtype: torch.dtype | None = None) -> Backend:
    """Pick the backend for a model on ``device`` (with parameters of ``dtype``, when given).

    ``name`` None or "auto" reads ``FASTBERT_BACKEND`` and otherwise picks triton on CUDA, cpp on CPU when
    the extension loaded, torch elsewhere, skipping a backend that does not compute in ``dtype`` (``DTYPES``:
    float16 on a CPU, float64 anywhere run on torch). An explicit name that cannot be honoured (device or
    dtype) raises ``BackendUnavailable`` with the reason; nothing falls back silently. The cpp backend warns
    once when bfloat16 would be emulated on this CPU (slower than float32).
    """
    backend = _pick(name, torch.device(device), dtype)
    if backend.name == "cpp" and dtype == torch.bfloat16:
        backend.module.warn_if_emulated_bf16()
    return backend


def _pick(name: str | None, dev: torch.device, dtype: torch.dtype | None) -> Backend:
    global _warned_cpp
    if name in (None, "auto"):
        name = os.environ.get("FASTBERT_BACKEND") or "auto"
    if name != "auto":
        reason = unavailable_reason(name, dev, dtype)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
        return _backend_named(name)
    native = {"cuda": "triton", "cpu": "cpp"}.get(dev.type)
    if native is not None and dtype is not None and dtype not in DTYPES[native]:
        return Backend("torch", reference)  # the dtype, not the build, rules the fused backend out: no warning
    if dev.type == "cuda" and unavailable_reason("triton", dev) is None:
        return Backend("triton", _import("triton")[0])
    if dev.type == "cpu":
        reason = unavailable_reason("cpp", dev)
        if reason is None:
            return Backend("cpp", _import("cpp")[0])
        if not _warned_cpp:
            _warned_cpp = True
            warnings.warn(f"fastbert: C++ backend unavailable, using the torch backend: {reason}", stacklevel=4)
    return Backend("torch", reference)
