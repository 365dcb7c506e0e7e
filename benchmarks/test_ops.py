"""Per-op benchmarks: every fused op on each backend, with the plain-PyTorch reference (backend ``torch``) as baseline.

Groups: attention, norms, activation, embeddings, linear+epilogue; one group per op, dtype and shape, so the
pytest-benchmark table (and ``pytest-benchmark compare``) puts the backends of one case side by side.
extra_info carries the throughput (tokens/s; TFLOP/s for GEMMs and attention; GB/s for the memory-bound ops)
and the max abs error against ``fastbert.reference`` evaluated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from fastbert import bench, reference


def _error_vs_fp64(ref_fn: Callable[..., Tensor], args: tuple[Any, ...]) -> Callable[[Tensor], float]:
    """out -> max |out - ref_fn(args in float64)|."""
    args64 = tuple(a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    return lambda out: float((out.double() - ref_fn(*args64)).abs().max())


def _rand(*shape: int, dtype: str, device: torch.device, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return (torch.randn(*shape) * scale + shift).to(device=device, dtype=bench.DTYPES[dtype])


def _itemsize(dtype: str) -> int:
    return bench.DTYPES[dtype].itemsize


@pytest.mark.parametrize("packing", ["dense", "varlen"])
def test_attention(
    backend_ops: Any, measure: Any, backend: str, dtype: str, device: torch.device, shape: Any, packing: str
) -> None:
    size = shape.dense if packing == "dense" else shape.varlen
    lengths = size.lengths()
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    head_dim = shape.hidden // shape.heads
    qkv = _rand(sum(lengths), 3 * shape.hidden, dtype=dtype, device=device)
    args = (qkv, cu_seqlens, max(lengths), shape.heads, 1.0 / math.sqrt(head_dim))
    measure(
        lambda: backend_ops.attention(*args),
        group=f"attention {dtype} {size.label} heads={shape.heads} head_dim={head_dim}",
        tokens=sum(lengths),
        flops=4 * shape.hidden * sum(s * s for s in lengths),  # QK^T and PV over real tokens only
        error=_error_vs_fp64(reference.attention, args),
        backend=backend,
        dtype=dtype,
    )


@pytest.mark.parametrize("op", ["add_layernorm", "bias_residual_layernorm"])
def test_norms(backend_ops: Any, measure: Any, backend: str, dtype: str, device: torch.device, shape: Any, op: str):
    tokens, h = shape.dense.batch * shape.dense.seqlen, shape.hidden
    x, residual = _rand(tokens, h, dtype=dtype, device=device), _rand(tokens, h, dtype=dtype, device=device)
    ln_w = _rand(h, dtype=dtype, device=device, scale=0.1, shift=1.0)
    ln_b = _rand(h, dtype=dtype, device=device, scale=0.1)
    if op == "add_layernorm":
        args: tuple[Any, ...] = (x, residual, ln_w, ln_b, 1e-12)
    else:
        args = (x, _rand(h, dtype=dtype, device=device, scale=0.1), residual, ln_w, ln_b, 1e-12)
    measure(
        lambda: getattr(backend_ops, op)(*args),
        group=f"norms {op} {dtype} ({tokens},{h})",
        tokens=tokens,
        bytes=3 * tokens * h * _itemsize(dtype),  # read x and residual, write the output
        error=_error_vs_fp64(getattr(reference, op), args),
        backend=backend,
        dtype=dtype,
    )


def test_activation(backend_ops: Any, measure: Any, backend: str, dtype: str, device: torch.device, shape: Any):
    tokens, n = shape.dense.batch * shape.dense.seqlen, shape.intermediate
    args = (_rand(tokens, n, dtype=dtype, device=device), _rand(n, dtype=dtype, device=device, scale=0.1), "gelu")
    measure(
        lambda: backend_ops.bias_activation(*args),
        group=f"activation bias+gelu {dtype} ({tokens},{n})",
        tokens=tokens,
        bytes=2 * tokens * n * _itemsize(dtype),
        error=_error_vs_fp64(reference.bias_activation, args),
        backend=backend,
        dtype=dtype,
    )


def test_embeddings(backend_ops: Any, measure: Any, backend: str, dtype: str, device: torch.device, shape: Any):
    size, h = shape.dense, shape.hidden
    tokens = size.batch * size.seqlen
    args = (
        torch.randint(0, shape.vocab, (tokens,), device=device),  # input_ids
        torch.arange(size.seqlen, device=device).repeat(size.batch),  # position_ids
        torch.zeros(tokens, dtype=torch.long, device=device),  # token_type_ids
        _rand(shape.vocab, h, dtype=dtype, device=device, scale=0.02),
        _rand(512, h, dtype=dtype, device=device, scale=0.02),
        _rand(2, h, dtype=dtype, device=device, scale=0.02),
        _rand(h, dtype=dtype, device=device, scale=0.1, shift=1.0),
        _rand(h, dtype=dtype, device=device, scale=0.1),
        1e-12,
    )
    measure(
        lambda: backend_ops.embeddings(*args),
        group=f"embeddings {dtype} ({tokens},{h})",
        tokens=tokens,
        bytes=4 * tokens * h * _itemsize(dtype),  # three gathered rows in, one row out
        error=_error_vs_fp64(reference.embeddings, args),
        backend=backend,
        dtype=dtype,
    )


@pytest.mark.parametrize("op", ["linear+gelu", "linear+residual+layernorm"])
def test_linear_epilogue(
    backend_ops: Any, measure: Any, backend: str, dtype: str, device: torch.device, shape: Any, op: str
) -> None:
    # The feed-forward block's two GEMMs: H -> I with bias + GELU, I -> H with bias + residual + LayerNorm.
    tokens = shape.dense.batch * shape.dense.seqlen
    k, n = (shape.hidden, shape.intermediate) if op == "linear+gelu" else (shape.intermediate, shape.hidden)
    x = _rand(tokens, k, dtype=dtype, device=device)
    weight = _rand(n, k, dtype=dtype, device=device, scale=1 / math.sqrt(k))
    bias = _rand(n, dtype=dtype, device=device, scale=0.1)
    packed = backend_ops.prepack_linear(weight)
    if op == "linear+gelu":
        args: tuple[Any, ...] = (x, weight, bias, "gelu")
        fn, ref = (lambda: backend_ops.linear(*args, packed=packed)), reference.linear
    else:
        residual = _rand(tokens, n, dtype=dtype, device=device)
        ln_w = _rand(n, dtype=dtype, device=device, scale=0.1, shift=1.0)
        args = (x, weight, bias, residual, ln_w, _rand(n, dtype=dtype, device=device, scale=0.1), 1e-12)
        fn = lambda: backend_ops.linear_residual_layernorm(*args, packed=packed)  # noqa: E731
        ref = reference.linear_residual_layernorm
    measure(
        fn,
        group=f"linear+epilogue {op} {dtype} ({tokens},{k})x({k},{n})",
        tokens=tokens,
        flops=2 * tokens * k * n,
        error=_error_vs_fp64(ref, args),
        backend=backend,
        dtype=dtype,
    )
