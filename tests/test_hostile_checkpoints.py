"""A corpus of hostile checkpoints, built here in tmp_path: each must fail fast with a fastbert error naming the
config field, the tensor or the file at fault (never a ZeroDivisionError, a NaN output, a hang, or a read
outside the checkpoint folder).

Config values are refused by ``EncoderConfig.from_hf`` (UnsupportedModelError); checkpoints whose tensors do
not fit their config by ``loading.check_fits`` before any model is built (CheckpointError); files and shard
indexes by ``loading.read_state_dict`` (CheckpointError).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import types

import pytest
import torch
import transformers
from checkpoints import edit_config, make_checkpoint, random_batch, write_shards
from safetensors.torch import load_file, save_file

import fastbert
from fastbert import loading
from fastbert.config import EncoderConfig, UnsupportedModelError
from fastbert.loading import CheckpointError

# Every refusal here is cheap; a case that takes longer is a hang in the making (1e7 layers used to be one).
LIMIT_S = 5.0


class _Expired(BaseException):
    """Raised by the deadline's alarm; a BaseException so that no ``except Exception`` can swallow it."""


@contextlib.contextmanager
def deadline(seconds: float = LIMIT_S):
    """Fail the test if the block runs longer than ``seconds`` (SIGALRM interrupts it rather than waiting)."""

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        pytest.fail(f"took more than {seconds} s: the refusal must come before anything is built")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One small checkpoint per family (hidden 32, 2 heads, 2 layers, vocab 99), copied by each test."""
    root = tmp_path_factory.mktemp("bases")
    return {
        family: make_checkpoint(root, family, hidden=32, heads=2, embedding_size=16 if family == "electra" else None)
        for family in ("bert", "roberta", "distilbert", "electra")
    }


@pytest.fixture
def checkpoint(bases, tmp_path):
    """checkpoint(family, **config_fields): a fresh copy of the family's base with config.json edited."""

    def copy(family: str = "bert", **fields):
        folder = shutil.copytree(bases[family], tmp_path / f"{family}-{len(list(tmp_path.iterdir()))}")
        return edit_config(folder, **fields)

    return copy


def _load(path):
    with deadline():
        return fastbert.AutoModel.from_pretrained(path, backend="torch")


def _check_fits(path):
    """What from_pretrained does before it builds a model: config, tensors, names, then check_fits."""
    with deadline():
        cfg = EncoderConfig.from_hf(loading.load_hf_config(path))
        state, _, origin = loading.hf_to_fastbert(loading.read_state_dict(path), cfg, None)
        loading.check_fits(cfg, state, str(path), origin)


# ----------------------------------------------------------------------------------------------------------
# Config values: UnsupportedModelError naming the field and the value
# ----------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("bert", "num_attention_heads", 0),  # was ZeroDivisionError
    ("bert", "num_attention_heads", -2),  # 32 % -2 == 0: loaded, then failed in forward
    ("bert", "vocab_size", -1),  # was torch's "negative dimension"
    ("bert", "hidden_size", -32),
    ("bert", "intermediate_size", 0),
    ("bert", "intermediate_size", -1),
    ("bert", "max_position_embeddings", 0),
    ("bert", "num_hidden_layers", 0),
    ("bert", "num_hidden_layers", -1),
    ("bert", "type_vocab_size", -1),
    ("bert", "layer_norm_eps", -1.0),  # loaded and gave NaN outputs
    ("bert", "layer_norm_eps", 0.0),
    ("bert", "layer_norm_eps", NAN),
    ("bert", "layer_norm_eps", INF),
    ("bert", "layer_norm_eps", -INF),
    ("bert", "initializer_range", -0.02),
    ("electra", "embedding_size", 0),  # was silently replaced by hidden_size
    ("electra", "embedding_size", -16),
    ("distilbert", "n_heads", 0),
    ("distilbert", "dim", -32),
    ("distilbert", "n_layers", 0),
    ("distilbert", "hidden_dim", 0),
    ("roberta", "pad_token_id", -1),
]


