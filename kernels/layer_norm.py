"""(bias +) residual + LayerNorm over rows: ``add_layernorm`` and ``bias_residual_layernorm``, forward and backward.

Forward: one program per token row; the sum is formed and the statistics computed in fp32 whatever the storage
dtype, and the row is written once in the storage dtype. Nothing is saved for the backward: it reloads the
inputs and recomputes the sum and its statistics (one row read, no extra forward traffic).

Backward: d(sum) per row (it is dx and d residual), and dgamma, dbeta, dbias by a two-stage reduction: each
program sums its block of rows into fp32 partials, then ``column_sum`` adds the partials in a fixed order
(deterministic, no atomics).
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
    grad_rows,
    kernel_spec,
    next_power_of_2,
    row_warps,
    rows_contiguous,
    through_op,
    vector,
)

#: Widest row one program holds in registers (8192 fp32 values over 16 warps = 16 a thread, no spills).
MAX_COLUMNS = 8192
#: Narrowest block: below 64 columns a program would use less than one warp's worth of lanes anyway.
MIN_BLOCK = 64
#: Programs of the backward (each owns a block of rows and writes one row of fp32 partial sums): a few per SM
#: of the largest GPUs (132 SMs on H100), fixed so that the order of summation never depends on the device.
BWD_PROGRAMS = 512
#: Widest row whose backward also accumulates dbias in registers (beyond it: a column sum of dx, see the kernel).
MAX_DBIAS_BLOCK: tl.constexpr = tl.constexpr(4096)
#: column_sum tiles: 32 rows x 64 columns a step (8 values a thread at 4 warps).
SUM_BLOCK_ROWS = 32
SUM_BLOCK_COLS = 64


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
def layer_norm_row_bwd(x, dy, w, mask, n_cols, eps):
    """(dx, xhat) of one row's LayerNorm backward (shared with embeddings.py), all fp32.

    x: the pre-norm row, dy: the output gradient, w: the gain, each 0 outside ``mask``. The statistics are
    recomputed exactly as ``layer_norm_row`` computes them; dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    with g = dy * w.
    """
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = xc * rstd
    g = dy * w
    c1 = tl.sum(xhat * g, axis=0) / n_cols
    c2 = tl.sum(g, axis=0) / n_cols
    return (g - (xhat * c1 + c2)) * rstd, xhat


@triton.jit
def _column_sum_kernel(
    x_ptr,  # (n_rows, n_cols), row stride stride_x_row
    out_ptr,  # (n_cols,)
    stride_x_row,
    n_rows,
    n_cols,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One program: out[c] = sum of x[:, c] over all rows for BLOCK_COLS columns, in fp32, rows in order."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    c_ok = cols < n_cols
    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows[:, None] < n_rows) & c_ok[None, :]
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x_row + cols[None, :]
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=c_ok)


def column_sum(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(n_cols,) sums over the rows of a 2-D ``x`` (fp32 accumulation, fixed order), in ``dtype``."""
    n_rows, n_cols = x.shape
    out = torch.empty(n_cols, dtype=dtype, device=x.device)
    if n_cols == 0:
        return out
    if n_rows == 0:
        return out.zero_()
    x = x if x.stride(1) == 1 else x.contiguous()
    _column_sum_kernel[(triton.cdiv(n_cols, SUM_BLOCK_COLS),)](
        x,
        out,
        x.stride(0),
        n_rows,
        n_cols,
        BLOCK_ROWS=SUM_BLOCK_ROWS,
        BLOCK_COLS=SUM_BLOCK_COLS,
        num_warps=4,
        num_stages=1,
    )
    return out


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


