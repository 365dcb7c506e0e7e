"""Backend selection (ops.py) and the reference ops against float64 definitions written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import AVAILABLE_BACKENDS

from fastbert import ops, reference
from fastbert.padding import cu_seqlens_from_lengths, pad, sequence_positions, unpad


def test_torch_backend_always_available():
    assert "torch" in ops.available_backends()
    assert ops.resolve_backend("torch", "cpu").name == "torch"


def test_unknown_backend_raises():
    with pytest.raises(ops.BackendUnavailable, match="unknown backend 'cuda'"):
        ops.resolve_backend("cuda", "cpu")


def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailable, match="needs a CUDA device"):
        ops.resolve_backend("triton", "cpu")


def test_cpp_on_cuda_tensors_refused():
    with pytest.raises(ops.BackendUnavailable, match="cpp backend runs on CPU tensors"):
        ops.resolve_backend("cpp", "cuda")


def test_env_variable_picks_backend(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    assert ops.resolve_backend("auto", "cpu").name == "torch"
    monkeypatch.setenv("FASTBERT_BACKEND", "nonsense")
    with pytest.raises(ops.BackendUnavailable, match="nonsense"):
        ops.resolve_backend(None, "cpu")


def test_auto_prefers_cpp_on_cpu_when_built():
    expected = "cpp" if ops.unavailable_reason("cpp", "cpu") is None else "torch"
    assert ops.resolve_backend("auto", "cpu").name == expected


def test_every_backend_module_implements_every_op():
    for name in AVAILABLE_BACKENDS:
        backend = ops.resolve_backend(name, "cpu")
        for op in ops.OPS:
            assert callable(getattr(backend, op))


def _naive_attention(qkv, lengths, heads, scale):
    """Per sequence, per head, per query: the textbook formula in float64."""
    hidden = qkv.shape[1] // 3
    d = hidden // heads
    out = torch.zeros(qkv.shape[0], hidden, dtype=torch.float64)
    start = 0
    for n in lengths:
        for h in range(heads):
            q = qkv[start : start + n, h * d : (h + 1) * d]
            k = qkv[start : start + n, hidden + h * d : hidden + (h + 1) * d]
            v = qkv[start : start + n, 2 * hidden + h * d : 2 * hidden + (h + 1) * d]
            for i in range(n):
                s = torch.tensor([float(q[i] @ k[j]) * scale for j in range(n)], dtype=torch.float64)
                p = torch.exp(s - s.max())
                out[start + i, h * d : (h + 1) * d] = (p / p.sum()) @ v
        start += n
    return out


def test_reference_attention_is_the_textbook_formula():
    torch.manual_seed(0)
    lengths, heads, d = [1, 5, 3], 2, 8
    qkv = torch.randn(sum(lengths), 3 * heads * d, dtype=torch.float64)
    cu = cu_seqlens_from_lengths(lengths)
    got = reference.attention(qkv, cu, max(lengths), heads, 1 / math.sqrt(d))
    want = _naive_attention(qkv, lengths, heads, 1 / math.sqrt(d))
    assert (got - want).abs().max() < 1e-12


def test_reference_layernorm_and_activations():
    torch.manual_seed(0)
    x = torch.randn(7, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-12) * w + b
    assert (reference.add_layernorm(x, None, w, b, 1e-12) - want).abs().max() < 1e-12
    assert (reference.activation(x, "gelu") - 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))).abs().max() < 1e-12
    tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert (reference.activation(x, "gelu_tanh") - tanh).abs().max() < 1e-12
    with pytest.raises(ValueError, match="unknown activation 'swiglu'"):
        reference.activation(x, "swiglu")


def test_layernorm_statistics_in_fp32_for_bf16():
    x = (torch.randn(4, 64) * 100 + 1000).to(torch.bfloat16)
    w, b = torch.ones(64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)
    y = reference.add_layernorm(x, None, w, b, 1e-12)
    want = torch.nn.functional.layer_norm(x.double(), (64,), eps=1e-12)
    assert y.dtype == torch.bfloat16
    assert (y.double() - want).abs().max() < 5e-2


def test_unpad_pad_round_trip():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    p = unpad(mask)
    assert p.cu_seqlens.tolist() == [0, 2, 2, 5] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 3
    x = torch.arange(12.0).view(3, 4)
    packed = x.reshape(-1)[p.indices]
    assert packed.tolist() == [0, 1, 8, 10, 11]
    back = pad(packed[:, None], p)[..., 0]
    assert torch.equal(back, x * mask)
    assert sequence_positions(p.cu_seqlens, 5).tolist() == [0, 1, 0, 1, 2]


# -- the reference ops are differentiable (the torch backend trains through them) --


def _gradcheck_cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    ids = torch.tensor([3, 0, 5, 5, 1])
    pos = torch.tensor([0, 1, 2, 0, 1])
    tt = torch.tensor([0, 1, 1, 0, 0])
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)  # an empty sequence in the middle
    seed = torch.tensor([7])
    return {
        "embeddings": (
            lambda w, p, t, lw, lb: reference.embeddings(ids, pos, tt, w, p, t, lw, lb, 1e-5),
            (r(6, 7), r(3, 7), r(2, 7), r(7), r(7)),
        ),
        "add_layernorm": (
            lambda x, res, w, b: reference.add_layernorm(x, res, w, b, 1e-5),
            (r(5, 7), r(5, 7), r(7), r(7)),
        ),
        "bias_activation_gelu": (lambda x, b: reference.bias_activation(x, b, "gelu"), (r(5, 7), r(7))),
        "bias_activation_gelu_tanh": (lambda x, b: reference.bias_activation(x, b, "gelu_tanh"), (r(5, 7), r(7))),
        "bias_activation_silu": (lambda x, b: reference.bias_activation(x, b, "silu"), (r(5, 7), r(7))),
        "bias_activation_tanh": (lambda x, b: reference.bias_activation(x, b, "tanh"), (r(5, 7), r(7))),
        "bias_residual_layernorm": (
            lambda x, b, res, w, lb: reference.bias_residual_layernorm(x, b, res, w, lb, 1e-5),
            (r(5, 7), r(7), r(5, 7), r(7), r(7)),
        ),
        "linear": (lambda x, w, b: reference.linear(x, w, b, "gelu"), (r(5, 4), r(7, 4), r(7))),
        "linear_residual_layernorm": (
            lambda x, w, b, res, lw, lb: reference.linear_residual_layernorm(x, w, b, res, lw, lb, 1e-5),
            (r(5, 4), r(7, 4), r(7), r(5, 7), r(7), r(7)),
        ),
        "attention": (lambda qkv: reference.attention(qkv, cu, 3, 2, 0.5), (r(5, 12),)),
        "attention_dropout": (lambda qkv: reference.attention(qkv, cu, 3, 2, 0.5, 0.3, seed), (r(5, 12),)),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_reference_ops_pass_gradcheck(name):
    fn, args = _gradcheck_cases()[name]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
