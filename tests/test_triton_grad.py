"""Gradients of the triton backend (fastbert.kernels) against fastbert.reference in float64 with autograd.

Every differentiable input of every op, at fp32 and fp16 (bf16 too on a GPU), under the rule of STYLE.md
(``helpers.assert_2x_rule``: error to float64 <= 2 x plain PyTorch's error at the same dtype + floor), on
awkward shapes: 1 token, 37 features, empty sequences inside a batch, sequences longer than a block, 0 tokens.
Attention dropout: the same mask as the reference for the same seed (forward and gradients, and the bits
themselves); the backward kernels are deterministic (two runs bitwise equal); each custom op passes
``torch.library.opcheck``. Without CUDA the kernels run under TRITON_INTERPRET=1, so shapes stay small.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does this already; kept so the file also runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_2x_rule, dtype_id  # noqa: E402

from fastbert import reference as R  # noqa: E402

K = importlib.import_module("fastbert.kernels")
assert K.UNAVAILABLE_REASON is None, K.UNAVAILABLE_REASON

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
OPS = torch.ops.fastbert_triton


def rand(*shape, scale=1.0, seed=0):
    """float64 on DEVICE (cast per run)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def run(fn, args, diff, dtype, grad_out):
    """fn(*args) with the float tensors of ``args`` cast to ``dtype`` (those at positions ``diff`` requiring
    grad), backpropagated from ``grad_out``: (output, [grad of each diff input])."""
    leaves = []
    cast = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.to(dtype).detach().requires_grad_(i in diff)
            if i in diff:
                leaves.append(a)
        cast.append(a)
    out = fn(*cast)
    out.backward(grad_out.to(dtype))
    return out, [leaf.grad for leaf in leaves]


def compare(name, fused, reference, args, diff, dtype, seed=0):
    """The output and the gradient of every input at ``diff`` of ``fused`` vs ``reference`` (the 2x rule); a
    missing gradient fails."""
    with torch.no_grad():
        shape = reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                            for a in args]).shape  # fmt: skip
    g = rand(*shape, seed=seed + 1000)
    exact, exact_grads = run(reference, args, diff, torch.float64, g)
    plain, plain_grads = run(reference, args, diff, dtype, g)
    got, got_grads = run(fused, args, diff, dtype, g)
    assert_2x_rule(f"{name} out", got, plain, exact, dtype)
    for i, got_g, plain_g, exact_g in zip(sorted(diff), got_grads, plain_grads, exact_grads, strict=True):
        assert got_g is not None, f"{name}: no gradient for argument {i}"
        assert_2x_rule(f"{name} d(arg {i})", got_g, plain_g, exact_g, dtype)


# ---------------------------------------------------------------------------------------------------------
# Elementwise and row ops


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", [None, *R.ACTIVATIONS])
def test_bias_activation_grad(dtype, act):
    x = rand(13, 37, scale=3.0, seed=1)  # wide range: erf / tanh tails, silu's exp overflow
    x[0, :4] = torch.tensor([80.0, -80.0, 0.0, 1e-4])
    compare(f"bias_activation[{act}]", K.bias_activation, R.bias_activation, (x, rand(37, seed=2), act), {0, 1}, dtype)