@pytest.mark.parametrize(("family", "field", "value"), BAD_VALUES, ids=lambda v: str(v))
def test_bad_config_value_is_refused(checkpoint, family, field, value):
    path = checkpoint(family, **{field: value})
    with pytest.raises(UnsupportedModelError, match=rf"config field {field} is {value}\b"):
        _load(path)


@pytest.mark.parametrize("excess", [0, 1, 40], ids=["longest-0", "pad=max_pos", "pad>max_pos"])
def test_roberta_pad_token_id_leaves_no_positions(checkpoint, excess):
    """RoBERTa's longest sequence is max_position_embeddings - pad_token_id - 1: it must be >= 1."""
    path = checkpoint("roberta")
    max_pos = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    pad = max_pos - 1 + excess
    edit_config(path, pad_token_id=pad)
    with pytest.raises(UnsupportedModelError, match=rf"pad_token_id is {pad} and max_position_embeddings {max_pos}"):
        _load(path)


def test_roberta_longest_sequence_one_is_accepted():
    hf = transformers.RobertaConfig(max_position_embeddings=34, pad_token_id=32, vocab_size=99)
    assert EncoderConfig.from_hf(hf).max_sequence_length == 1


def _namespace(family: str, **fields):
    """A config object as from_hf reads it (attributes), without transformers' own type checks."""
    base = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]()
    return types.SimpleNamespace(**{**base.to_dict(), **fields})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 768.0),
        ("hidden_size", True),
        ("hidden_size", "768"),
        ("hidden_size", None),
        ("num_attention_heads", 12.0),
        ("num_hidden_layers", "12"),
        ("vocab_size", [30522]),
        ("max_position_embeddings", False),
        ("type_vocab_size", 2.5),
        ("layer_norm_eps", "1e-12"),
        ("layer_norm_eps", True),
        ("pad_token_id", 1.5),
    ],
    ids=lambda v: repr(v),
)
def test_non_integer_sizes_are_refused(field, value):
    """transformers' strict configs refuse these in config.json; from_hf refuses them on any config object."""
    with pytest.raises(UnsupportedModelError, match=rf"config field {field} is {re.escape(repr(value))}"):
        EncoderConfig.from_hf(_namespace("bert", **{field: value}))


def test_tiny_positive_eps_is_kept():
    """A positive eps is never clamped: BERT's 1e-12 reaches the model as 1e-12."""
    cfg = EncoderConfig.from_hf(_namespace("bert", layer_norm_eps=1e-12))
    assert cfg.layer_norm_eps == 1e-12


def test_non_integer_size_in_config_json_names_the_field(checkpoint):
    path = checkpoint("bert", hidden_size="32")
    with pytest.raises(CheckpointError, match=r"config.json could not be read.*hidden_size"):
        _load(path)


# ----------------------------------------------------------------------------------------------------------
# Tensors that do not fit the config: CheckpointError from check_fits, before anything is built.
# The "from_pretrained" variants need check_fits called in from_pretrained (right after hf_to_fastbert).
# ----------------------------------------------------------------------------------------------------------


def _misfit(family: str, message: str, **fields):
    return pytest.param(family, fields, message, id="-".join([family, *(f"{k}={v}" for k, v in fields.items())]))


