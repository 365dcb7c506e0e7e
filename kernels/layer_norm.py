"""(bias +) residual + LayerNorm over rows: ``add_layernorm`` and ``bias_residual_layernorm``.

One kernel, one program per token row; the sum is formed and the statistics computed in fp32 whatever the
storage dtype, and the row is written once in the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    TRITON_TYPES,
    KernelSpec,
    check_tensor,
    dtype_name,
    kernel_spec,
    next_power_of_2,
    row_warps,
    rows_contiguous,
    vector,
)

#: Widest row one program holds in registers (8192 fp32 values over 16 warps = 16 a thread, no spills).
MAX_COLUMNS = 8192
#: Narrowest block: below 64 columns a program would use less than one warp's worth of lanes anyway.
MIN_BLOCK = 64


@triton.jit
def layer_norm_row(x, cols, mask, n_cols, eps, weight_ptr, ln_bias_ptr, out_ptr, row, stride_out_row):
    """LayerNorm of one row, written to row ``row`` of out in out's dtype (shared with embeddings.py).

    x: the (BLOCK_SIZE,) row in fp32, 0 in the lanes outside ``mask`` (cols < n_cols); statistics in fp32.
    """
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n_cols  # two-pass (centred) variance: no cancellation
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ln_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(out_ptr + row * stride_out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr,  # (n_rows, n_cols), row stride stride_x_row
    bias_ptr,  # (n_cols,) or unused
    residual_ptr,  # (n_rows, n_cols), row stride stride_residual_row, or unused
    weight_ptr,  # (n_cols,) LayerNorm gain
    ln_bias_ptr,  # (n_cols,) LayerNorm shift
    out_ptr,  # (n_rows, n_cols), row stride stride_out_row
    stride_x_row,
    stride_residual_row,
    stride_out_row,
    n_cols,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: row r of out = LayerNorm(x[r] + bias + residual[r]), statistics in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0).to(tl.float32)
    layer_norm_row(x, cols, mask, n_cols, eps, weight_ptr, ln_bias_ptr, out_ptr, row, stride_out_row)


def layer_norm_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for rows of ``n_cols`` features: the whole row in one block."""
    if n_cols > MAX_COLUMNS:
        raise ValueError(f"LayerNorm over {n_cols} features: the triton kernel handles at most {MAX_COLUMNS}")
    block = max(MIN_BLOCK, next_power_of_2(n_cols))
    return block, row_warps(block)


def add_layer_norm_fwd(
    x: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """LayerNorm(x + bias + residual) -> out (a new (T, N) tensor when None; may alias x: each program reads its
    whole row before writing it)."""
    check_tensor(x, "x")
    x = rows_contiguous(x)
    n_rows, n_cols = x.shape
    bias = vector(bias, "bias", n_cols, x.dtype)
    ln_weight = vector(ln_weight, "ln_weight", n_cols, x.dtype)
    ln_bias = vector(ln_bias, "ln_bias", n_cols, x.dtype)
    if residual is not None:
        check_tensor(residual, "residual", x.dtype)
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        residual = rows_contiguous(residual)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n_rows == 0 or n_cols == 0:
        return out
    block, warps = layer_norm_config(n_cols)
    _add_layer_norm_fwd_kernel[(n_rows,)](
        x,
        bias if bias is not None else x,
        residual if residual is not None else x,
        ln_weight,
        ln_bias,
        out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        n_cols,
        float(eps),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK_SIZE=block,
        num_warps=warps,
        num_stages=1,
    )
    return out


def add_layernorm(x: Tensor, residual: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """LayerNorm(x + residual) over the last dim; residual may be None. x, residual: (T, N)."""
    return add_layer_norm_fwd(x, None, residual, ln_weight, ln_bias, eps)


def bias_residual_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float
) -> Tensor:
    """LayerNorm(x + bias + residual). x, residual: (T, N); bias: (N,) or None."""
    if residual is None:
        raise ValueError("bias_residual_layernorm needs a residual (use add_layernorm without one)")
    return add_layer_norm_fwd(x, bias, residual, ln_weight, ln_bias, eps)


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, variant, BLOCK_SIZE, num_warps) the launcher can choose."""
    specs = []
    blocks = sorted({layer_norm_config(n)[0] for n in range(1, MAX_COLUMNS + 1, 63)} | {MAX_COLUMNS})
    for dtype in TRITON_TYPES:
        for has_bias, has_residual in ((False, False), (False, True), (True, True)):
            for block in blocks:
                specs.append(
                    kernel_spec(
                        _add_layer_norm_fwd_kernel,
                        dtype,
                        {"HAS_BIAS": has_bias, "HAS_RESIDUAL": has_residual, "BLOCK_SIZE": block},
                        num_warps=row_warps(block),
                        num_stages=1,
                        label=f"layer_norm-{dtype_name(dtype)}-bias{int(has_bias)}-res{int(has_residual)}-B{block}",
                    )
                )
    return specs
