"""fastbert.optimize(): same transformers object, shared parameters, same outputs, reversible."""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_hf_model, random_batch

import fastbert
from fastbert.patch import is_optimized

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in fastbert.available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "family,task",
    [
        ("bert", "sequence-classification"),
        ("roberta", "token-classification"),
        ("distilbert", None),
        ("electra", "question-answering"),
        ("xlm-roberta", "masked-lm"),
    ],
)
def test_optimize_round_trip(tmp_path, family, task, backend):
    hf = make_hf_model(family, task, embedding_size=32 if family == "electra" else None)
    ids, mask = random_batch(family, [7, 2, 5])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keys_before = list(hf.state_dict())
    params_before = {n: p for n, p in hf.named_parameters()}
    assert fastbert.optimize(hf, backend=backend) is hf
    assert is_optimized(hf)
    assert list(hf.state_dict()) == keys_before  # nothing added to what save_pretrained writes
    assert all(p is params_before[n] for n, p in hf.named_parameters())  # same tensors, not copies
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert type(out) is type(ref)
    valid = mask.bool()
    for name in ("logits", "start_logits", "end_logits"):
        if getattr(ref, name, None) is not None:
            a, b = getattr(out, name), getattr(ref, name)
            d = (
                (a[valid] - b[valid]).abs().max()
                if a.dim() >= 2 and a.shape[1] == ids.shape[1]
                else (a - b).abs().max()
            )
            assert d < 1e-4, (name, d)
    assert (out.hidden_states[-1][valid] - ref.hidden_states[-1][valid]).abs().max() < 1e-4

    # Parameters are shared: an in-place update shows in the next forward (the fused QKV cache is rebuilt).
    with torch.no_grad():
        value = next(m for n, m in hf.named_modules() if n.endswith(("value", "v_lin")))
        value.weight.add_(0.1)
        changed = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        fastbert.restore(hf)
        assert not is_optimized(hf)
        expected = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert (changed[valid] - expected[valid]).abs().max() < 1e-4
    assert (changed[valid] - ref.hidden_states[-1][valid]).abs().max() > 1e-3


def test_optimized_model_saves_like_transformers(tmp_path):
    hf = make_hf_model("bert", "sequence-classification")
    fastbert.optimize(hf)
    hf.save_pretrained(tmp_path / "out")
    reloaded = type(hf).from_pretrained(tmp_path / "out")
    for (n, a), (_, b) in zip(hf.state_dict().items(), reloaded.state_dict().items(), strict=False):
        assert torch.equal(a, b), n


def test_optimize_refuses_other_models():
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        fastbert.optimize(torch.nn.Linear(2, 2))


def test_optimize_refuses_unsupported_families_with_a_type_error():
    """A transformers model of a family fastbert does not run: TypeError naming what is supported (and still the
    UnsupportedModelError loading raises), and the model is left as it was."""
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    for kind in (TypeError, fastbert.UnsupportedModelError):
        with pytest.raises(kind, match="gpt2.*SentenceTransformer"):
            fastbert.optimize(gpt2)
    assert not is_optimized(gpt2)


def test_trains_after_first_call_under_inference_mode():
    # The fused QKV is built on the first call; built under inference_mode it used to be an inference tensor that
    # transformers' Q, K, V Parameters became views of, and every later backward failed (optimised or restored).
    hf = make_hf_model("bert", "sequence-classification", hidden=48, heads=3)
    fastbert.optimize(hf)
    ids, mask = random_batch("bert", [5, 3])
    labels = torch.tensor([0, 1])
    with torch.inference_mode():
        hf(input_ids=ids, attention_mask=mask)
    hf.train()
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    q = hf.bert.encoder.layer[0].attention.self.query.weight
    assert not q.is_inference() and q.grad is not None and q.grad.abs().sum() > 0
    fastbert.restore(hf)
    hf.zero_grad()
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
