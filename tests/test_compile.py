"""torch.compile (fullgraph, dynamic shapes) and torch.export of fastbert models, and the ONNX refusal.

Compile time dominates this file, so the models are tiny (one layer). Graph breaks, recompiles and the unbacked
token count are all decided by dynamo and AOT tracing, which the ``aot_eager`` compiler runs without generating
code: every CPU backend is compiled that way. Inductor's code generation (the default ``torch.compile``) runs
once, on the cpp backend, the CPU default.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import make_checkpoint, random_batch
from helpers import CPU_BACKENDS
from torch._dynamo.utils import counters

import fastbert

#: (batch, seqlen) (3, 7) then (5, 11): both dimensions change, mixed lengths with padding, batch >= 2 (dynamo
#: specialises sizes 0 and 1, so a batch of 1 is a graph of its own).
LENGTHS = ([5, 3, 7], [9, 2, 4, 11, 1])
OUTPUTS = ("last_hidden_state", "pooler_output")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("compile"), "bert", hidden=32, heads=2, layers=1)


def _max_diff(got, want, names) -> float:
    worst = 0.0
    for name in names:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        worst = max(worst, (a - b).abs().max().item())
    return worst


def _compile_and_compare(model, compiler: str, family: str = "bert", names=OUTPUTS):
    """Compile once with dynamic shapes, run both shapes of LENGTHS (the second must not recompile)."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=compiler)
    with torch.no_grad():
        for i, lengths in enumerate(LENGTHS):
            ids, mask = random_batch(family, lengths)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(input_ids=ids, attention_mask=mask)
            diff = _max_diff(got, model(input_ids=ids, attention_mask=mask), names)
            print(f"{compiler}, lengths {lengths}: max|compiled - eager| = {diff:.3g}")
            assert diff <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1
    return compiled


def _assert_checks_traced(compiled, family: str = "bert"):
    """Out-of-range ids and a non-0/1 mask still raise, from the compiled graph (same shape: no recompile)."""
    ids, mask = random_batch(family, LENGTHS[-1])
    bad_ids = ids.clone()
    bad_ids[1, 1] = 99  # vocab_size is 99
    bad_mask = mask.clone()
    bad_mask[1, 1] = 2
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises(RuntimeError, match=r"input_ids must hold values in \[0, 99\)"):
            compiled(input_ids=bad_ids, attention_mask=mask)
        with pytest.raises(RuntimeError, match="attention_mask must hold 0/1"):
            compiled(input_ids=ids, attention_mask=bad_mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_dynamic(checkpoint, backend):
    model = fastbert.AutoModel.from_pretrained(checkpoint, backend=backend)
    compiled = _compile_and_compare(model, "aot_eager")
    _assert_checks_traced(compiled)


def test_compile_head_fullgraph_dynamic(tmp_path):
    """A head on RoBERTa: padding-aware positions (a cumulative sum) and the first-token classifier."""
    path = make_checkpoint(tmp_path, "roberta", task="sequence-classification", hidden=32, heads=2, layers=1)
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(path, backend=CPU_BACKENDS[-1])
    _compile_and_compare(model, "aot_eager", family="roberta", names=("logits",))


def test_compile_training_step_fullgraph(tmp_path):
    """A training step (dropout on) compiles with fullgraph and dynamic shapes: forward and backward are traced
    through the ops' registered gradients; with the same seed, loss and gradients equal eager's."""
    path = make_checkpoint(tmp_path, "bert", task="sequence-classification", hidden=32, heads=2, layers=1)
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(path, backend=CPU_BACKENDS[-1]).train()
    ids, mask = random_batch("bert", LENGTHS[0])
    labels = torch.tensor([0, 1, 2])

    def step(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = fn(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    eager_loss, eager = step(model)
    compiled_loss, compiled = step(torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager"))
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-6
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the cpp backend is not built")
def test_compile_inductor(checkpoint):
    model = fastbert.AutoModel.from_pretrained(checkpoint, backend="cpp")
    compiled = _compile_and_compare(model, "inductor")
    _assert_checks_traced(compiled)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_dynamic_batch_and_seqlen(checkpoint, backend):
    model = fastbert.AutoModel.from_pretrained(checkpoint, backend=backend)
    ids, mask = random_batch("bert", LENGTHS[0])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.cfg.max_sequence_length)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    program = torch.export.export(model, (), kwargs={"input_ids": ids, "attention_mask": mask}, dynamic_shapes=dims)
    exported = program.module()
    for lengths in (*LENGTHS, [4]):  # a batch of 1 too: export keeps sizes 0/1 symbolic
        ids, mask = random_batch("bert", lengths)
        diff = _max_diff(
            exported(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask), OUTPUTS
        )
        print(f"export, lengths {lengths}: max|exported - eager| = {diff:.3g}")
        assert diff <= 1e-5
    ids[0, 0] = 99
    with pytest.raises(RuntimeError, match="input_ids must hold values in"):
        exported(input_ids=ids, attention_mask=mask)


def test_onnx_export_names_the_transformers_path(checkpoint, tmp_path, monkeypatch):
    model = fastbert.AutoModel.from_pretrained(checkpoint, backend=CPU_BACKENDS[0])
    ids, mask = random_batch("bert", LENGTHS[0])
    with pytest.raises(NotImplementedError, match="Export the transformers model"):  # the TorchScript exporter
        torch.onnx.export(model, (ids, mask), str(tmp_path / "m.onnx"), dynamo=False)
    # The dynamo exporter needs onnxscript to start at all; inside it, this is the flag it sets around the export.
    from torch.onnx._internal.exporter import _flags

    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    with pytest.raises(NotImplementedError, match="fastbert.restore"):
        model(input_ids=ids, attention_mask=mask)


def test_real_token_indices_opcheck():
    from fastbert.padding import real_token_indices

    for mask in (torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)):
        torch.library.opcheck(real_token_indices, (mask,))
        assert torch.equal(real_token_indices(mask), torch.nonzero(mask.reshape(-1)).flatten())
