"""Training through fastbert: gradients against transformers, dropout, optimize()d models, gradient checkpointing,
padding-free (flattened) batches.

Gradient parity is the issue's rule: with dropout off and float32, the loss within 1e-4 of transformers' and
each parameter's gradient within 1e-3 of that gradient's own max-abs (plus a 1e-6 floor).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from checkpoints import FAMILIES, hf_config, make_hf_model, random_batch
from helpers import AVAILABLE_BACKENDS, CPU_BACKENDS

import fastbert
from fastbert import loading, reference
from fastbert.patch import is_optimized

HEADS = ("sequence-classification", "token-classification", "question-answering", "masked-lm")
#: Heavy mixed padding: a 1-token sequence beside long ones.
LENGTHS = [7, 1, 12, 4]
#: Backends the model-level tests train on: the CPU ones everywhere, triton under the interpreter too.
TRAIN_BACKENDS = [b for b in (*CPU_BACKENDS, "triton") if b in AVAILABLE_BACKENDS]

_DROPOUT_FIELDS = {
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
    "qa_dropout",
}


def no_dropout(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """The same model with every dropout rate 0 (the config the fastbert twin is built from too)."""
    for name in _DROPOUT_FIELDS:
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def labels_for(task: str | None, ids: torch.Tensor, mask: torch.Tensor, num_labels: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    batch, seqlen = ids.shape
    if task == "sequence-classification":
        return {"labels": torch.randint(0, num_labels, (batch,), generator=g)}
    if task == "token-classification":
        labels = torch.randint(0, num_labels, (batch, seqlen), generator=g)
        return {"labels": labels.masked_fill(mask == 0, -100)}
    if task == "question-answering":
        lengths = mask.sum(1)
        start = (torch.rand(batch, generator=g) * lengths).long()
        return {"start_positions": start, "end_positions": torch.minimum(start + 1, lengths - 1)}
    if task == "masked-lm":
        labels = torch.randint(4, vocab, (batch, seqlen), generator=g)
        keep = (torch.rand(batch, seqlen, generator=g) < 0.5) & (mask == 1)
        return {"labels": labels.masked_fill(~keep, -100)}
    return {}


def loss_of(task: str | None, out, mask: torch.Tensor) -> torch.Tensor:
    if task is None:  # the base model: a loss that reaches every real token's output and the pooler
        loss = (out.last_hidden_state.pow(2) * mask[..., None]).mean()
        pooled = getattr(out, "pooler_output", None)
        return loss + pooled.sum() if pooled is not None else loss
    return out.loss


def hf_grads(model: torch.nn.Module) -> dict[tuple[str, ...], torch.Tensor]:
    """Each Parameter's gradient under all of its names (tied weights have several: the decoder, its bias)."""
    names: dict[int, list[str]] = {}
    params = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
        params[id(p)] = p
    return {tuple(names[i]): params[i].grad for i in names}


def fastbert_grads_as_hf(model: fastbert.AutoModel) -> dict[str, torch.Tensor]:
    """fastbert's gradients under transformers' parameter names (fused QKV split), for comparison."""
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    return loading.fastbert_to_hf(grads, model.cfg, model.task, with_prefix=model.task is not None)


def assert_grads_match(got: dict[str, torch.Tensor], want: dict[tuple[str, ...], torch.Tensor], where: str) -> None:
    """Every transformers Parameter's gradient (under any of its names) against fastbert's, and nothing extra."""
    if all(isinstance(k, tuple) for k in got):  # both sides transformers models: one name per Parameter
        got = {names[0]: g for names, g in got.items()}
    assert all(g is not None for g in want.values()), f"{where}: transformers left a gradient unset"
    worst, seen = [], set()
    for names, w in want.items():
        present = [n for n in names if n in got]
        assert present, f"{where}: fastbert has no gradient for {names}"
        seen.update(present)
        name = present[0]
        g = got[name]
        err = (g.double() - w.double()).abs().max().item()
        bound = 1e-3 * w.abs().max().item() + 1e-6
        if not err <= bound:
            worst.append(f"{name}: err {err:.3g} > {bound:.3g}")
    assert not set(got) - seen, f"{where}: gradients transformers has no Parameter for: {sorted(set(got) - seen)[:6]}"
    assert not worst, f"{where}: " + "; ".join(worst[:6])


