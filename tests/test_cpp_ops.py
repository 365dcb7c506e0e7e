"""The C++ ops (fastbert._cpp, torch.ops.fastbert.*) against fastbert.reference evaluated in float64.

Tolerance (STYLE.md, ``helpers.assert_2x_rule``): error <= 2 x (plain PyTorch's error at the same dtype) +
floor (fp32 1e-5, bf16 5e-2), both measured against the float64 reference. Every numeric test runs on both kernel
tables the CPU can run ("avx512" and the portable "base"), so the baseline build is covered on an AVX-512 machine
too.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import FLOOR, assert_2x_rule, dtype_id, f64

from fastbert import reference

_cpp = pytest.importorskip("fastbert._cpp")
if _cpp.UNAVAILABLE_REASON is not None:
    pytest.skip(f"C++ extension not built: {_cpp.UNAVAILABLE_REASON}", allow_module_level=True)

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


def _params(n: int, gen: torch.Generator, dtype=torch.float32):
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(dtype)
    return w, b


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    """Same values, row stride larger than the row (a column slice of a wider buffer)."""
    wide = torch.zeros(x.shape[0], x.shape[1] + 7, dtype=x.dtype)
    wide[:, 3 : 3 + x.shape[1]] = x
    out = wide[:, 3 : 3 + x.shape[1]]
    assert not out.is_contiguous() or x.shape[0] <= 1
    return out


# ---------------------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (97, 1023), (513, 96)], ids=["T1-E64", "T97-E1023", "T513-E96"])
@pytest.mark.parametrize("types", ["with_types", "no_type_ids", "no_type_table"])
def test_embeddings(isa, dtype, tokens, hidden, types):
    gen = torch.Generator().manual_seed(tokens + hidden)
    word = torch.randn(300, hidden, generator=gen).to(dtype)
    pos = torch.randn(600, hidden, generator=gen).to(dtype)
    ttw = torch.randn(2, hidden, generator=gen).to(dtype) if types != "no_type_table" else None
    ids = torch.randint(0, 300, (tokens,), generator=gen, dtype=torch.int32)
    pids = torch.randint(0, 600, (tokens,), generator=gen)
    tt = torch.randint(0, 2, (tokens,), generator=gen) if types == "with_types" else None
    lw, lb = _params(hidden, gen)
    out = _cpp.embeddings(ids, pids, tt, word, pos, ttw, lw, lb, 1e-12)
    ref = reference.embeddings(ids, pids, tt, f64(word), f64(pos), f64(ttw), f64(lw), f64(lb), 1e-12)
    plain = reference.embeddings(ids, pids, tt, word, pos, ttw, lw.to(dtype), lb.to(dtype), 1e-12)
    assert_2x_rule("embeddings", out, plain, ref, dtype)


# ---------------------------------------------------------------------------------------------------------
# LayerNorm fusions and bias + activation
# ---------------------------------------------------------------------------------------------------------

ROW_SHAPES = [(1, 1023), (97, 768), (513, 64)]
ROW_IDS = ["T1-N1023", "T97-N768", "T513-N64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_add_layernorm(isa, dtype, shape, layout, with_residual):
    gen = torch.Generator().manual_seed(shape[0])
    # An offset of 3 makes a one-pass variance visibly wrong; eps 1e-12 as in BERT, never clamped.
    x = (3 + torch.randn(*shape, generator=gen)).to(dtype)
    res = torch.randn(*shape, generator=gen).to(dtype) if with_residual else None
    lw, lb = _params(shape[1], gen)
    xin = _noncontig(x) if layout == "strided" else x
    out = _cpp.add_layernorm(xin, res, lw, lb, 1e-12)
    ref = reference.add_layernorm(f64(x), f64(res), f64(lw), f64(lb), 1e-12)
    plain = reference.add_layernorm(x, res, lw.to(dtype), lb.to(dtype), 1e-12)
    assert_2x_rule("add_layernorm", out, plain, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=ROW_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_residual_layernorm(isa, dtype, shape, with_bias):
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=gen).to(dtype)
    res = _noncontig(torch.randn(*shape, generator=gen).to(dtype))
    bias = torch.randn(shape[1], generator=gen).to(dtype) if with_bias else None
    lw, lb = _params(shape[1], gen)
    out = _cpp.bias_residual_layernorm(x, bias, res, lw, lb, 1e-12)
    ref = reference.bias_residual_layernorm(f64(x), f64(bias), f64(res), f64(lw), f64(lb), 1e-12)
    plain = reference.bias_residual_layernorm(x, bias, res, lw.to(dtype), lb.to(dtype), 1e-12)
    assert_2x_rule("bias_residual_layernorm", out, plain, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [*reference.ACTIVATIONS, None])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_bias_activation(isa, dtype, act, with_bias):
    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(97, 1023, generator=gen)).to(dtype)
    bias = torch.randn(1023, generator=gen).to(dtype) if with_bias else None
    out = _cpp.bias_activation(_noncontig(x), bias, act)
    ref = reference.bias_activation(f64(x), f64(bias), act)
    plain = reference.bias_activation(x, bias, act)
    assert_2x_rule(f"bias_activation[{act}]", out, plain, ref, dtype)


@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_bias_activation_extreme_values(isa, act):
    """The polynomial exp/erf/tanh saturate like libm: NaN stays NaN, large finite inputs give finite outputs
    equal to the reference (no overflow to inf or NaN from the range reduction)."""
    x = torch.tensor([[float("nan"), -1e30, -200.0, -88.5, -87.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 88.5, 200.0, 1e30]])
    out = _cpp.bias_activation(x, None, act)
    ref = reference.bias_activation(x.double(), None, act)
    assert torch.isnan(out[0, 0]), f"{act}(nan) = {out[0, 0].item()}"
    finite = out[0, 1:].double()
    print(f"{act}: {finite.tolist()}")
    assert torch.isfinite(finite).all(), f"{act}: non-finite output {finite.tolist()}"
    err = (finite - ref[0, 1:]).abs() / ref[0, 1:].abs().clamp_min(1.0)
    assert err.max().item() <= 1e-6, f"{act}: relative error {err.max().item():.3g}"


# ---------------------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------------------

LINEAR_SHAPES = [(1, 64, 96), (97, 1023, 256), (513, 128, 1023)]
LINEAR_IDS = ["T1-K64-N96", "T97-K1023-N256", "T513-K128-N1023"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
@pytest.mark.parametrize("act", [*reference.ACTIVATIONS, None])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_linear(dtype, shape, act, packed):
    t, k, n = shape
    gen = torch.Generator().manual_seed(t + k + n)
    x = torch.randn(t, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if act != "relu" else None  # relu: also cover bias=None
    p = _cpp.prepack_linear(w) if packed else None
    out = _cpp.linear(_noncontig(x), w, b, act, packed=p)
    ref = reference.linear(f64(x), f64(w), f64(b), act)
    plain = reference.linear(x, w, b, act)
    assert_2x_rule(f"linear[{act}]", out, plain, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_linear_residual_layernorm(isa, dtype, shape, packed):
    t, k, n = shape
    gen = torch.Generator().manual_seed(t * k + n)
    x = torch.randn(t, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    res = torch.randn(t, n, generator=gen).to(dtype)
    lw, lb = _params(n, gen)
    p = _cpp.prepack_linear(w) if packed else None
    out = _cpp.linear_residual_layernorm(x, w, b, _noncontig(res), lw, lb, 1e-12, packed=p)
    ref = reference.linear_residual_layernorm(f64(x), f64(w), f64(b), f64(res), f64(lw), f64(lb), 1e-12)
    plain = reference.linear_residual_layernorm(x, w, b, res, lw.to(dtype), lb.to(dtype), 1e-12)
    assert_2x_rule("linear_residual_layernorm", out, plain, ref, dtype)


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=LINEAR_IDS)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_linear_residual_layernorm_float32_residual(isa, shape, packed):
    """bfloat16 x and weight with a float32 residual (bfloat16 inference's float32 stream): float32 out."""
    t, k, n = shape
    gen = torch.Generator().manual_seed(t * k + n + 1)
    x = torch.randn(t, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    res = torch.randn(t, n, generator=gen)
    lw, lb = _params(n, gen)
    p = _cpp.prepack_linear(w) if packed else None
    out = _cpp.linear_residual_layernorm(x, w, b, _noncontig(res), lw, lb, 1e-12, packed=p)
    assert out.dtype == torch.float32 and out.shape == (t, n)
    # float64 reference of the same arithmetic: the GEMM output rounded to bfloat16, then the float32 epilogue
    y = (f64(x) @ f64(w).T + f64(b)).bfloat16()
    ref = reference.add_layernorm(f64(y), f64(res), f64(lw), f64(lb), 1e-12)
    plain = reference.linear_residual_layernorm(x, w, b, res, lw, lb, 1e-12)
    assert plain.dtype == torch.float32
    # The GEMM's accumulation order may round an element of y differently by one bfloat16 ulp: STYLE.md's rule
    # with the bfloat16 floor (y is bfloat16).
    err = (out.double() - ref).abs()
    bound = 2 * (plain.double() - ref).abs().max().item() + FLOOR[torch.bfloat16]
    assert torch.isfinite(out).all() and err.max().item() <= bound, (err.max().item(), bound)
    # The residual is not rounded: on average the error stays far below that of a bfloat16 residual (every
    # element of which is rounded, where one-ulp differences in y are rare).
    rounded = reference.add_layernorm(f64(y), f64(res.bfloat16()), f64(lw), f64(lb), 1e-12)
    assert err.mean() < 0.5 * (rounded - ref).abs().mean()


def test_linear_residual_layernorm_refuses_other_mixes():
    w = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="residual dtype"):
        _cpp.linear_residual_layernorm(
            torch.randn(3, 4), w, None, torch.randn(3, 4).bfloat16(), torch.ones(4), torch.zeros(4), 1e-12
        )


def test_linear_zero_tokens():
    w = torch.randn(8, 4)
    assert _cpp.linear(torch.empty(0, 4), w, None).shape == (0, 8)


# ---------------------------------------------------------------------------------------------------------
# Attention over packed sequences
# ---------------------------------------------------------------------------------------------------------

ATTN_CASES = [
    # (lengths, heads, head_dim)
    ([1], 2, 64),
    ([97], 2, 32),
    ([513], 1, 48),
    ([5, 1, 0, 17, 64, 33], 3, 80),
    ([1, 2, 3, 129], 2, 128),
    ([40, 7], 4, 96),
    ([19, 3], 2, 24),  # not a multiple of 16: the generic path on every ISA
]
ATTN_IDS = ["L1-D64", "L97-D32", "L513-D48", "mixed-D80", "mixed-D128", "mixed-D96", "mixed-D24"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,heads,head_dim", ATTN_CASES, ids=ATTN_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_attention(isa, dtype, lengths, heads, head_dim, layout):
    gen = torch.Generator().manual_seed(sum(lengths) + head_dim)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = (2 * torch.randn(total, 3 * heads * head_dim, generator=gen)).to(dtype)
    scale = 1.0 / math.sqrt(head_dim)
    out = _cpp.attention(_noncontig(qkv) if layout == "strided" else qkv, cu, max(lengths), heads, scale)
    ref = reference.attention(f64(qkv), cu, max(lengths), heads, scale)
    plain = reference.attention(qkv, cu, max(lengths), heads, scale)
    assert_2x_rule("attention", out, plain, ref, dtype)


def test_attention_does_not_read_other_sequences():
    """Changing sequence 1's tokens must not change sequence 0's outputs."""
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    qkv = torch.randn(30, 3 * 2 * 32)
    a = _cpp.attention(qkv, cu, 20, 2, 0.2)
    qkv2 = qkv.clone()
    qkv2[10:] = 1e4
    b = _cpp.attention(qkv2, cu, 20, 2, 0.2)
    assert torch.equal(a[:10], b[:10])


# ---------------------------------------------------------------------------------------------------------
# opcheck (schema, fake/meta registration, dispatch) on every op
# ---------------------------------------------------------------------------------------------------------


def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    t, h = 7, 32
    x = torch.randn(t, h, generator=gen)
    res = torch.randn(t, h, generator=gen)
    lw, lb = torch.ones(h), torch.zeros(h)
    w = torch.randn(48, h, generator=gen)
    b = torch.randn(48, generator=gen)
    ids = torch.randint(0, 50, (t,), generator=gen)
    pos = torch.arange(t)
    tt = torch.zeros(t, dtype=torch.long)
    word, pw, tw = torch.randn(50, h), torch.randn(16, h), torch.randn(2, h)
    qkv = torch.randn(t, 3 * 2 * 16, generator=gen)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    ops = torch.ops.fastbert
    return [
        ("embeddings", ops.embeddings.default, (ids, pos, tt, word, pw, tw, lw, lb, 1e-12)),
        ("add_layernorm", ops.add_layernorm.default, (x, res, lw, lb, 1e-5)),
        ("bias_activation", ops.bias_activation.default, (x, lb, "gelu")),
        ("bias_residual_layernorm", ops.bias_residual_layernorm.default, (x, lb, res, lw, lb, 1e-5)),
        ("linear", ops.linear.default, (x, w, b, "gelu", None)),
        (
            "linear_residual_layernorm",
            ops.linear_residual_layernorm.default,
            (x, w[:h], b[:h], res, lw, lb, 1e-12, None),
        ),
        (
            "linear_residual_layernorm_float32_residual",
            ops.linear_residual_layernorm.default,
            (x.bfloat16(), w[:h].bfloat16(), b[:h].bfloat16(), res, lw, lb, 1e-12, None),
        ),
        ("attention", ops.attention.default, (qkv, cu, 4, 2, 0.25)),
        ("attention_dropout", ops.attention.default, (qkv, cu, 4, 2, 0.25, 0.1, torch.tensor([7]))),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the value, never a crash
# ---------------------------------------------------------------------------------------------------------


def _emb_args(ids=None, pids=None):
    h = 16
    ids = torch.tensor([1, 2, 3]) if ids is None else ids
    pids = torch.arange(3) if pids is None else pids
    return (ids, pids, None, torch.randn(10, h), torch.randn(5, h), None, torch.ones(h), torch.zeros(h), 1e-12)


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([1, 10, 2]), r"input_ids\[1\] = 10 is out of range .* 10 rows"),
        (torch.tensor([1, -1, 2]), r"input_ids\[1\] = -1 is out of range"),
        (torch.tensor([1.0, 2.0, 3.0]), r"input_ids must be int64 or int32, got Float"),
    ],
    ids=["too_large", "negative", "float_ids"],
)
def test_embeddings_bad_ids(ids, match):
    with pytest.raises(RuntimeError, match=match):
        _cpp.embeddings(*_emb_args(ids=ids))


