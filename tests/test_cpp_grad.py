"""Gradients of the C++ ops (fastbert._cpp, torch.ops.fastbert.*) against fastbert.reference's autograd in float64.

Every differentiable input's gradient follows the rule outputs follow (STYLE.md, ``helpers.assert_2x_rule``):
error <= 2 x (plain PyTorch's error at the same dtype) + floor, both measured against the float64 reference,
on every kernel table this CPU can run. Also: attention dropout equal to the reference's for the same seed (the
mask itself read back exactly), bitwise-deterministic backward (also across thread counts), opcheck on every op
including the autograd registration, and clear errors for bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_2x_rule, dtype_id, f64

from fastbert import reference

_cpp = pytest.importorskip("fastbert._cpp")
if _cpp.UNAVAILABLE_REASON is not None:
    pytest.skip(f"C++ extension not built: {_cpp.UNAVAILABLE_REASON}", allow_module_level=True)

ops = torch.ops.fastbert
DTYPES = [pytest.param(dtype, id=dtype_id(dtype)) for dtype in (torch.float32, torch.bfloat16)]


def _isas() -> list[str]:
    """Every kernel table this CPU can run (AVX-512, AVX2, the baseline), widest first."""
    names = []
    prev = _cpp.isa()
    for name in ("avx512", "avx2"):
        try:
            _cpp.isa(name)
            names.append(name)
        except RuntimeError:
            pass
    _cpp.isa(prev)
    return [*names, "base"]


@pytest.fixture(params=_isas())
def isa(request):
    prev = _cpp.isa()
    _cpp.isa(request.param)
    yield request.param
    _cpp.isa(prev)


def _leaf(t, dtype=None):
    """A fresh leaf requiring grad (floating tensors; others and None unchanged), optionally cast."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    t = t.detach().to(dtype if dtype is not None else t.dtype).clone()
    return t.requires_grad_()