@triton.jit
def _add_layer_norm_bwd_kernel(
    dout_ptr,  # (n_rows, n_cols), row stride stride_dout_row
    x_ptr,  # (n_rows, n_cols), row stride stride_x_row
    bias_ptr,  # (n_cols,) or unused
    residual_ptr,  # (n_rows, n_cols), row stride stride_residual_row, or unused
    weight_ptr,  # (n_cols,) LayerNorm gain
    dx_ptr,  # (n_rows, n_cols) contiguous: d(x + bias + residual)
    dweight_partial_ptr,  # (programs, n_cols) fp32
    dln_bias_partial_ptr,  # (programs, n_cols) fp32
    dbias_partial_ptr,  # (programs, n_cols) fp32 (HAS_BIAS), else unused
    stride_dout_row,
    stride_x_row,
    stride_residual_row,
    stride_dx_row,
    n_rows,
    n_cols,
    n_rows_per_program,
    eps,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: for each of its n_rows_per_program rows, recompute the sum and its statistics, write
    dx = d(sum); add dy * xhat, dy (and dx, for the bias) to fp32 partials, written once at the end.

    Above MAX_DBIAS_BLOCK columns the bias partial is left out (a fourth row-wide accumulator spills there) and
    the launcher sums dbias from dx instead."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    dln_bias = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row0 = pid.to(tl.int64) * n_rows_per_program
    for i in range(0, tl.minimum(n_rows_per_program, n_rows - row0)):
        row = row0 + i
        x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:  # reloaded per row (a cache hit): held across the loop it spills at 8192 columns
            x += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + row * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)
        dx, xhat = layer_norm_row_bwd(x, dy, w, mask, n_cols, eps)
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dweight += dy * xhat
        dln_bias += dy
        if HAS_BIAS and BLOCK_SIZE <= MAX_DBIAS_BLOCK:
            dbias += dx
    offs = pid.to(tl.int64) * n_cols + cols
    tl.store(dweight_partial_ptr + offs, dweight, mask=mask)
    tl.store(dln_bias_partial_ptr + offs, dln_bias, mask=mask)
    if HAS_BIAS and BLOCK_SIZE <= MAX_DBIAS_BLOCK:
        tl.store(dbias_partial_ptr + offs, dbias, mask=mask)


def bwd_programs(n_rows: int) -> tuple[int, int]:
    """(programs, rows a program) of a row-blocked backward over ``n_rows`` rows."""
    per = triton.cdiv(n_rows, min(n_rows, BWD_PROGRAMS))
    return triton.cdiv(n_rows, per), per


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


