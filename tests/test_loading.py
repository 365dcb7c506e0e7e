"""Checkpoint formats, name variants, cross-class loading, strict checks and save_pretrained round trips."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from checkpoints import make_checkpoint, make_hf_model, random_batch
from safetensors.torch import load_file, save_file

import fastbert
from fastbert.loading import CheckpointError

ATOL = 1e-4


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def _reference(path, ids, mask):
    hf = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return _hidden(hf, ids, mask)


def test_pytorch_bin_with_prefix_and_legacy_gamma_beta(tmp_path):
    src = make_checkpoint(tmp_path, "bert")
    state = load_file(str(src / "model.safetensors"))
    legacy = {}
    for k, v in state.items():
        k = "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[k] = v
    legacy["bert.embeddings.position_ids"] = torch.arange(80)[None]  # old checkpoints carry this buffer
    dst = tmp_path / "legacy"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    torch.save(legacy, dst / "pytorch_model.bin")
    ids, mask = random_batch("bert", [5, 3])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastbert: loading")  # nothing missing, nothing unexpected
        fb = fastbert.AutoModel.from_pretrained(dst, backend="torch")
    d = (_hidden(fb, ids, mask) - _reference(src, ids, mask))[mask.bool()].abs().max().item()
    assert d < ATOL


def test_sharded_safetensors(tmp_path):
    model = make_hf_model("roberta", hidden=64, heads=2)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    ids, mask = random_batch("roberta", [6, 2])
    fb = fastbert.AutoModel.from_pretrained(folder, backend="torch")
    d = (_hidden(fb, ids, mask) - _hidden(model, ids, mask))[mask.bool()].abs().max().item()
    assert d < ATOL


def test_sharded_bin(tmp_path):
    src = make_checkpoint(tmp_path, "distilbert")
    state = load_file(str(src / "model.safetensors"))
    keys = sorted(state)
    dst = tmp_path / "binshards"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, dst / name)
        weight_map.update({k: name for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids, mask = random_batch("distilbert", [4, 4])
    fb = fastbert.AutoModel.from_pretrained(dst, backend="torch")
    d = (_hidden(fb, ids, mask) - _reference(src, ids, mask))[mask.bool()].abs().max().item()
    assert d < ATOL


def test_base_checkpoint_into_head_reports_missing(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    with pytest.warns(UserWarning, match="newly initialised.*head.out_proj.weight"):
        model, info = fastbert.AutoModelForSequenceClassification.from_pretrained(
            path, backend="torch", output_loading_info=True
        )
    assert "head.out_proj.weight" in info["missing_keys"]
    assert torch.isfinite(model.head.out_proj.weight).all()
    ids, mask = random_batch("bert", [3, 2])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


def test_head_checkpoint_into_base_reports_unexpected(tmp_path):
    path = make_checkpoint(tmp_path, "roberta", task="sequence-classification")
    with pytest.warns(UserWarning, match="unused checkpoint tensors.*classifier"):
        _, info = fastbert.AutoModel.from_pretrained(path, backend="torch", output_loading_info=True)
    assert any(k.startswith("classifier.") for k in info["unexpected_keys"])
    assert "pooler.weight" in info["missing_keys"]  # RoBERTa classification checkpoints have no pooler


def test_shape_mismatch_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"intermediate.dense.(weight|bias) \(fastbert layers.0.ffn_in.(weight|bias)\) has shape \(128.*\) but the config implies \(100",
    ):
        fastbert.AutoModel.from_pretrained(path, backend="torch")


def test_missing_tensor_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    state = load_file(str(path / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks encoder tensors \['encoder.layer.1.output.dense.weight'\]"):
        fastbert.AutoModel.from_pretrained(path, backend="torch")


def test_corrupt_file(tmp_path):
    path = make_checkpoint(tmp_path, "bert")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable checkpoint file"):
        fastbert.AutoModel.from_pretrained(path, backend="torch")


def test_pickle_with_code_is_refused(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickle that would run code is an error."""
    path = make_checkpoint(tmp_path, "bert")
    (path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "evil": _Evil()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        fastbert.AutoModel.from_pretrained(path, backend="torch")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fastbert.AutoModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        fastbert.AutoModel.from_pretrained(tmp_path / "empty")
    path = make_checkpoint(tmp_path, "bert")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        fastbert.AutoModel.from_pretrained(path)


def test_unsupported_model_type_and_relative_positions(tmp_path):
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.GPT2Model(gpt2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(fastbert.UnsupportedModelError, match="model_type 'gpt2' is not supported.*bert, roberta"):
        fastbert.AutoModel.from_pretrained(tmp_path / "gpt2")
    path = make_checkpoint(tmp_path, "bert")
    cfg = json.loads((path / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastbert.UnsupportedModelError, match="relative_key"):
        fastbert.AutoModel.from_pretrained(path)
    cfg["position_embedding_type"] = "absolute"
    cfg["hidden_act"] = "quick_gelu"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastbert.UnsupportedModelError, match="activation 'quick_gelu' is not supported"):
        fastbert.AutoModel.from_pretrained(path)


TASKS = {
    None: (fastbert.AutoModel, transformers.AutoModel),
    "sequence-classification": (
        fastbert.AutoModelForSequenceClassification,
        transformers.AutoModelForSequenceClassification,
    ),
    "token-classification": (fastbert.AutoModelForTokenClassification, transformers.AutoModelForTokenClassification),
    "question-answering": (fastbert.AutoModelForQuestionAnswering, transformers.AutoModelForQuestionAnswering),
    "masked-lm": (fastbert.AutoModelForMaskedLM, transformers.AutoModelForMaskedLM),
}


@pytest.mark.parametrize("task", list(TASKS), ids=lambda t: t or "base")
@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "distilbert", "electra"])
def test_save_pretrained_round_trip_through_transformers(tmp_path, family, task):
    """fastbert.save_pretrained writes what transformers loads with no missing/unexpected keys, same outputs."""
    src = make_checkpoint(tmp_path, family, task=task, embedding_size=32 if family == "electra" else None)
    ours, theirs = TASKS[task]
    fb = ours.from_pretrained(src, backend="torch")
    out_dir = tmp_path / "saved"
    fb.save_pretrained(out_dir)
    hf, info = theirs.from_pretrained(out_dir, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = theirs.from_pretrained(src, attn_implementation="eager")
    for name, p in original.state_dict().items():
        assert torch.equal(p, hf.state_dict()[name]), name


def test_dtype_and_hub_id_refused_offline(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path, "bert")
    fb = fastbert.AutoModel.from_pretrained(path, dtype=torch.bfloat16, backend="torch")
    assert all(p.dtype == torch.bfloat16 for p in fb.parameters())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download 'nobody/no-such-model'"):
        fastbert.AutoModel.from_pretrained("nobody/no-such-model")
