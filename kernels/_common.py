"""Helpers shared by the Triton launchers: input checks and the small shape -> launch-parameter rules."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
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


def row_warps(block_size: int) -> int:
    """Warps for a kernel whose program handles one row of ``block_size`` elements: about 8 elements a thread
    (enough independent loads in flight to hide latency without spilling), between 1 and 16 warps."""
    return max(1, min(16, block_size // 256))


@dataclass(frozen=True)
class KernelSpec:
    """One compile of a kernel: what the ahead-of-time compile test feeds to ``triton.compile``.

    signature: argument name -> Triton type (``*fp16``, ``i32``, ``fp32``, ``constexpr``); constexprs: values of
    the constexpr arguments; aligned: arguments the JIT would see as 16-divisible in normal use (pointers of fresh
    allocations, strides of BERT-sized rows); label: a readable id for the test report.
    """

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    aligned: tuple[str, ...] = field(default=())
