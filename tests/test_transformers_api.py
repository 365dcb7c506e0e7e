"""fastbert against the rest of the transformers API: float16 on a CPU, from_pretrained's keyword arguments,
pipelines, and the embedding methods (num_parameters, get/set_input_embeddings, resize_token_embeddings).

Every test compares with what transformers itself gives for the same checkpoint.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from checkpoints import make_checkpoint, random_batch

import fastbert
from fastbert import ops

HEADS = {
    None: fastbert.AutoModel,
    "sequence-classification": fastbert.AutoModelForSequenceClassification,
    "token-classification": fastbert.AutoModelForTokenClassification,
    "question-answering": fastbert.AutoModelForQuestionAnswering,
    "masked-lm": fastbert.AutoModelForMaskedLM,
}
HF_AUTO = {
    None: transformers.AutoModel,
    "sequence-classification": transformers.AutoModelForSequenceClassification,
    "token-classification": transformers.AutoModelForTokenClassification,
    "question-answering": transformers.AutoModelForQuestionAnswering,
    "masked-lm": transformers.AutoModelForMaskedLM,
}


def _main_output(out, task):
    if task is None:
        return out.last_hidden_state
    if task == "question-answering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


# ----------------------------------------------------------------------------------------------------------
# float16 on a CPU
# ----------------------------------------------------------------------------------------------------------


def test_auto_skips_backends_that_do_not_compute_in_the_dtype():
    assert ops.resolve_backend("auto", "cpu", torch.float16).name == "torch"
    assert ops.resolve_backend("auto", "cpu", torch.float64).name == "torch"
    assert ops.resolve_backend("torch", "cpu", torch.float16).name == "torch"
    reason = ops.unavailable_reason("cpp", "cpu", torch.float16)
    assert reason is not None and "float32, bfloat16" in reason and "float16" in reason
    assert ops.unavailable_reason("triton", None, torch.float64) is not None
    if "cpp" in ops.available_backends("cpu"):
        assert ops.resolve_backend("auto", "cpu", torch.float32).name == "cpp"
        assert ops.unavailable_reason("cpp", "cpu", torch.bfloat16) is None


@pytest.mark.parametrize("task", [None, "sequence-classification", "masked-lm"], ids=lambda t: t or "base")
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_fp16_on_cpu_matches_transformers_fp16(tmp_path, family, task):
    """STYLE.md's model-level rule: fastbert fp16's error to HF fp32 is under 3x HF fp16's own error."""
    folder = make_checkpoint(tmp_path, family, task, hidden=64, heads=4)
    ids, mask = random_batch(family, [9, 3, 6])
    hf32 = HF_AUTO[task].from_pretrained(folder, attn_implementation="eager").eval()
    hf16 = HF_AUTO[task].from_pretrained(folder, attn_implementation="eager", dtype=torch.float16).eval()
    ours = HEADS[task].from_pretrained(folder, dtype=torch.float16)
    assert ours.dtype == torch.float16 and ours.backend.name == "torch"
    with torch.no_grad():
        ref = _main_output(hf32(input_ids=ids, attention_mask=mask), task).double()
        theirs = _main_output(hf16(input_ids=ids, attention_mask=mask), task).double()
        got = _main_output(ours(input_ids=ids, attention_mask=mask), task)
    assert got.dtype == torch.float16
    valid = mask.bool() if task != "sequence-classification" else torch.ones(ids.shape[0], dtype=torch.bool)
    err = (got.double() - ref)[valid].abs().max().item()
    base = (theirs - ref)[valid].abs().max().item()
    print(f"{family}/{task}: max|fastbert fp16 - hf fp32| = {err:.3g}, max|hf fp16 - hf fp32| = {base:.3g}")
    assert torch.isfinite(got).all()
    assert err < 3 * base


def test_explicit_cpp_with_fp16_raises_at_load(tmp_path):
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("the cpp extension is not built here")
    folder = make_checkpoint(tmp_path, "bert")
    with pytest.raises(fastbert.BackendUnavailable, match="float32, bfloat16"):
        fastbert.AutoModel.from_pretrained(folder, dtype=torch.float16, backend="cpp")