@pytest.mark.parametrize("n_rows", [0, 1], ids=["0tokens", "1token"])
def test_bias_activation_grad_tiny(n_rows):
    args = (rand(n_rows, 37, seed=3), rand(37, seed=4), "gelu")
    compare("bias_activation tiny", K.bias_activation, R.bias_activation, args, {0, 1}, torch.float32)
    compare("bias_activation no bias", K.bias_activation, R.bias_activation, (args[0], None, "silu"), {0},
            torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_rows", [1, 40, 0], ids=["1token", "40tokens", "0tokens"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["residual", "noresidual"])
def test_add_layernorm_grad(dtype, n_rows, has_residual):
    n = 37
    x = rand(n_rows, n, seed=5)
    res = rand(n_rows, n, seed=6, scale=3.0) + 5 if has_residual else None  # an offset: cancellation
    args = (x, res, rand(n, seed=7), rand(n, seed=8), 1e-12)
    diff = {0, 1, 2, 3} if has_residual else {0, 2, 3}
    compare(f"add_layernorm(T={n_rows})", K.add_layernorm, R.add_layernorm, args, diff, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_residual_layernorm_grad(dtype, has_bias):
    n = 96
    x = rand(11, 2 * n, seed=9)[:, :n]  # non-contiguous rows
    args = (x, rand(n, seed=10) if has_bias else None, rand(11, n, seed=11), rand(n, seed=12), rand(n, seed=13), 1e-5)
    diff = {0, 1, 2, 3, 4} if has_bias else {0, 2, 3, 4}
    compare("bias_residual_layernorm", K.bias_residual_layernorm, R.bias_residual_layernorm, args, diff, dtype)


def test_bias_residual_layernorm_grad_wide():
    """4100 features: a row block above MAX_DBIAS_BLOCK, where dbias is summed from dx instead of in the kernel."""
    n = 4100
    args = (rand(3, n, seed=15), rand(n, seed=16), rand(3, n, seed=17), rand(n, seed=18), rand(n, seed=19), 1e-5)
    compare("bias_residual_layernorm wide", K.bias_residual_layernorm, R.bias_residual_layernorm, args,
            {0, 1, 2, 3, 4}, torch.float32)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Embeddings


def _embedding_args(types, n=12, width=37, vocab=11, n_pos=9, seed=14):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    if n >= 4:
        ids[:3] = 4  # one id used by several tokens: its rows are summed
        ids[3] = vocab - 1
    pos = torch.randint(0, n_pos, (n,), generator=g)
    tt = torch.randint(0, 2, (n,), generator=g) if types == "ids" else None
    type_table = rand(2, width, seed=seed + 3) if types != "none" else None
    return (ids.to(DEVICE), pos.to(DEVICE), tt if tt is None else tt.to(DEVICE), rand(vocab, width, seed=seed + 1),
            rand(n_pos, width, seed=seed + 2), type_table, rand(width, seed=seed + 4), rand(width, seed=seed + 5),
            1e-12)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("types", ["ids", "default", "none"])
def test_embeddings_grad(dtype, types):
    args = _embedding_args(types)
    diff = {3, 4, 5, 6, 7} if types != "none" else {3, 4, 6, 7}
    compare(f"embeddings(types={types})", K.embeddings, R.embeddings, args, diff, dtype)


@pytest.mark.parametrize("n", [0, 1], ids=["0tokens", "1token"])
def test_embeddings_grad_tiny(n):
    compare("embeddings tiny", K.embeddings, R.embeddings, _embedding_args("ids", n=n), {3, 4, 5, 6, 7},
            torch.float32)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Linear layers


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", [None, "gelu", "tanh"])
def test_linear_grad(dtype, act):
    args = (rand(13, 40, seed=20), rand(37, 40, seed=21, scale=0.2), rand(37, seed=22), act)
    compare(f"linear[{act}]", K.linear, R.linear, args, {0, 1, 2}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_linear_residual_layernorm_grad(dtype):
    args = (rand(13, 40, seed=23), rand(37, 40, seed=24, scale=0.2), rand(37, seed=25), rand(13, 37, seed=26),
            rand(37, seed=27), rand(37, seed=28), 1e-12)  # fmt: skip
    compare("linear_residual_layernorm", K.linear_residual_layernorm, R.linear_residual_layernorm, args,
            {0, 1, 2, 3, 4, 5}, dtype)  # fmt: skip


def test_linear_backward_recomputes_an_unsaved_gemm():
    """Called with save_pre=False (the inference path) the ops still differentiate: the GEMM is recomputed."""
    x, w, b = rand(5, 16, seed=29), rand(24, 16, seed=30), rand(24, seed=31)

    def act_op(x, w, b, act):
        return OPS.linear_activation(x, w, b, act, False)[0]

    def ln_op(x, w, b, res, g, beta, eps):
        return OPS.linear_residual_layernorm(x, w, b, res, g, beta, eps, False)[0]

    compare("linear_activation(save_pre=False)", act_op, R.linear, (x, w, b, "gelu_tanh"), {0, 1, 2}, torch.float32)
    args = (x, w, b, rand(5, 24, seed=32), rand(24, seed=33), rand(24, seed=34), 1e-5)
    compare("linear_residual_layernorm(save_pre=False)", ln_op, R.linear_residual_layernorm, args,
            {0, 1, 2, 3, 4, 5}, torch.float32)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Attention


def _attention_args(lengths, num_heads=2, head_dim=16, dropout_p=0.0, seed=1234, scale=1.5):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    qkv = rand(int(cu[-1]), 3 * num_heads * head_dim, seed=sum(lengths) + head_dim, scale=scale)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE) if dropout_p > 0 else None
    max_len = max(lengths) if lengths else 0
    return (qkv, cu.to(DEVICE), max_len, num_heads, 1.0 / math.sqrt(head_dim), dropout_p, seed_t)


ATTENTION_CASES = {
    "seq1-empty-37": ([1, 0, 37, 5], 16),  # 1 token, an empty sequence, 37 > every backward block
    "d32-two": ([9, 14], 32),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_attention_grad(dtype, case, dropout_p):
    lengths, head_dim = ATTENTION_CASES[case]
    args = _attention_args(lengths, head_dim=head_dim, dropout_p=dropout_p)
    compare(f"attention[{case}, p={dropout_p}]", K.attention, R.attention, args, {0}, dtype)


def test_attention_grad_longer_than_forward_block():
    """70 tokens: two 64-query forward blocks, several backward blocks, padding lanes in every one of them."""
    args = _attention_args([70, 3], num_heads=1, head_dim=16, dropout_p=0.1, seed=2**32 - 7)
    compare("attention[70 tokens, p=0.1]", K.attention, R.attention, args, {0}, torch.float32)


@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=["no-sequences", "empty-sequences"])
def test_attention_grad_zero_tokens(lengths):
    compare("attention[0 tokens]", K.attention, R.attention, _attention_args(lengths), {0}, torch.float32)


def test_attention_grad_without_stored_stats():
    """The op run without its softmax statistics (store_stats=False) recomputes them in backward."""
    qkv, cu, max_len, heads, scale, p, seed = _attention_args([7, 20], dropout_p=0.2)

    def op(qkv, cu, max_len, heads, scale, p, seed):
        return OPS.attention(qkv, cu, max_len, heads, scale, p, seed, False)[0]

    compare("attention(store_stats=False)", op, R.attention, (qkv, cu, max_len, heads, scale, p, seed), {0},
            torch.float32)  # fmt: skip


@pytest.mark.parametrize("seed,dropout_p", [(0, 0.1), (2**31 + 5, 0.6), (2**32 - 1, 0.5)])
def test_attention_dropout_bits_match_reference(seed, dropout_p):
    """The kernel keeps exactly the entries reference.dropout_bits keeps: with q = k = 0 every probability is
    1 / len, and with v_j the one-hot vector e_j the output row i is row i of the dropped probabilities."""
    lengths, heads, head_dim = [5, 32, 0, 17], 2, 32
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    total = int(cu[-1])
    qkv = torch.zeros(total, 3, heads, head_dim)
    for b, n in enumerate(lengths):
        start = int(cu[b])
        qkv[start : start + n, 2, :, :n] = torch.eye(n)[:, None, :]  # v of key j = e_j, in every head
    qkv = qkv.reshape(total, -1).to(DEVICE)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    out = K.attention(qkv, cu.to(DEVICE), max(lengths), heads, 1.0, dropout_p, seed_t).view(total, heads, head_dim)
    threshold = R.dropout_threshold(dropout_p)
    for b, n in enumerate(lengths):
        start = int(cu[b])
        if n == 0:
            continue
        rows = torch.arange(start, start + n)[None, :, None]
        bits = R.dropout_bits(torch.tensor(seed), torch.arange(heads)[:, None, None], rows, torch.arange(n))
        want = (bits >= threshold).permute(1, 0, 2)  # (rows, heads, keys)
        got = out[start : start + n, :, :n].cpu() > 0
        assert torch.equal(got, want), f"sequence {b}: {int((got != want).sum())} mask bits differ"
        kept = out[start : start + n, :, :n].cpu()[want]
        torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / (n * (1.0 - dropout_p))))
    print(f"seed {seed}, p {dropout_p}: all {int(sum(n * n for n in lengths)) * heads} mask bits match")


