"""act(x + bias) elementwise, forward and backward: the epilogue of the FFN-up projection (exact erf GELU for
BERT).

Backward: dx = dy * act'(x + bias), recomputing x + bias from the saved input (elementwise, one pass), and
dbias = the column sum of dx (``layer_norm.column_sum``: fp32, fixed order, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TRITON_TYPES, KernelSpec, check_tensor, dtype_name, grad_rows, kernel_spec, through_op, vector
from .layer_norm import column_sum

#: Activation names (None = identity), as in fastbert.reference.
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
#: Elements per program: 2048 = 8 per thread at 8 warps, enough loads in flight to stream at full bandwidth.
BLOCK_SIZE = 2048
NUM_WARPS = 8


@triton.jit
def _tanh(x):
    """tanh from exp of a non-positive argument: exact to fp32 rounding, never overflows (tl.math has no tanh
    that runs both compiled and in the interpreter on every supported Triton version)."""
    t = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """x (fp32) through the named activation."""
    if ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # exact GELU: x * Phi(x); 1/sqrt(2)
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # sqrt(2/pi)
    elif ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == "tanh":
        x = _tanh(x)
    return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act / dx at x (fp32), for every activation of ``_activation`` (identity: 1)."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))  # Phi(x)
        d = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)  # + x * phi(x); 1/sqrt(2 pi)
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        # d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACTIVATION == "relu":
        d = tl.where(x > 0.0, 1.0, 0.0)  # 0 at x = 0, as torch's relu backward
    elif ACTIVATION == "silu":
        sig = 1.0 / (1.0 + tl.exp(-x))  # exp overflows to inf for x < -88: sig = 0, d = 0
        d = sig * (1.0 + x * (1.0 - sig))
    elif ACTIVATION == "tanh":
        t = _tanh(x)
        d = 1.0 - t * t
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _bias_activation_kernel(
    x_ptr,  # (n_rows, n_cols) contiguous, read as n_elements flat values
    bias_ptr,  # (n_cols,) or unused
    out_ptr,  # (n_rows, n_cols) contiguous; may be x_ptr
    n_elements,
    n_cols,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: BLOCK_SIZE consecutive elements of the flattened tensor, out = act(x + bias[col]) in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    x = _activation(x, ACTIVATION)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_activation_bwd_kernel(
    dout_ptr,  # (n_rows, n_cols) contiguous
    x_ptr,  # (n_rows, n_cols) contiguous: the forward's input
    bias_ptr,  # (n_cols,) or unused
    dx_ptr,  # (n_rows, n_cols) contiguous
    n_elements,
    n_cols,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: BLOCK_SIZE consecutive elements, dx = dy * act'(x + bias[col]) in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (dy * _activation_grad(x, ACTIVATION)).to(dx_ptr.dtype.element_ty), mask=mask)


def _check_activation(act: str | None) -> None:
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)} or None")


def bias_activation_fwd(x: Tensor, bias: Tensor | None, act: str | None, out: Tensor | None = None) -> Tensor:
    """act(x + bias) into ``out`` (a new tensor when None; may be x itself). x: (T, N), bias: (N,) or None."""
    _check_activation(act)
    check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, features), got shape {tuple(x.shape)}")
    x = x.contiguous()
    bias = vector(bias, "bias", x.shape[1], x.dtype)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    _bias_activation_kernel[grid](
        x,
        bias if bias is not None else x,
        out,
        n,
        x.shape[1],
        HAS_BIAS=bias is not None,
        ACTIVATION=act,
        BLOCK_SIZE=BLOCK_SIZE,
        num_warps=NUM_WARPS,
        num_stages=1,
    )
    return out


def bias_activation_bwd(dout: Tensor, x: Tensor, bias: Tensor | None, act: str | None) -> tuple[Tensor, Tensor]:
    """(dx, dbias) of out = act(x + bias) from dout = d(out); dbias is an empty (0,) tensor when bias is None.

    dx (T, N) in x's dtype is also d(x + bias), which is what a GEMM before the epilogue needs.
    """
    _check_activation(act)
    check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, features), got shape {tuple(x.shape)}")
    x = x.contiguous()
    bias = vector(bias, "bias", x.shape[1], x.dtype)
    dout = grad_rows(dout, x)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n:
        _bias_activation_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
            dout,
            x,
            bias if bias is not None else x,
            dx,
            n,
            x.shape[1],
            HAS_BIAS=bias is not None,
            ACTIVATION=act,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            num_stages=1,
        )
    dbias = column_sum(dx, x.dtype) if bias is not None else x.new_empty(0)
    return dx, dbias


# ----------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops


@torch.library.custom_op(
    "fastbert_triton::bias_activation", mutates_args=(), schema="(Tensor x, Tensor? bias, str? act) -> Tensor"
)
def _bias_activation_op(x, bias, act):
    return bias_activation_fwd(x, bias, act)


@_bias_activation_op.register_fake
def _(x, bias, act):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "fastbert_triton::bias_activation_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor x, Tensor? bias, str? act) -> (Tensor, Tensor)",
)
def _bias_activation_backward_op(dout, x, bias, act):
    return bias_activation_bwd(dout, x, bias, act)


@_bias_activation_backward_op.register_fake
def _(dout, x, bias, act):
    dbias = x.new_empty(x.shape[1] if bias is not None else 0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dbias


def _bias_activation_setup_context(ctx, inputs, output):
    x, bias, act = inputs
    ctx.save_for_backward(x, bias)
    ctx.act = act


def _bias_activation_backward(ctx, dout):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.fastbert_triton.bias_activation_backward(dout, x, bias, ctx.act)
    return dx, dbias if bias is not None else None, None


_bias_activation_op.register_autograd(_bias_activation_backward, setup_context=_bias_activation_setup_context)


def bias_activation(x: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
    """act(x + bias). x: (T, N), bias: (N,) or None. Differentiable in x and bias."""
    _check_activation(act)
    if not through_op(x, bias):
        return bias_activation_fwd(x, bias, act)
    return torch.ops.fastbert_triton.bias_activation(x, bias, act)


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, activation, bias) variant of the forward and the backward kernel; the launch parameters are
    fixed. (dbias's column sum is layer_norm's kernel, compiled with layer_norm's specs.)"""
    specs = []
    kernels = (
        (_bias_activation_kernel, "bias_activation", False),
        (_bias_activation_bwd_kernel, "bias_activation_bwd", True),
    )
    for kernel, name, training in kernels:
        for dtype in TRITON_TYPES:
            for act in (None, *ACTIVATIONS):
                for has_bias in (False, True):
                    specs.append(
                        kernel_spec(
                            kernel,
                            dtype,
                            {"HAS_BIAS": has_bias, "ACTIVATION": act, "BLOCK_SIZE": BLOCK_SIZE},
                            num_warps=NUM_WARPS,
                            num_stages=1,
                            label=f"{name}-{dtype_name(dtype)}-{act}-bias{int(has_bias)}",
                            aligned_sizes=("n_elements", "n_cols"),
                            training=training,
                        )
                    )
    return specs
