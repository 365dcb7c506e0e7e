"""The triton backend (fastbert.kernels) against fastbert.reference in float64, op by op and model-wide.

Without a CUDA device the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py before
triton is imported; the interpreter does no bf16 arithmetic, so fp32 and fp16 are tested there, bf16 too on a
GPU). Tolerance (STYLE.md, ``helpers.assert_2x_rule``): error to the float64 reference <= 2 x plain PyTorch's
error at the same dtype + floor (fp32 1e-5, fp16 1e-2, bf16 5e-2). Shapes are small and awkward on purpose: the
interpreter is slow.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py does this already; kept so the file also runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import assert_2x_rule, dtype_id, f64  # noqa: E402

import fastbert  # noqa: E402
from fastbert import ops  # noqa: E402
from fastbert import reference as R  # noqa: E402

K = importlib.import_module("fastbert.kernels")
assert K.UNAVAILABLE_REASON is None, K.UNAVAILABLE_REASON
attention_mod = importlib.import_module("fastbert.kernels.attention")
layer_norm_mod = importlib.import_module("fastbert.kernels.layer_norm")
embeddings_mod = importlib.import_module("fastbert.kernels.embeddings")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def rand(*shape, dtype=torch.float32, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


# ---------------------------------------------------------------------------------------------------------
# Elementwise and row ops


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", [None, *R.ACTIVATIONS])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_activation(dtype, act, has_bias):
    x = rand(37, 97, dtype=dtype, scale=3.0)  # wide range: exercises erf/tanh tails and silu's exp overflow
    b = rand(97, dtype=dtype, seed=1) if has_bias else None
    assert_2x_rule(
        f"bias_activation[{act}]",
        K.bias_activation(x, b, act),
        R.bias_activation(x, b, act),
        R.bias_activation(f64(x), f64(b), act),
        dtype,
    )


def test_bias_activation_non_contiguous_and_extremes():
    wide = rand(9, 200, scale=1.0)
    x = wide[:, 3:101]  # row stride 200
    x[0, :4] = torch.tensor([80.0, -80.0, 1e-4, -1e-4])  # tanh/exp saturation, and tiny values
    b = rand(98, seed=2)
    for act in R.ACTIVATIONS:
        assert_2x_rule(f"non-contiguous {act}", K.bias_activation(x, b, act), R.bias_activation(x, b, act),
                       R.bias_activation(f64(x), f64(b), act), torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n_cols", [33, 768, 1023])
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_add_layernorm(dtype, n_cols, eps):
    x, res = rand(5, n_cols, dtype=dtype), rand(5, n_cols, dtype=dtype, seed=3)
    w, b = rand(n_cols, dtype=dtype, seed=4), rand(n_cols, dtype=dtype, seed=5)
    for r in (res, None):
        assert_2x_rule(
            f"add_layernorm(N={n_cols}, residual={r is not None})",
            K.add_layernorm(x, r, w, b, eps),
            R.add_layernorm(x, r, w, b, eps),
            R.add_layernorm(f64(x), f64(r), f64(w), f64(b), eps),
            dtype,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_residual_layernorm(dtype, has_bias):
    n = 97
    x = rand(11, 2 * n, dtype=dtype)[:, :n]  # non-contiguous rows
    res = rand(11, n, dtype=dtype, seed=6, scale=4.0) + 10  # a large common offset: cancellation in the variance
    bias = rand(n, dtype=dtype, seed=7) if has_bias else None
    w, b = rand(n, dtype=dtype, seed=8), rand(n, dtype=dtype, seed=9)
    assert_2x_rule(
        "bias_residual_layernorm",
        K.bias_residual_layernorm(x, bias, res, w, b, 1e-12),
        R.bias_residual_layernorm(x, bias, res, w, b, 1e-12),
        R.bias_residual_layernorm(f64(x), f64(bias), f64(res), f64(w), f64(b), 1e-12),
        dtype,
    )


def test_layernorm_keeps_tiny_eps():
    """A constant row has zero variance: with eps=1e-12 the output is the LayerNorm bias, never NaN, and eps is
    not clamped (a clamp to 1e-5 would show on a row of variance 1e-10)."""
    n = 64
    x = torch.full((2, n), 3.0, device=DEVICE)
    x[1] += rand(n, scale=1e-5)  # variance ~1e-10: normalised values ~1 only if eps stays 1e-12
    w, b = torch.ones(n, device=DEVICE), rand(n, seed=10)
    y = K.add_layernorm(x, None, w, b, 1e-12)
    exact = R.add_layernorm(f64(x), None, f64(w), f64(b), 1e-12)
    print("constant-row output", y[0, :4].tolist(), "max diff", (y.double() - exact).abs().max().item())
    assert torch.equal(y[0], b)
    assert (y.double() - exact).abs().max().item() < 1e-3


# ---------------------------------------------------------------------------------------------------------
# Embeddings


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("types", ["ids", "default", "none"])
@pytest.mark.parametrize("width", [48, 97])
def test_embeddings(dtype, types, width):
    n, vocab, n_pos = 29, 50, 40
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    ids[0], ids[1] = 0, vocab - 1  # both ends of the table
    pos = torch.randint(0, n_pos, (n,), generator=g).to(DEVICE)
    tt = torch.randint(0, 2, (n,), generator=g).to(DEVICE) if types == "ids" else None
    word, position = rand(vocab, width, dtype=dtype, seed=12), rand(n_pos, width, dtype=dtype, seed=13)
    type_table = rand(2, width, dtype=dtype, seed=14) if types != "none" else None
    w, b = rand(width, dtype=dtype, seed=15), rand(width, dtype=dtype, seed=16)
    args = (ids, pos, tt)
    assert_2x_rule(
        f"embeddings(types={types})",
        K.embeddings(*args, word, position, type_table, w, b, 1e-12),
        R.embeddings(*args, word, position, type_table, w, b, 1e-12),
        R.embeddings(*args, f64(word), f64(position), f64(type_table), f64(w), f64(b), 1e-12),
        dtype,
    )


def test_embeddings_int32_ids():
    ids = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32, device=DEVICE)
    pos = torch.arange(5, dtype=torch.int32, device=DEVICE)
    word, position, w, b = rand(10, 32, seed=1), rand(8, 32, seed=2), rand(32, seed=3), rand(32, seed=4)
    got = K.embeddings(ids, pos, None, word, position, None, w, b, 1e-5)
    exact = R.embeddings(ids.long(), pos.long(), None, f64(word), f64(position), None, f64(w), f64(b), 1e-5)
    assert_2x_rule("embeddings(int32 ids)", got, got, exact, torch.float32)


@pytest.mark.parametrize(
    "which,bad", [("input_ids", -1), ("input_ids", 10), ("position_ids", 8), ("token_type_ids", 2)]
)
def test_embeddings_rejects_out_of_range_ids(which, bad):
    ids = {"input_ids": torch.tensor([1, 2, 3]), "position_ids": torch.tensor([0, 1, 2])}
    ids["token_type_ids"] = torch.tensor([0, 1, 0])
    ids[which] = ids[which].clone()
    ids[which][1] = bad
    ids = {k: v.to(DEVICE) for k, v in ids.items()}
    tables = (rand(10, 32, seed=1), rand(8, 32, seed=2), rand(2, 32, seed=5), rand(32, seed=3), rand(32, seed=4))
    with pytest.raises(IndexError, match=f"{which} contains {bad}"):
        K.embeddings(ids["input_ids"], ids["position_ids"], ids["token_type_ids"], *tables, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Linear layers (cuBLAS/torch matmul + fused epilogue)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
def test_linear(dtype, act):
    x, w, b = rand(13, 40, dtype=dtype), rand(72, 40, dtype=dtype, seed=1, scale=0.2), rand(72, dtype=dtype, seed=2)
    assert K.prepack_linear(w) is None
    assert_2x_rule(
        f"linear[{act}]", K.linear(x, w, b, act), R.linear(x, w, b, act), R.linear(f64(x), f64(w), f64(b), act), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_linear_residual_layernorm(dtype):
    x, w, b = rand(13, 40, dtype=dtype), rand(72, 40, dtype=dtype, seed=1, scale=0.2), rand(72, dtype=dtype, seed=2)
    res, g, beta = rand(13, 72, dtype=dtype, seed=3), rand(72, dtype=dtype, seed=4), rand(72, dtype=dtype, seed=5)
    assert_2x_rule(
        "linear_residual_layernorm",
        K.linear_residual_layernorm(x, w, b, res, g, beta, 1e-12),
        R.linear_residual_layernorm(x, w, b, res, g, beta, 1e-12),
        R.linear_residual_layernorm(f64(x), f64(w), f64(b), f64(res), f64(g), f64(beta), 1e-12),
        dtype,
    )


# ---------------------------------------------------------------------------------------------------------
# Attention


def _attention_case(dtype, head_dim, num_heads, lengths, stride_pad=0, seed=0):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    width = 3 * num_heads * head_dim
    qkv = rand(int(cu[-1]), width + stride_pad, dtype=dtype, seed=seed, scale=1.5)[:, :width]
    return qkv, cu.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "head_dim,num_heads,lengths",
    [
        (32, 2, [1, 97, 0, 13]),  # seq 1, an empty sequence, max > 64 (128-query blocks for fp16)
        (48, 2, [65, 7]),  # non-power-of-2 head_dim, padded to 64
        (64, 1, [64, 33, 2]),  # max <= 64: 64-query blocks
        (80, 1, [40, 3]),
        (128, 1, [17, 66]),
        (8, 3, [5, 9]),  # tiny test-model head_dim, padded to 16
    ],
    ids=["d32-seq1-empty-97", "d48-65", "d64-short", "d80", "d128", "d8"],
)
def test_attention(dtype, head_dim, num_heads, lengths):
    qkv, cu = _attention_case(dtype, head_dim, num_heads, lengths, stride_pad=5)
    scale = 1.0 / math.sqrt(head_dim)
    max_len = max(lengths)
    assert_2x_rule(
        f"attention(d={head_dim}, lengths={lengths})",
        K.attention(qkv, cu, max_len, num_heads, scale),
        R.attention(qkv, cu, max_len, num_heads, scale),
        R.attention(f64(qkv), cu, max_len, num_heads, scale),
        dtype,
    )


def test_attention_larger_max_seqlen_and_ignores_other_sequences():
    """max_seqlen only bounds the grid (a larger one changes nothing), and no token sees another sequence."""
    qkv, cu = _attention_case(torch.float32, 32, 2, [5, 70, 3], seed=4)
    out = K.attention(qkv, cu, 70, 2, 0.3)
    assert torch.equal(out, K.attention(qkv, cu, 200, 2, 0.3))
    alone = K.attention(qkv[5:75].contiguous(), torch.tensor([0, 70], dtype=torch.int32, device=DEVICE), 70, 2, 0.3)
    print("second sequence alone vs in the batch:", (alone - out[5:75]).abs().max().item())
    assert torch.allclose(alone, out[5:75], rtol=0, atol=1e-6)


def test_attention_empty_batch():
    qkv = torch.empty(0, 3 * 2 * 32, device=DEVICE)
    assert K.attention(qkv, torch.zeros(1, dtype=torch.int32, device=DEVICE), 0, 2, 0.1).shape == (0, 64)


# ---------------------------------------------------------------------------------------------------------
# Bad input and launch configuration


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        K.bias_activation(x, None, "gelu")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        K.bias_activation(x.float(), None, "swish")
    with pytest.raises(ValueError, match="head_dim 256"):
        K.attention(torch.randn(3, 3 * 256, device=DEVICE), torch.tensor([0, 3], dtype=torch.int32), 3, 1, 0.1)
    with pytest.raises(TypeError, match="int32"):
        K.attention(torch.randn(3, 96, device=DEVICE), torch.tensor([0, 3], device=DEVICE), 3, 1, 0.1)
    with pytest.raises(ValueError, match=r"bias has shape \(7,\) but must be \(8,\)"):
        K.bias_activation(x.float(), torch.zeros(7, device=DEVICE), None)


def test_every_launch_config_is_compiled_ahead_of_time():
    """The configs the launchers choose are exactly those test_triton_compile.py compiles (forward and backward;
    with FASTBERT_AOT_FULL unset the compile test runs a subset of these, see there)."""
    specs = attention_mod.aot_specs()

    def configs(kernel):
        return {(s.constexprs["BLOCK_D"], s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps,
                 s.num_stages, s.signature["qkv_ptr"]) for s in specs if s.fn is kernel}  # fmt: skip

    fwd = configs(attention_mod._attention_fwd_kernel)
    dkdv, dq = configs(attention_mod._attention_bwd_dkdv_kernel), configs(attention_mod._attention_bwd_dq_kernel)
    fwd_variants = {(s.constexprs["HEAD_DIM"], s.constexprs["HAS_DROPOUT"], s.constexprs["STORE_STATS"])
                    for s in specs if s.fn is attention_mod._attention_fwd_kernel}  # fmt: skip
    types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype, ty in types.items():
        for head_dim in range(1, attention_mod.MAX_HEAD_DIM + 1):
            for max_seqlen in (1, 64, 65, 100000):
                for dropout in (False, True):
                    c = attention_mod.attention_config(head_dim, dtype, max_seqlen, dropout)
                    assert (c.BLOCK_D, c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages, ty) in fwd, (dtype, head_dim)
            c_kv, c_q = attention_mod.attention_bwd_config(head_dim, dtype)
            assert (c_kv.BLOCK_D, c_kv.BLOCK_M, c_kv.BLOCK_N, c_kv.num_warps, c_kv.num_stages, ty) in dkdv
            assert (c_q.BLOCK_D, c_q.BLOCK_M, c_q.BLOCK_N, c_q.num_warps, c_q.num_stages, ty) in dq
    for head_dim in attention_mod.HEAD_DIMS:
        for has_dropout, store_stats in attention_mod.FWD_VARIANTS:
            assert (head_dim, has_dropout, store_stats) in fwd_variants
    for module, config in ((layer_norm_mod, layer_norm_mod.layer_norm_config),
                           (embeddings_mod, embeddings_mod.embeddings_config)):  # fmt: skip
        blocks = {}
        for s in module.aot_specs():
            if "BLOCK_SIZE" in s.constexprs:
                blocks.setdefault(s.fn, set()).add(s.constexprs["BLOCK_SIZE"])
        assert len(blocks) >= 2, "forward and backward row kernels"
        for n in range(1, module.MAX_COLUMNS + 1):
            for kernel_blocks in blocks.values():
                assert config(n)[0] in kernel_blocks, (module.__name__, n)


# ---------------------------------------------------------------------------------------------------------
# Whole model through the triton backend


def test_backend_resolves_to_these_kernels():
    backend = ops.resolve_backend("triton", DEVICE)
    assert backend.name == "triton" and backend.module is K


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra"])
def test_model_matches_transformers_fp32(tmp_path, family):
    from checkpoints import make_checkpoint, make_hf_model, random_batch

    kw = dict(hidden=48, heads=3, layers=2, act="gelu_new" if family == "electra" else "gelu")
    path = make_checkpoint(tmp_path, family, **kw)
    hf = make_hf_model(family, **kw).to(DEVICE)
    ids, mask = random_batch(family, [7, 1, 12])
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    fb = fastbert.AutoModel.from_pretrained(path, device=DEVICE, backend="triton")
    assert fb.backend.name == "triton"
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = fb(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    diff = (got[valid] - want[valid]).abs().max().item()
    print(f"{family} [triton, fp32] last_hidden_state max|diff| on real tokens = {diff:.3g}")
    assert diff < 1e-4


def test_model_fp16_error_within_3x_transformers_fp16(tmp_path):
    """STYLE.md: in fp16, fastbert's error to HF-fp32 must be under 3x HF-fp16's own error."""
    from checkpoints import make_checkpoint, make_hf_model, random_batch

    kw = dict(hidden=64, heads=4, layers=2)
    path = make_checkpoint(tmp_path, "bert", **kw)
    hf32 = make_hf_model("bert", **kw).to(DEVICE)
    hf16 = make_hf_model("bert", **kw).to(DEVICE, torch.float16)
    ids, mask = random_batch("bert", [9, 20, 3])
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    fb = fastbert.AutoModel.from_pretrained(path, device=DEVICE, dtype=torch.float16, backend="triton")
    with torch.no_grad():
        ref = hf32(input_ids=ids, attention_mask=mask).last_hidden_state
        base = hf16(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        got = fb(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    valid = mask.bool()
    err = (got[valid] - ref[valid]).abs().max().item()
    base_err = (base[valid] - ref[valid]).abs().max().item()
    print(f"fp16: max|fastbert-triton - HF fp32| = {err:.3g}, max|HF fp16 - HF fp32| = {base_err:.3g}")
    assert err < 3 * base_err