def twin(family: str, task: str | None, backend: str, tmp_path, **config_kw):
    """A random transformers model (dropout 0, train mode) and fastbert's copy of it on ``backend``."""
    hf = no_dropout(make_hf_model(family, task, **config_kw))
    hf.save_pretrained(tmp_path)
    auto = fastbert.AutoModel if task is None else getattr(fastbert, hf_auto_name(task))
    fb = auto.from_pretrained(tmp_path, backend=backend)
    return hf.train(), fb.train()


def hf_auto_name(task: str) -> str:
    return {
        "sequence-classification": "AutoModelForSequenceClassification",
        "token-classification": "AutoModelForTokenClassification",
        "question-answering": "AutoModelForQuestionAnswering",
        "masked-lm": "AutoModelForMaskedLM",
    }[task]


def run_step(model, task, ids, mask, targets) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = loss_of(task, model(input_ids=ids, attention_mask=mask, **targets), mask)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("task", (None, *HEADS))
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_transformers(family, task, backend, tmp_path):
    hf, fb = twin(family, task, backend, tmp_path, hidden=32, heads=4, intermediate=37)
    ids, mask = random_batch(family, LENGTHS)
    targets = labels_for(task, ids, mask, hf.config.num_labels, hf.config.vocab_size)
    want_loss = (hf_step_per_sequence if task == "question-answering" else run_step)(hf, task, ids, mask, targets)
    got_loss = run_step(fb, task, ids, mask, targets)
    assert abs(got_loss.item() - want_loss.item()) <= 1e-4, (got_loss.item(), want_loss.item())
    assert_grads_match(fastbert_grads_as_hf(fb), hf_grads(hf), f"{family}/{task}/{backend}")


def hf_step_per_sequence(model, task, ids, mask, targets) -> torch.Tensor:
    """transformers' loss and gradients with each sequence run alone, unpadded, and the losses averaged.

    For extractive QA: transformers' softmax over a padded row also counts the padding positions' logits, which
    fastbert never computes; alone, each sequence has no padding, and the batch loss is the mean of theirs.
    """
    model.zero_grad(set_to_none=True)
    total = 0.0
    lengths = mask.sum(1).tolist()
    for i, n in enumerate(lengths):
        one = {k: v[i : i + 1] for k, v in targets.items()}
        loss = loss_of(task, model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n], **one), mask)
        (loss / len(lengths)).backward()
        total += loss.item() / len(lengths)
    return torch.tensor(total)


@pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="triton cannot run here")
@pytest.mark.parametrize("task", ("sequence-classification", "token-classification"))
def test_gradients_match_transformers_triton(task, tmp_path):
    hf, fb = twin("bert", task, "triton", tmp_path, hidden=32, heads=2, layers=1, intermediate=37)
    ids, mask = random_batch("bert", [5, 1, 9])
    targets = labels_for(task, ids, mask, hf.config.num_labels, hf.config.vocab_size)
    want_loss = run_step(hf, task, ids, mask, targets)
    got_loss = run_step(fb, task, ids, mask, targets)
    assert abs(got_loss.item() - want_loss.item()) <= 1e-4
    assert_grads_match(fastbert_grads_as_hf(fb), hf_grads(hf), f"bert/{task}/triton")


# -- dropout --


def test_attention_dropout_keeps_the_configured_fraction():
    rate = 0.3
    bits = reference.dropout_bits(
        12345, torch.arange(4)[:, None, None], torch.arange(200)[None, :, None], torch.arange(200)[None, None, :]
    )
    kept = (bits >= reference.dropout_threshold(rate)).double().mean().item()
    # 160,000 Bernoulli(0.7) draws: standard deviation 0.0011, so 5 sigma is 0.006.
    assert abs(kept - (1 - rate)) < 0.006, kept
    assert reference.dropout_threshold(0.0) == 0