def test_embeddings_bad_position_ids():
    with pytest.raises(RuntimeError, match=r"position_ids\[2\] = 5 is out of range .* 5 rows"):
        _cpp.embeddings(*_emb_args(pids=torch.tensor([0, 1, 5])))


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([1, 4, 6], dtype=torch.int32), r"cu_seqlens\[0\] must be 0, got 1"),
        (torch.tensor([0, 4, 3, 6], dtype=torch.int32), r"cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 4"),
        (torch.tensor([0, 4, 5], dtype=torch.int32), r"cu_seqlens\[-1\] = 5 but qkv has 6 tokens"),
        (torch.tensor([0, 4, 6], dtype=torch.int64), r"cu_seqlens must be int32, got Long"),
    ],
    ids=["not_from_0", "decreasing", "last_not_total", "int64"],
)
def test_attention_bad_cu_seqlens(cu, match):
    with pytest.raises(RuntimeError, match=match):
        _cpp.attention(torch.randn(6, 3 * 2 * 16), cu, 4, 2, 0.25)


def test_attention_bad_shapes():
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"qkv has 100 features, which is not 3 \* num_heads"):
        _cpp.attention(torch.randn(6, 100), cu, 6, 2, 0.25)
    with pytest.raises(RuntimeError, match=r"max_seqlen = 3 is smaller than the longest sequence \(6 tokens\)"):
        _cpp.attention(torch.randn(6, 96), cu, 3, 2, 0.25)
    with pytest.raises(RuntimeError, match=r"qkv must be float32 or bfloat16, got Double"):
        _cpp.attention(torch.randn(6, 96, dtype=torch.float64), cu, 6, 2, 0.25)


