"""act(x + bias) elementwise: the epilogue of the FFN-up projection (exact erf GELU for BERT)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TRITON_TYPES, KernelSpec, check_tensor, dtype_name, kernel_spec, vector

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


def bias_activation_fwd(x: Tensor, bias: Tensor | None, act: str | None, out: Tensor | None = None) -> Tensor:
    """act(x + bias) into ``out`` (a new tensor when None; may be x itself). x: (T, N), bias: (N,) or None."""
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)} or None")
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


def bias_activation(x: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
    """act(x + bias). x: (T, N), bias: (N,) or None."""
    return bias_activation_fwd(x, bias, act)


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, activation, bias) variant; the launch parameters are fixed."""
    specs = []
    for dtype in TRITON_TYPES:
        for act in (None, *ACTIVATIONS):
            for has_bias in (False, True):
                specs.append(
                    kernel_spec(
                        _bias_activation_kernel,
                        dtype,
                        {"HAS_BIAS": has_bias, "ACTIVATION": act, "BLOCK_SIZE": BLOCK_SIZE},
                        num_warps=NUM_WARPS,
                        num_stages=1,
                        label=f"bias_activation-{dtype_name(dtype)}-{act}-bias{int(has_bias)}",
                        aligned_sizes=("n_elements", "n_cols"),
                    )
                )
    return specs