@pytest.mark.parametrize("rate", (1.0, -0.1, 1.5))
def test_attention_dropout_rate_is_checked(rate):
    qkv = torch.randn(4, 24)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout_p"):
        reference.attention(qkv, cu, 4, 2, 0.5, rate, torch.tensor([1]))


def test_attention_dropout_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        reference.attention(torch.randn(4, 24), torch.tensor([0, 4], dtype=torch.int32), 4, 2, 0.5, 0.1, None)


def test_attention_dropout_scales_kept_probabilities():
    """With v = identity rows, the output is the dropped-out probability matrix itself."""
    n, heads, dim = 8, 1, 8
    q = torch.randn(n, dim, dtype=torch.float64)
    k = torch.randn(n, dim, dtype=torch.float64)
    v = torch.eye(n, dim, dtype=torch.float64)
    qkv = torch.cat([q, k, v], 1)
    cu = torch.tensor([0, n], dtype=torch.int32)
    seed = torch.tensor([99])
    plain = reference.attention(qkv, cu, n, heads, 0.3)
    dropped = reference.attention(qkv, cu, n, heads, 0.3, 0.25, seed)
    bits = reference.dropout_bits(99, torch.zeros(()), torch.arange(n)[:, None], torch.arange(n)[None, :])
    keep = bits >= reference.dropout_threshold(0.25)
    torch.testing.assert_close(dropped, plain * keep / 0.75, rtol=0, atol=1e-12)


