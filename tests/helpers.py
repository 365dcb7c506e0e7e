"""Helpers shared by the test files: the error rule for fused ops, its floors, dtype ids and backend lists.

Import as ``from helpers import ...`` (``tests/`` is on sys.path under pytest, as for ``checkpoints``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastbert.ops import available_backends

#: Absolute floor of the error rule per dtype (STYLE.md): fp32 1e-5, fp16 1e-2, bf16 5e-2.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: Readable parametrize ids of the storage dtypes.
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: Every backend that runs on CPU tensors here: torch, cpp where the extension is built, and triton where
#: kernels run under TRITON_INTERPRET=1 (conftest.py sets it when there is no CUDA device).
AVAILABLE_BACKENDS = available_backends("cpu")

#: The native CPU backends, torch and (where built) cpp: the ones model-level tests run on every CPU.
CPU_BACKENDS = [b for b in ("torch", "cpp") if b in AVAILABLE_BACKENDS]


def dtype_id(value: object) -> str | None:
    """``ids=dtype_id`` in ``pytest.mark.parametrize``: "fp32" / "fp16" / "bf16" for dtypes, pytest's default
    (None) for anything else."""
    return DTYPE_IDS.get(value) if isinstance(value, torch.dtype) else None


def f64(t: Tensor | None) -> Tensor | None:
    """``t`` in float64 for the reference (integer tensors such as ids unchanged; None stays None)."""
    return None if t is None else (t.double() if t.is_floating_point() else t)


def assert_2x_rule(name: str, fused: Tensor, plain: Tensor, exact: Tensor, dtype: torch.dtype) -> None:
    """The error rule of STYLE.md for one fused op's output.

    fused: the fused op's output at ``dtype``; plain: ``fastbert.reference`` at the same dtype; exact: the
    reference in float64. Passes when max|fused - exact| <= 2 x max|plain - exact| + FLOOR[dtype], and fused
    has the dtype and shape of the reference and is finite everywhere. Prints the errors before asserting.
    """
    assert fused.dtype == dtype, f"{name}: dtype {fused.dtype}, expected {dtype}"
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)}, expected {tuple(exact.shape)}"
    err = (fused.double() - exact.double()).abs().max().item() if exact.numel() else 0.0
    base = (plain.double() - exact.double()).abs().max().item() if exact.numel() else 0.0
    bound = 2 * base + FLOOR[dtype]
    print(f"{name}: max|fused - fp64| = {err:.3g}, max|torch {dtype} - fp64| = {base:.3g}, bound {bound:.3g}")
    assert torch.isfinite(fused).all(), f"{name}: non-finite output"
    assert math.isfinite(err) and err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
