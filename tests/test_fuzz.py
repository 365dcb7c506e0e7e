"""Fuzzing (issue 15): random inputs through every backend end in transformers' answer or a clear error.

Seeded and bounded (hypothesis with ``derandomize=True``, no example database), so CI is deterministic and fast.
A longer run: ``FASTBERT_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py`` (every category then tries that many
cases; ``FASTBERT_FUZZ_SEED`` changes the derandomised stream). Categories:

- valid padded batches (random shapes, right/left/holey masks, id dtypes, token types) vs transformers eager;
- corrupted padded batches: each corruption must raise its ValueError / TypeError naming the value;
- malformed packed batches (random cu_seqlens / max_seqlen): the padded answer when valid, else a ValueError;
- direct calls of every C++ op with random, often invalid arguments, in a subprocess (a crash fails the test
  instead of killing the runner): valid calls must match ``fastbert.reference``, the rest must raise;
- concurrency (one model, 4 threads) and determinism (a sequence does not depend on its batch neighbours).
Hostile checkpoints are in test_hostile_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from checkpoints import make_checkpoint
from helpers import AVAILABLE_BACKENDS

import fastbert

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("FASTBERT_FUZZ_EXAMPLES", "0"))
SEED = int(os.environ.get("FASTBERT_FUZZ_SEED", "0"))
BACKENDS = AVAILABLE_BACKENDS
FAMILIES = ("bert", "roberta", "distilbert", "electra")
VOCAB, MAX_LEN, HIDDEN = 99, 24, 32
ATOL = 1e-4  # STYLE.md: model level against transformers eager in fp32


def bounded(max_examples: int):
    """Seeded, bounded hypothesis settings (no example database, no deadline: the interpreter is slow)."""

    def wrap(fn):
        fn = settings(
            max_examples=max_examples,
            deadline=None,
            derandomize=SEED == 0,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )(fn)
        return hypothesis.seed(SEED)(fn) if SEED else fn

    return wrap


def examples_for(backend: str, default: int) -> int:
    return EXAMPLES or (max(3, default // 4) if backend == "triton" else default)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (folder, transformers eager model, {backend: fastbert model})."""
    out = {}
    for family in FAMILIES:
        path = make_checkpoint(
            tmp_path_factory.mktemp(family), family, hidden=HIDDEN, heads=2, vocab=VOCAB, max_positions=MAX_LEN
        )
        hf = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        fb = {b: fastbert.AutoModel.from_pretrained(path, backend=b) for b in BACKENDS}
        out[family] = (path, hf, fb)
    return out


def _pad_id(family: str) -> int:
    return 1 if family in ("roberta", "xlm-roberta") else 0


@st.composite
def padded_batches(draw, family: str):
    """(input_ids, attention_mask, token_type_ids | None, layout) with a random mask layout."""
    batch = draw(st.integers(1, 4))
    seqlen = draw(st.integers(1, 16))
    layout = draw(st.sampled_from(["right", "left", "holes"]))
    lengths = [draw(st.integers(0, seqlen)) for _ in range(batch)]
    mask = torch.zeros(batch, seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        if layout == "right":
            mask[i, :n] = 1
        elif layout == "left":
            mask[i, seqlen - n :] = 1
        else:
            mask[i] = torch.tensor([draw(st.integers(0, 1)) for _ in range(seqlen)])
    ids = torch.tensor([[draw(st.integers(4, VOCAB - 1)) for _ in range(seqlen)] for _ in range(batch)])
    ids[mask == 0] = _pad_id(family)
    tt = None
    if family != "distilbert" and draw(st.booleans()):
        tt = torch.tensor([[draw(st.integers(0, 1)) for _ in range(seqlen)] for _ in range(batch)])
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
    return ids.to(dtype), mask, tt, layout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_valid_batches_match_transformers(models, family, backend):
    _, hf, fb = models[family]
    model = fb[backend]
    worst = []

    @bounded(examples_for(backend, 12))
    @given(padded_batches(family))
    def check(case):
        ids, mask, tt, layout = case
        extra = {"token_type_ids": tt} if tt is not None else {}
        with torch.no_grad():
            ref = hf(input_ids=ids.long(), attention_mask=mask, **extra).last_hidden_state
            out = model(input_ids=ids, attention_mask=mask, **extra)
        valid = mask.bool()
        got = out.last_hidden_state
        assert got.shape == ref.shape
        assert torch.isfinite(got).all()
        assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))  # nothing computed for padding
        if valid.any():
            diff = (got[valid] - ref[valid]).abs().max().item()
            worst.append(diff)
            assert diff < ATOL, f"{layout} {tuple(ids.shape)} {ids.dtype}: max diff {diff:.2e}"

    check()
    print(f"{family}/{backend}: {len(worst)} batches, worst diff {max(worst, default=0):.2e}")


