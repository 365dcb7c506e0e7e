"""Embeddings: LayerNorm(word[ids] + position[pos] + type[tt]) in one pass over the packed tokens."""

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
    vector,
)
from .layer_norm import layer_norm_row

#: Widest embedding one program holds in registers (as for LayerNorm).
MAX_COLUMNS = 8192
MIN_BLOCK = 64


@triton.jit
def _embeddings_fwd_kernel(
    input_ids_ptr,  # (n_tokens,) int64
    position_ids_ptr,  # (n_tokens,) int64
    token_type_ids_ptr,  # (n_tokens,) int64, or unused
    word_ptr,  # (vocab_size, n_cols), row stride stride_word_row
    position_ptr,  # (n_positions, n_cols), row stride stride_position_row
    type_ptr,  # (n_types, n_cols), row stride stride_type_row, or unused
    weight_ptr,  # (n_cols,) LayerNorm gain
    ln_bias_ptr,  # (n_cols,) LayerNorm shift
    out_ptr,  # (n_tokens, n_cols) contiguous
    stride_word_row,
    stride_position_row,
    stride_type_row,
    stride_out_row,
    n_cols,
    vocab_size,
    n_positions,
    n_types,
    eps,
    HAS_TYPES: tl.constexpr,
    HAS_TYPE_IDS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: the embedding row of one token, LayerNorm'd with fp32 statistics.

    An id outside its table contributes a zero row instead of being read (the launcher rejects such ids
    before launching; the mask keeps the kernel inside the tables whatever it is given).
    """
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    wid = tl.load(input_ids_ptr + tok)
    w_ok = (wid >= 0) & (wid < vocab_size)
    wid = tl.where(w_ok, wid, 0)
    # A bad id loads nothing: its row mask is cols < 0 (a scalar limit keeps the mask a plain vector compare).
    x = tl.load(word_ptr + wid * stride_word_row + cols, mask=cols < tl.where(w_ok, n_cols, 0), other=0.0)
    x = x.to(tl.float32)
    pid = tl.load(position_ids_ptr + tok)
    p_ok = (pid >= 0) & (pid < n_positions)
    pid = tl.where(p_ok, pid, 0)
    p_mask = cols < tl.where(p_ok, n_cols, 0)
    x += tl.load(position_ptr + pid * stride_position_row + cols, mask=p_mask, other=0.0).to(tl.float32)
    if HAS_TYPES:
        if HAS_TYPE_IDS:
            tid = tl.load(token_type_ids_ptr + tok)
            t_ok = (tid >= 0) & (tid < n_types)
            tid = tl.where(t_ok, tid, 0)
            t_mask = cols < tl.where(t_ok, n_cols, 0)
            x += tl.load(type_ptr + tid * stride_type_row + cols, mask=t_mask, other=0.0).to(tl.float32)
        else:  # no token_type_ids given: every token has type 0, as in transformers
            x += tl.load(type_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    layer_norm_row(x, cols, mask, n_cols, eps, weight_ptr, ln_bias_ptr, out_ptr, tok, stride_out_row)


def embeddings_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for embeddings of width ``n_cols``."""
    if n_cols > MAX_COLUMNS:
        raise ValueError(f"embedding width {n_cols}: the triton kernel handles at most {MAX_COLUMNS}")
    block = max(MIN_BLOCK, next_power_of_2(n_cols))
    return block, row_warps(block)


def _ids(t: Tensor, name: str, n_tokens: int, n_rows: int, device: torch.device) -> Tensor:
    """``t`` as a contiguous int64 (n_tokens,) tensor, every value checked to index a table of ``n_rows`` rows."""
    if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.shape != (n_tokens,):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be ({n_tokens},)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the embedding tables are on {device}")
    # One host check per call (skipped while a CUDA graph is being captured, where a sync is not allowed; the
    # kernel masks out-of-range ids, so it never reads outside a table either way).
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    if n_tokens and not capturing:
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n_rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} contains {bad} but the table has {n_rows} rows (valid: 0..{n_rows - 1})")
    return t.to(torch.int64).contiguous()


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

    input_ids, position_ids, token_type_ids: (total_tokens,) integer; token_type_ids may be None (type 0 for
    every token when token_type_weight exists). Weights: (rows, E), rows with unit stride. Returns (T, E).
    """
    check_tensor(word_weight, "word_weight")
    dtype, device = word_weight.dtype, word_weight.device
    if word_weight.dim() != 2 or word_weight.stride(1) != 1:
        raise ValueError(
            f"word_weight must be a (vocab, E) table with unit column stride, got {tuple(word_weight.shape)}"
        )
    n_cols = word_weight.shape[1]
    check_tensor(position_weight, "position_weight", dtype)
    if position_weight.dim() != 2 or position_weight.shape[1] != n_cols or position_weight.stride(1) != 1:
        raise ValueError(
            f"position_weight has shape {tuple(position_weight.shape)}; expected (max_positions, {n_cols})"
        )
    if token_type_weight is not None:
        check_tensor(token_type_weight, "token_type_weight", dtype)
        if token_type_weight.dim() != 2 or token_type_weight.shape[1] != n_cols or token_type_weight.stride(1) != 1:
            raise ValueError(
                f"token_type_weight has shape {tuple(token_type_weight.shape)}; expected (types, {n_cols})"
            )
    elif token_type_ids is not None:
        raise ValueError("token_type_ids were given but the model has no token type embeddings")
    ln_weight = vector(ln_weight, "ln_weight", n_cols, dtype)
    ln_bias = vector(ln_bias, "ln_bias", n_cols, dtype)
    n_tokens = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() == 1 else -1
    if n_tokens < 0:
        raise ValueError(f"input_ids must be a 1-D (total_tokens,) tensor, got {getattr(input_ids, 'shape', None)}")
    input_ids = _ids(input_ids, "input_ids", n_tokens, word_weight.shape[0], device)
    position_ids = _ids(position_ids, "position_ids", n_tokens, position_weight.shape[0], device)
    n_types = token_type_weight.shape[0] if token_type_weight is not None else 0
    if token_type_ids is not None:
        token_type_ids = _ids(token_type_ids, "token_type_ids", n_tokens, n_types, device)
    out = torch.empty(n_tokens, n_cols, dtype=dtype, device=device)
    if n_tokens == 0:
        return out
    block, warps = embeddings_config(n_cols)
    _embeddings_fwd_kernel[(n_tokens,)](
        input_ids,
        position_ids,
        token_type_ids if token_type_ids is not None else input_ids,
        word_weight,
        position_weight,
        token_type_weight if token_type_weight is not None else word_weight,
        ln_weight,
        ln_bias,
        out,
        word_weight.stride(0),
        position_weight.stride(0),
        token_type_weight.stride(0) if token_type_weight is not None else 0,
        out.stride(0),
        n_cols,
        word_weight.shape[0],
        position_weight.shape[0],
        n_types,
        float(eps),
        HAS_TYPES=token_type_weight is not None,
        HAS_TYPE_IDS=token_type_ids is not None,
        BLOCK_SIZE=block,
        num_warps=warps,
        num_stages=1,
    )
    return out


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, token-type variant, BLOCK_SIZE, num_warps) the launcher can choose."""
    specs = []
    blocks = sorted({embeddings_config(n)[0] for n in range(1, MAX_COLUMNS + 1, 63)} | {MAX_COLUMNS})
    for dtype in TRITON_TYPES:
        for has_types, has_type_ids in ((False, False), (True, False), (True, True)):
            for block in blocks:
                specs.append(
                    kernel_spec(
                        _embeddings_fwd_kernel,
                        dtype,
                        {"HAS_TYPES": has_types, "HAS_TYPE_IDS": has_type_ids, "BLOCK_SIZE": block},
                        num_warps=row_warps(block),
                        num_stages=1,
                        label=f"embeddings-{dtype_name(dtype)}-types{int(has_types)}{int(has_type_ids)}-B{block}",
                    )
                )
    return specs