def test_backend_follows_later_dtype_changes(tmp_path):
    folder = make_checkpoint(tmp_path, "bert")
    model = fastbert.AutoModel.from_pretrained(folder)
    native = "cpp" if "cpp" in ops.available_backends("cpu") else "torch"
    assert model.backend.name == native
    model.half()
    assert model.backend.name == "torch"
    ids, mask = random_batch("bert", [5, 2])
    assert model(input_ids=ids, attention_mask=mask).last_hidden_state.dtype == torch.float16
    model.float()
    assert model.backend.name == native
    if native == "cpp":
        model.set_backend("cpp")
        with pytest.raises(fastbert.BackendUnavailable, match="float16"):
            model.to(torch.float16)


# ----------------------------------------------------------------------------------------------------------
# from_pretrained's keyword arguments
# ----------------------------------------------------------------------------------------------------------


def test_unknown_from_pretrained_kwargs_raise_type_error(tmp_path):
    folder = make_checkpoint(tmp_path, "bert")
    with pytest.raises(TypeError, match=r"\['foo'\]"):
        fastbert.AutoModel.from_pretrained(folder, foo=1)
    with pytest.raises(TypeError, match="to_dict"):  # a config method is not a config attribute
        fastbert.AutoModel.from_pretrained(folder, to_dict=1)
    with pytest.raises(TypeError):  # transformers raises TypeError for the same call
        transformers.AutoModel.from_pretrained(folder, foo=1)


def test_transformers_options_are_accepted_with_a_one_time_note(tmp_path, caplog):
    folder = make_checkpoint(tmp_path, "bert")
    ids, mask = random_batch("bert", [6, 4])
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    fastbert.AutoModel._noted.discard("attn_implementation")
    options = dict(attn_implementation="sdpa", low_cpu_mem_usage=True, trust_remote_code=False, use_safetensors=True)
    with caplog.at_level("WARNING", logger="fastbert"):
        model = fastbert.AutoModel.from_pretrained(
            folder, local_files_only=True, revision="main", subfolder="", _from_pipeline="x", **options
        )
        model2 = fastbert.AutoModel.from_pretrained(folder, attn_implementation="eager")
    notes = [r.getMessage() for r in caplog.records if "attn_implementation" in r.getMessage()]
    assert len(notes) == 1 and "backend=" in notes[0], notes
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        for m in (model, model2):
            got = m(input_ids=ids, attention_mask=mask).last_hidden_state
            assert (got - want)[mask.bool()].abs().max() < 1e-4


def test_torch_dtype_dtype_names_and_device_map(tmp_path, caplog):
    folder = make_checkpoint(tmp_path, "bert")
    fastbert.AutoModel._noted.discard("torch_dtype")
    with caplog.at_level("WARNING", logger="fastbert"):
        model = fastbert.AutoModel.from_pretrained(folder, torch_dtype=torch.float16)
    assert model.dtype == torch.float16 and any("torch_dtype" in r.getMessage() for r in caplog.records)
    # transformers 5: dtype wins over torch_dtype; names and "auto" (the config's dtype) are accepted
    for kwargs, want in [
        (dict(torch_dtype=torch.float16, dtype=torch.bfloat16), torch.bfloat16),
        (dict(dtype="float16"), torch.float16),
        (dict(dtype="auto"), torch.float32),
    ]:
        theirs = transformers.AutoModel.from_pretrained(folder, **kwargs).dtype
        assert fastbert.AutoModel.from_pretrained(folder, **kwargs).dtype == theirs == want, kwargs
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}):
        assert fastbert.AutoModel.from_pretrained(folder, device_map=device_map).device.type == "cpu"
    for device_map in ("auto", "balanced", {"embeddings": 0, "layers": "cpu"}):
        with pytest.raises(ValueError, match="one device"):
            fastbert.AutoModel.from_pretrained(folder, device_map=device_map)
    with pytest.raises(ValueError, match="disagree"):
        fastbert.AutoModel.from_pretrained(folder, device="cpu", device_map="cuda:0")
    with pytest.raises(ValueError, match="variant"):
        fastbert.AutoModel.from_pretrained(folder, variant="fp16")


