"""Helpers shared by the Triton launchers: input checks, the small shape -> launch-parameter rules, and the
ahead-of-time compile specs built from each kernel's own argument list."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton.language as tl
from torch import Tensor

#: Storage dtypes the kernels run in (statistics are fp32 in every one of them).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Triton signature type of each storage dtype (for the ahead-of-time compile test).
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set: kernels then run on CPU tensors through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_tensor(t: Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error when ``t`` cannot be fed to a kernel (dtype, device)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is None:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the triton backend supports float16, bfloat16 and float32")
    elif t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must be {dtype} (the dtype of the activations)")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"{name} is on {t.device}; the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    )


def rows_contiguous(t: Tensor) -> Tensor:
    """``t`` as a 2-D tensor whose last dim has stride 1 (rows may keep any stride); copies only when needed."""
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D (tokens, features) tensor, got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def vector(t: Tensor | None, name: str, n: int, dtype: torch.dtype) -> Tensor | None:
    """A contiguous (n,) parameter vector (bias, LayerNorm weight) checked against the feature count."""
    if t is None:
        return None
    check_tensor(t, name, dtype)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be ({n},)")
    return t.contiguous()


def needs_grad(*tensors: Tensor | None) -> bool:
    """True when autograd will differentiate through an op on ``tensors``: grad mode is on and one requires grad.

    The launchers use it to do training-only work (store attention's log-sum-exp, keep a GEMM's output for the
    epilogue's backward) only when a backward can follow.
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def through_op(*tensors: Tensor | None) -> bool:
    """True when a public function should call its torch.library custom op rather than its launcher: when a
    backward can follow (``needs_grad``) or torch.compile is tracing (the op is one opaque node of the graph).

    Eager inference calls the launcher directly, as before training existed: a custom op's dispatch costs tens
    of microseconds of host time a call (measured on this project's CPU machine: ~100 us against ~20 us for a
    bare Python call), which a GPU forward of small batches would wait on.
    """
    return needs_grad(*tensors) or torch.compiler.is_compiling()


def grad_rows(t: Tensor, like: Tensor) -> Tensor:
    """An incoming gradient as a row-major tensor of ``like``'s shape (autograd may hand in expanded or strided
    gradients, e.g. the gradient of ``out.sum()``)."""
    if t.shape != like.shape:
        raise ValueError(f"gradient has shape {tuple(t.shape)} but the output has {tuple(like.shape)}")
    return t.contiguous()


def row_warps(block_size: int) -> int:
    """Warps for a kernel whose program handles one row of ``block_size`` elements: about 8 elements a thread
    (enough independent loads in flight to hide latency without spilling), between 1 and 16 warps."""
    return max(1, min(16, block_size // 256))


@dataclass(frozen=True)
class KernelSpec:
    """One compile of a kernel: what the ahead-of-time compile test feeds to ``triton.compile``. Build it with
    ``kernel_spec``, which reads the signature from the kernel's own arguments.

    signature: argument name -> Triton type (``*fp16``, ``i32``, ``fp32``, ``constexpr``); constexprs: values of
    the constexpr arguments; aligned: arguments the JIT would see as 16-divisible in normal use (pointers of fresh
    allocations, strides of BERT-sized rows); label: a readable id for the test report; training: the kernel runs
    only when training (a backward kernel, or a forward variant that stores what a backward needs).
    """

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    aligned: tuple[str, ...] = field(default=())
    training: bool = False


#: Pointers that do not hold activations, by name suffix: token / position / type ids, the sort order of ids
#: and the segment offsets into it (the launchers pass them as int64), cu_seqlens (int32, as everywhere in fastbert), the dropout seed (an
#: int64 tensor), and fp32 workspaces: attention's per-row softmax statistics, log-sum-exp and delta, per-program partial sums of
#: the two-stage reductions (``*_partial_ptr``) and fp32 accumulators (``*_acc_ptr``). Every other ``*_ptr`` has
#: the storage dtype.
INDEX_POINTERS = {
    "_ids_ptr": "*i64",
    "order_ptr": "*i64",
    "offsets_ptr": "*i64",
    "cu_seqlens_ptr": "*i32",
    "seed_ptr": "*i64",
    "stats_ptr": "*fp32",
    "lse_ptr": "*fp32",
    "delta_ptr": "*fp32",
    "_partial_ptr": "*fp32",
    "_acc_ptr": "*fp32",
}


def _is_constexpr(param: inspect.Parameter) -> bool:
    # The annotation is the object tl.constexpr, or its source text under ``from __future__ import annotations``.
    ann = param.annotation
    return ann is tl.constexpr or (isinstance(ann, str) and ann.rsplit(".", 1)[-1] == "constexpr")


def kernel_arguments(fn: Any) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each argument of a ``@triton.jit`` kernel, in order.

    Read from the Python function itself (``fn.fn``), so it works for compiled JITFunctions and for the
    interpreter's InterpretedFunctions (TRITON_INTERPRET=1) alike.
    """
    return [(p.name, _is_constexpr(p)) for p in inspect.signature(fn.fn).parameters.values()]


def argument_type(name: str, storage: str) -> str:
    """Triton signature type of the runtime argument ``name`` of a kernel whose activations are ``storage``.

    The rule follows fastbert's kernel naming: ``*_ptr`` -> a pointer (``*<storage>``, or the index type of
    ``INDEX_POINTERS``); ``stride_*``, ``n_*``, ``*_size`` and ``*_threshold`` -> ``i32``; ``eps`` and ``*_scale``
    -> ``fp32``.
    A name no rule covers raises, so a new kernel argument gets a rule (or a conforming name), never a guess.
    """
    if name.endswith("_ptr"):
        for suffix, ty in INDEX_POINTERS.items():
            if name.endswith(suffix):
                return ty
        return f"*{storage}"
    if name.startswith(("stride_", "n_")) or name.endswith(("_size", "_threshold")):
        return "i32"
    if name == "eps" or name.endswith("_scale"):  # passed as Python floats: fp32 scalars
        return "fp32"
    raise ValueError(
        f"kernel argument {name!r} matches no signature rule (*_ptr, stride_*, n_*, *_size, *_threshold, eps, "
        "*_scale); "
        "rename it or add a rule to kernels/_common.py"
    )


def kernel_spec(
    fn: Any,
    dtype: torch.dtype,
    constexprs: dict[str, Any],
    *,
    num_warps: int,
    num_stages: int,
    label: str,
    aligned_sizes: tuple[str, ...] = ("n_cols",),
    pointer_types: dict[str, str] | None = None,
    training: bool = False,
) -> KernelSpec:
    """The KernelSpec of ``fn`` at storage ``dtype``, its signature derived from the kernel's argument names.

    ``constexprs`` must give a value for exactly the kernel's constexpr arguments. The arguments marked
    16-divisible (``aligned``) are every pointer and stride, and the size arguments named in ``aligned_sizes``
    that the kernel has. ``pointer_types`` overrides the type of named pointers (a kernel whose input and
    output dtypes differ, such as a reduction of fp32 partial sums into an fp16 gradient).
    """
    args = kernel_arguments(fn)
    expected = [name for name, is_const in args if is_const]
    if sorted(constexprs) != sorted(expected):
        raise ValueError(f"{label}: constexprs {sorted(constexprs)} do not match the kernel's {sorted(expected)}")
    storage = TRITON_TYPES[dtype]
    signature = {name: "constexpr" if is_const else argument_type(name, storage) for name, is_const in args}
    for name, ty in (pointer_types or {}).items():
        if not signature.get(name, "").startswith("*"):
            raise ValueError(f"{label}: pointer_types names {name!r}, which is not a pointer argument")
        signature[name] = ty
    aligned = tuple(
        name
        for name, is_const in args
        if not is_const and (name.endswith("_ptr") or name.startswith("stride_") or name in aligned_sizes)
    )
    return KernelSpec(fn, signature, constexprs, num_warps, num_stages, label, aligned, training)
