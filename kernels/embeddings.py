"""Embeddings: LayerNorm(word[ids] + position[pos] + type[tt]) in one pass over the packed tokens, and its backward.

Backward: the LayerNorm backward per token (recomputing the gathered sum from the tables; dgamma, dbeta by
fp32 partials per program, then ``layer_norm.column_sum``), written as an fp32 d(sum) per token; then each
table's gradient by one program per table row, which sums the rows of the tokens with that id in token order:
the ids are sorted with ``torch.sort`` (stable) and each id's segment found with ``torch.searchsorted``, on the
device. Deterministic, no atomics; ids outside a table match no row, and a row no token uses gets zeros.
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
    through_op,
    vector,
)
from .layer_norm import bwd_programs, column_sum, layer_norm_row, layer_norm_row_bwd

#: Widest embedding one program holds in registers (as for LayerNorm).
MAX_COLUMNS = 8192
MIN_BLOCK = 64


@triton.jit
def _embedding_sum(
    tok,
    cols,
    mask,
    input_ids_ptr,
    position_ids_ptr,
    token_type_ids_ptr,
    word_ptr,
    position_ptr,
    type_ptr,
    stride_word_row,
    stride_position_row,
    stride_type_row,
    n_cols,
    vocab_size,
    n_positions,
    n_types,
    HAS_TYPES: tl.constexpr,
    HAS_TYPE_IDS: tl.constexpr,
):
    """word[ids[tok]] + position[pos[tok]] (+ type[tt[tok]]) in fp32, (BLOCK_SIZE,), 0 outside ``mask``.

    An id outside its table contributes a zero row instead of being read (the launcher rejects such ids
    before launching; the mask keeps the kernel inside the tables whatever it is given).
    """
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
    return x


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
    """One program: the embedding row of one token, LayerNorm'd with fp32 statistics."""
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = _embedding_sum(
        tok,
        cols,
        mask,
        input_ids_ptr,
        position_ids_ptr,
        token_type_ids_ptr,
        word_ptr,
        position_ptr,
        type_ptr,
        stride_word_row,
        stride_position_row,
        stride_type_row,
        n_cols,
        vocab_size,
        n_positions,
        n_types,
        HAS_TYPES,
        HAS_TYPE_IDS,
    )
    layer_norm_row(x, cols, mask, n_cols, eps, weight_ptr, ln_bias_ptr, out_ptr, tok, stride_out_row)


