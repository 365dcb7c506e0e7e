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

#: Every op here is differentiable through PyTorch's autograd (no in-place writes to saved tensors).
DIFFERENTIABLE = True
#: linear_residual_layernorm takes a bfloat16 x with a float32 residual and returns float32 (type promotion).
FLOAT32_RESIDUAL = True

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
    """LayerNorm(x @ weight.T + bias + residual). x: (T, K), weight: (N, K), residual: (T, N).

    A bfloat16 x (and weight) may come with a float32 residual: the GEMM output (bias included) is rounded to
    bfloat16, as a bfloat16 GEMM writes it, and the sum, LayerNorm and output are float32.
    """
    return add_layernorm(F.linear(x, weight, bias), residual, ln_weight, ln_bias, eps)


# ----------------------------------------------------------------------------------------------------------
# Attention dropout: one counter-based hash, identical in every backend
# ----------------------------------------------------------------------------------------------------------

_U32 = 0xFFFFFFFF


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32) (a bijection of uint32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _U32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _U32
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold of attention dropout at rate p: a probability is kept when its bits are >= it.

    floor(p * 2**32), computed on the host in float64 by every backend, so all of them keep the same entries.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention dropout_p must be in [0, 1), got {p}")
    return int(p * 4294967296.0)


def dropout_bits(seed: int | Tensor, head: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """The uint32 random bits (as int64) deciding whether query ``row`` keeps key ``col`` in ``head``.

    seed: in [0, 2**32); head: head index; row: the query's packed token index (0 .. total_tokens - 1); col: the
    key's index within its sequence (0 .. len - 1). All broadcast. The C++ and Triton kernels compute exactly
    this (three rounds of ``_fmix32``), so a mask is regenerated in backward and is the same on every backend:

        x = fmix32((seed + head * 0x9E3779B9) mod 2**32)
        x = fmix32((x + row) mod 2**32)
        bits = fmix32((x + col) mod 2**32)
    """
    seed = torch.as_tensor(seed, dtype=torch.int64, device=head.device)
    x = _fmix32((seed + head.long() * 0x9E3779B9) & _U32)
    x = _fmix32((x + row.long()) & _U32)
    return _fmix32((x + col.long()) & _U32)


def check_dropout(dropout_p: float, seed: Tensor | None, device: torch.device | None = None) -> None:
    """Attention dropout arguments, for every backend: p in [0, 1); a seed (int64 tensor of one element in
    [0, 2**32), on ``device`` when given) when p > 0."""
    dropout_threshold(dropout_p)
    if dropout_p > 0 and seed is None:
        raise ValueError(f"attention dropout_p = {dropout_p} needs a seed (an int64 tensor of one element)")
    if seed is not None and (not isinstance(seed, Tensor) or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError(
            "attention seed must be an int64 tensor of one element, got "
            f"{getattr(seed, 'dtype', type(seed).__name__)} of shape {tuple(getattr(seed, 'shape', ()))}"
        )
    if seed is not None and device is not None and seed.device != device:
        raise ValueError(f"attention seed is on {seed.device} but qkv is on {device}")
    if seed is not None and seed.device.type == "cpu" and not tracing() and not 0 <= int(seed) < 2**32:
        raise ValueError(f"attention seed must be in [0, 2**32), got {int(seed)}")  # (a device seed is not read)


def attention(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """Non-causal multi-head attention over packed sequences, with optional dropout on the probabilities.

    qkv: (total_tokens, 3 * num_heads * head_dim), laid out [q heads | k heads | v heads] per token (the fused
    QKV projection's output). cu_seqlens: int32 (batch + 1,). Token i attends only to tokens of its own
    sequence. Softmax in fp32 (fp64 for fp64 input). Returns (total_tokens, num_heads * head_dim).

    dropout_p > 0 (training, as transformers' ``attention_probs_dropout_prob``): probability (head, query row i,
    key j) is kept when ``dropout_bits(seed, head, i, j) >= dropout_threshold(dropout_p)`` and then scaled by
    1 / (1 - dropout_p); the softmax normaliser counts every key. seed: int64 tensor of one element in
    [0, 2**32), on qkv's device.
    """
    check_dropout(dropout_p, seed, qkv.device)
    total = qkv.shape[0]
    hidden = qkv.shape[1] // 3
    head_dim = hidden // num_heads
    batch = cu_seqlens.numel() - 1
    if batch == 0:
        return qkv.new_zeros(total, hidden) + 0 * qkv.sum()  # keeps the graph: a gradient of zeros, not None
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
    if dropout_p > 0:
        pos = torch.arange(seqlen, device=qkv.device)
        heads = torch.arange(num_heads, device=qkv.device)[None, :, None, None]
        rows = (cu[:-1, None] + pos[None, :])[:, None, :, None]  # (batch, 1, seq, 1): packed query index
        bits = dropout_bits(seed.reshape(()), heads, rows, pos[None, None, None, :])  # (batch, heads, seq, seq)
        probs = probs * (bits >= dropout_threshold(dropout_p)).to(probs.dtype) / (1.0 - dropout_p)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(batch * seqlen, hidden)  # (batch * seq, hidden)
    return ctx.index_select(0, slot).to(qkv.dtype)


# ----------------------------------------------------------------------------------------------------------
# int8 inference (``quantize="int8"``; fastbert.quantize). Activations: per row (token) asymmetric uint8,
# x ~ scale * (q - zp). Weights: per output channel symmetric int8, w ~ weight_scale * weight_q. A GEMM's
# output is scale * weight_scale * (sum_k q w_q - zp * weight_sum) + bias, weight_sum = sum_k w_q (exact in
# float32). The cpp backend computes exactly this; quantize_rows bit for bit (float32 arithmetic, round half
# to even), the GEMM exactly in integers, the epilogue up to float32 rounding. No gradients: int8 is inference.
# ----------------------------------------------------------------------------------------------------------


def int8_quantize(x: Tensor, smooth_inv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(q uint8 (rows, n), scale float32 (rows,), zp int32 (rows,)) of float32 rows ``x * smooth_inv``.

    lo = min(0, min v), hi = max(0, max v), scale = (hi - lo) / 255 (1 for an all-zero row), zp = rint(-lo /
    scale), q = clamp(rint(v * (1 / scale)) + zp, 0, 255). A NaN or infinity raises ValueError naming its row.
    """
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"int8_quantize takes 2-D float32 rows, got {x.dtype} of shape {tuple(x.shape)}")
    v = x * smooth_inv.float() if smooth_inv is not None else x
    zero = v.new_zeros(())
    lo = torch.minimum(v.amin(1), zero) if v.shape[1] else v.new_zeros(v.shape[0])
    hi = torch.maximum(v.amax(1), zero) if v.shape[1] else v.new_zeros(v.shape[0])
    scale = (hi - lo) / 255.0
    bad = ~torch.isfinite(scale) | ~torch.isfinite(v).all(1)
    if not tracing() and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"int8 quantization: row {row} holds a NaN or an infinity (or a range past float32), which int8 "
            "cannot represent"
        )
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1.0 / scale
    zp = torch.round(-lo * inv).clamp(0, 255)
    q = (torch.round(v * inv[:, None]) + zp[:, None]).clamp(0, 255)
    return q.to(torch.uint8), scale, zp.to(torch.int32)


def int8_prepack(weight_q: Tensor) -> Tensor:
    """The weight in the form the int8 GEMM reads: here the int8 tensor itself."""
    return weight_q


def _int8_gemm(
    q: Tensor, scale: Tensor, zp: Tensor, weight_q: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias
) -> Tensor:
    """The dequantized product in float64 (exact integer sums: |sum| < 2^53)."""
    acc = q.double() @ weight_q.double().t()
    y = scale.double()[:, None] * weight_scale.double() * (acc - zp.double()[:, None] * weight_sum.double())
    return y + bias.double() if bias is not None else y


def int8_linear(
    q: Tensor,
    scale: Tensor,
    zp: Tensor,
    weight_q: Tensor,
    weight_scale: Tensor,
    weight_sum: Tensor,
    bias: Tensor | None,
    act: str | None = None,
    packed: Any = None,
) -> Tensor:
    """act(dequantized q @ weight_q.T + bias), float32 (computed in float64)."""
    y = _int8_gemm(q, scale, zp, weight_q, weight_scale, weight_sum, bias)
    return activation(y, act).float()


def int8_linear_quantize(
    q: Tensor,
    scale: Tensor,
    zp: Tensor,
    weight_q: Tensor,
    weight_scale: Tensor,
    weight_sum: Tensor,
    bias: Tensor | None,
    act: str | None = None,
    smooth_inv: Tensor | None = None,
    packed: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``int8_linear``'s output quantized for the next GEMM (``int8_quantize`` with that GEMM's ``smooth_inv``)."""
    return int8_quantize(int8_linear(q, scale, zp, weight_q, weight_scale, weight_sum, bias, act), smooth_inv)


def int8_linear_residual_layernorm(
    q: Tensor,
    scale: Tensor,
    zp: Tensor,
    weight_q: Tensor,
    weight_scale: Tensor,
    weight_sum: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    packed: Any = None,
) -> Tensor:
    """LayerNorm(dequantized q @ weight_q.T + bias + residual), float32 (computed in float64)."""
    y = _int8_gemm(q, scale, zp, weight_q, weight_scale, weight_sum, bias) + residual.double()
    return layer_norm(y, ln_weight.double(), ln_bias.double(), eps).float()


def int8_linear_residual_layernorm_quantize(
    q: Tensor,
    scale: Tensor,
    zp: Tensor,
    weight_q: Tensor,
    weight_scale: Tensor,
    weight_sum: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    smooth_inv: Tensor | None = None,
    packed: Any = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, q, scale, zp): ``int8_linear_residual_layernorm``'s output and its quantized form for the next GEMM."""
    y = int8_linear_residual_layernorm(
        q, scale, zp, weight_q, weight_scale, weight_sum, bias, residual, ln_weight, ln_bias, eps
    )
    return (y, *int8_quantize(y, smooth_inv))


def int8_info() -> str:
    """How int8 GEMMs run on this backend: exact float64 products of the integers."""
    return "reference"