def test_attention_dropout_changes_the_output():
    qkv, cu, max_len, heads, scale, _, _ = _attention_args([9, 14])
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    base = K.attention(qkv.float(), cu, max_len, heads, scale)
    dropped = K.attention(qkv.float(), cu, max_len, heads, scale, 0.5, seed)
    other = K.attention(qkv.float(), cu, max_len, heads, scale, 0.5, seed + 1)
    assert not torch.equal(base, dropped) and not torch.equal(dropped, other)
    assert torch.equal(dropped, K.attention(qkv.float(), cu, max_len, heads, scale, 0.5, seed.clone()))


def test_attention_dropout_arguments_are_checked():
    qkv, cu, max_len, heads, scale, _, _ = _attention_args([3])
    qkv = qkv.float()
    seed = torch.tensor([1], dtype=torch.int64, device=DEVICE)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            K.attention(qkv, cu, max_len, heads, scale, p, seed)
    with pytest.raises(ValueError, match="needs a seed"):
        K.attention(qkv, cu, max_len, heads, scale, 0.1)
    with pytest.raises(ValueError, match="int64 tensor of one element"):
        K.attention(qkv, cu, max_len, heads, scale, 0.1, seed.int())
    with pytest.raises(ValueError, match="int64 tensor of one element"):
        K.attention(qkv, cu, max_len, heads, scale, 0.1, torch.tensor([1, 2], device=DEVICE))