@triton.jit
def _embeddings_bwd_kernel(
    dout_ptr,  # (n_tokens, n_cols), row stride stride_dout_row
    input_ids_ptr,  # (n_tokens,) int64
    position_ids_ptr,  # (n_tokens,) int64
    token_type_ids_ptr,  # (n_tokens,) int64, or unused
    word_ptr,  # (vocab_size, n_cols), row stride stride_word_row
    position_ptr,  # (n_positions, n_cols), row stride stride_position_row
    type_ptr,  # (n_types, n_cols), row stride stride_type_row, or unused
    weight_ptr,  # (n_cols,) LayerNorm gain
    dx_acc_ptr,  # (n_tokens, n_cols) fp32 contiguous: d(sum) of each token
    dweight_partial_ptr,  # (programs, n_cols) fp32
    dln_bias_partial_ptr,  # (programs, n_cols) fp32
    stride_dout_row,
    stride_word_row,
    stride_position_row,
    stride_type_row,
    stride_dx_row,
    n_tokens,
    n_cols,
    vocab_size,
    n_positions,
    n_types,
    n_rows_per_program,
    eps,
    HAS_TYPES: tl.constexpr,
    HAS_TYPE_IDS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: the LayerNorm backward of n_rows_per_program tokens (the sum regathered from the tables),
    d(sum) stored in fp32; dgamma and dbeta summed into one row of fp32 partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    dln_bias = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    tok0 = pid.to(tl.int64) * n_rows_per_program
    for i in range(0, tl.minimum(n_rows_per_program, n_tokens - tok0)):
        tok = tok0 + i
        x = _embedding_sum(
            tok,
            cols,
            mask,
            input_ids_ptr,
            position_ids_ptr,
            token_type_ids_ptr,
            word_ptr,
            position_ptr,
            type_ptr,
            stride_word_row,
            stride_position_row,
            stride_type_row,
            n_cols,
            vocab_size,
            n_positions,
            n_types,
            HAS_TYPES,
            HAS_TYPE_IDS,
        )
        dy = tl.load(dout_ptr + tok * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)
        dx, xhat = layer_norm_row_bwd(x, dy, w, mask, n_cols, eps)
        tl.store(dx_acc_ptr + tok * stride_dx_row + cols, dx, mask=mask)
        dweight += dy * xhat
        dln_bias += dy
    offs = pid.to(tl.int64) * n_cols + cols
    tl.store(dweight_partial_ptr + offs, dweight, mask=mask)
    tl.store(dln_bias_partial_ptr + offs, dln_bias, mask=mask)


@triton.jit
def _embedding_table_bwd_kernel(
    order_ptr,  # (n_tokens,) int64: the tokens sorted by id (stable: in token order within an id)
    offsets_ptr,  # (table rows + 1,) int64: the tokens of id r are order[offsets[r]:offsets[r + 1]]
    dx_acc_ptr,  # (n_tokens, n_cols) fp32, row stride stride_dx_row
    dtable_ptr,  # (table rows, n_cols), row stride stride_dtable_row
    stride_dx_row,
    stride_dtable_row,
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: row r = program_id of the table's gradient, the sum of d(sum) over the tokens whose id is r,
    in token order (fp32), or zeros when no token has id r."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for j in range(tl.load(offsets_ptr + r), tl.load(offsets_ptr + r + 1)):
        tok = tl.load(order_ptr + j)
        acc += tl.load(dx_acc_ptr + tok * stride_dx_row + cols, mask=mask, other=0.0)
    tl.store(dtable_ptr + r * stride_dtable_row + cols, acc.to(dtable_ptr.dtype.element_ty), mask=mask)


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


def embeddings_fwd(
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
    """LayerNorm(word[ids] + position[pos] + type[tt]) (the launcher: checks, then one kernel)."""
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


def _table_grad(ids: Tensor, dx: Tensor, table: Tensor) -> Tensor:
    """d(table) (rows, E) in table's dtype: row r sums the rows of the fp32 ``dx`` of the tokens whose id is r."""
    dtable = torch.empty(table.shape, dtype=table.dtype, device=table.device)
    if table.shape[0] == 0 or table.shape[1] == 0:
        return dtable
    n_tokens, n_cols = dx.shape
    sorted_ids, order = torch.sort(ids, stable=True)
    # Segment starts of every id, on the device (no host sync): the first sorted index whose id is >= r.
    rows = torch.arange(table.shape[0] + 1, dtype=torch.int64, device=ids.device)
    offsets = torch.searchsorted(sorted_ids, rows)
    block, warps = embeddings_config(n_cols)
    _embedding_table_bwd_kernel[(table.shape[0],)](
        order,
        offsets,
        dx,
        dtable,
        dx.stride(0),
        dtable.stride(0),
        n_cols,
        BLOCK_SIZE=block,
        num_warps=warps,
        num_stages=1,
    )
    return dtable


def embeddings_bwd(
    dout: Tensor,
    input_ids: Tensor,
    position_ids: Tensor,
    token_type_ids: Tensor | None,
    word_weight: Tensor,
    position_weight: Tensor,
    token_type_weight: Tensor | None,
    ln_weight: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d word, d position, d token type, d ln_weight, d ln_bias) from dout = d(out) (T, E).

    d token type is an empty (0,) tensor when there is no type table. The ids are the forward's (checked
    there); here an id outside its table simply matches no row.
    """
    check_tensor(word_weight, "word_weight")
    dtype, device = word_weight.dtype, word_weight.device
    n_tokens, n_cols = input_ids.shape[0], word_weight.shape[1]
    if dout.shape != (n_tokens, n_cols):
        raise ValueError(f"gradient has shape {tuple(dout.shape)} but the output has {(n_tokens, n_cols)}")
    dout = dout.contiguous()
    ids = [t.to(torch.int64).contiguous() for t in (input_ids, position_ids)]
    if token_type_weight is not None:
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(ids[0])
        ids.append(tt.to(torch.int64).contiguous())
    ln_weight = vector(ln_weight, "ln_weight", n_cols, dtype)
    dx = torch.empty(n_tokens, n_cols, dtype=torch.float32, device=device)
    programs, per = bwd_programs(n_tokens) if n_tokens else (0, 0)
    partial = torch.zeros(2, max(programs, 1), n_cols, dtype=torch.float32, device=device)
    if n_tokens and n_cols:
        block, warps = embeddings_config(n_cols)
        _embeddings_bwd_kernel[(programs,)](
            dout,
            ids[0],
            ids[1],
            ids[2] if token_type_ids is not None else ids[0],
            word_weight,
            position_weight,
            token_type_weight if token_type_weight is not None else word_weight,
            ln_weight,
            dx,
            partial[0],
            partial[1],
            dout.stride(0),
            word_weight.stride(0),
            position_weight.stride(0),
            token_type_weight.stride(0) if token_type_weight is not None else 0,
            dx.stride(0),
            n_tokens,
            n_cols,
            word_weight.shape[0],
            position_weight.shape[0],
            token_type_weight.shape[0] if token_type_weight is not None else 0,
            per,
            float(eps),
            HAS_TYPES=token_type_weight is not None,
            HAS_TYPE_IDS=token_type_ids is not None,
            BLOCK_SIZE=block,
            num_warps=warps,
            num_stages=1,
        )
    d_word = _table_grad(ids[0], dx, word_weight)
    d_position = _table_grad(ids[1], dx, position_weight)
    d_type = (
        _table_grad(ids[2], dx, token_type_weight) if token_type_weight is not None else dx.new_empty(0, dtype=dtype)
    )
    return d_word, d_position, d_type, column_sum(partial[0], dtype), column_sum(partial[1], dtype)


# ----------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops


@torch.library.custom_op(
    "fastbert_triton::embeddings",
    mutates_args=(),
    schema="(Tensor input_ids, Tensor position_ids, Tensor? token_type_ids, Tensor word_weight, "
    "Tensor position_weight, Tensor? token_type_weight, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor",
)
def _embeddings_op(
    input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, ln_weight, ln_bias, eps
):
    return embeddings_fwd(
        input_ids,
        position_ids,
        token_type_ids,
        word_weight,
        position_weight,
        token_type_weight,
        ln_weight,
        ln_bias,
        eps,
    )


@_embeddings_op.register_fake
def _(
    input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, ln_weight, ln_bias, eps
):
    return word_weight.new_empty(input_ids.shape[0], word_weight.shape[1])


@torch.library.custom_op(
    "fastbert_triton::embeddings_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor input_ids, Tensor position_ids, Tensor? token_type_ids, Tensor word_weight, "
    "Tensor position_weight, Tensor? token_type_weight, Tensor ln_weight, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _embeddings_backward_op(
    dout, input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, ln_weight, eps
):
    return embeddings_bwd(
        dout, input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, ln_weight, eps
    )


@_embeddings_backward_op.register_fake
def _(dout, input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, ln_weight, eps):
    n = word_weight.shape[1]
    d_type = torch.empty_like(token_type_weight) if token_type_weight is not None else word_weight.new_empty(0)
    return (
        torch.empty_like(word_weight),
        torch.empty_like(position_weight),
        d_type,
        word_weight.new_empty(n),
        word_weight.new_empty(n),
    )


def _embeddings_setup_context(ctx, inputs, output):
    ids, pos, tt, word, position, types, ln_weight, _, eps = inputs
    ctx.save_for_backward(ids, pos, tt, word, position, types, ln_weight)
    ctx.eps = eps


def _embeddings_backward(ctx, dout):
    ids, pos, tt, word, position, types, ln_weight = ctx.saved_tensors
    d_word, d_position, d_type, d_ln_weight, d_ln_bias = torch.ops.fastbert_triton.embeddings_backward(
        dout, ids, pos, tt, word, position, types, ln_weight, ctx.eps
    )
    return None, None, None, d_word, d_position, d_type if types is not None else None, d_ln_weight, d_ln_bias, None


_embeddings_op.register_autograd(_embeddings_backward, setup_context=_embeddings_setup_context)


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
    Differentiable in every table and the LayerNorm parameters; each id is checked against its table.
    """
    args = (input_ids, position_ids, token_type_ids, word_weight, position_weight, token_type_weight, ln_weight)
    if not through_op(word_weight, position_weight, token_type_weight, ln_weight, ln_bias):
        return embeddings_fwd(*args, ln_bias, eps)
    return torch.ops.fastbert_triton.embeddings(
        input_ids,
        position_ids,
        token_type_ids,
        word_weight,
        position_weight,
        token_type_weight,
        ln_weight,
        ln_bias,
        float(eps),
    )


def aot_specs() -> list[KernelSpec]:
    """Every (dtype, token-type variant, BLOCK_SIZE, num_warps) the launchers can choose, forward and backward,
    and the table-gradient kernel at every BLOCK_SIZE."""
    specs = []
    blocks = sorted({embeddings_config(n)[0] for n in range(1, MAX_COLUMNS + 1, 63)} | {MAX_COLUMNS})
    kernels = ((_embeddings_fwd_kernel, "embeddings", False), (_embeddings_bwd_kernel, "embeddings_bwd", True))
    for dtype in TRITON_TYPES:
        for kernel, name, training in kernels:
            for has_types, has_type_ids in ((False, False), (True, False), (True, True)):
                for block in blocks:
                    specs.append(
                        kernel_spec(
                            kernel,
                            dtype,
                            {"HAS_TYPES": has_types, "HAS_TYPE_IDS": has_type_ids, "BLOCK_SIZE": block},
                            num_warps=row_warps(block),
                            num_stages=1,
                            label=f"{name}-{dtype_name(dtype)}-types{int(has_types)}{int(has_type_ids)}-B{block}",
                            training=training,
                        )
                    )
        for block in blocks:
            specs.append(
                kernel_spec(
                    _embedding_table_bwd_kernel,
                    dtype,
                    {"BLOCK_SIZE": block},
                    num_warps=row_warps(block),
                    num_stages=1,
                    label=f"embedding_table_bwd-{dtype_name(dtype)}-B{block}",
                    training=True,
                )
            )
    return specs