# (name, corruption(ids, mask, tt) -> kwargs, expected error, message fragment)
CORRUPTIONS = [
    ("id-too-large", lambda i, m, t: dict(input_ids=i.clone().fill_(VOCAB + 3)), ValueError, f"contains {VOCAB + 3}"),
    ("negative-id", lambda i, m, t: dict(input_ids=i.clone().fill_(-2)), ValueError, "contains -2, a negative"),
    ("float-ids", lambda i, m, t: dict(input_ids=i.float()), TypeError, "integer tensor, got torch.float32"),
    ("bool-ids", lambda i, m, t: dict(input_ids=i > 5), TypeError, "integer tensor, got torch.bool"),
    ("1-d-ids", lambda i, m, t: dict(input_ids=i[0]), ValueError, "must be 2-D"),
    ("list-ids", lambda i, m, t: dict(input_ids=i.tolist()), TypeError, "must be a torch.Tensor, got list"),
    ("mask-shape", lambda i, m, t: dict(input_ids=i, attention_mask=m[:, :-1]), ValueError, "attention_mask has"),
    ("mask-value", lambda i, m, t: dict(input_ids=i, attention_mask=m + 2), ValueError, "0/1 or bools, found [23]"),
    ("mask-3d", lambda i, m, t: dict(input_ids=i, attention_mask=m[:, None]), ValueError, "got 3-D"),
    (
        "mask-4d-nan",
        lambda i, m, t: dict(input_ids=i, attention_mask=torch.full((i.shape[0], 1, 1, i.shape[1]), float("nan"))),
        ValueError,
        "contains NaN",
    ),
    ("types-range", lambda i, m, t: dict(input_ids=i, token_type_ids=torch.full_like(i, 2)), ValueError, "contains 2"),
    ("types-shape", lambda i, m, t: dict(input_ids=i, token_type_ids=i[:, :-1]), ValueError, "token_type_ids has"),
    ("positions-shape", lambda i, m, t: dict(input_ids=i, position_ids=i[:, :-1]), ValueError, "position_ids has"),
    ("too-long", lambda i, m, t: dict(input_ids=i.repeat(1, MAX_LEN + 1)), ValueError, "exceeds the model's maximum"),
    ("both-inputs", lambda i, m, t: dict(input_ids=i, inputs_embeds=torch.zeros(1)), ValueError, "exactly one"),
    ("unknown-kwarg", lambda i, m, t: dict(input_ids=i, frobnicate=1), TypeError, "unexpected argument"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_corrupted_batches_raise_named_errors(models, backend):
    tried = 0

    @bounded(examples_for(backend, 40))
    @given(st.sampled_from(["bert", "roberta", "electra"]), st.integers(0, len(CORRUPTIONS) - 1), st.data())
    def check(family, which, data):
        nonlocal tried
        name, corrupt, error, fragment = CORRUPTIONS[which]
        ids, mask, tt, _ = data.draw(padded_batches(family))
        if ids.shape[1] < 2 and name in ("mask-shape", "types-shape", "positions-shape"):
            return  # slicing off a column leaves a valid (1, 0) shape only for seqlen 1: nothing to corrupt
        kwargs = corrupt(ids.long(), mask, tt)
        tried += 1
        with pytest.raises(error, match=fragment):
            models[family][2][backend](**kwargs)

    check()
    print(f"{backend}: {tried} corrupted batches, each refused with its named error")


def _packed_is_valid(cu: list[int], max_seqlen: int, total: int) -> bool:
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=False)]
    return (
        len(cu) >= 1
        and cu[0] == 0
        and all(n >= 0 for n in lengths)
        and cu[-1] == total
        and max_seqlen >= max(lengths, default=0)
        and max(lengths, default=0) <= MAX_LEN
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_malformed_packed_batches(models, backend):
    model = models["bert"][2][backend]
    reference = models["bert"][2]["torch"]
    counts = {"valid": 0, "refused": 0}

    @bounded(examples_for(backend, 60))
    @given(
        st.lists(st.integers(-3, 14), min_size=1, max_size=5),
        st.integers(-2, 16),
        st.integers(0, 12),
        st.booleans(),
    )
    def check(cu, max_seqlen, total, sort):
        if sort:  # bias half the cases towards well-formed offsets (and a third of those to a right max_seqlen)
            cu = [0, *sorted(abs(x) for x in cu[1:])]
            total = cu[-1]
            if max_seqlen % 3 == 0:
                max_seqlen = max((b - a for a, b in zip(cu[:-1], cu[1:], strict=False)), default=0)
        ids = torch.randint(4, VOCAB, (total,))
        cu_t = torch.tensor(cu, dtype=torch.int32)
        if _packed_is_valid(cu, max_seqlen, total):
            counts["valid"] += 1
            with torch.no_grad():
                got = model.forward_packed(ids, cu_t, max_seqlen)
                lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=False)]
                seqs = [ids[a:b] for a, b in zip(cu[:-1], cu[1:], strict=False)]
                width = max(lengths, default=0)
                padded = torch.zeros(len(seqs), width, dtype=torch.long)
                mask = torch.zeros(len(seqs), width, dtype=torch.long)
                for i, s in enumerate(seqs):
                    padded[i, : len(s)], mask[i, : len(s)] = s, 1
                ref = reference(input_ids=padded, attention_mask=mask).last_hidden_state[mask.bool()]
            assert got.shape == (total, HIDDEN)
            assert (got - ref).abs().max().item() < ATOL if total else True
        else:
            counts["refused"] += 1
            with pytest.raises(ValueError):
                model.forward_packed(ids, cu_t, max_seqlen)

    check()
    assert counts["valid"] and counts["refused"]
    print(f"{backend}: packed batches {counts}")


