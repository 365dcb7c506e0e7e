"""Linear layers: the GEMM is cuBLAS through torch; bias (+ activation) or bias + residual + LayerNorm run as
one fused Triton pass over the GEMM's output, in place."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_tensor
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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None, packed: Any = None) -> Tensor:
    """act(x @ weight.T + bias). x: (T, K), weight: (N, K), bias: (N,) or None. Returns (T, N)."""
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; supported: {', '.join(ACTIVATIONS)} or None")
    if act is None:
        check_tensor(x, "x")
        check_tensor(weight, "weight", x.dtype)
        if bias is not None:
            check_tensor(bias, "bias", x.dtype)
        return F.linear(x, weight, bias)  # cuBLAS applies the bias in its epilogue
    y = _matmul(x, weight)
    return bias_activation_fwd(y, bias, act, out=y)


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
    """LayerNorm(x @ weight.T + bias + residual). x: (T, K), weight: (N, K), residual: (T, N)."""
    if residual is None:
        raise ValueError("linear_residual_layernorm needs a residual")
    y = _matmul(x, weight)
    return add_layer_norm_fwd(y, bias, residual, ln_weight, ln_bias, eps, out=y)
