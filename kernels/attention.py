"""Non-causal multi-head attention over packed sequences (FlashAttention-style online softmax).

The grid is (query blocks, heads, sequences), sized by the host's ``max_seqlen`` so nothing is read back from
the device. A program whose query block starts past its sequence's end returns at once: no work on padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import TRITON_TYPES, KernelSpec, check_tensor, dtype_name, kernel_spec, next_power_of_2

#: Largest head_dim handled (the fp32 accumulator is BLOCK_M x BLOCK_D registers).
MAX_HEAD_DIM = 128
#: Head dims the ahead-of-time test compiles: the BERT family's, and 16 for the smallest BLOCK_D (tiny test
#: models); any head_dim <= 128 runs.
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)
#: CUDA limits grid dims y and z to 65535: longer batches are launched in chunks of sequences.
MAX_GRID_Z = 65535


@triton.jit
def _attention_fwd_kernel(
    qkv_ptr,  # (n_tokens, 3 * NUM_HEADS * HEAD_DIM): [q heads | k heads | v heads], row stride stride_qkv_row
    out_ptr,  # (n_tokens, NUM_HEADS * HEAD_DIM), row stride stride_out_row
    cu_seqlens_ptr,  # (batch + 1,) int32
    stride_qkv_row,
    stride_out_row,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2; the extra lanes are masked to 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots instead of tf32
):
    """One program: BLOCK_M queries of one head of one sequence attend to all keys of that sequence.

    Keys stream through in BLOCK_N blocks with a running max and sum (fp32); the output is normalised once.
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
        v = tl.load(v_base + cols[:, None] * stride_qkv_row + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = out_ptr + (start.to(tl.int64) + offs_m[:, None]) * stride_out_row + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < seqlen) & d_ok[None, :])


@dataclass(frozen=True)
class AttentionConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


def attention_config(head_dim: int, dtype: torch.dtype, max_seqlen: int) -> AttentionConfig:
    """Launch parameters from (head_dim, dtype, max_seqlen) alone.

    fp16/bf16: 128 queries a program (8 warps) once sequences are longer than 64, else 64 (4 warps) so short
    batches do not waste half of each block; 64 keys a step, 3 pipeline stages (2 at BLOCK_D 128, which keeps
    K/V buffers within sm_80's shared memory). fp32 is the exactness mode: ieee dots run on FMA units and hold
    far more registers, so 64 x 32 tiles over 8 warps (64 x 16 at BLOCK_D 128): the largest that compile without
    spills for sm_80 and sm_90 (4 warps or wider tiles spill, see tests/test_triton_compile.py).
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported by the triton attention kernel (1..{MAX_HEAD_DIM})")
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
    if dtype == torch.float32:
        return AttentionConfig(64, 32 if block_d <= 64 else 16, block_d, num_warps=8, num_stages=2)
    if max_seqlen > 64:
        return AttentionConfig(128, 64, block_d, num_warps=8, num_stages=2 if block_d >= 128 else 3)
    return AttentionConfig(64, 64, block_d, num_warps=4, num_stages=2 if block_d >= 128 else 3)


def attention(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_heads: int, scale: float) -> Tensor:
    """Non-causal multi-head attention over packed sequences.

    qkv: (total_tokens, 3 * num_heads * head_dim), [q heads | k heads | v heads] per token. cu_seqlens: int32
    (batch + 1,). max_seqlen: a host int >= the longest sequence (it sizes the grid). Returns (total_tokens,
    num_heads * head_dim). Softmax statistics in fp32.
    """
    check_tensor(qkv, "qkv")
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be a (tokens, 3 * hidden) tensor with unit column stride, got {tuple(qkv.shape)}")
    total, width = qkv.shape
    if num_heads <= 0 or width % (3 * num_heads) != 0:
        raise ValueError(f"qkv width {width} is not 3 * num_heads ({num_heads}) * head_dim")
    head_dim = width // (3 * num_heads)
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but qkv is on {qkv.device}")
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    cfg = attention_config(head_dim, qkv.dtype, max_seqlen)
    cu_seqlens = cu_seqlens.contiguous()
    batch = cu_seqlens.numel() - 1
    out = qkv.new_empty(total, num_heads * head_dim)
    if total == 0 or batch <= 0 or max_seqlen == 0:
        return out
    qk_scale = float(scale) * math.log2(math.e)
    num_m = triton.cdiv(max_seqlen, cfg.BLOCK_M)
    for b0 in range(0, batch, MAX_GRID_Z):  # one launch for any real batch
        nb = min(MAX_GRID_Z, batch - b0)
        _attention_fwd_kernel[(num_m, num_heads, nb)](
            qkv,
            out,
            cu_seqlens[b0:],
            qkv.stride(0),
            out.stride(0),
            qk_scale,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=cfg.BLOCK_D,
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            IEEE=qkv.dtype == torch.float32,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out


def aot_specs(num_heads: int = 12) -> list[KernelSpec]:
    """Every (dtype, head_dim, config) the launcher can choose for the BERT-family head dims."""
    specs = []
    for dtype in TRITON_TYPES:
        for head_dim in HEAD_DIMS:
            cfgs = {attention_config(head_dim, dtype, s) for s in (1, 64, 65, 512)}
            for cfg in sorted(cfgs, key=lambda c: c.BLOCK_M):
                consts = {
                    "NUM_HEADS": num_heads,
                    "HEAD_DIM": head_dim,
                    "BLOCK_D": cfg.BLOCK_D,
                    "BLOCK_M": cfg.BLOCK_M,
                    "BLOCK_N": cfg.BLOCK_N,
                    "IEEE": dtype == torch.float32,
                }
                specs.append(
                    kernel_spec(
                        _attention_fwd_kernel,
                        dtype,
                        consts,
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        label=f"attention-{dtype_name(dtype)}-d{head_dim}-M{cfg.BLOCK_M}N{cfg.BLOCK_N}",
                    )
                )
    return specs