DIRECT_OPS_SCRIPT = textwrap.dedent(
    """
    import json, random, sys
    import torch
    from fastbert import _cpp, reference

    rng = random.Random(int(sys.argv[1]))
    n_cases = int(sys.argv[2])
    counts = {"valid": 0, "raised": 0}
    errors = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)

    def maybe(t, p=0.15):
        # corrupt a tensor argument now and then: wrong dtype, wrong shape, non-contiguous, meta, empty
        r = rng.random()
        if r > p:
            return t, None
        kind = rng.choice(["dtype", "float64", "shape", "meta", "empty", "noncontig"])
        if kind == "dtype":
            return t.to(torch.int32), kind
        if kind == "float64":  # parameters are read in any float dtype: accepted or refused, never wrong
            return t.double(), None
        if kind == "shape" and t.numel() > 0:
            return t.reshape(-1)[: t.numel() - 1], kind
        if kind == "meta":
            return torch.empty_like(t, device="meta"), kind
        if kind == "empty" and t.dim() == 2 and t.shape[0] > 0:  # zero rows: valid alone, a mismatch beside others
            return t[:0], None
        return (t.t() if t.dim() == 2 else t), None  # a transposed view is valid input: must still be right

    def case():
        op = rng.choice(["embeddings", "add_layernorm", "bias_activation", "bias_residual_layernorm",
                         "linear", "linear_residual_layernorm", "attention"])
        T = rng.choice([0, 1, 3, 17])
        H = rng.choice([1, 8, 33])
        x = torch.randn(T, H)
        w, b = torch.ones(H) + 0.1 * torch.randn(H), 0.1 * torch.randn(H)
        eps = rng.choice([1e-12, 1e-5, -1.0, 0.0])
        if op == "embeddings":
            V = rng.choice([1, 5, 30])
            ids = torch.randint(-1, V + 1, (T,)) if rng.random() < 0.3 else torch.randint(0, V, (T,))
            pos = torch.randint(0, 4, (T,))
            args = [ids, pos, torch.zeros(T, dtype=torch.long), torch.randn(V, H), torch.randn(4, H),
                    torch.randn(2, H), w, b, eps]
        elif op == "add_layernorm":
            args = [x, torch.randn(T, H) if rng.random() < 0.5 else None, w, b, eps]
        elif op == "bias_activation":
            args = [x, b, rng.choice([None, "gelu", "gelu_tanh", "relu", "silu", "tanh", "bogus"])]
        elif op == "bias_residual_layernorm":
            args = [x, b, torch.randn(T, H), w, b, eps]
        elif op in ("linear", "linear_residual_layernorm"):
            K = rng.choice([0, 1, 16, 33])
            x = torch.randn(T, K)
            weight = torch.randn(H, K)
            args = [x, weight, b] + ([None, None] if op == "linear" else [torch.randn(T, H), w, b, eps, None])
        else:
            heads = rng.choice([1, 2, 3])
            D = rng.choice([8, 16])
            lengths = [rng.randint(0, 6) for _ in range(rng.randint(1, 3))]
            T = sum(lengths)
            cu = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
            if rng.random() < 0.3:
                cu[rng.randrange(len(cu))] += rng.choice([-2, 1, 5])
            args = [torch.randn(T, 3 * heads * D), cu, max(lengths) + rng.choice([0, 0, -1, 2]), heads, D**-0.5]
        corrupted = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                args[i], bad = maybe(a)
                if bad:
                    corrupted.append(f"argument {i}: {bad}")
        return op, args, corrupted

    def valid_reference(op, args):
        try:
            with torch.no_grad():
                return getattr(reference, op)(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                 else a for a in args])
        except Exception:
            return None

    for i in range(n_cases):
        op, args, corrupted = case()
        try:
            out = getattr(_cpp, op)(*args)
        except errors as exc:
            msg = str(exc)
            if not msg.strip():
                print(json.dumps({"bad": f"{op}: {type(exc).__name__} with an empty message"}))
                sys.exit(1)
            counts["raised"] += 1
            continue
        if corrupted or out.is_meta:
            print(json.dumps({"bad": f"{op}: corrupted arguments {corrupted} were accepted (output {tuple(out.shape)}"
                              f" on {out.device})"}))
            sys.exit(1)
        ref = valid_reference(op, args)
        if ref is None:
            print(json.dumps({"bad": f"{op}: fastbert accepted arguments the reference rejects"}))
            sys.exit(1)
        close = ref.shape == out.shape and (
            ref.numel() == 0 or torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4, equal_nan=True)
        )
        if not close:
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
            print(json.dumps({"bad": f"{op}: wrong result for valid arguments {shapes}"}))
            sys.exit(1)
        counts["valid"] += 1
    print(json.dumps(counts))
    """
)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_fuzz_direct_cpp_op_calls_in_subprocess():
    n = EXAMPLES or 300
    res = subprocess.run(
        [sys.executable, "-c", DIRECT_OPS_SCRIPT, str(SEED), str(n)], capture_output=True, text=True, timeout=600
    )
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"direct op fuzzing died (rc {res.returncode}): {last}\n{res.stderr[-3000:]}"
    counts = json.loads(last)
    assert counts["valid"] > 0 and counts["raised"] > 0
    print(f"direct cpp op calls: {counts}")