def test_config_attributes_and_config_object_as_transformers(tmp_path):
    folder = make_checkpoint(tmp_path, "bert")
    ours = fastbert.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5, problem_type="regression")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=5, problem_type="regression"
    )
    assert ours.config.num_labels == theirs.config.num_labels == 5
    assert ours.config.problem_type == theirs.config.problem_type == "regression"
    assert ours.head.out_proj.weight.shape == theirs.classifier.weight.shape
    config = transformers.AutoConfig.from_pretrained(folder, num_labels=4)
    ours = fastbert.AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    assert ours.config.num_labels == 4 and config.num_labels == 4 and ours.config is not config


def test_hub_options_go_to_the_download(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path, "bert")
    seen = {}

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(folder.parent)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = fastbert.AutoModel.from_pretrained(
        "someone/model", revision="v1", token="t", cache_dir=str(tmp_path), subfolder=folder.name
    )
    assert seen == {"repo_id": "someone/model", "revision": "v1", "token": "t", "cache_dir": str(tmp_path)}
    assert model.cfg.hidden_size == 64


# ----------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------

_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
_PIPELINES = {
    "text-classification": ("sequence-classification", ["w1 w2 w3 w7 w9", "w4 w5"]),
    "token-classification": ("token-classification", ["w1 w2 w3 w7 w9", "w4 w5"]),
    "question-answering": ("question-answering", {"question": "w1 w2", "context": "w3 w4 w5 w6 w7"}),
    "fill-mask": ("masked-lm", ["w1 w2 [MASK] w7 w9", "w4 [MASK]"]),
}