MISFITS = [
    _misfit("bert", r"config field num_hidden_layers is 100000 but the checkpoint holds 2", num_hidden_layers=10**5),
    _misfit("bert", r"config field num_hidden_layers is 10000000 but the checkpoint holds 2", num_hidden_layers=10**7),
    _misfit("bert", r"num_hidden_layers is 1 but the checkpoint holds 2 layers", num_hidden_layers=1),  # was a warning
    _misfit("bert", r"num_hidden_layers is 3 but the checkpoint holds 2 layers", num_hidden_layers=3),
    _misfit("distilbert", r"config field n_layers is 1000000 but the checkpoint holds 2", n_layers=10**6),
    _misfit(
        "bert",
        r"word_embeddings.weight \(fastbert embeddings.word.weight\) has shape \(99, 32\) but config field vocab_size "
        r"is 100",
        vocab_size=100,
    ),
    _misfit("bert", r"position_embeddings.weight .* config field max_position_embeddings", max_position_embeddings=81),
    _misfit("bert", r"token_type_embeddings.weight .* config field type_vocab_size is 3", type_vocab_size=3),
    _misfit("bert", r"has shape \(99, 32\) but config field hidden_size is 64", hidden_size=64),
    _misfit("distilbert", r"has shape \(99, 32\) but config field dim is 64", dim=64),
    _misfit("electra", r"has shape \(99, 16\) but config field embedding_size is 32", embedding_size=32),
    _misfit("bert", r"parameters .* more than this machine's .*intermediate_size=10{12}", intermediate_size=10**12),
    _misfit("bert", r"config field vocab_size is 10000000000000", vocab_size=10**13),
]


@pytest.mark.parametrize("via", ["check_fits", "from_pretrained"])
@pytest.mark.parametrize(("family", "fields", "message"), MISFITS)
def test_tensors_that_do_not_fit_the_config(checkpoint, via, family, fields, message):
    path = checkpoint(family, **fields)
    with pytest.raises(CheckpointError, match=message):
        (_check_fits if via == "check_fits" else _load)(path)


@pytest.mark.parametrize("via", ["check_fits", "from_pretrained"])
def test_token_type_table_with_type_vocab_size_0(checkpoint, via):
    """The table used to be dropped with a warning, silently changing every output."""
    path = checkpoint("bert", type_vocab_size=0)
    with pytest.raises(
        CheckpointError,
        match=r"holds tensor embeddings.token_type_embeddings.weight .* of shape \(2, 32\) but config field "
        r"type_vocab_size is 0",
    ):
        (_check_fits if via == "check_fits" else _load)(path)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra"])
def test_check_fits_accepts_every_base(bases, family):
    _check_fits(bases[family])


def test_check_fits_refuses_what_memory_cannot_hold(bases, monkeypatch):
    """The estimate is the config's float32 parameter count against os.sysconf's physical memory."""
    assert loading.physical_memory() is None or loading.physical_memory() > 2**20
    cfg = EncoderConfig.from_hf(loading.load_hf_config(bases["bert"]))
    state, _, origin = loading.hf_to_fastbert(loading.read_state_dict(bases["bert"]), cfg, None)
    count = loading.parameter_count(cfg)
    assert count == sum(t.numel() for t in state.values())  # exact for a base BERT (embeddings, layers, pooler)
    monkeypatch.setattr(loading, "physical_memory", lambda: 4 * count)
    loading.check_fits(cfg, state, "ckpt", origin)
    monkeypatch.setattr(loading, "physical_memory", lambda: 4 * count - 1)
    with pytest.raises(CheckpointError, match=rf"ckpt: the config implies {count:,} parameters"):
        loading.check_fits(cfg, state, "ckpt", origin)


def test_hf_to_fastbert_iterates_over_the_checkpoint_not_the_config(bases):
    """1e9 configured layers with a 2-layer checkpoint: renaming looks at the 2 it holds."""
    cfg = EncoderConfig.from_hf(loading.load_hf_config(bases["bert"]))
    cfg = dataclasses.replace(cfg, num_layers=10**9)
    with deadline():
        state, _, _ = loading.hf_to_fastbert(loading.read_state_dict(bases["bert"]), cfg, None)
    assert loading.layer_indices(state) == {0, 1}


# ----------------------------------------------------------------------------------------------------------
# Tensor contents
# ----------------------------------------------------------------------------------------------------------


def test_integer_weights_are_refused(checkpoint):
    path = checkpoint("bert")
    state = load_file(str(path / "model.safetensors"))
    state["encoder.layer.1.attention.self.key.weight"] = torch.ones(32, 32, dtype=torch.int64)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"tensor encoder.layer.1.attention.self.key.weight has dtype torch.int64"
    ):
        _load(path)