def add_layer_norm_bwd(
    dout: Tensor,
    x: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    ln_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dln_weight, dln_bias, dbias) of out = LayerNorm(x + bias + residual) from dout = d(out).

    dx (T, N) in x's dtype is also d(residual); dbias is an empty (0,) tensor when bias is None.
    """
    check_tensor(x, "x")
    x = rows_contiguous(x)
    n_rows, n_cols = x.shape
    bias = vector(bias, "bias", n_cols, x.dtype)
    ln_weight = vector(ln_weight, "ln_weight", n_cols, x.dtype)
    if residual is not None:
        check_tensor(residual, "residual", x.dtype)
        residual = rows_contiguous(residual)
    dout = grad_rows(dout, x)
    dx = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    empty = x.new_empty(0)
    if n_rows == 0 or n_cols == 0:
        zeros = x.new_zeros(n_cols)
        return dx, zeros, zeros.clone(), zeros.clone() if bias is not None else empty
    block, warps = layer_norm_config(n_cols)
    programs, per = bwd_programs(n_rows)
    partial = torch.empty(3 if bias is not None else 2, programs, n_cols, dtype=torch.float32, device=x.device)
    _add_layer_norm_bwd_kernel[(programs,)](
        dout,
        x,
        bias if bias is not None else x,
        residual if residual is not None else x,
        ln_weight,
        dx,
        partial[0],
        partial[1],
        partial[-1],
        dout.stride(0),
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        dx.stride(0),
        n_rows,
        n_cols,
        per,
        float(eps),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK_SIZE=block,
        num_warps=warps,
        num_stages=1,
    )
    if bias is None:
        dbias = empty
    else:
        dbias = column_sum(partial[2] if block <= MAX_DBIAS_BLOCK.value else dx, x.dtype)
    return dx, column_sum(partial[0], x.dtype), column_sum(partial[1], x.dtype), dbias


# ----------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops


@torch.library.custom_op(
    "fastbert_triton::add_layer_norm",
    mutates_args=(),
    schema="(Tensor x, Tensor? bias, Tensor? residual, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor",
)
def _add_layer_norm_op(x, bias, residual, ln_weight, ln_bias, eps):
    return add_layer_norm_fwd(x, bias, residual, ln_weight, ln_bias, eps)


@_add_layer_norm_op.register_fake
def _(x, bias, residual, ln_weight, ln_bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "fastbert_triton::add_layer_norm_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor x, Tensor? bias, Tensor? residual, Tensor ln_weight, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _add_layer_norm_backward_op(dout, x, bias, residual, ln_weight, eps):
    return add_layer_norm_bwd(dout, x, bias, residual, ln_weight, eps)


@_add_layer_norm_backward_op.register_fake
def _(dout, x, bias, residual, ln_weight, eps):
    n = x.shape[1]
    dbias = x.new_empty(n if bias is not None else 0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(n), x.new_empty(n), dbias


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, bias, residual, ln_weight, _, eps = inputs
    ctx.save_for_backward(x, bias, residual, ln_weight)
    ctx.eps = eps


def _add_layer_norm_backward(ctx, dout):
    x, bias, residual, ln_weight = ctx.saved_tensors
    dx, dln_weight, dln_bias, dbias = torch.ops.fastbert_triton.add_layer_norm_backward(
        dout, x, bias, residual, ln_weight, ctx.eps
    )
    return (
        dx,
        dbias if bias is not None else None,
        dx if residual is not None else None,
        dln_weight,
        dln_bias,
        None,
    )


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup_context)


def add_layernorm(x: Tensor, residual: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """LayerNorm(x + residual) over the last dim; residual may be None. x, residual: (T, N).

    Differentiable in x, residual, ln_weight and ln_bias."""
    if not through_op(x, residual, ln_weight, ln_bias):
        return add_layer_norm_fwd(x, None, residual, ln_weight, ln_bias, eps)
    return torch.ops.fastbert_triton.add_layer_norm(x, None, residual, ln_weight, ln_bias, float(eps))


def bias_residual_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float
) -> Tensor:
    """LayerNorm(x + bias + residual). x, residual: (T, N); bias: (N,) or None. Differentiable in every tensor."""
    if residual is None:
        raise ValueError("bias_residual_layernorm needs a residual (use add_layernorm without one)")
    if not through_op(x, bias, residual, ln_weight, ln_bias):
        return add_layer_norm_fwd(x, bias, residual, ln_weight, ln_bias, eps)
    return torch.ops.fastbert_triton.add_layer_norm(x, bias, residual, ln_weight, ln_bias, float(eps))


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, variant, BLOCK_SIZE, num_warps) the launchers can choose: forward, backward, and the
    column sums (fp32 partials into each storage dtype, and a storage-dtype gradient into itself for
    bias_activation's dbias)."""
    specs = []
    blocks = sorted({layer_norm_config(n)[0] for n in range(1, MAX_COLUMNS + 1, 63)} | {MAX_COLUMNS})
    kernels = ((_add_layer_norm_fwd_kernel, "layer_norm", False), (_add_layer_norm_bwd_kernel, "layer_norm_bwd", True))
    for kernel, name, training in kernels:
        for dtype in TRITON_TYPES:
            for has_bias, has_residual in ((False, False), (False, True), (True, True)):
                for block in blocks:
                    specs.append(
                        kernel_spec(
                            kernel,
                            dtype,
                            {"HAS_BIAS": has_bias, "HAS_RESIDUAL": has_residual, "BLOCK_SIZE": block},
                            num_warps=row_warps(block),
                            num_stages=1,
                            label=f"{name}-{dtype_name(dtype)}-bias{int(has_bias)}-res{int(has_residual)}-B{block}",
                            training=training,
                        )
                    )
    for dtype in TRITON_TYPES:
        for source in {torch.float32, dtype}:
            specs.append(
                kernel_spec(
                    _column_sum_kernel,
                    dtype,
                    {"BLOCK_ROWS": SUM_BLOCK_ROWS, "BLOCK_COLS": SUM_BLOCK_COLS},
                    num_warps=4,
                    num_stages=1,
                    label=f"column_sum-{dtype_name(source)}-to-{dtype_name(dtype)}",
                    pointer_types={"x_ptr": f"*{TRITON_TYPES[source]}"},
                    training=True,
                )
            )
    return specs