def _same(a, b):
    """Pipeline outputs equal up to float rounding (scores to 1e-4, everything else exactly)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or type(a).__module__ == "numpy":
        return abs(float(a) - float(b)) < 1e-4
    return a == b


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("pipeline_task", list(_PIPELINES))
def test_pipelines_match_transformers_without_error_log(tmp_path, caplog, pipeline_task, family):
    from transformers.pipelines import SUPPORTED_TASKS

    if pipeline_task not in SUPPORTED_TASKS:
        pytest.skip(f"transformers {transformers.__version__} has no {pipeline_task!r} pipeline")
    task, inputs = _PIPELINES[pipeline_task]
    folder = make_checkpoint(tmp_path, family, task, vocab=len(_WORDS), type_vocab=2)
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(_WORDS)})
    hf = HF_AUTO[task].from_pretrained(folder).eval()
    ours = HEADS[task].from_pretrained(folder)
    want = transformers.pipeline(pipeline_task, model=hf, tokenizer=tokenizer, device="cpu")(inputs)
    caplog.clear()
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger caplog listens on
    hf_logger.addHandler(caplog.handler)
    try:
        pipe = transformers.pipeline(pipeline_task, model=ours, tokenizer=tokenizer, device="cpu")
        got = pipe(inputs)
    finally:
        hf_logger.removeHandler(caplog.handler)
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, errors
    print(got)
    assert _same(got, want), (got, want)


def test_named_classes_are_transformers_names():
    from transformers.models.auto import modeling_auto

    tables = {
        fastbert.AutoModel: modeling_auto.MODEL_MAPPING_NAMES,
        fastbert.AutoModelForSequenceClassification: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        fastbert.AutoModelForTokenClassification: modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        fastbert.AutoModelForQuestionAnswering: modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
        fastbert.AutoModelForMaskedLM: modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    }
    for auto, table in tables.items():
        for model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "electra"):
            named = fastbert.AutoModel._named[(auto, model_type)]
            assert named.__name__ == table[model_type] and issubclass(named, auto)
            assert getattr(fastbert.heads, named.__name__) is named


def test_named_class_round_trip(tmp_path):
    folder = make_checkpoint(tmp_path, "roberta", "sequence-classification")
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(model).__name__ == "RobertaForSequenceClassification"
    assert isinstance(model, fastbert.AutoModelForSequenceClassification)
    model.save_pretrained(tmp_path / "out")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(theirs).__name__ == "RobertaForSequenceClassification"
    assert theirs.config.architectures == ["RobertaForSequenceClassification"]


# ----------------------------------------------------------------------------------------------------------
# num_parameters, input / output embeddings, resize_token_embeddings
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(HEADS), ids=lambda t: t or "base")
@pytest.mark.parametrize("family", ["bert", "distilbert", "electra"])
def test_num_parameters_and_embeddings_match_transformers(tmp_path, family, task):
    kw = dict(embedding_size=32) if family == "electra" else {}
    folder = make_checkpoint(tmp_path, family, task, **kw)
    ours = HEADS[task].from_pretrained(folder)
    theirs = HF_AUTO[task].from_pretrained(folder)
    for options in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**options) == theirs.num_parameters(**options), options
    assert torch.equal(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight)
    out = ours.get_output_embeddings()
    if task == "masked-lm":
        assert torch.equal(out.weight, theirs.get_output_embeddings().weight)
        assert out.weight is ours.get_input_embeddings().weight  # tied
    else:
        assert out is None and theirs.get_output_embeddings() is None
    ours.embeddings.word.weight.requires_grad_(False)
    theirs.get_input_embeddings().weight.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)


def test_set_input_embeddings(tmp_path):
    folder = make_checkpoint(tmp_path, "bert", "masked-lm")
    ours = fastbert.AutoModelForMaskedLM.from_pretrained(folder)
    table = torch.nn.Embedding(99, 64)
    ours.set_input_embeddings(table)
    assert ours.get_input_embeddings() is table and ours.get_output_embeddings().weight is table.weight
    with pytest.raises(ValueError, match="width 64"):
        ours.set_input_embeddings(torch.nn.Embedding(99, 32))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mean_resizing", [True, False], ids=["mean", "normal"])
@pytest.mark.parametrize("new_size", [120, 90])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_resize_token_embeddings_matches_transformers(tmp_path, family, new_size, mean_resizing, tied):
    task = "masked-lm"
    folder = make_checkpoint(tmp_path, family, task)
    if not tied:  # a checkpoint with its own decoder weight
        hf = transformers.AutoModelForMaskedLM.from_pretrained(folder)
        hf.config.tie_word_embeddings = False
        decoder = hf.get_output_embeddings()
        decoder.weight = torch.nn.Parameter(decoder.weight.detach() + 0.01 * torch.randn_like(decoder.weight))
        folder = tmp_path / "untied"
        hf.save_pretrained(folder)
    ours = fastbert.AutoModelForMaskedLM.from_pretrained(folder)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert ours.head.tied == tied
    if not tied:  # transformers 5 unties the decoder bias too and initialises it (not read from the checkpoint)
        theirs.get_output_embeddings().bias.data.copy_(ours.head.bias)
    torch.manual_seed(7)
    got = ours.resize_token_embeddings(new_size, mean_resizing=mean_resizing)
    torch.manual_seed(7)
    want = theirs.resize_token_embeddings(new_size, mean_resizing=mean_resizing)
    assert got is ours.get_input_embeddings() and got.num_embeddings == new_size
    assert torch.equal(got.weight, want.weight)
    assert torch.equal(ours.get_output_embeddings().weight, theirs.get_output_embeddings().weight)
    assert torch.equal(ours.head.bias, theirs.get_output_embeddings().bias)
    assert (ours.get_output_embeddings().weight is got.weight) == tied
    assert ours.config.vocab_size == theirs.config.vocab_size == new_size
    if tied:  # untied, transformers' RoBERTa keeps a stale lm_head.bias beside the decoder's (an extra 99)
        assert ours.num_parameters() == theirs.num_parameters()
    ids, mask = random_batch(family, [7, 4], vocab=min(new_size, 99))
    ids[0, 1] = new_size - 1  # a new token id (or the last kept one)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape == (2, 7, new_size)
    assert (a - b)[mask.bool()].abs().max() < 1e-4
    with pytest.raises(ValueError, match=f"vocab_size is {new_size}"):
        ours(input_ids=torch.tensor([[new_size]]))
    ours.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    assert back.config.vocab_size == new_size


def test_resize_pad_to_multiple_of_and_no_op(tmp_path):
    folder = make_checkpoint(tmp_path, "bert")
    ours = fastbert.AutoModel.from_pretrained(folder)
    theirs = transformers.AutoModel.from_pretrained(folder)
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    assert ours.config.vocab_size == 99
    torch.manual_seed(0)
    a = ours.resize_token_embeddings(pad_to_multiple_of=64)
    torch.manual_seed(0)
    b = theirs.resize_token_embeddings(pad_to_multiple_of=64)
    assert a.num_embeddings == b.num_embeddings == 128 and torch.equal(a.weight, b.weight)
    assert ours.config.vocab_size == 128
