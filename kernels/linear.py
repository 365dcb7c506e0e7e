"""Linear layers: the GEMM is cuBLAS through torch; bias (+ activation) or bias + residual + LayerNorm run as
one fused Triton pass over the GEMM's output, in place.

Backward: the epilogue's backward kernel (``bias_activation_bwd`` / ``add_layer_norm_bwd``) gives d(GEMM output)
and the bias gradient; dx and dweight are two more torch matmuls. The epilogue needs the GEMM's output, which the
in-place forward overwrites: when a backward can follow (grad mode on and an input requires grad) the forward
writes its result to a new tensor and keeps the GEMM output (the memory eager PyTorch would hold for the same
layer; no extra work); otherwise (inference) nothing changes, and a backward through such a call (only possible
by calling the op directly) recomputes the GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_tensor, needs_grad, through_op
from .bias_activation import ACTIVATIONS, bias_activation_fwd
from .layer_norm import add_layer_norm_fwd


def prepack_linear(weight: Tensor) -> Any:
    """cuBLAS takes the (N, K) weight as it is: nothing to prepack."""
    return None


def _matmul(x: Tensor, weight: Tensor) -> Tensor:
    check_tensor(x, "x")
    check_tensor(weight, "weight", x.dtype)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match as (T, K), (N, K)")
    return torch.matmul(x, weight.t())  # (T, N)


def _gemm_grads(ctx, dy: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dweight) of y = x @ weight.T from dy, each only when its input needs it."""
    dx = torch.matmul(dy, weight) if ctx.needs_input_grad[0] else None  # (T, K)
    dweight = torch.matmul(dy.t(), x) if ctx.needs_input_grad[1] else None  # (N, K)
    return dx, dweight


def _pre(pre: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The GEMM output the forward kept, or (forward run without keeping it: an empty (0,) tensor) recomputed."""
    return pre if pre.dim() == 2 else torch.matmul(x, weight.t())


# ----------------------------------------------------------------------------------------------------------
# act(x @ weight.T + bias)


@torch.library.custom_op(
    "fastbert_triton::linear_activation",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, str? act, bool save_pre) -> (Tensor, Tensor)",
)
def _linear_activation_op(x, weight, bias, act, save_pre):
    y = _matmul(x, weight)
    if save_pre:
        return bias_activation_fwd(y, bias, act), y
    return bias_activation_fwd(y, bias, act, out=y), y.new_empty(0)


@_linear_activation_op.register_fake
def _(x, weight, bias, act, save_pre):
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, x.new_empty(out.shape if save_pre else (0,))


def _linear_activation_setup_context(ctx, inputs, output):
    x, weight, bias, act, _ = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.act = act
    ctx.mark_non_differentiable(output[1])


def _linear_activation_backward(ctx, dout, _dpre):
    x, weight, bias, pre = ctx.saved_tensors
    dy, dbias = torch.ops.fastbert_triton.bias_activation_backward(dout, _pre(pre, x, weight), bias, ctx.act)
    dx, dweight = _gemm_grads(ctx, dy, x, weight)
    return dx, dweight, dbias if bias is not None else None, None, None


_linear_activation_op.register_autograd(_linear_activation_backward, setup_context=_linear_activation_setup_context)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None, packed: Any = None) -> Tensor:
    """act(x @ weight.T + bias). x: (T, K), weight: (N, K), bias: (N,) or None. Returns (T, N).

    Differentiable in x, weight and bias."""
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)} or None")
    if act is None:
        check_tensor(x, "x")
        check_tensor(weight, "weight", x.dtype)
        if bias is not None:
            check_tensor(bias, "bias", x.dtype)
        return F.linear(x, weight, bias)  # cuBLAS applies the bias in its epilogue; torch differentiates it
    if not through_op(x, weight, bias):
        y = _matmul(x, weight)
        return bias_activation_fwd(y, bias, act, out=y)
    out, _ = torch.ops.fastbert_triton.linear_activation(x, weight, bias, act, needs_grad(x, weight, bias))
    return out


# ----------------------------------------------------------------------------------------------------------
# LayerNorm(x @ weight.T + bias + residual)


@torch.library.custom_op(
    "fastbert_triton::linear_residual_layernorm",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, float eps, "
    "bool save_pre) -> (Tensor, Tensor)",
)
def _linear_residual_layernorm_op(x, weight, bias, residual, ln_weight, ln_bias, eps, save_pre):
    y = _matmul(x, weight)
    if save_pre:
        return add_layer_norm_fwd(y, bias, residual, ln_weight, ln_bias, eps), y
    return add_layer_norm_fwd(y, bias, residual, ln_weight, ln_bias, eps, out=y), y.new_empty(0)


@_linear_residual_layernorm_op.register_fake
def _(x, weight, bias, residual, ln_weight, ln_bias, eps, save_pre):
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, x.new_empty(out.shape if save_pre else (0,))


def _linear_residual_layernorm_setup_context(ctx, inputs, output):
    x, weight, bias, residual, ln_weight, _, eps, _ = inputs
    ctx.save_for_backward(x, weight, bias, residual, ln_weight, output[1])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])


def _linear_residual_layernorm_backward(ctx, dout, _dpre):
    x, weight, bias, residual, ln_weight, pre = ctx.saved_tensors
    dy, dln_weight, dln_bias, dbias = torch.ops.fastbert_triton.add_layer_norm_backward(
        dout, _pre(pre, x, weight), bias, residual, ln_weight, ctx.eps
    )
    dx, dweight = _gemm_grads(ctx, dy, x, weight)
    return dx, dweight, dbias if bias is not None else None, dy, dln_weight, dln_bias, None, None


_linear_residual_layernorm_op.register_autograd(
    _linear_residual_layernorm_backward, setup_context=_linear_residual_layernorm_setup_context
)


def linear_residual_layernorm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    packed: Any = None,
) -> Tensor:
    """LayerNorm(x @ weight.T + bias + residual). x: (T, K), weight: (N, K), residual: (T, N).

    Differentiable in every tensor."""
    if residual is None:
        raise ValueError("linear_residual_layernorm needs a residual")
    if not through_op(x, weight, bias, residual, ln_weight, ln_bias):
        y = _matmul(x, weight)
        return add_layer_norm_fwd(y, bias, residual, ln_weight, ln_bias, eps, out=y)
    save_pre = needs_grad(x, weight, bias, residual, ln_weight, ln_bias)
    out, _ = torch.ops.fastbert_triton.linear_residual_layernorm(
        x, weight, bias, residual, ln_weight, ln_bias, float(eps), save_pre
    )
    return out
