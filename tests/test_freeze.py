"""``AutoModel.freeze()``: inference with every linear weight kept prepacked for the backend's GEMM.

Rules: a frozen model's outputs equal the unfrozen model's exactly (the same GEMM on the same weight, read from
its packed form); every tracked write to a weight (optimizer step, ``torch.no_grad()`` in-place update,
``load_state_dict``, re-pointing ``.data``) is seen on the next call; copies (deepcopy, pickling the whole model)
work; training is refused while frozen, and works again after ``unfreeze()``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from checkpoints import make_checkpoint, random_batch

import fastbert
from fastbert import ops as ops_mod
from fastbert.modeling import Linear

BACKENDS = [b for b in ("torch", "cpp") if ops_mod.unavailable_reason(b, torch.device("cpu")) is None]
LENGTHS = [7, 1, 12, 5]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("freeze"), "bert", "sequence-classification", hidden=48, heads=3)


def _load(folder, backend):
    return fastbert.AutoModelForSequenceClassification.from_pretrained(folder, backend=backend).eval()


def _out(model, ids, mask):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def _linears(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_outputs_equal_unfrozen(folder, backend):
    ids, mask = random_batch("bert", LENGTHS)
    model = _load(folder, backend)
    plain = _out(model, ids, mask)
    assert model.freeze() is model and model.frozen and not model.training
    torch.testing.assert_close(_out(model, ids, mask), plain, rtol=0, atol=0)
    torch.testing.assert_close(_out(model, ids, mask), plain, rtol=0, atol=0)  # from the kept packs
    if backend == "cpp" and torch.backends.mkldnn.is_available():
        assert all(m._pack is not None and m._pack[1] is not None for m in _linears(model.layers))
    model.unfreeze()
    assert not model.frozen and all(m._pack is None and not m.frozen for m in _linears(model))
    torch.testing.assert_close(_out(model, ids, mask), plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write", ["no_grad_inplace", "load_state_dict", "repoint_data", "set_backend"])
def test_tracked_writes_are_seen(folder, backend, write):
    ids, mask = random_batch("bert", LENGTHS, seed=1)
    model = _load(folder, backend).freeze()
    _out(model, ids, mask)  # packs made
    target = model.layers[0].qkv.weight
    new = target.detach() * 1.5 + 0.01
    if write == "no_grad_inplace":
        with torch.no_grad():
            target.copy_(new)
    elif write == "load_state_dict":
        name = next(n for n, p in model.named_parameters() if p is target)
        model.load_state_dict({**model.state_dict(), name: new})
    elif write == "repoint_data":
        target.data = new.clone()
    elif write == "set_backend":
        with torch.no_grad():
            target.copy_(new)
        other = next((b for b in BACKENDS if b != backend), backend)
        model.set_backend(other)
    fresh = _load(folder, backend)
    name = next(n for n, p in model.named_parameters() if p is target)
    fresh.load_state_dict({**fresh.state_dict(), name: new})
    torch.testing.assert_close(_out(model, ids, mask), _out(fresh, ids, mask), rtol=1e-5, atol=1e-5)


def test_train_refused_while_frozen_then_trains_after_unfreeze(folder):
    backend = "cpp" if "cpp" in BACKENDS else "torch"
    ids, mask = random_batch("bert", LENGTHS, seed=2)
    model = _load(folder, backend).freeze()
    with pytest.raises(NotImplementedError, match=r"frozen.*unfreeze\(\)"):
        model.train()
    assert not model.training
    model.unfreeze().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    labels = torch.tensor([0, 1, 2, 0])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    # an optimizer step on an unfrozen model, then freeze: the packs hold the stepped weights
    model.eval()
    stepped = _out(model, ids, mask)
    torch.testing.assert_close(_out(model.freeze(), ids, mask), stepped, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_of_frozen_and_unfrozen_models(folder, backend):
    ids, mask = random_batch("bert", LENGTHS, seed=3)
    for frozen in (False, True):
        model = _load(folder, backend)
        if frozen:
            model.freeze()
        want = _out(model, ids, mask)
        twin = copy.deepcopy(model)
        assert twin.backend is model.backend and twin.frozen == frozen
        torch.testing.assert_close(_out(twin, ids, mask), want, rtol=0, atol=0)
        with torch.no_grad():  # the copy owns its weights: a write to it leaves the original (and its packs) alone
            for p in twin.parameters():
                p.mul_(0.5)
        torch.testing.assert_close(_out(model, ids, mask), want, rtol=0, atol=0)
        assert not torch.equal(_out(twin, ids, mask), want)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)  # a whole pickled module, as users save one
        assert loaded.backend.name == backend and loaded.frozen == frozen
        torch.testing.assert_close(_out(loaded, ids, mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_under_autocast_equals_unfrozen(folder, backend):
    ids, mask = random_batch("bert", LENGTHS, seed=4)
    model = _load(folder, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _out(model, ids, mask)
        got = _out(model.freeze(), ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_optimized_transformers_model_freezes(folder):
    import transformers

    backend = "cpp" if "cpp" in BACKENDS else "torch"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = random_batch("bert", LENGTHS, seed=5)
    with torch.inference_mode():
        want = hf(input_ids=ids, attention_mask=mask).logits
    fastbert.optimize(hf, backend=backend, freeze=True)
    with torch.inference_mode():
        got = hf(input_ids=ids, attention_mask=mask).logits
        again = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="freeze"):
        hf.train()
    with torch.no_grad():  # the HF model's own parameters are the ones the packs follow (fused QKV views)
        hf.bert.encoder.layer[0].attention.self.query.weight.mul_(2.0)
    with torch.inference_mode():
        changed = hf(input_ids=ids, attention_mask=mask).logits
    fastbert.restore(hf)
    with torch.inference_mode():
        torch.testing.assert_close(changed, hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)
    hf.train()  # restored: trains again


def test_optimize_freeze_requires_eval(folder):
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    hf.train()
    with pytest.raises(ValueError, match="eval"):
        fastbert.optimize(hf, freeze=True)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_frozen_model_compiles_fullgraph(tmp_path, quantize):
    if "cpp" not in BACKENDS:
        pytest.skip("the cpp backend is not built here (int8 and prepacking are cpp features)")
    folder = make_checkpoint(tmp_path, "bert", None, hidden=48, heads=3)
    ids, mask = random_batch("bert", [7, 3, 9], seed=6)
    model = fastbert.AutoModel.from_pretrained(folder, backend="cpp", quantize=quantize).freeze()
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(model, dynamic=True, fullgraph=True)
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_optimize_again_with_freeze_is_refused_not_ignored(folder):
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    fastbert.optimize(hf)
    fastbert.optimize(hf)  # the same options again: a no-op
    with pytest.raises(ValueError, match="already optimised.*restore"):
        fastbert.optimize(hf, freeze=True)
    fastbert.restore(hf)
    fastbert.optimize(hf, freeze=True)
    fastbert.optimize(hf, freeze=True)  # already frozen: a no-op