# ---------------------------------------------------------------------------------------------------------
# Determinism, double backward, torch.library contracts


def _grads_once(fn, args, diff):
    with torch.no_grad():
        shape = fn(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]).shape
    return run(fn, args, diff, torch.float32, rand(*shape, seed=50))[1]


@pytest.mark.parametrize("op", ["attention", "layernorm", "embeddings", "bias_activation"])
def test_backward_is_deterministic(op):
    """Two runs give bitwise-equal gradients (no atomics anywhere, reductions in a fixed order)."""
    if op == "attention":
        fn, args, diff = K.attention, _attention_args([9, 1, 20], dropout_p=0.25), {0}
    elif op == "layernorm":
        fn, diff = K.bias_residual_layernorm, {0, 1, 2, 3, 4}
        args = (rand(20, 37, seed=40), rand(37, seed=41), rand(20, 37, seed=42), rand(37, seed=43), rand(37, seed=44),
                1e-5)  # fmt: skip
    elif op == "embeddings":
        fn, args, diff = K.embeddings, _embedding_args("ids"), {3, 4, 5, 6, 7}
    else:
        fn, args, diff = K.bias_activation, (rand(20, 37, seed=45), rand(37, seed=46), "gelu"), {0, 1}
    first, second = _grads_once(fn, args, diff), _grads_once(fn, args, diff)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_inference_path_matches_the_training_path():
    """Eager inference (no grad: the launchers directly) and a differentiable call (the custom ops) give bitwise
    the same outputs, dropout included."""
    qkv, cu, max_len, heads, scale, p, seed = _attention_args([9, 0, 20], dropout_p=0.25)
    x, w, b = rand(6, 16, seed=51).float(), rand(37, 16, seed=52).float(), rand(37, seed=53).float()
    res, g, beta = rand(6, 37, seed=54).float(), rand(37, seed=55).float(), rand(37, seed=56).float()
    calls = {
        "attention": (K.attention, (qkv.float(), cu, max_len, heads, scale, p, seed)),
        "linear": (K.linear, (x, w, b, "gelu")),
        "linear_residual_layernorm": (K.linear_residual_layernorm, (x, w, b, res, g, beta, 1e-5)),
        "bias_residual_layernorm": (K.bias_residual_layernorm, (res, b, res, g, beta, 1e-5)),
        "embeddings": (K.embeddings, tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                           for a in _embedding_args("ids"))),
    }  # fmt: skip
    for name, (fn, args) in calls.items():
        with torch.no_grad():
            inference = fn(*args)
        leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]  # fmt: skip
        training = fn(*leaves)
        assert training.requires_grad, name
        assert torch.equal(inference, training.detach()), name


