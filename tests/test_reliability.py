"""Issue 15's reproducers: each ends in the right answer or a clear Python error naming the value."""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint, random_batch
from helpers import AVAILABLE_BACKENDS

import fastbert
from fastbert import padding

BACKENDS = AVAILABLE_BACKENDS


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "bert", vocab=99, max_positions=80)


@pytest.fixture(scope="module", params=BACKENDS)
def model(bert_path, request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return fastbert.AutoModel.from_pretrained(bert_path, backend=request.param)


# -- malformed packed batches (forward_packed reaches every backend's attention) --

GOOD_IDS = torch.tensor([5, 6, 7, 8, 9, 10], dtype=torch.long)
MALFORMED = {
    "decreasing": (torch.tensor([0, 4, 2, 6], dtype=torch.int32), 4, "non-decreasing; it falls from 4 to 2"),
    "first-not-zero": (torch.tensor([1, 3, 6], dtype=torch.int32), 3, "must start at 0, got 1"),
    "last-not-total": (torch.tensor([0, 3, 5], dtype=torch.int32), 3, "ends at 5 but the batch holds 6 tokens"),
    "beyond-total": (torch.tensor([0, 3, 9], dtype=torch.int32), 6, "ends at 9 but the batch holds 6 tokens"),
    "negative": (torch.tensor([0, -2, 6], dtype=torch.int32), 8, "non-decreasing; it falls from 0 to -2"),
    "max-seqlen-zero": (torch.tensor([0, 3, 6], dtype=torch.int32), 0, "max_seqlen is 0 but the longest"),
    "max-seqlen-short": (torch.tensor([0, 1, 6], dtype=torch.int32), 3, "max_seqlen is 3 but the longest .* 5"),
    "2-d": (torch.tensor([[0, 3, 6]], dtype=torch.int32), 3, "must be a 1-D tensor"),
    "float": (torch.tensor([0.0, 3.0, 6.0]), 3, "must be an integer tensor"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_cu_seqlens_refused(model, case):
    cu, max_seqlen, message = MALFORMED[case]
    with pytest.raises((ValueError, TypeError), match=message):
        model.forward_packed(GOOD_IDS, cu, max_seqlen)


def test_packed_position_and_type_ids_checked(model):
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="position_ids contains 80 but max_position_embeddings is 80"):
        model.forward_packed(GOOD_IDS, cu, 3, position_ids=torch.tensor([0, 1, 2, 0, 1, 80]))
    with pytest.raises(ValueError, match="position_ids must be 1-D with one entry per token"):
        model.forward_packed(GOOD_IDS, cu, 3, position_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="input_ids contains 99 but vocab_size is 99"):
        model.forward_packed(torch.tensor([5, 6, 99, 8, 9, 10]), cu, 3)
    with pytest.raises(ValueError, match="token_type_ids contains 2 but type_vocab_size is 2"):
        model.forward_packed(GOOD_IDS, cu, 3, token_type_ids=torch.tensor([0, 0, 0, 1, 1, 2]))


def test_packed_sequence_longer_than_positions(model):
    ids = torch.full((81,), 5)
    with pytest.raises(ValueError, match="sequence length 81 exceeds the model's maximum of 80"):
        model.forward_packed(ids, padding.cu_seqlens_from_lengths([81]), 81)


def test_valid_packed_batch_still_matches_padded(model):
    ids, mask = random_batch("bert", [4, 2])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        cu = torch.tensor([0, 4, 6], dtype=torch.int64)  # int64 offsets are accepted too
        packed = model.forward_packed(ids[mask.bool()], cu, 4)
    assert torch.equal(packed, padded[mask.bool()])


# -- small integer id dtypes --


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_ids_cast(model, dtype):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    tt = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        out = model(input_ids=ids.to(dtype), attention_mask=mask.to(dtype), token_type_ids=tt.to(dtype))
    assert torch.equal(out.last_hidden_state, ref)


def test_uint8_ids_when_token_count_equals_table_size(tmp_path):
    """uint8 indexing is boolean masking in torch: with as many tokens as table rows it silently 'worked'."""
    path = make_checkpoint(tmp_path, "bert", vocab=8, max_positions=16)
    model = fastbert.AutoModel.from_pretrained(path, backend="torch")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        out = model(input_ids=ids.to(torch.uint8)).last_hidden_state
    assert torch.equal(out, ref)


def test_int8_negative_ids_refused(model):
    with pytest.raises(ValueError, match="input_ids contains -3, a negative value"):
        model(input_ids=torch.tensor([[5, -3]], dtype=torch.int8))


# -- NaN does not cross sequences --


def test_nan_in_one_sequence_does_not_reach_an_empty_neighbour(model):
    embeds = torch.randn(2, 4, 64)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    with torch.no_grad():
        clean = model(inputs_embeds=embeds, attention_mask=mask).pooler_output
        embeds[0, 1, 3] = float("nan")
        out = model(inputs_embeds=embeds, attention_mask=mask).pooler_output
    assert torch.isnan(out[0]).any()  # the NaN sequence is NaN, as in transformers
    assert torch.isfinite(out[1]).all() and torch.equal(out[1], clean[1])  # its empty neighbour is untouched


# -- smaller gaps --


def test_nan_in_additive_4d_mask_refused(model):
    ids, mask = random_batch("bert", [3, 2])
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    additive[0, 0, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        model(input_ids=ids, attention_mask=additive)


@pytest.mark.parametrize("shape", [(1, 5), (2, 5), (5,), (3, 3, 3)])
def test_wrong_length_position_ids_refused(model, shape):
    ids = torch.full((2, 3), 5)
    with pytest.raises(ValueError, match=r"position_ids has shape .* but input has shape \(2, 3\)"):
        model(input_ids=ids, position_ids=torch.zeros(shape, dtype=torch.long))


def test_shared_position_ids_broadcast(model):
    ids = torch.full((2, 3), 5)
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        for pos in (torch.arange(3), torch.arange(3)[None]):
            assert torch.equal(model(input_ids=ids, position_ids=pos).last_hidden_state, ref)


def test_4d_mask_with_seqlen_zero(model):
    ids = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for mask in (torch.zeros(2, 1, 0, 0, dtype=torch.bool), torch.zeros(2, 1, 1, 0)):
            out = model(input_ids=ids, attention_mask=mask)
            assert out.last_hidden_state.shape == (2, 0, 64)


def test_meta_ids_refused(model):
    with pytest.raises(ValueError, match="meta tensor"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long, device="meta"))


# -- no stale weights: writes through .data (which does not bump the version counter) reach the next forward --


def test_data_writes_reach_fastbert_models(bert_path, model):
    import transformers

    hf = transformers.AutoModel.from_pretrained(bert_path, attn_implementation="eager").eval()
    fb = fastbert.AutoModel.from_pretrained(bert_path, backend=model.backend.name)
    ids, mask = random_batch("bert", [5, 3])
    with torch.no_grad():
        before = fb(input_ids=ids, attention_mask=mask).last_hidden_state
        delta = torch.randn_like(fb.layers[0].attn_out.weight) * 0.05
        fb.layers[0].qkv.weight.data.mul_(0)  # the reproducer: the next forward returned exactly `before`
        fb.layers[1].attn_out.weight.data += delta  # PEFT's LoRA merge
        for x in (hf.encoder.layer[0].attention.self.query, hf.encoder.layer[0].attention.self.key):
            x.weight.data.mul_(0)
        hf.encoder.layer[0].attention.self.value.weight.data.mul_(0)
        hf.encoder.layer[1].attention.output.dense.weight.data += delta
        after = fb(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert not torch.equal(after, before)
    assert (after[valid] - ref[valid]).abs().max() < 1e-4


def test_data_writes_reach_optimized_transformers_models(bert_path):
    import transformers

    hf = transformers.AutoModel.from_pretrained(bert_path, attn_implementation="eager").eval()
    ids, mask = random_batch("bert", [6, 2])
    fastbert.optimize(hf)
    attn = hf.encoder.layer[0].attention.self
    with torch.no_grad():
        before = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        attn.query.weight.data.normal_()  # the reproducer: changed nothing
        attn.value.bias.data.add_(0.5)
        hf.encoder.layer[1].output.dense.weight.data.mul_(0.5)
        changed = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        attn.key.weight.data = torch.randn_like(attn.key.weight)  # re-pointed at new storage
        repointed = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        fastbert.restore(hf)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert not torch.equal(changed, before) and not torch.equal(repointed, changed)
    assert (repointed[valid] - ref[valid]).abs().max() < 1e-4


def test_optimize_keeps_one_copy_of_qkv(bert_path):
    """Q, K and V become views of the fused weight: no concatenated copy beside transformers' parameters."""
    import transformers

    hf = transformers.AutoModel.from_pretrained(bert_path).eval()
    fastbert.optimize(hf)
    with torch.no_grad():
        hf(input_ids=torch.tensor([[5, 6, 7]]))
    attn = hf.encoder.layer[0].attention.self
    storages = {p.untyped_storage().data_ptr() for p in (attn.query.weight, attn.key.weight, attn.value.weight)}
    assert len(storages) == 1


# -- train / eval modes --


def test_built_in_eval_mode_and_train_switches(bert_path):
    import transformers

    fb = fastbert.AutoModelForSequenceClassification.from_pretrained(bert_path, backend="torch")
    assert not fb.training and not any(m.training for m in fb.modules())  # as transformers' from_pretrained
    direct = fastbert.AutoModel(transformers.AutoConfig.from_pretrained(bert_path), backend="torch")
    assert not direct.training  # built in eval mode, not in torch's default train mode
    fb.train()
    assert all(m.training for m in fb.modules())
    fb.eval()
    assert not any(m.training for m in fb.modules())

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(bert_path).eval()
    fastbert.optimize(hf, backend="torch")
    ids = torch.tensor([[5, 6, 7]])
    hf.train()  # what Trainer.train() does first: the fastbert encoder follows (dropout on)
    hf(input_ids=ids, labels=torch.tensor([1])).loss.backward()
    assert hf.bert._fastbert_encoder.training
    assert hf.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    hf.eval()
    with torch.no_grad():
        hf(input_ids=ids)
    assert not hf.bert._fastbert_encoder.training


def test_trainer_keyword_arguments_accepted(bert_path):
    """transformers.Trainer passes num_items_in_batch to every model (train, evaluate, predict)."""
    fb = fastbert.AutoModelForSequenceClassification.from_pretrained(bert_path, backend="torch")
    ids, mask = random_batch("bert", [4, 2])
    with torch.no_grad():
        ref = fb(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
        out = fb(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]), num_items_in_batch=2)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