def _dropout_model(backend: str, tmp_path, task="sequence-classification"):
    model = make_hf_model("bert", task)
    model.config.hidden_dropout_prob = 0.2
    model.config.attention_probs_dropout_prob = 0.2
    model.save_pretrained(tmp_path)
    return getattr(fastbert, hf_auto_name(task)).from_pretrained(tmp_path, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_on_in_train_off_in_eval(backend, tmp_path):
    model = _dropout_model(backend, tmp_path)
    ids, mask = random_batch("bert", LENGTHS)
    with torch.no_grad():
        eval_a = model(input_ids=ids, attention_mask=mask).logits
        eval_b = model(input_ids=ids, attention_mask=mask).logits
        model.train()
        torch.manual_seed(5)
        train_a = model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(5)
        train_b = model(input_ids=ids, attention_mask=mask).logits
        train_c = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(eval_a, eval_b), "eval is not deterministic"
    assert torch.equal(train_a, train_b), "torch.manual_seed does not repeat the dropout masks"
    assert not torch.allclose(train_a, eval_a), "train() applies no dropout"
    assert not torch.allclose(train_a, train_c), "every step draws the same dropout masks"


def test_hidden_dropout_rate_statistics(tmp_path):
    """The embedding output's dropout keeps 1 - p of the values, scaled by 1 / (1 - p)."""
    model = fastbert.AutoModel(hf_config("bert", hidden=32, heads=4), backend="torch").train()
    model.embeddings.dropout = 0.25
    ids, mask = random_batch("bert", [60] * 8)
    batch = fastbert.inputs.prepare(model.cfg, ids, mask, None, None, None, model.device)
    batch = fastbert.inputs.with_defaults(model.cfg, batch)
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = model.embeddings(batch, model.backend)
        model.embeddings.train(False)
        plain = model.embeddings(batch, model.backend)
    kept = dropped != 0
    frac = kept.double().mean().item()
    assert abs(frac - 0.75) < 0.01, frac  # 30,720 draws: sigma 0.0025
    torch.testing.assert_close(dropped[kept], plain[kept] / 0.75)


# -- transformers models given to optimize() --


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("family", ("bert", "distilbert", "roberta"))
def test_optimized_transformers_model_trains_on_its_own_parameters(family, backend):
    task = "sequence-classification"
    hf = no_dropout(make_hf_model(family, task, hidden=32, heads=4, intermediate=37)).train()
    twin_model = no_dropout(make_hf_model(family, task, hidden=32, heads=4, intermediate=37)).train()
    fastbert.optimize(twin_model, backend=backend)
    ids, mask = random_batch(family, LENGTHS)
    targets = labels_for(task, ids, mask, hf.config.num_labels, hf.config.vocab_size)
    want_loss = run_step(hf, task, ids, mask, targets)
    got_loss = run_step(twin_model, task, ids, mask, targets)
    assert abs(got_loss.item() - want_loss.item()) <= 1e-4
    assert_grads_match(hf_grads(twin_model), hf_grads(hf), f"optimize/{family}/{backend}")
    # an optimizer step on the transformers Parameters reaches the fused QKV weight the kernels read
    opt = torch.optim.SGD(twin_model.parameters(), lr=0.5)
    opt.step()
    torch.optim.SGD(hf.parameters(), lr=0.5).step()
    twin_model.eval()
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            twin_model(input_ids=ids, attention_mask=mask).logits,
            hf(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-4,
            atol=1e-5,
        )


# -- gradient checkpointing --


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_checkpointing_gives_the_same_gradients(backend, tmp_path):
    model = _dropout_model(backend, tmp_path).train()
    ids, mask = random_batch("bert", LENGTHS)
    targets = {"labels": torch.tensor([0, 1, 2, 1])}
    torch.manual_seed(3)
    plain_loss = run_step(model, "sequence-classification", ids, mask, targets)
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    torch.manual_seed(3)
    loss = run_step(model, "sequence-classification", ids, mask, targets)
    assert loss.item() == plain_loss.item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


# -- padding-free (flattened) input --


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flattened_batch_equals_the_padded_batch(backend, tmp_path):
    """DataCollatorWithFlattening's rows (one row, position_ids restarting at 0) are packed sequences."""
    hf, fb = twin("bert", "token-classification", backend, tmp_path, hidden=32, heads=4)
    ids, mask = random_batch("bert", LENGTHS)
    features = [{"input_ids": ids[i, :n].tolist(), "labels": [1] * n} for i, n in enumerate(LENGTHS)]
    flat = transformers.DataCollatorWithFlattening()(features)
    assert flat["input_ids"].shape == (1, sum(LENGTHS))
    padded = fb(input_ids=ids, attention_mask=mask).logits
    got = fb(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
    torch.testing.assert_close(got, padded[mask.bool()], rtol=1e-5, atol=1e-5)
    with_kwargs = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(features)
    got2 = fb(**{k: v for k, v in with_kwargs.items() if k != "labels"}).logits[0]
    torch.testing.assert_close(got2, got, rtol=0, atol=0)
    loss = fb(**flat).loss
    loss.backward()
    assert all(p.grad is not None for p in fb.parameters())


def test_backend_without_gradients_refuses_train(tmp_path, monkeypatch):
    model = fastbert.AutoModel(hf_config("bert", hidden=32, heads=4), backend="torch")
    monkeypatch.setattr(model.backend, "trains", False)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        model.train()


# -- learning, Trainer, DDP --


def contains_token_task(n: int, seed: int, marker: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels): random sequences of 3-12 tokens; label 1 when ``marker`` occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n,), generator=g)
    ids = torch.randint(6, 40, (n, 12), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = (torch.rand(n, generator=g) * lengths).long()
    ids[labels == 1, where[labels == 1]] = marker
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask, labels


def fine_tune(model, steps: int, seed: int) -> float:
    """AdamW on the contains-token task; held-out accuracy afterwards."""
    ids, mask, labels = contains_token_task(32 * steps, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        part = slice(32 * step, 32 * (step + 1))
        loss = model(input_ids=ids[part], attention_mask=mask[part], labels=labels[part]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, mask, labels = contains_token_task(512, seed=seed + 1)
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    return (pred == labels).double().mean().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fine_tuning_learns_as_transformers_does(backend, tmp_path):
    """The same small BERT, the same data and seed (dropout on): fastbert reaches transformers' accuracy."""
    hf = make_hf_model("bert", "sequence-classification", hidden=32, heads=4, layers=2, num_labels=2, vocab=40)
    hf.save_pretrained(tmp_path)
    fb = fastbert.AutoModelForSequenceClassification.from_pretrained(tmp_path, backend=backend)
    torch.manual_seed(0)
    want = fine_tune(hf, steps=120, seed=0)
    torch.manual_seed(0)
    got = fine_tune(fb, steps=120, seed=0)
    print(f"held-out accuracy: transformers {want:.3f}, fastbert ({backend}) {got:.3f}")
    assert want >= 0.9, f"the task is too hard for this test: transformers reaches only {want:.3f}"
    assert got >= want - 0.03, (got, want)


def _token_features(n: int, seed: int) -> list[dict]:
    ids, mask, labels = contains_token_task(n, seed)
    return [{"input_ids": ids[i, : int(mask[i].sum())].tolist(), "labels": int(labels[i])} for i in range(ids.shape[0])]


#: The backend the Trainer tests run on: the one "auto" picks on this machine's CPU.
DEFAULT_BACKEND = CPU_BACKENDS[-1]


@pytest.mark.parametrize("backend", [DEFAULT_BACKEND])
def test_trainer_end_to_end(backend, tmp_path):
    """Trainer.train / evaluate / predict on fastbert's own model; the saved model loads back in transformers."""
    hf = make_hf_model("bert", "sequence-classification", hidden=32, heads=4, layers=2, num_labels=2, vocab=40)
    hf.save_pretrained(tmp_path / "init")
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(tmp_path / "init", backend=backend)
    # Trainer calls the model's activation (older: gradient) checkpointing method; transformers 5.2x renamed it.
    fields = transformers.TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = transformers.TrainingArguments(
        **{checkpointing: True},
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=2e-3,
        max_steps=60,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
    )
    collator = pad_features
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_token_features(16 * 2 * 60, seed=0),
        eval_dataset=_token_features(256, seed=1),
        data_collator=collator,
    )
    result = trainer.train()
    assert result.training_loss < 0.69, result.training_loss  # the mean over every step; chance is ln 2 = 0.693
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] < 0.4, metrics
    pred = trainer.predict(_token_features(256, seed=1))
    labels = torch.tensor(pred.label_ids)
    accuracy = (torch.tensor(pred.predictions).argmax(-1) == labels).double().mean().item()
    assert accuracy >= 0.85, accuracy
    # Trainer.save_model writes only a state dict for a model that is not a transformers PreTrainedModel;
    # fastbert's save_pretrained writes the transformers checkpoint.
    model.save_pretrained(tmp_path / "trained")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "trained").eval()
    ids, mask, _ = contains_token_task(8, seed=2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
        )


