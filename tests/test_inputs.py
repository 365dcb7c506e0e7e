"""Bad input gets a clear Python exception naming the problem; edge cases give finite, sensible outputs."""

from __future__ import annotations

import pytest
import torch
import transformers
from checkpoints import make_checkpoint, random_batch
from helpers import CPU_BACKENDS

import fastbert


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def bert(tmp_path_factory, request):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "bert", vocab=99, max_positions=80)
    return fastbert.AutoModel.from_pretrained(path, backend=request.param), path


@pytest.fixture(scope="module")
def distil(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "distilbert")
    return fastbert.AutoModel.from_pretrained(path, backend="torch")


def test_id_out_of_range(bert):
    model, _ = bert
    ids = torch.tensor([[5, 99, 7]])
    with pytest.raises(ValueError, match="input_ids contains 99 but vocab_size is 99"):
        model(input_ids=ids)


def test_negative_id(bert):
    model, _ = bert
    with pytest.raises(ValueError, match="input_ids contains -3, a negative value"):
        model(input_ids=torch.tensor([[5, -3]]))


def test_token_type_out_of_range(bert):
    model, _ = bert
    with pytest.raises(ValueError, match="token_type_ids contains 2 but type_vocab_size is 2"):
        model(input_ids=torch.tensor([[5, 6]]), token_type_ids=torch.tensor([[0, 2]]))


def test_sequence_too_long(bert):
    model, _ = bert
    with pytest.raises(ValueError, match="sequence length 81 exceeds the model's maximum of 80"):
        model(input_ids=torch.full((1, 81), 5))


def test_mask_shape_mismatch(bert):
    model, _ = bert
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input has shape \(2, 5\)"):
        model(input_ids=torch.full((2, 5), 5), attention_mask=torch.ones(2, 4))


def test_non_integer_ids(bert):
    model, _ = bert
    with pytest.raises(TypeError, match="input_ids must be an integer tensor, got torch.float32"):
        model(input_ids=torch.full((1, 3), 5.0))


def test_mask_values_and_3d_mask(bert):
    model, _ = bert
    with pytest.raises(ValueError, match="0/1 or bools, found 2"):
        model(input_ids=torch.full((1, 3), 5), attention_mask=torch.tensor([[1, 2, 1]]))
    with pytest.raises(ValueError, match="must be 2-D .* or a 4-D padding mask, got 3-D"):
        model(input_ids=torch.full((1, 3), 5), attention_mask=torch.ones(1, 3, 3))


def test_4d_padding_masks_accepted_and_others_refused(bert):
    model, path = bert
    ids, mask = random_batch("bert", [6, 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        bool4d = mask.bool()[:, None, None, :].expand(2, 1, 6, 6)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for m in (bool4d, additive):
            out = model(input_ids=ids, attention_mask=m).last_hidden_state
            assert torch.equal(out, ref)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None].expand(2, 1, 6, 6)
    with pytest.raises(ValueError, match="not a plain padding mask"):
        model(input_ids=ids, attention_mask=causal)


def test_unsupported_arguments_raise(bert):
    model, _ = bert
    ids = torch.full((1, 3), 5)
    with pytest.raises(NotImplementedError, match="head_mask"):
        model(input_ids=ids, head_mask=torch.ones(2, 2))
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(TypeError, match="unexpected argument 'frobnicate'"):
        model(input_ids=ids, frobnicate=1)
    model(input_ids=ids, output_attentions=False, head_mask=None)  # the harmless values are accepted
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


def test_distilbert_has_no_token_types(distil):
    with pytest.raises(ValueError, match="distilbert has no token types"):
        distil(input_ids=torch.full((1, 3), 5), token_type_ids=torch.zeros(1, 3, dtype=torch.long))


def test_all_zero_mask_row_is_finite(bert):
    model, path = bert
    ids, mask = random_batch("bert", [5, 3])
    mask[1] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all()
    assert torch.isfinite(out.pooler_output).all()
    hf = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (out.last_hidden_state[0, :5] - ref[0, :5]).abs().max() < 1e-4  # the other rows are unaffected


def test_empty_batch(bert):
    model, _ = bert
    for shape in ((0, 4), (2, 0)):
        with torch.no_grad():
            out = model(input_ids=torch.zeros(shape, dtype=torch.long))
        assert out.last_hidden_state.shape == (*shape, 64)
        assert out.pooler_output.shape == (shape[0], 64)


def test_seq_classification_with_empty_row(tmp_path):
    path = make_checkpoint(tmp_path, "roberta", task="sequence-classification")
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(path, backend="torch")
    ids, mask = random_batch("roberta", [4, 4])
    mask[0] = 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