def test_linear_bad_inputs():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"unknown activation 'swish'"):
        _cpp.linear(x, w, None, "swish")
    with pytest.raises(RuntimeError, match=r"x has 7 features but weight expects 8"):
        _cpp.linear(torch.randn(3, 7), w, None)
    with pytest.raises(RuntimeError, match=r"weight dtype BFloat16 does not match x dtype Float"):
        _cpp.linear(x, w.bfloat16(), None)
    with pytest.raises(RuntimeError, match=r"residual shape \[3, 5\] does not match the output shape \(3, 4\)"):
        _cpp.linear_residual_layernorm(x, w, None, torch.randn(3, 5), torch.ones(4), torch.zeros(4), 1e-12)


def test_layernorm_bad_weight_shape():
    with pytest.raises(RuntimeError, match=r"ln_weight must have shape \(8,\), got \[7\]"):
        _cpp.add_layernorm(torch.randn(3, 8), None, torch.ones(7), torch.zeros(8), 1e-12)


# ---------------------------------------------------------------------------------------------------------
# bfloat16 on a CPU without bfloat16 instructions
# ---------------------------------------------------------------------------------------------------------


def test_bf16_without_native_instructions_warns_once(monkeypatch):
    monkeypatch.setattr(_cpp, "native_bf16", lambda: False)
    monkeypatch.setattr(_cpp, "_warned_bf16", False)
    w = torch.randn(8, 4).bfloat16()
    with pytest.warns(UserWarning, match="no bfloat16 matrix instructions"):
        _cpp.prepack_linear(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cpp.prepack_linear(w)  # once only
        _cpp.prepack_linear(w.float())  # never for float32


def test_bf16_with_native_instructions_is_silent(monkeypatch):
    monkeypatch.setattr(_cpp, "native_bf16", lambda: True)
    monkeypatch.setattr(_cpp, "_warned_bf16", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cpp.prepack_linear(torch.randn(8, 4).bfloat16())