def pad_features(features: list[dict]) -> dict[str, torch.Tensor]:
    """A data collator: right-pad ``input_ids`` with 0, build the attention mask, stack the labels."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    mask = torch.zeros(len(features), longest, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


@pytest.mark.parametrize("backend", [DEFAULT_BACKEND])
def test_trainer_with_optimized_model_and_flattened_batches(backend, tmp_path):
    """optimize(transformers model) + Trainer(bf16=True, gradient accumulation) + DataCollatorWithFlattening."""
    hf = make_hf_model("bert", "token-classification", hidden=32, heads=4, layers=2, num_labels=2, vocab=40)
    fastbert.optimize(hf, backend=backend)
    ids, mask, _ = contains_token_task(16 * 40, seed=3)
    features = []
    for i in range(ids.shape[0]):
        row = ids[i, : int(mask[i].sum())]
        features.append({"input_ids": row.tolist(), "labels": (row == 5).long().tolist()})  # tag the marker
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        bf16=True,  # autocast on the CPU, as the example runs it
        learning_rate=3e-3,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=hf, args=args, train_dataset=features, data_collator=transformers.DataCollatorWithFlattening()
    )
    before = hf.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    trainer.train()
    assert is_optimized(hf)
    assert not torch.equal(before, hf.bert.encoder.layer[0].attention.self.query.weight), "the encoder did not train"
    hf.eval()
    test_ids, test_mask, _ = contains_token_task(64, seed=4)
    with torch.no_grad():
        pred = hf(input_ids=test_ids, attention_mask=test_mask).logits.argmax(-1)
    real = test_mask.bool()
    accuracy = (pred[real] == (test_ids[real] == 5).long()).double().mean().item()
    assert accuracy >= 0.97, accuracy
    hf.save_pretrained(tmp_path / "saved")
    fastbert.restore(hf)
    back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "saved").eval()
    # (accelerate leaves hf.forward wrapped in bf16 autocast after Trainer(bf16=True): compare the weights)
    trained = hf.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


@pytest.mark.parametrize("backend", [DEFAULT_BACKEND])
def test_ddp_two_processes_match_one_process(backend, tmp_path):
    """DistributedDataParallel over 2 gloo ranks on this machine: the averaged gradients equal one process's on
    the combined batch (dropout off; each rank's loss is the mean over its half, so their average is the mean)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    hf = no_dropout(make_hf_model("bert", "sequence-classification", hidden=32, heads=4, intermediate=37))
    hf.save_pretrained(tmp_path / "ckpt")
    ids, mask = random_batch("bert", [7, 1, 12, 4, 9, 3])
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    out = tmp_path / "grads.pt"
    torch.save({"ids": ids, "mask": mask, "labels": labels}, f"{out}.batch")
    worker = Path(__file__).with_name("ddp_worker.py")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(port)]
    done = subprocess.run(
        [*cmd, str(worker), str(tmp_path / "ckpt"), backend, str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(out, weights_only=True)
    model = fastbert.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", backend=backend).train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# -- mixed precision --


#: (backend, autocast dtype): bfloat16 on the CPU backends; float16 for triton, whose interpreter has no bfloat16
#: arithmetic (on a GPU both run through the same casts).
AUTOCAST_CASES = [(b, torch.bfloat16) for b in CPU_BACKENDS] + (
    [("triton", torch.float16)] if "triton" in AVAILABLE_BACKENDS else []
)


@pytest.mark.parametrize(("backend", "dtype"), AUTOCAST_CASES)
def test_autocast_step_is_as_close_to_fp32_as_transformers(backend, dtype, tmp_path):
    """Under torch.autocast: fastbert's loss and gradients are as close to the float32 ones as transformers' under
    the same autocast (error <= 2x transformers' + 2% of the gradient's max-abs)."""
    small = dict(hidden=32, heads=2, layers=1) if backend == "triton" else dict(hidden=64, heads=4)
    hf, fb = twin("bert", "sequence-classification", backend, tmp_path, **small)
    ids, mask = random_batch("bert", LENGTHS)
    targets = {"labels": torch.tensor([0, 1, 2, 1])}

    def step(model, autocast: bool):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = run_step(model, "sequence-classification", ids, mask, targets)
        return loss.item(), hf_grads(model)

    exact_loss, exact = step(hf, False)
    hf_loss, hf_bf16 = step(hf, True)
    fb_loss, _ = step(fb, True)
    got = fastbert_grads_as_hf(fb)
    assert abs(fb_loss - exact_loss) <= 2 * abs(hf_loss - exact_loss) + 1e-3, (fb_loss, hf_loss, exact_loss)
    for names, want in exact.items():
        scale = want.abs().max().item()
        err = (got[names[0]].float() - want).abs().max().item()
        hf_err = (hf_bf16[names].float() - want).abs().max().item()
        assert err <= 2 * hf_err + 0.02 * scale + 1e-6, (names[0], err, hf_err, scale)
    fb.eval()
    hf.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        logits = fb(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        exact_logits = hf(input_ids=ids, attention_mask=mask).logits
    assert (logits.float() - exact_logits).abs().max().item() < 5e-2


def test_packed_offsets_and_a_mask_together_are_refused():
    model = fastbert.AutoModel(hf_config("bert", hidden=32, heads=4), backend="torch")
    ids = torch.tensor([[5, 6, 7, 8]])
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cu_seq_lens_q=cu)
