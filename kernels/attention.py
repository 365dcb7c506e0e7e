"""Non-causal multi-head attention over packed sequences (FlashAttention-2 style), forward and backward.

Forward: the grid is (query blocks, heads, sequences), sized by the host's ``max_seqlen`` so nothing is read
back from the device; keys stream through with an online softmax. For training it also stores each row's
softmax statistics (fp32, base 2: the running max m and the sum l, so log-sum-exp = m + log2(l)) and applies
dropout to the probabilities. (The log2 is left to the backward: in the forward's epilogue it pushed the fp32
kernel for sm_90 to 255 registers and spills; in the preprocess it is free.)

Backward (FlashAttention-2): ``lse = m + log2(l)`` and ``delta = rowsum(dO * O)`` per row (a preprocess kernel); dK and dV by one program
per key block that loops over the query blocks of its sequence; dQ by a separate program per query block that
loops over the key blocks (no atomics: deterministic, the only mode). Probabilities are recomputed from the
stored log-sum-exp; dropout masks are regenerated from the seed. Every program whose block starts past its
sequence's end returns at once: no work on padding. dQ, dK, dV land in one d(qkv) in the [q | k | v] layout.

Dropout bits: the counter-based hash of ``fastbert.reference.dropout_bits`` (three rounds of MurmurHash3's
fmix32 in uint32 arithmetic), bit-identical, from a seed the kernels read from a device tensor (no host sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastbert.reference import check_dropout, dropout_threshold  # the one definition of the dropout rule

from ._common import (
    TRITON_TYPES,
    KernelSpec,
    check_tensor,
    dtype_name,
    grad_rows,
    kernel_spec,
    needs_grad,
    next_power_of_2,
    through_op,
)

#: Largest head_dim handled (the fp32 accumulator is BLOCK_M x BLOCK_D registers).
MAX_HEAD_DIM = 128
#: Head dims the ahead-of-time test compiles: the BERT family's, and 16 for the smallest BLOCK_D (tiny test
#: models); any head_dim <= 128 runs.
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)
#: CUDA limits grid dims y and z to 65535: longer batches are launched in chunks of sequences.
MAX_GRID_Z = 65535
#: Tokens a program of the backward preprocess (delta = rowsum(dO * O)) handles.
PREPROCESS_BLOCK_M = 64


# ----------------------------------------------------------------------------------------------------------
# Dropout bits: fastbert.reference.dropout_bits in uint32 arithmetic


@triton.jit
def _fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 values (products wrap mod 2**32, shifts are logical)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _dropout_head_state(seed_ptr, head):
    """fmix32(seed + head * 0x9E3779B9): the first round, the same for every entry of one head (uint32).

    The seed is read from its int64 tensor and taken mod 2**32, as reference.dropout_bits masks it."""
    seed = tl.load(seed_ptr).to(tl.uint32)
    return _fmix32(seed + head.to(tl.uint32) * 0x9E3779B9)


@triton.jit
def _dropout_row_state(head_state, rows):
    """Second round, per packed query row: (BLOCK_M,) uint32 from (BLOCK_M,) int rows."""
    return _fmix32(head_state + rows.to(tl.uint32))


@triton.jit
def _dropout_threshold_u32(dropout_threshold):
    """The uint32 threshold floor(p * 2**32), passed as ``threshold - 2**31`` so it is always an i32 argument
    (one compiled signature for every p): flipping the top bit of its bit pattern undoes the offset."""
    return dropout_threshold.to(tl.uint32, bitcast=True) ^ 0x80000000


# ----------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attention_fwd_kernel(
    qkv_ptr,  # (n_tokens, 3 * NUM_HEADS * HEAD_DIM): [q heads | k heads | v heads], row stride stride_qkv_row
    out_ptr,  # (n_tokens, NUM_HEADS * HEAD_DIM), row stride stride_out_row
    stats_ptr,  # (n_tokens, NUM_HEADS, 2) fp32: row max and row sum of exp2 (STORE_STATS), else unused
    cu_seqlens_ptr,  # (batch + 1,) int32
    seed_ptr,  # (1,) int64 dropout seed (HAS_DROPOUT), else unused
    stride_qkv_row,
    stride_out_row,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    dropout_threshold,  # floor(p * 2**32) - 2**31 (HAS_DROPOUT)
    dropout_scale,  # 1 / (1 - p) (HAS_DROPOUT)
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2; the extra lanes are masked to 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots instead of tf32
    HAS_DROPOUT: tl.constexpr,
    STORE_STATS: tl.constexpr,
):
    """One program: BLOCK_M queries of one head of one sequence attend to all keys of that sequence.

    Keys stream through in BLOCK_N blocks with a running max and sum (fp32); the output is normalised once.
    Dropout zeroes a probability after the normaliser has counted it, and the kept ones are scaled by
    1 / (1 - p) at the end. STORE_STATS: the row's max and sum of exp2 (base-2 logits) for the backward.
    """
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    hidden = NUM_HEADS * HEAD_DIM  # constexpr: the q, k and v sections of a qkv row are this wide
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions within the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = qkv_ptr + start.to(tl.int64) * stride_qkv_row + head * HEAD_DIM
    q_ptrs = base + offs_m[:, None] * stride_qkv_row + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen) & d_ok[None, :], other=0.0)
    k_base = base + hidden
    v_base = base + 2 * hidden
    if HAS_DROPOUT:
        row_state = _dropout_row_state(_dropout_head_state(seed_ptr, head), start + offs_m)
        threshold = _dropout_threshold_u32(dropout_threshold)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n  # (BLOCK_N,) key positions
        kv_mask = (cols[:, None] < seqlen) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32
        # Every key block holds at least one real key (n0 < seqlen), so each row's max stays finite.
        s = tl.where(cols[None, :] < seqlen, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            bits = _fmix32(row_state[:, None] + cols[None, :].to(tl.uint32))
            p = tl.where(bits >= threshold, p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    m_ok = offs_m < seqlen
    rows = start.to(tl.int64) + offs_m  # packed token index of each query
    if STORE_STATS:
        stats = stats_ptr + (rows * NUM_HEADS + head) * 2
        tl.store(stats, m_i, mask=m_ok)
        tl.store(stats + 1, l_i, mask=m_ok)
    if HAS_DROPOUT:
        acc = acc * (dropout_scale / l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_out_row + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_bwd_preprocess_kernel(
    out_ptr,  # (n_tokens, NUM_HEADS * HEAD_DIM), row stride stride_out_row
    dout_ptr,  # (n_tokens, NUM_HEADS * HEAD_DIM), row stride stride_dout_row
    stats_ptr,  # (n_tokens, NUM_HEADS, 2) fp32 from the forward
    lse_ptr,  # (n_tokens, NUM_HEADS) fp32
    delta_ptr,  # (n_tokens, NUM_HEADS) fp32
    stride_out_row,
    stride_dout_row,
    n_tokens,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program: lse = m + log2(l) and delta = rowsum(dO * O) in fp32 for BLOCK_M tokens of one head.

    With dropout this is still rowsum(dP * P) of the softmax backward, because O already holds the dropped and
    rescaled probabilities."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_tokens) & (offs_d[None, :] < HEAD_DIM)
    cols = head * HEAD_DIM + offs_d[None, :]
    o = tl.load(out_ptr + rows[:, None] * stride_out_row + cols, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + rows[:, None] * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)
    row_ok = rows < n_tokens
    stat = rows * NUM_HEADS + head
    tl.store(delta_ptr + stat, tl.sum(o * do, axis=1), mask=row_ok)
    m = tl.load(stats_ptr + stat * 2, mask=row_ok, other=0.0)
    l_sum = tl.load(stats_ptr + stat * 2 + 1, mask=row_ok, other=1.0)
    tl.store(lse_ptr + stat, m + tl.log2(l_sum), mask=row_ok)


@triton.jit
def _attention_bwd_dkdv_kernel(
    qkv_ptr,  # (n_tokens, 3 * NUM_HEADS * HEAD_DIM), row stride stride_qkv_row
    dout_ptr,  # (n_tokens, NUM_HEADS * HEAD_DIM), row stride stride_dout_row
    dqkv_ptr,  # (n_tokens, 3 * NUM_HEADS * HEAD_DIM), row stride stride_dqkv_row: dK and dV sections written
    lse_ptr,  # (n_tokens, NUM_HEADS) fp32, from the preprocess
    delta_ptr,  # (n_tokens, NUM_HEADS) fp32, from the preprocess
    cu_seqlens_ptr,  # (batch + 1,) int32
    seed_ptr,  # (1,) int64 (HAS_DROPOUT), else unused
    stride_qkv_row,
    stride_dout_row,
    stride_dqkv_row,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    dropout_threshold,
    dropout_scale,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries a step
    BLOCK_N: tl.constexpr,  # keys a program
    IEEE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """One program: dK and dV of BLOCK_N keys of one head of one sequence, looping over its query blocks.

    Works on transposed tiles (keys x queries): P^T = exp2(K Q^T * qk_scale - lse), dV += (P^T o mask / (1-p))
    dO, dP^T = V dO^T (o mask / (1-p)), dS^T = P^T o (dP^T - delta), dK += dS^T Q, all accumulated in fp32.
    Key rows past the sequence's end compute garbage that is never stored; query rows past it get lse = +inf,
    hence P = 0, and contribute nothing.
    """
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - start
    if pid_n * BLOCK_N >= seqlen:
        return
    hidden = NUM_HEADS * HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions within the sequence
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_mask = (offs_n[:, None] < seqlen) & d_ok[None, :]
    start64 = start.to(tl.int64)
    base = qkv_ptr + start64 * stride_qkv_row + head * HEAD_DIM
    k = tl.load(base + hidden + offs_n[:, None] * stride_qkv_row + offs_d[None, :], mask=n_mask, other=0.0)
    v = tl.load(base + 2 * hidden + offs_n[:, None] * stride_qkv_row + offs_d[None, :], mask=n_mask, other=0.0)
    dout_base = dout_ptr + start64 * stride_dout_row + head * HEAD_DIM
    stat_base = start64 * NUM_HEADS + head
    if HAS_DROPOUT:
        head_state = _dropout_head_state(seed_ptr, head)
        threshold = _dropout_threshold_u32(dropout_threshold)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + offs_m  # (BLOCK_M,) query positions
        m_ok = rows < seqlen
        m_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(base + rows[:, None] * stride_qkv_row + offs_d[None, :], mask=m_mask, other=0.0)
        do = tl.load(dout_base + rows[:, None] * stride_dout_row + offs_d[None, :], mask=m_mask, other=0.0)
        lse = tl.load(lse_ptr + stat_base + rows * NUM_HEADS, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stat_base + rows * NUM_HEADS, mask=m_ok, other=0.0)
        if IEEE:
            s_t = tl.dot(k, tl.trans(q), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        else:
            s_t = tl.dot(k, tl.trans(q))
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if IEEE:
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dp_t = tl.dot(v, tl.trans(do))
        if HAS_DROPOUT:
            row_state = _dropout_row_state(head_state, start + rows)
            keep = _fmix32(row_state[None, :] + offs_n[:, None].to(tl.uint32)) >= threshold
            pd_t = tl.where(keep, p_t * dropout_scale, 0.0)
            dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
        else:
            pd_t = p_t
        ds_t = p_t * (dp_t - delta[None, :])
        if IEEE:
            dv += tl.dot(pd_t, do, input_precision="ieee")
            dk += tl.dot(ds_t, q, input_precision="ieee")
        else:
            dv += tl.dot(pd_t.to(do.dtype), do)
            dk += tl.dot(ds_t.to(q.dtype), q)
    dk *= sm_scale
    out_base = dqkv_ptr + (start64 + offs_n[:, None]) * stride_dqkv_row + head * HEAD_DIM + offs_d[None, :]
    tl.store(out_base + hidden, dk.to(dqkv_ptr.dtype.element_ty), mask=n_mask)
    tl.store(out_base + 2 * hidden, dv.to(dqkv_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    qkv_ptr,  # (n_tokens, 3 * NUM_HEADS * HEAD_DIM), row stride stride_qkv_row
    dout_ptr,  # (n_tokens, NUM_HEADS * HEAD_DIM), row stride stride_dout_row
    dqkv_ptr,  # (n_tokens, 3 * NUM_HEADS * HEAD_DIM), row stride stride_dqkv_row: dQ section written
    lse_ptr,  # (n_tokens, NUM_HEADS) fp32
    delta_ptr,  # (n_tokens, NUM_HEADS) fp32
    cu_seqlens_ptr,  # (batch + 1,) int32
    seed_ptr,  # (1,) int64 (HAS_DROPOUT), else unused
    stride_qkv_row,
    stride_dout_row,
    stride_dqkv_row,
    qk_scale,
    sm_scale,
    dropout_threshold,
    dropout_scale,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries a program
    BLOCK_N: tl.constexpr,  # keys a step
    IEEE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one head of one sequence, looping over its key blocks.

    dS = P o (dP - delta) with P = exp2(Q K^T * qk_scale - lse), dP = dO V^T (o mask / (1-p)); dQ = scale * dS K.
    Key columns past the sequence's end are masked to P = 0.
    """
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - start
    if pid_m * BLOCK_M >= seqlen:
        return
    hidden = NUM_HEADS * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    m_mask = m_ok[:, None] & d_ok[None, :]
    start64 = start.to(tl.int64)
    base = qkv_ptr + start64 * stride_qkv_row + head * HEAD_DIM
    q = tl.load(base + offs_m[:, None] * stride_qkv_row + offs_d[None, :], mask=m_mask, other=0.0)
    dout_base = dout_ptr + start64 * stride_dout_row + head * HEAD_DIM
    do = tl.load(dout_base + offs_m[:, None] * stride_dout_row + offs_d[None, :], mask=m_mask, other=0.0)
    stat = start64 * NUM_HEADS + head + offs_m * NUM_HEADS
    lse = tl.load(lse_ptr + stat, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stat, mask=m_ok, other=0.0)
    if HAS_DROPOUT:
        row_state = _dropout_row_state(_dropout_head_state(seed_ptr, head), start + offs_m)
        threshold = _dropout_threshold_u32(dropout_threshold)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        kv_mask = (cols[:, None] < seqlen) & d_ok[None, :]
        k = tl.load(base + hidden + cols[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * hidden + cols[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        # Masked, not left to the zero K rows: exp2(-lse) of a padded key overflows when every score is very
        # negative, and inf * 0 would be NaN.
        p = tl.where(cols[None, :] < seqlen, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        if HAS_DROPOUT:
            keep = _fmix32(row_state[:, None] + cols[None, :].to(tl.uint32)) >= threshold
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    dq *= sm_scale
    dq_ptrs = dqkv_ptr + (start64 + offs_m[:, None]) * stride_dqkv_row + head * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(dqkv_ptr.dtype.element_ty), mask=m_mask)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations


@dataclass(frozen=True)
class AttentionConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


def _block_d(head_dim: int) -> int:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported by the triton attention kernel (1..{MAX_HEAD_DIM})")
    return max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16


def attention_config(head_dim: int, dtype: torch.dtype, max_seqlen: int, dropout: bool = False) -> AttentionConfig:
    """Forward launch parameters from (head_dim, dtype, max_seqlen, whether dropout is on) alone.

    fp16/bf16: 128 queries a program (8 warps) once sequences are longer than 64, else 64 (4 warps) so short
    batches do not waste half of each block; 64 keys a step, 3 pipeline stages (2 at BLOCK_D 128, which keeps
    K/V buffers within sm_80's shared memory). fp32 is the exactness mode: ieee dots run on FMA units and hold
    far more registers, so 64 x 32 tiles over 8 warps (64 x 16 at BLOCK_D 128): the largest that compile without
    spills for sm_80 and sm_90 (4 warps or wider tiles spill, see tests/test_triton_compile.py).

    Dropout (training) hashes a uint32 per score, which needs registers of its own: fp32 takes 32 x 16 tiles over
    8 warps, and short fp16/bf16 batches at BLOCK_D 128 take 32-key steps (64 x 64 at 4 warps spills on sm_80;
    all three measured with the compile test).
    """
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        if dropout:
            return AttentionConfig(32, 16, block_d, num_warps=8, num_stages=2)
        return AttentionConfig(64, 32 if block_d <= 64 else 16, block_d, num_warps=8, num_stages=2)
    if max_seqlen > 64:
        return AttentionConfig(128, 64, block_d, num_warps=8, num_stages=2 if block_d >= 128 else 3)
    if dropout and block_d >= 128:
        return AttentionConfig(64, 32, block_d, num_warps=4, num_stages=2)
    return AttentionConfig(64, 64, block_d, num_warps=4, num_stages=2 if block_d >= 128 else 3)


def attention_bwd_config(head_dim: int, dtype: torch.dtype) -> tuple[AttentionConfig, AttentionConfig]:
    """(dK/dV config, dQ config) of the backward from (head_dim, dtype).

    The dK/dV program holds two fp32 (BLOCK_N, BLOCK_D) accumulators plus K and V for its whole loop, the dQ
    program one accumulator plus Q and dO: so the block a program owns is 64 rows and the one it streams 32
    (FlashAttention-2's Triton kernels use the same asymmetry). fp32 (ieee dots on FMA units) halves the owned
    block. Wider head dims take 8 warps to keep the accumulators in registers (tests/test_triton_compile.py
    checks that nothing spills).
    """
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        warps = 4 if block_d <= 64 else 8
        return (
            AttentionConfig(16, 32, block_d, num_warps=warps, num_stages=1),
            AttentionConfig(32, 16, block_d, num_warps=warps, num_stages=1),
        )
    warps = 4 if block_d <= 64 else 8
    return (
        AttentionConfig(32, 64, block_d, num_warps=warps, num_stages=2),
        AttentionConfig(64, 32, block_d, num_warps=warps, num_stages=2),
    )


def preprocess_warps(block_d: int) -> int:
    """Warps of the preprocess: 64 x BLOCK_D tiles of O and dO, about 16 values a thread for each."""
    return 4 if block_d <= 64 else 8


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _check_inputs(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int) -> tuple[int, int, int]:
    """(total_tokens, head_dim, max_seqlen) after checking the arguments."""
    check_tensor(qkv, "qkv")
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be a (tokens, 3 * hidden) tensor with unit column stride, got {tuple(qkv.shape)}")
    total, width = qkv.shape
    if num_heads <= 0 or width % (3 * num_heads) != 0:
        raise ValueError(f"qkv width {width} is not 3 * num_heads ({num_heads}) * head_dim")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but qkv is on {qkv.device}")
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    return total, width // (3 * num_heads), max_seqlen


def _dropout_args(dropout_p: float, seed: Tensor | None, fallback: Tensor) -> tuple[bool, Tensor, int, float]:
    """(HAS_DROPOUT, seed pointer, biased threshold, 1 / (1 - p)) for the kernels."""
    if dropout_p > 0:
        return True, seed.reshape(1), dropout_threshold(dropout_p) - 2**31, 1.0 / (1.0 - dropout_p)
    return False, fallback, 0, 1.0


def attention_fwd(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
    store_stats: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(out, stats): out (total_tokens, num_heads * head_dim); stats (total_tokens, num_heads, 2) fp32, each
    row's max and sum of exp2 of the base-2 scores, when ``store_stats`` (for the backward), else None."""
    total, head_dim, max_seqlen = _check_inputs(qkv, cu_seqlens, max_seqlen, num_heads)
    check_dropout(dropout_p, seed, qkv.device)
    cfg = attention_config(head_dim, qkv.dtype, max_seqlen, dropout_p > 0)
    cu_seqlens = cu_seqlens.contiguous()
    batch = cu_seqlens.numel() - 1
    stats = torch.zeros(total, num_heads, 2, dtype=torch.float32, device=qkv.device) if store_stats else None
    if total == 0 or batch <= 0 or max_seqlen == 0:
        return qkv.new_zeros(total, num_heads * head_dim), stats  # no sequence covers any token
    out = qkv.new_empty(total, num_heads * head_dim)
    has_dropout, seed_arg, threshold, dropout_scale = _dropout_args(dropout_p, seed, cu_seqlens)
    qk_scale = float(scale) * math.log2(math.e)
    num_m = triton.cdiv(max_seqlen, cfg.BLOCK_M)
    for b0 in range(0, batch, MAX_GRID_Z):  # one launch for any real batch
        nb = min(MAX_GRID_Z, batch - b0)
        _attention_fwd_kernel[(num_m, num_heads, nb)](
            qkv,
            out,
            stats if store_stats else out,
            cu_seqlens[b0:],
            seed_arg,
            qkv.stride(0),
            out.stride(0),
            qk_scale,
            threshold,
            dropout_scale,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=cfg.BLOCK_D,
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            IEEE=qkv.dtype == torch.float32,
            HAS_DROPOUT=has_dropout,
            STORE_STATS=store_stats,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out, stats


def attention_bwd(
    dout: Tensor,
    qkv: Tensor,
    out: Tensor,
    stats: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """d(qkv) (total_tokens, 3 * num_heads * head_dim) in the [q | k | v] layout, from dout = d(out).

    ``out`` and ``stats`` are the forward's; empty ``stats`` (a forward run without them) are recomputed first.
    Deterministic: no atomics, every entry written by exactly one program in a fixed order of summation.
    """
    total, head_dim, max_seqlen = _check_inputs(qkv, cu_seqlens, max_seqlen, num_heads)
    check_dropout(dropout_p, seed, qkv.device)
    dout = grad_rows(dout, out)
    dqkv = torch.empty(total, 3 * num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    cu_seqlens = cu_seqlens.contiguous()
    batch = cu_seqlens.numel() - 1
    if total == 0:
        return dqkv
    if batch <= 0 or max_seqlen == 0:
        return dqkv.zero_()
    if stats.shape != (total, num_heads, 2):
        out, stats = attention_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, store_stats=True)
    dkdv_cfg, dq_cfg = attention_bwd_config(head_dim, qkv.dtype)
    lse, delta = torch.empty(2, total, num_heads, dtype=torch.float32, device=qkv.device)
    _attention_bwd_preprocess_kernel[(triton.cdiv(total, PREPROCESS_BLOCK_M), num_heads)](
        out,
        dout,
        stats,
        lse,
        delta,
        out.stride(0),
        dout.stride(0),
        total,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=dkdv_cfg.BLOCK_D,
        BLOCK_M=PREPROCESS_BLOCK_M,
        num_warps=preprocess_warps(dkdv_cfg.BLOCK_D),
        num_stages=1,
    )
    has_dropout, seed_arg, threshold, dropout_scale = _dropout_args(dropout_p, seed, cu_seqlens)
    qk_scale = float(scale) * math.log2(math.e)
    for b0 in range(0, batch, MAX_GRID_Z):
        nb = min(MAX_GRID_Z, batch - b0)
        for kernel, cfg, block in (
            (_attention_bwd_dkdv_kernel, dkdv_cfg, "BLOCK_N"),
            (_attention_bwd_dq_kernel, dq_cfg, "BLOCK_M"),
        ):
            grid = (triton.cdiv(max_seqlen, getattr(cfg, block)), num_heads, nb)
            kernel[grid](
                qkv,
                dout,
                dqkv,
                lse,
                delta,
                cu_seqlens[b0:],
                seed_arg,
                qkv.stride(0),
                dout.stride(0),
                dqkv.stride(0),
                qk_scale,
                float(scale),
                threshold,
                dropout_scale,
                NUM_HEADS=num_heads,
                HEAD_DIM=head_dim,
                BLOCK_D=cfg.BLOCK_D,
                BLOCK_M=cfg.BLOCK_M,
                BLOCK_N=cfg.BLOCK_N,
                IEEE=qkv.dtype == torch.float32,
                HAS_DROPOUT=has_dropout,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
    return dqkv


# ----------------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (eager, torch.compile and opcheck share one contract)


@torch.library.custom_op(
    "fastbert_triton::attention",
    mutates_args=(),
    schema="(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, int num_heads, float scale, float dropout_p, "
    "Tensor? seed, bool store_stats) -> (Tensor, Tensor)",
)
def _attention_op(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, store_stats):
    out, stats = attention_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, store_stats)
    return out, stats if stats is not None else qkv.new_empty(0, dtype=torch.float32)


@_attention_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, store_stats):
    total, width = qkv.shape
    stats_shape = (total, num_heads, 2) if store_stats else (0,)
    return qkv.new_empty(total, width // 3), qkv.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op(
    "fastbert_triton::attention_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor qkv, Tensor out, Tensor stats, Tensor cu_seqlens, SymInt max_seqlen, "
    "int num_heads, float scale, float dropout_p, Tensor? seed) -> Tensor",
)
def _attention_backward_op(dout, qkv, out, stats, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed):
    return attention_bwd(dout, qkv, out, stats, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)


@_attention_backward_op.register_fake
def _(dout, qkv, out, stats, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _attention_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed, _ = inputs
    out, stats = output
    ctx.save_for_backward(qkv, cu_seqlens, out, stats, seed)
    ctx.args = (max_seqlen, num_heads, scale, dropout_p)
    ctx.mark_non_differentiable(stats)


def _attention_backward(ctx, dout, _dstats):
    qkv, cu_seqlens, out, stats, seed = ctx.saved_tensors
    max_seqlen, num_heads, scale, dropout_p = ctx.args
    dqkv = torch.ops.fastbert_triton.attention_backward(
        dout, qkv, out, stats, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed
    )
    return dqkv, None, None, None, None, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


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

    qkv: (total_tokens, 3 * num_heads * head_dim), [q heads | k heads | v heads] per token. cu_seqlens: int32
    (batch + 1,). max_seqlen: a host int >= the longest sequence (it sizes the grid). Returns (total_tokens,
    num_heads * head_dim). Softmax statistics in fp32. dropout_p > 0: probability (head, query row i, key j) is
    kept when ``reference.dropout_bits(seed, head, i, j) >= floor(p * 2**32)``, then scaled by 1 / (1 - p);
    seed: int64 tensor of one element on qkv's device. Differentiable in qkv; the softmax statistics the backward
    needs are stored only when qkv requires grad (the inference path does no extra work).
    """
    check_dropout(dropout_p, seed, qkv.device if isinstance(qkv, Tensor) else None)
    if not through_op(qkv):
        return attention_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale, dropout_p, seed)[0]
    out, _ = torch.ops.fastbert_triton.attention(
        qkv, cu_seqlens, max_seqlen, num_heads, float(scale), float(dropout_p), seed, needs_grad(qkv)
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs


def _consts(head_dim: int, dtype: torch.dtype, cfg: AttentionConfig, num_heads: int) -> dict:
    return {
        "NUM_HEADS": num_heads,
        "HEAD_DIM": head_dim,
        "BLOCK_D": cfg.BLOCK_D,
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_N": cfg.BLOCK_N,
        "IEEE": dtype == torch.float32,
    }


def _unused_pointers(dtype: torch.dtype, has_dropout: bool, store_stats: bool) -> dict[str, str]:
    """The types the launchers give pointers a variant does not read (cu_seqlens as the seed, out as stats),
    so each spec's signature is the one the JIT sees."""
    types = {} if has_dropout else {"seed_ptr": "*i32"}
    if not store_stats:
        types["stats_ptr"] = f"*{TRITON_TYPES[dtype]}"
    return types


#: (HAS_DROPOUT, STORE_STATS) of the forward: inference, training without dropout, training with dropout, and
#: dropout without a backward (a train-mode model under no_grad).
FWD_VARIANTS = ((False, False), (False, True), (True, True), (True, False))


def aot_specs(num_heads: int = 12) -> list[KernelSpec]:
    """Every (dtype, head_dim, config, variant) the launchers can choose for the BERT-family head dims: the
    forward's four (dropout, statistics) variants, and the backward's preprocess, dK/dV and dQ kernels with and
    without dropout."""
    specs = []
    for dtype in TRITON_TYPES:
        name = dtype_name(dtype)
        for head_dim in HEAD_DIMS:
            for has_dropout, store_stats in FWD_VARIANTS:
                cfgs = {attention_config(head_dim, dtype, s, has_dropout) for s in (1, 64, 65, 512)}
                for cfg in sorted(cfgs, key=lambda c: c.BLOCK_M):
                    consts = _consts(head_dim, dtype, cfg, num_heads)
                    consts.update(HAS_DROPOUT=has_dropout, STORE_STATS=store_stats)
                    label = f"attention-{name}-d{head_dim}-M{cfg.BLOCK_M}N{cfg.BLOCK_N}"
                    if has_dropout or store_stats:
                        label += f"-drop{int(has_dropout)}-stats{int(store_stats)}"
                    specs.append(
                        kernel_spec(
                            _attention_fwd_kernel,
                            dtype,
                            consts,
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            label=label,
                            pointer_types=_unused_pointers(dtype, has_dropout, store_stats),
                            training=has_dropout or store_stats,
                        )
                    )
            dkdv_cfg, dq_cfg = attention_bwd_config(head_dim, dtype)
            pre = {"NUM_HEADS": num_heads, "HEAD_DIM": head_dim, "BLOCK_D": dkdv_cfg.BLOCK_D}
            pre["BLOCK_M"] = PREPROCESS_BLOCK_M
            specs.append(
                kernel_spec(
                    _attention_bwd_preprocess_kernel,
                    dtype,
                    pre,
                    num_warps=preprocess_warps(dkdv_cfg.BLOCK_D),
                    num_stages=1,
                    label=f"attention_bwd_preprocess-{name}-d{head_dim}",
                    training=True,
                )
            )
            bwd = ((_attention_bwd_dkdv_kernel, dkdv_cfg, "dkdv"), (_attention_bwd_dq_kernel, dq_cfg, "dq"))
            for kernel, cfg, what in bwd:
                for has_dropout in (False, True):
                    consts = _consts(head_dim, dtype, cfg, num_heads)
                    consts["HAS_DROPOUT"] = has_dropout
                    specs.append(
                        kernel_spec(
                            kernel,
                            dtype,
                            consts,
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            label=f"attention_bwd_{what}-{name}-d{head_dim}-M{cfg.BLOCK_M}N{cfg.BLOCK_N}"
                            f"-drop{int(has_dropout)}",
                            pointer_types=_unused_pointers(dtype, has_dropout, True),
                            training=True,
                        )
                    )
    return specs