def check_grads(name, cpp_fn, ref_fn, args, names, dtype, gen):
    """Run the cpp op at ``dtype``, the reference at ``dtype`` and in float64 on the same values, backpropagate
    one random output gradient, and hold the output and every floating input's gradient to the 2x rule."""
    cpp_args = [_leaf(a, dtype) for a in args]
    plain_args = [_leaf(a, dtype) for a in args]
    # float64 from the dtype-rounded values, so all three see exactly the same inputs.
    exact_args = [_leaf(f64(a.to(dtype))) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out = cpp_fn(*cpp_args)
    plain = ref_fn(*plain_args)
    exact = ref_fn(*exact_args)
    assert_2x_rule(f"{name} out", out, plain, exact, dtype)
    grad = torch.randn(exact.shape, generator=gen, dtype=torch.float64)
    out.backward(grad.to(dtype))
    plain.backward(grad.to(dtype))
    exact.backward(grad)
    for arg_name, c, p, e in zip(names, cpp_args, plain_args, exact_args, strict=True):
        if not (isinstance(c, torch.Tensor) and c.is_floating_point()):
            continue
        assert c.grad is not None, f"{name}: no gradient for {arg_name}"
        assert_2x_rule(f"{name} d{arg_name}", c.grad, p.grad, e.grad, dtype)


def _vec(n, gen, dtype=torch.float32, base=0.0):
    return (base + 0.5 * torch.randn(n, generator=gen)).to(dtype)


ROWS = [(1, 37), (97, 768), (513, 64), (0, 37)]
ROW_IDS = ["T1-N37", "T97-N768", "T513-N64", "T0-N37"]


# ---------------------------------------------------------------------------------------------------------
# LayerNorm family and bias + activation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_add_layernorm_grad(isa, dtype, shape, with_residual):
    gen = torch.Generator().manual_seed(shape[0] + shape[1])
    x = 3 + torch.randn(*shape, generator=gen)
    res = torch.randn(*shape, generator=gen) if with_residual else None
    args = [x, res, _vec(shape[1], gen, base=1.0), _vec(shape[1], gen), 1e-12]
    names = ["x", "residual", "ln_weight", "ln_bias", "eps"]
    check_grads("add_layernorm", _cpp.add_layernorm, reference.add_layernorm, args, names, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_residual_layernorm_grad(isa, dtype, shape, with_bias):
    gen = torch.Generator().manual_seed(shape[0] * 3 + shape[1])
    x = torch.randn(*shape, generator=gen)
    bias = _vec(shape[1], gen) if with_bias else None
    res = torch.randn(*shape, generator=gen)
    args = [x, bias, res, _vec(shape[1], gen, base=1.0), _vec(shape[1], gen), 1e-5]
    names = ["x", "bias", "residual", "ln_weight", "ln_bias", "eps"]
    check_grads(
        "bias_residual_layernorm",
        _cpp.bias_residual_layernorm,
        reference.bias_residual_layernorm,
        args,
        names,
        dtype,
        gen,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [*reference.ACTIVATIONS, None])
@pytest.mark.parametrize("shape", [(97, 37), (1, 1023), (0, 37)], ids=["T97-N37", "T1-N1023", "T0-N37"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_activation_grad(isa, dtype, act, shape, with_bias):
    gen = torch.Generator().manual_seed(11 + shape[1])
    x = 3 * torch.randn(*shape, generator=gen)
    bias = _vec(shape[1], gen) if with_bias else None
    args = [x, bias, act]
    check_grads(
        f"bias_activation[{act}]",
        _cpp.bias_activation,
        reference.bias_activation,
        args,
        ["x", "bias", "act"],
        dtype,
        gen,
    )


# ---------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,hidden", [(1, 64), (97, 37), (300, 96), (0, 37)], ids=["T1-E64", "T97-E37", "T300-E96", "T0-E37"]
)
@pytest.mark.parametrize("types", ["with_types", "no_type_ids", "no_type_table"])
def test_embeddings_grad(isa, dtype, tokens, hidden, types):
    gen = torch.Generator().manual_seed(tokens * 7 + hidden)
    # A small vocabulary: many tokens share a row, so the scatter-add sums several contributions per row.
    word = torch.randn(23, hidden, generator=gen)
    pos = torch.randn(40, hidden, generator=gen)
    ttw = torch.randn(2, hidden, generator=gen) if types != "no_type_table" else None
    ids = torch.randint(0, 23, (tokens,), generator=gen)
    pids = torch.randint(0, 40, (tokens,), generator=gen, dtype=torch.int32)
    tt = torch.randint(0, 2, (tokens,), generator=gen) if types == "with_types" else None
    args = [ids, pids, tt, word, pos, ttw, _vec(hidden, gen, base=1.0), _vec(hidden, gen), 1e-12]
    names = [
        "input_ids",
        "position_ids",
        "token_type_ids",
        "word",
        "position",
        "token_type",
        "ln_weight",
        "ln_bias",
        "eps",
    ]
    check_grads("embeddings", _cpp.embeddings, reference.embeddings, args, names, dtype, gen)


# ---------------------------------------------------------------------------------------------------------
# Linear layers (packed: a prepacked oneDNN weight in the forward; backward reads the plain weight)
# ---------------------------------------------------------------------------------------------------------

LINEAR_SHAPES = [(1, 37, 16), (97, 64, 37), (200, 96, 128), (0, 8, 5)]
LINEAR_IDS = ["T1-K37-N16", "T97-K64-N37", "T200-K96-N128", "T0-K8-N5"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
@pytest.mark.parametrize("act", [*reference.ACTIVATIONS, None])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_linear_grad(isa, dtype, shape, act, packed):
    t, k, n = shape
    gen = torch.Generator().manual_seed(t + k + n)
    x = torch.randn(t, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=gen) if act != "relu" else None  # relu: also cover bias=None
    p = _cpp.prepack_linear(w) if packed else None

    def cpp_fn(x, w, b, act):
        return _cpp.linear(x, w, b, act, packed=p)

    check_grads(f"linear[{act}]", cpp_fn, reference.linear, [x, w, b, act], ["x", "weight", "bias", "act"], dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_linear_residual_layernorm_grad(isa, dtype, shape, packed):
    t, k, n = shape
    gen = torch.Generator().manual_seed(t * k + n)
    x = torch.randn(t, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=gen)
    res = torch.randn(t, n, generator=gen)
    p = _cpp.prepack_linear(w) if packed else None

    def cpp_fn(x, w, b, res, lw, lb, eps):
        return _cpp.linear_residual_layernorm(x, w, b, res, lw, lb, eps, packed=p)

    args = [x, w, b, res, _vec(n, gen, base=1.0), _vec(n, gen), 1e-12]
    names = ["x", "weight", "bias", "residual", "ln_weight", "ln_bias", "eps"]
    check_grads("linear_residual_layernorm", cpp_fn, reference.linear_residual_layernorm, args, names, dtype, gen)


# ---------------------------------------------------------------------------------------------------------
# Attention over packed sequences, with dropout
# ---------------------------------------------------------------------------------------------------------

ATTN_CASES = [
    # (lengths, heads, head_dim)
    ([1], 2, 64),
    ([5, 1, 0, 17, 64, 33], 3, 16),  # an empty sequence inside the batch, one much longer than the others
    ([40, 0, 7], 2, 64),
    ([19, 3], 2, 13),  # an odd head_dim: the generic loops on every ISA
    ([0, 0], 2, 16),  # no tokens at all
    ([129, 2], 1, 32),
]
ATTN_IDS = ["L1-D64", "mixed-D16", "empty-D64", "odd-D13", "T0-D16", "L129-D32"]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,heads,head_dim", ATTN_CASES, ids=ATTN_IDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.5], ids=["p0", "p0.1", "p0.5"])
def test_attention_grad(isa, dtype, lengths, heads, head_dim, dropout_p):
    gen = torch.Generator().manual_seed(sum(lengths) + head_dim)
    cu = _cu(lengths)
    qkv = torch.randn(sum(lengths), 3 * heads * head_dim, generator=gen)
    seed = torch.tensor([987654321 + head_dim], dtype=torch.int64) if dropout_p > 0 else None
    args = [qkv, cu, max(lengths, default=0), heads, 1.0 / math.sqrt(head_dim), dropout_p, seed]
    names = ["qkv", "cu_seqlens", "max_seqlen", "num_heads", "scale", "dropout_p", "seed"]
    check_grads(f"attention[p={dropout_p}]", _cpp.attention, reference.attention, args, names, dtype, gen)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_attention_op_called_directly(dropout_p):
    """torch.ops.fastbert.attention itself (no LSE saved) is differentiable too: its backward recomputes it."""
    gen = torch.Generator().manual_seed(3)
    lengths, heads, head_dim = [9, 0, 30], 2, 16
    cu = _cu(lengths)
    qkv = torch.randn(sum(lengths), 3 * heads * head_dim, generator=gen)
    seed = torch.tensor([42]) if dropout_p > 0 else None
    args = [qkv, cu, 30, heads, 0.25, dropout_p, seed]
    names = ["qkv", "cu_seqlens", "max_seqlen", "num_heads", "scale", "dropout_p", "seed"]
    check_grads("ops.attention", ops.attention, reference.attention, args, names, torch.float32, gen)


def test_dropout_bits_match_reference(isa):
    """The C++ hash is reference.dropout_bits bit for bit, over the whole uint32 range of seeds and rows."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    head = torch.randint(0, 64, (n,), generator=gen)
    row = torch.randint(0, 2**31 - 1, (n,), generator=gen)
    col = torch.randint(0, 2**20, (n,), generator=gen)
    for seed in (0, 1, 2**31 + 12345, 2**32 - 1):
        s = torch.tensor([seed], dtype=torch.int64)
        got = ops._dropout_bits(s, head, row, col)
        want = reference.dropout_bits(s.reshape(()), head, row, col)
        assert torch.equal(got, want), f"seed {seed}: {(got != want).sum().item()} of {n} bits differ"


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_attention_dropout_mask_matches_reference(isa, dropout_p):
    """Read the kept/dropped pattern back exactly: with q = k = 0 every probability is 1/L, and with v the
    identity each output feature j of query i is (1/L) keep(i, j) / (1 - p)."""
    lengths, heads = [16, 0, 5, 16, 11], 2
    head_dim = 16
    cu = _cu(lengths)
    total = sum(lengths)
    qkv = torch.zeros(total, 3, heads, head_dim)
    for b, length in enumerate(lengths):
        start = int(cu[b])
        qkv[start : start + length, 2, :, :length] = torch.eye(length)[:, None, :]  # v row j = e_j, every head
    qkv = qkv.reshape(total, -1)
    seed = torch.tensor([2024])
    out = _cpp.attention(qkv, cu, 16, heads, 1.0, dropout_p, seed).view(total, heads, head_dim)
    thr = reference.dropout_threshold(dropout_p)
    kept_total = 0
    for b, length in enumerate(lengths):
        start = int(cu[b])
        rows = torch.arange(start, start + length)
        bits = reference.dropout_bits(
            seed.reshape(()),
            torch.arange(heads)[None, :, None],
            rows[:, None, None],
            torch.arange(length)[None, None, :],
        )
        want = (bits >= thr).double() / length / (1 - dropout_p)  # (len, heads, len)
        got = out[start : start + length, :, :length].double()
        assert torch.allclose(got, want, rtol=1e-6, atol=0), f"sequence {b}: masks differ"
        assert torch.equal(got > 0, bits >= thr)
        assert (out[start : start + length, :, length:] == 0).all()
        kept_total += int((bits >= thr).sum())
    expected = (1 - dropout_p) * heads * sum(n * n for n in lengths)
    print(f"p={dropout_p}: kept {kept_total}, expected about {expected:.0f}")
    assert abs(kept_total - expected) < 6 * math.sqrt(expected) + 5


def test_attention_dropout_uses_the_seed():
    cu = _cu([20, 12])
    qkv = torch.randn(32, 3 * 2 * 16, generator=torch.Generator().manual_seed(1))
    a = _cpp.attention(qkv, cu, 20, 2, 0.25, 0.3, torch.tensor([1]))
    assert torch.equal(a, _cpp.attention(qkv, cu, 20, 2, 0.25, 0.3, torch.tensor([1])))
    assert not torch.equal(a, _cpp.attention(qkv, cu, 20, 2, 0.25, 0.3, torch.tensor([2])))
    # p = 0 with a seed: no dropout at all, the seed is not read.
    assert torch.equal(
        _cpp.attention(qkv, cu, 20, 2, 0.25), _cpp.attention(qkv, cu, 20, 2, 0.25, 0.0, torch.tensor([5]))
    )


def test_attention_with_lse_returns_logsumexp():
    gen = torch.Generator().manual_seed(5)
    lengths, heads, d = [7, 0, 20], 3, 16
    cu = _cu(lengths)
    qkv = torch.randn(27, 3 * heads * d, generator=gen)
    out, lse = ops.attention_with_lse(qkv, cu, 20, heads, 0.3)
    assert torch.equal(out, ops.attention(qkv, cu, 20, heads, 0.3))
    q, k = qkv.view(27, 3, heads, d)[:, 0].double(), qkv.view(27, 3, heads, d)[:, 1].double()
    for b in range(len(lengths)):
        s, e = int(cu[b]), int(cu[b + 1])
        scores = torch.einsum("ihd,jhd->hij", q[s:e], k[s:e]) * 0.3
        torch.testing.assert_close(lse[:, s:e].double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Determinism: bitwise-equal gradients run to run and for 1 or 2 threads
# ---------------------------------------------------------------------------------------------------------


def _all_grads():
    """Every op's gradients on one set of inputs, as a flat list."""
    gen = torch.Generator().manual_seed(9)
    grads = []

    def run(fn, *args):
        leaves = [_leaf(a) for a in args]
        out = fn(*leaves)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        grads.extend(a.grad for a in leaves if isinstance(a, torch.Tensor) and a.is_floating_point())

    t, n = 700, 96
    x, res = torch.randn(t, n, generator=gen), torch.randn(t, n, generator=gen)
    lw, lb, b = _vec(n, gen, base=1.0), _vec(n, gen), _vec(n, gen)
    run(_cpp.add_layernorm, x, res, lw, lb, 1e-12)
    run(_cpp.bias_residual_layernorm, x, b, res, lw, lb, 1e-12)
    run(_cpp.bias_activation, x, b, "gelu")
    ids = torch.randint(0, 30, (t,), generator=gen)
    tables = [torch.randn(30, n, generator=gen), torch.randn(t, n, generator=gen), torch.randn(2, n, generator=gen)]
    run(_cpp.embeddings, ids, torch.arange(t), None, *tables, lw, lb, 1e-12)
    w = torch.randn(n, 64, generator=gen) / 8
    run(_cpp.linear, torch.randn(t, 64, generator=gen), w, b, "gelu_tanh")
    run(_cpp.linear_residual_layernorm, torch.randn(t, 64, generator=gen), w, b, res, lw, lb, 1e-12)
    lengths = [300, 0, 1, 150, 249]
    qkv = torch.randn(t, 3 * n, generator=gen)
    run(_cpp.attention, qkv, _cu(lengths), 300, 2, 0.125, 0.1, torch.tensor([77]))
    return grads


def test_backward_is_deterministic():
    prev = torch.get_num_threads()
    try:
        first = _all_grads()
        again = _all_grads()
        torch.set_num_threads(1)
        single = _all_grads()
    finally:
        torch.set_num_threads(prev)
    for i, (a, b, c) in enumerate(zip(first, again, single, strict=True)):
        assert torch.equal(a, b), f"gradient {i}: two runs differ"
        assert torch.equal(a, c), (
            f"gradient {i}: {prev} threads and 1 thread differ by {(a - c).abs().max().item():.3g}"
        )


# ---------------------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, autograd registration, AOT dispatch incl. backward) on every op
# ---------------------------------------------------------------------------------------------------------


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    t, h = 7, 32

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    def g(*shape):
        return r(*shape).requires_grad_()

    ids = torch.randint(0, 50, (t,), generator=gen)
    pos = torch.arange(t)
    tt = torch.zeros(t, dtype=torch.long)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    seed = torch.tensor([3])
    qkv = r(t, 3 * 2 * 16)
    out, lse = ops.attention_with_lse(qkv, cu, 4, 2, 0.25, 0.2, seed)
    x, res, lw, w, b = r(t, h), r(t, h), r(h), r(48, h), r(48)
    return [
        # forward ops, with inputs requiring grad: the registered gradients are checked too
        ("embeddings", ops.embeddings.default, (ids, pos, tt, g(50, h), g(16, h), g(2, h), g(h), g(h), 1e-12)),
        ("add_layernorm", ops.add_layernorm.default, (g(t, h), g(t, h), g(h), g(h), 1e-5)),
        ("bias_activation", ops.bias_activation.default, (g(t, h), g(h), "gelu")),
        ("bias_residual_layernorm", ops.bias_residual_layernorm.default, (g(t, h), g(h), g(t, h), g(h), g(h), 1e-5)),
        ("linear", ops.linear.default, (g(t, h), g(48, h), g(48), "silu", None)),
        (
            "linear_residual_layernorm",
            ops.linear_residual_layernorm.default,
            (g(t, h), g(h, h), g(h), g(t, h), g(h), g(h), 1e-12, None),
        ),
        ("attention", ops.attention.default, (g(t, 96), cu, 4, 2, 0.25)),
        ("attention_dropout", ops.attention.default, (g(t, 96), cu, 4, 2, 0.25, 0.2, seed)),
        ("attention_with_lse", ops.attention_with_lse.default, (g(t, 96), cu, 4, 2, 0.25, 0.2, seed)),
        # backward ops (plain inputs)
        ("attention_backward", ops.attention_backward.default, (r(t, 32), qkv, out, lse, cu, 4, 2, 0.25, 0.2, seed)),
        ("layernorm_backward", ops.layernorm_backward.default, (r(t, h), x, r(h), res, lw, 1e-5)),
        ("bias_activation_backward", ops.bias_activation_backward.default, (r(t, h), x, r(h), "tanh")),
        (
            "embeddings_backward",
            ops.embeddings_backward.default,
            (r(t, h), ids, pos, tt, r(50, h), r(16, h), r(2, h), lw, 1e-12),
        ),
        ("linear_backward", ops.linear_backward.default, (r(t, 48), x, w, b, "gelu")),
        (
            "linear_residual_layernorm_backward",
            ops.linear_residual_layernorm_backward.default,
            (r(t, h), x, r(h, h), r(h), res, lw, 1e-12),
        ),
        ("_dropout_bits", ops._dropout_bits.default, (seed, ids, pos, tt)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_autograd_registration_covers_every_op():
    """Every op of the extension has an opcheck case above and an autograd kernel: a gradient, or for the
    backward ops one that raises (double backward). _dropout_bits (integers only) and _set_isa need none."""
    names = {n.removeprefix("fastbert::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbert::")}
    names -= {"real_token_indices", "_set_isa", "int8_info"}  # fastbert.padding's op (test_compile.py); no tensors
    int8 = {n for n in names if n.startswith("int8_")}  # opcheck cases in tests/test_int8.py; gradients raise
    untested = names - int8 - {case[0] for case in _opcheck_cases()}
    assert not untested, f"ops without an opcheck case: {sorted(untested)}"
    for name in names - {"_dropout_bits", "int8_prepack"}:  # int8_prepack: int8 weights only
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbert::{name}", "Autograd"), f"{name}: no autograd"


def test_expanded_output_gradient():
    """out.sum().backward() hands every op a stride-0 gradient: read as such, not as one row."""
    gen = torch.Generator().manual_seed(4)
    x, res, lw, lb = (
        torch.randn(9, 24, generator=gen),
        torch.randn(9, 24, generator=gen),
        torch.ones(24),
        torch.zeros(24),
    )
    qkv, cu = torch.randn(9, 3 * 2 * 8, generator=gen), _cu([4, 5])
    w = torch.randn(24, 24, generator=gen) / 5
    cases = [
        (_cpp.add_layernorm, reference.add_layernorm, [x, res, lw, lb, 1e-5]),
        (_cpp.bias_activation, reference.bias_activation, [x, lb, "silu"]),
        (_cpp.linear, reference.linear, [x, w, lb, "tanh"]),
        (_cpp.linear_residual_layernorm, reference.linear_residual_layernorm, [x, w, lb, res, lw, lb, 1e-5]),
        (_cpp.attention, reference.attention, [qkv, cu, 5, 2, 0.3, 0.2, torch.tensor([8])]),
    ]
    for cpp_fn, ref_fn, args in cases:
        got = [_leaf(a) for a in args]
        want = [_leaf(f64(a)) if isinstance(a, torch.Tensor) else a for a in args]
        cpp_fn(*got).sum().backward()
        ref_fn(*want).sum().backward()
        for g, r in zip(got, want, strict=True):
            if isinstance(g, torch.Tensor) and g.requires_grad:
                torch.testing.assert_close(g.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_double_backward_raises():
    x = torch.randn(5, 8, requires_grad=True)
    out = _cpp.bias_activation(x, None, "gelu")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"fastbert::bias_activation_backward has no gradient: double backward"):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the value
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dropout_p,seed,match",
    [
        (1.0, torch.tensor([1]), r"dropout_p must be in \[0, 1\), got 1(\.0)?$"),
        (-0.1, torch.tensor([1]), r"dropout_p must be in \[0, 1\), got -0.1"),
        (0.1, None, r"dropout_p = 0.1 needs a seed"),
        (0.1, torch.tensor([1.0]), r"seed must be an int64 tensor of one element, got torch.float32"),
        (0.1, torch.tensor([1, 2]), r"seed must be an int64 tensor of one element, got torch.int64 of shape \(2,\)"),
    ],
    ids=["p1", "negative_p", "no_seed", "float_seed", "two_seeds"],
)
def test_attention_bad_dropout(dropout_p, seed, match):
    qkv, cu = torch.randn(6, 96), _cu([6])
    with pytest.raises(ValueError, match=match):
        _cpp.attention(qkv, cu, 6, 2, 0.25, dropout_p, seed)
    with pytest.raises(
        RuntimeError,
        match=match.replace("torch.float32", "Float").replace("torch.int64 of shape \\(2,\\)", "Long of shape \\[2\\]"),
    ):
        ops.attention(qkv, cu, 6, 2, 0.25, dropout_p, seed)


def test_attention_seed_out_of_range():
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\*\*32\), got -1"):
        ops.attention(torch.randn(6, 96), _cu([6]), 6, 2, 0.25, 0.1, torch.tensor([-1]))


def test_backward_ops_bad_shapes():
    qkv, cu = torch.randn(6, 96), _cu([6])
    out, lse = ops.attention_with_lse(qkv, cu, 6, 2, 0.25)
    with pytest.raises(RuntimeError, match=r"grad_out shape \[6, 31\] does not match out shape \[6, 32\]"):
        ops.attention_backward(torch.randn(6, 31), qkv, out, lse, cu, 6, 2, 0.25)
    with pytest.raises(
        RuntimeError, match=r"lse must be a float32 CPU tensor of shape \(2, 6\), got Float of shape \[6\]"
    ):
        ops.attention_backward(torch.randn(6, 32), qkv, out, lse[0], cu, 6, 2, 0.25)
    with pytest.raises(RuntimeError, match=r"grad_out shape \[3, 8\] does not match x shape \[3, 7\]"):
        ops.layernorm_backward(torch.randn(3, 8), torch.randn(3, 7), None, None, torch.ones(7), 1e-12)
    with pytest.raises(RuntimeError, match=r"grad_out dtype BFloat16 does not match x dtype Float"):
        ops.bias_activation_backward(torch.randn(3, 7).bfloat16(), torch.randn(3, 7), None, "relu")
    with pytest.raises(RuntimeError, match=r"grad_out shape \[3, 5\] does not match the linear output shape \(3, 4\)"):
        ops.linear_backward(torch.randn(3, 5), torch.randn(3, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match=r"input_ids\[1\] = 10 is out of range for word_weight with 10 rows"):
        ops.embeddings_backward(
            torch.randn(2, 4),
            torch.tensor([0, 10]),
            torch.arange(2),
            None,
            torch.randn(10, 4),
            torch.randn(5, 4),
            None,
            torch.ones(4),
            1e-12,
        )


# ---------------------------------------------------------------------------------------------------------
# torch.compile traces forward and backward through the registered gradients
# ---------------------------------------------------------------------------------------------------------


def test_compiled_training_step_matches_eager():
    """One encoder-layer-shaped chain of every op type (dropout on): fullgraph, dynamic compile, same gradients."""
    torch._dynamo.reset()
    n, heads = 32, 2
    gen = torch.Generator().manual_seed(6)

    def layer(x, cu, w_qkv, b_qkv, w_o, b_o, lw, lb, seed):
        qkv = _cpp.linear(x, w_qkv, None)
        qkv = _cpp.bias_activation(qkv, b_qkv, None)
        ctx = _cpp.attention(qkv, cu, 10, heads, 0.25, 0.1, seed)
        y = _cpp.linear_residual_layernorm(ctx, w_o, b_o, x, lw, lb, 1e-12)
        h = _cpp.bias_activation(_cpp.linear(y, w_o, None), b_o, "gelu")
        return _cpp.bias_residual_layernorm(h, b_o, y, lw, lb, 1e-12)

    args = [
        torch.randn(20, n, generator=gen),
        _cu([7, 0, 10, 3]),
        torch.randn(3 * n, n, generator=gen) / 6,
        torch.randn(3 * n, generator=gen),
        torch.randn(n, n, generator=gen) / 6,
        torch.randn(n, generator=gen),
        _vec(n, gen, base=1.0),
        _vec(n, gen),
        torch.tensor([11]),
    ]

    def grads(fn):
        leaves = [_leaf(a) for a in args]
        fn(*leaves).pow(2).sum().backward()
        return [a.grad for a in leaves if a.is_floating_point()]

    eager = grads(layer)
    compiled = grads(torch.compile(layer, fullgraph=True, dynamic=True))
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        assert torch.equal(a, b), f"gradient {i}: compiled differs by {(a - b).abs().max().item():.3g}"
