"""Plain-PyTorch versions of every fused op.

This module is three things at once: the ``torch`` backend (runs anywhere), the test oracle (every fused
kernel is compared with these functions evaluated in float64) and the baseline of the per-op benchmarks.
Every backend (``fastbert._cpp`` for the C++ extension, ``fastbert.kernels`` for Triton) exposes functions
with exactly these names and signatures; ``fastbert.ops`` picks one of them.

Conventions: activations are packed tokens ``(total_tokens, features)``; ``cu_seqlens`` is int32
``(batch + 1,)`` with ``cu_seqlens[0] == 0`` and ``cu_seqlens[-1] == total_tokens``. Statistics (LayerNorm
moments, softmax) are computed in float32 (float64 for float64 inputs) whatever the storage dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .padding import tracing

#: Activation names understood by every backend (``None`` = identity).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def activation(x: Tensor, name: str | None) -> Tensor:
    """Apply a named activation: ``gelu`` (exact erf), ``gelu_tanh``, ``relu``, ``silu``, ``tanh`` or None."""
    if name is None:
        return x
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    if name == "tanh":
        return torch.tanh(x)
    raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)} or None")


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim with statistics in fp32 (fp64 for fp64 input); output in x.dtype."""
    xs = x.to(_stat_dtype(x))
    y = F.layer_norm(xs, (x.shape[-1],), weight.to(xs.dtype), bias.to(xs.dtype), eps)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Fused ops (the backend interface)
# ----------------------------------------------------------------------------------------------------------


def embeddings(
    input_ids: Tensor,
    position_ids: Tensor,
    token_type_ids: Tensor | None,
    word_weight: Tensor,
    position_weight: Tensor,
    token_type_weight: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
) -> Tensor:
    """LayerNorm(word[ids] + position[pos] + type[tt]).

    input_ids, position_ids, token_type_ids: (total_tokens,) integer; token_type_ids may be None (no token
    types, e.g. DistilBERT) and token_type_weight then must be None too. Weights: (rows, E). Returns (T, E).
    """
    x = word_weight[input_ids] + position_weight[position_ids]
    if token_type_weight is not None:
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = x + token_type_weight[tt]
    return layer_norm(x, ln_weight, ln_bias, eps)


def add_layernorm(x: Tensor, residual: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float) -> Tensor:
    """LayerNorm(x + residual) over the last dim; residual may be None. x, residual: (T, N)."""
    if residual is not None:
        x = x + residual
    return layer_norm(x, ln_weight, ln_bias, eps)


def bias_activation(x: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
    """act(x + bias). x: (T, N), bias: (N,) or None."""
    if bias is not None:
        x = x + bias
    return activation(x, act)


def bias_residual_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float
) -> Tensor:
    """LayerNorm(x + bias + residual). x, residual: (T, N); bias: (N,) or None."""
    if bias is not None:
        x = x + bias
    return add_layernorm(x, residual, ln_weight, ln_bias, eps)


def prepack_linear(weight: Tensor) -> Any:
    """Backend-specific prepacked form of a (N, K) weight, or None. The torch backend needs none."""
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None, packed: Any = None) -> Tensor:
    """act(x @ weight.T + bias). x: (T, K), weight: (N, K), bias: (N,) or None. Returns (T, N)."""
    return activation(F.linear(x, weight, bias), act)


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
    return bias_residual_layernorm(F.linear(x, weight), bias, residual, ln_weight, ln_bias, eps)


def attention(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float) -> Tensor:
    """Non-causal multi-head attention over packed sequences.

    qkv: (total_tokens, 3 * num_heads * head_dim), laid out [q heads | k heads | v heads] per token (the fused
    QKV projection's output). cu_seqlens: int32 (batch + 1,). Token i attends only to tokens of its own
    sequence. Softmax in fp32 (fp64 for fp64 input). Returns (total_tokens, num_heads * head_dim).
    """
    total = qkv.shape[0]
    hidden = qkv.shape[1] // 3
    head_dim = hidden // num_heads
    batch = cu_seqlens.numel() - 1
    if batch == 0:
        return qkv.new_empty(total, hidden)
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    # max_seqlen may be symbolic (torch.compile / export pass the padded width); compute it only when not given.
    seqlen = max_seqlen if max_seqlen > 0 else int(lengths.max())
    if not tracing() and int(lengths.max()) > seqlen:
        raise ValueError(
            f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({int(lengths.max())} tokens)"
        )
    # Scatter packed tokens into a (batch, seqlen) grid once, run dense attention with a key mask, gather back.
    # Integer indices rather than a boolean mask, and no branch on total: both would read a data-dependent size.
    seq = torch.repeat_interleave(torch.arange(batch, device=qkv.device), lengths, output_size=total)  # (T,)
    slot = torch.arange(total, device=qkv.device) + seq * seqlen - cu[seq]  # (T,) row in the flat grid
    grid = qkv.new_zeros(batch * seqlen, 3, num_heads, head_dim)
    grid = grid.index_copy(0, slot, qkv.view(total, 3, num_heads, head_dim)).view(batch, seqlen, 3, num_heads, head_dim)
    valid = torch.arange(seqlen, device=qkv.device)[None, :] < lengths[:, None]  # (batch, seqlen)
    q, k, v = (grid[:, :, i].transpose(1, 2).to(_stat_dtype(qkv)) for i in range(3))  # (batch, heads, seq, dim)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of empty sequences have no keys at all
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(batch * seqlen, hidden)  # (batch * seq, hidden)
    return ctx.index_select(0, slot).to(qkv.dtype)