def test_nan_weights_are_allowed(checkpoint):
    """NaN (or inf) in weights is allowed: fastbert, like transformers, does not scan tensor values (a pass over
    every weight at load); the NaN reaches the outputs."""
    path = checkpoint("bert")
    state = load_file(str(path / "model.safetensors"))
    state["encoder.layer.0.output.dense.weight"][0, 0] = math.nan
    save_file(state, str(path / "model.safetensors"))
    model = _load(path)
    ids, mask = random_batch("bert", [4, 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out[mask.bool()].isnan().any()


# ----------------------------------------------------------------------------------------------------------
# Files: CheckpointError naming the file
# ----------------------------------------------------------------------------------------------------------


def test_truncated_safetensors(checkpoint):
    path = checkpoint("bert")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable checkpoint file .*model.safetensors"):
        _load(path)


def test_truncated_pytorch_bin(checkpoint):
    path = checkpoint("bert")
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable checkpoint file .*pytorch_model.bin"):
        _load(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "{}", '"bert"'], ids=["not-json", "list", "empty", "string"])
def test_config_json_that_is_not_a_config(checkpoint, text):
    path = checkpoint("bert")
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config.json could not be read"):
        _load(path)


# ----------------------------------------------------------------------------------------------------------
# Shard indexes: CheckpointError naming the index or the shard
# ----------------------------------------------------------------------------------------------------------


def _two_shards(path, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    return {names[0]: {k: state[k] for k in keys[::2]}, names[1]: {k: state[k] for k in keys[1::2]}}


def test_two_shards_load(checkpoint):
    path = checkpoint("bert")
    _load(write_shards(path, _two_shards(path)))


@pytest.mark.parametrize(
    "index",
    ["{not json", "[]", '{"weight_map": []}', '{"weight_map": null}', '{"weight_map": {}}', '{"metadata": {}}'],
    ids=["not-json", "list", "weight_map-list", "weight_map-null", "weight_map-empty", "no-weight_map"],
)
def test_corrupt_index(checkpoint, index):
    path = checkpoint("bert")
    write_shards(path, _two_shards(path))
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"corrupt shard index .*model.safetensors.index.json"):
        _load(path)


@pytest.mark.parametrize("shard", [3, None, "", ["a.safetensors"]], ids=repr)
def test_shard_name_that_is_not_a_file_name(checkpoint, shard):
    path = checkpoint("bert")
    shards = _two_shards(path)
    weight_map = {k: name for name, part in shards.items() for k in part}
    weight_map[next(iter(weight_map))] = shard
    write_shards(path, shards, weight_map)
    with pytest.raises(CheckpointError, match=rf"index.json: shard name {re.escape(repr(shard))} is not a file name"):
        _load(path)


def _point_one_tensor_at(path, shard: str):
    shards = _two_shards(path)
    weight_map = {k: name for name, part in shards.items() for k in part}
    weight_map[next(iter(weight_map))] = shard
    return write_shards(path, shards, weight_map)


def test_shard_outside_the_folder_is_refused(checkpoint, tmp_path):
    """A real safetensors file one level up: it used to load silently."""
    path = checkpoint("bert")
    (tmp_path / "outside").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside" / "x.safetensors"))
    _point_one_tensor_at(path, "../outside/x.safetensors")
    with pytest.raises(CheckpointError, match=r"shard '../outside/x.safetensors' listed in .* lies outside"):
        _load(path)


def test_absolute_shard_path_is_refused(checkpoint):
    """'/etc/passwd' was opened (and failed as a corrupt file); it must not be touched at all."""
    path = _point_one_tensor_at(checkpoint("bert"), "/etc/passwd")
    with pytest.raises(CheckpointError, match=r"shard '/etc/passwd' listed in .* lies outside"):
        _load(path)


def test_shard_symlink_out_of_the_folder_is_refused(checkpoint, tmp_path):
    path = checkpoint("bert")
    shards = _two_shards(path)
    write_shards(path, shards)
    first = next(iter(shards))
    shutil.move(path / first, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", path / first)
    with pytest.raises(CheckpointError, match=rf"shard '{first}' listed in .* lies outside"):
        _load(path)


def test_relative_folder_with_dotdot_loads(checkpoint, tmp_path, monkeypatch):
    """Shards are confined to the folder as normalised: '../ckpt' is not 'outside' itself."""
    path = checkpoint("bert")
    write_shards(path, _two_shards(path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    _load(os.path.join("..", path.name))


def test_hub_cache_symlinks_into_blobs_are_allowed(checkpoint, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> are symlinks to ../../blobs/<hash>; those load."""
    src = checkpoint("bert")
    shards = _two_shards(src)
    write_shards(src, shards)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(p.name for p in src.iterdir())):
        shutil.copy(src / file, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / file)
    _load(snapshot)


def test_index_pointing_at_a_missing_shard(checkpoint):
    path = _point_one_tensor_at(checkpoint("bert"), "model-00003-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"shard model-00003-of-00002.safetensors listed in .* is missing"):
        _load(path)


def test_tensor_in_two_shards(checkpoint):
    """The second copy used to win silently."""
    path = checkpoint("bert")
    shards = _two_shards(path)
    first, second = shards
    shards[second]["embeddings.word_embeddings.weight"] = torch.zeros(99, 32)
    shards[first]["embeddings.word_embeddings.weight"] = torch.ones(99, 32)
    write_shards(path, shards)
    with pytest.raises(
        CheckpointError, match=rf"tensor embeddings.word_embeddings.weight is in two shards, {first} and {second}"
    ):
        _load(path)


def test_safetensors_index_never_unpickles(checkpoint):
    """Shards of model.safetensors.index.json are read as safetensors whatever their name says."""
    path = checkpoint("bert")
    state = load_file(str(path / "model.safetensors"))
    torch.save(state, path / "model-00001-of-00001.bin")
    write_shards(path, {}, dict.fromkeys(state, "model-00001-of-00001.bin"))  # no shards: a safetensors index
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable checkpoint file .*model-00001-of-00001.bin"):
        _load(path)


# ----------------------------------------------------------------------------------------------------------
# read_torch_file: the one safe reader of a torch pickle (also used for sentence-transformers' 2_Dense)
# ----------------------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"linear.weight": torch.zeros(2, 2), "evil": _Evil()},
            r"corrupt or unreadable checkpoint file .*UnpicklingError",
        ),
        ([torch.zeros(2)], r"does not hold a flat dict of tensors \(got list\)"),
        ({0: torch.zeros(2)}, r"does not hold a flat dict of tensors"),
        ({"nested": {"w": torch.zeros(2)}}, r"does not hold a flat dict of tensors"),
        (b"garbage", r"corrupt or unreadable checkpoint file"),
        (None, r"corrupt or unreadable checkpoint file .*No such file"),
    ],
    ids=["code", "list", "int-keys", "nested", "garbage", "missing"],
)
def test_read_torch_file_refuses(tmp_path, content, message):
    file = tmp_path / "2_Dense" / "pytorch_model.bin"
    file.parent.mkdir()
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        torch.save(content, file)
    with pytest.raises(CheckpointError, match=message) as err:
        loading.read_torch_file(file)
    assert str(file) in str(err.value)


def test_read_torch_file_reads_a_state_dict(tmp_path):
    state = {"linear.weight": torch.randn(3, 2), "linear.bias": torch.randn(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    got = loading.read_torch_file(tmp_path / "pytorch_model.bin")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_config_json_is_plain_json(checkpoint):
    """Sanity of the corpus builder: edit_config writes NaN the way transformers reads it back."""
    path = checkpoint("bert", layer_norm_eps=NAN)
    assert math.isnan(json.loads((path / "config.json").read_text())["layer_norm_eps"])