# -- concurrency and determinism --


def test_one_model_four_threads_equals_sequential(models):
    _, _, fb = models["bert"]
    model = fb["cpp" if "cpp" in fb else "torch"]
    g = torch.Generator().manual_seed(1)
    batches = []
    for k in range(16):
        b, s = 1 + k % 4, 3 + (5 * k) % 20
        ids = torch.randint(4, VOCAB, (b, s), generator=g)
        mask = (torch.arange(s)[None] < torch.randint(1, s + 1, (b, 1), generator=g)).long()
        batches.append((ids, mask))

    def run(batch):
        with torch.no_grad():
            return model(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state

    sequential = [run(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(run, batches * 2))
    for i, out in enumerate(threaded):
        assert torch.equal(out, sequential[i % len(batches)]), f"batch {i % len(batches)} differs under threads"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_does_not_depend_on_its_neighbours(models, backend):
    """A sequence alone vs the same sequence among random neighbours: no more change than transformers shows."""
    _, hf, fb = models["bert"]
    g = torch.Generator().manual_seed(2)
    target = torch.randint(4, VOCAB, (1, 9), generator=g)
    neighbours = torch.randint(4, VOCAB, (5, 20), generator=g)
    lengths = torch.tensor([9, 20, 3, 17, 1, 12])
    ids = torch.zeros(6, 20, dtype=torch.long)
    ids[0, :9], ids[1:] = target[0], neighbours
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    ids[mask == 0] = 0
    diffs = {}
    for name, model in (("transformers", hf), ("fastbert", fb[backend])):
        with torch.no_grad():
            alone = model(input_ids=target).last_hidden_state[0]
            batched = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :9]
        diffs[name] = (alone - batched).abs().max().item()
    print(f"{backend}: alone vs batched {diffs}")
    assert diffs["fastbert"] <= max(3 * diffs["transformers"], 1e-5)