def test_torch_compile_traces_forward_and_backward():
    """A block of the encoder through torch.compile(fullgraph=True): the custom ops are graph nodes, forward and
    backward; outputs and gradients equal eager's bitwise. (aot_eager: inductor is not needed to trace.)"""
    qkv, cu, max_len, heads, scale, p, seed = _attention_args([4, 0, 5], dropout_p=0.1)
    w, b = rand(32, 32, seed=57).float(), rand(32, seed=58).float()
    g, beta = rand(32, seed=59).float(), rand(32, seed=60).float()

    def block(qkv, w, b, g, beta):
        ctx = K.attention(qkv, cu, max_len, heads, scale, p, seed)
        return K.linear_residual_layernorm(K.linear(ctx, w, b, "gelu"), w, b, ctx, g, beta, 1e-5)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = [t.detach().float().requires_grad_() for t in (qkv, w, b, g, beta)]
        out = fn(*leaves)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for eager, traced in zip(*results, strict=True):
        assert torch.equal(eager, traced)


def test_double_backward_raises():
    x = rand(4, 37, seed=47).float().requires_grad_()
    w, b = rand(37, seed=48).float(), rand(37, seed=49).float()
    (gx,) = torch.autograd.grad(K.add_layernorm(x, None, w, b, 1e-5).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()


def _opcheck_cases():
    """(op, args) for every custom op of the backend, small shapes (opcheck runs each several times)."""
    f = torch.float32
    x, res, v = rand(3, 37, seed=60).to(f), rand(3, 37, seed=61).to(f), rand(37, seed=62).to(f)
    ids, pos, tt, word, position, types, g, beta, eps = _embedding_args("ids", n=5)
    word, position, types, g, beta = (t.to(f) for t in (word, position, types, g, beta))
    qkv, cu, max_len, heads, scale, p, seed = _attention_args([3, 0, 4], head_dim=16, dropout_p=0.2)
    qkv = qkv.to(f)
    out, stats = OPS.attention(qkv, cu, max_len, heads, scale, p, seed, True)
    lin_x, lin_w = rand(3, 16, seed=63).to(f), rand(37, 16, seed=64).to(f)
    return {
        "bias_activation": (OPS.bias_activation, (x, v, "gelu")),
        "bias_activation_backward": (OPS.bias_activation_backward, (res, x, v, "silu")),
        "add_layer_norm": (OPS.add_layer_norm, (x, v, res, v, v, 1e-5)),
        "add_layer_norm_backward": (OPS.add_layer_norm_backward, (res, x, None, res, v, 1e-5)),
        "embeddings": (OPS.embeddings, (ids, pos, tt, word, position, types, g, beta, eps)),
        "embeddings_backward": (
            OPS.embeddings_backward,
            (rand(5, 37, seed=65).to(f), ids, pos, None, word, position, types, g, eps),
        ),
        "attention": (OPS.attention, (qkv, cu, max_len, heads, scale, p, seed, True)),
        "attention_backward": (
            OPS.attention_backward,
            (rand(*out.shape, seed=66).to(f), qkv, out, stats, cu, max_len, heads, scale, p, seed),
        ),
        "linear_activation": (OPS.linear_activation, (lin_x, lin_w, v, "gelu", True)),
        "linear_residual_layernorm": (OPS.linear_residual_layernorm, (lin_x, lin_w, v, res, v, v, 1e-5, True)),
    }


OPCHECK_OPS = ["bias_activation", "bias_activation_backward", "add_layer_norm", "add_layer_norm_backward",
               "embeddings", "embeddings_backward", "attention", "attention_backward", "linear_activation",
               "linear_residual_layernorm"]  # fmt: skip


@pytest.mark.parametrize("name", OPCHECK_OPS)
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    differentiable = not name.endswith("_backward")
    args = tuple(
        a.detach().requires_grad_(differentiable and a.is_floating_point()) if isinstance(a, torch.Tensor) else a
        for a in args
    )
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40 + 3])
def test_attention_seed_outside_uint32_is_refused(seed):
    """Seeds are uint32 on every backend (reference.check_dropout): a wider one raises instead of being truncated."""
    qkv = torch.randn(4, 3 * 2 * 16, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="seed must be in"):
        K.attention(qkv, cu, 4, 2, 0.25, 0.1, torch.tensor([seed], dtype=torch.int64, device=DEVICE))
