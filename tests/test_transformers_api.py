"""fastbert against the rest of the transformers API: float16 on a CPU, from_pretrained's keyword arguments,
pipelines, and the embedding methods (num_parameters, get/set_input_embeddings, resize_token_embeddings).

Every test compares with what transformers itself gives for the same checkpoint.
"""

from __future__ import annotations

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
