"""Checkpoints: find and read HF weight files, map HF names to fastbert's, check every shape, write back.

fastbert's own parameter names are family-independent (``layers.3.qkv.weight``); one rule table per family
maps them to and from the transformers names. Q/K/V are stored fused (``qkv``) and split again on save.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .config import EncoderConfig

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit its config; the message names the file or tensor."""


# ----------------------------------------------------------------------------------------------------------
# Name tables: (HF name without the family prefix, fastbert name). "{n}" is a layer index, "{p}" weight|bias.
# ----------------------------------------------------------------------------------------------------------

_BERT_BASE = [
    ("embeddings.word_embeddings.weight", "embeddings.word.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.position.weight"),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
    ("embeddings.LayerNorm.{p}", "embeddings.norm.{p}"),
    ("embeddings_project.{p}", "embeddings.project.{p}"),
    ("encoder.layer.{n}.attention.self.query.{p}", "layers.{n}.q.{p}"),
    ("encoder.layer.{n}.attention.self.key.{p}", "layers.{n}.k.{p}"),
    ("encoder.layer.{n}.attention.self.value.{p}", "layers.{n}.v.{p}"),
    ("encoder.layer.{n}.attention.output.dense.{p}", "layers.{n}.attn_out.{p}"),
    ("encoder.layer.{n}.attention.output.LayerNorm.{p}", "layers.{n}.attn_norm.{p}"),
    ("encoder.layer.{n}.intermediate.dense.{p}", "layers.{n}.ffn_in.{p}"),
    ("encoder.layer.{n}.output.dense.{p}", "layers.{n}.ffn_out.{p}"),
    ("encoder.layer.{n}.output.LayerNorm.{p}", "layers.{n}.ffn_norm.{p}"),
    ("pooler.dense.{p}", "pooler.{p}"),
]

_DISTILBERT_BASE = [
    ("embeddings.word_embeddings.weight", "embeddings.word.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.position.weight"),
    ("embeddings.LayerNorm.{p}", "embeddings.norm.{p}"),
    ("transformer.layer.{n}.attention.q_lin.{p}", "layers.{n}.q.{p}"),
    ("transformer.layer.{n}.attention.k_lin.{p}", "layers.{n}.k.{p}"),
    ("transformer.layer.{n}.attention.v_lin.{p}", "layers.{n}.v.{p}"),
    ("transformer.layer.{n}.attention.out_lin.{p}", "layers.{n}.attn_out.{p}"),
    ("transformer.layer.{n}.sa_layer_norm.{p}", "layers.{n}.attn_norm.{p}"),
    ("transformer.layer.{n}.ffn.lin1.{p}", "layers.{n}.ffn_in.{p}"),
    ("transformer.layer.{n}.ffn.lin2.{p}", "layers.{n}.ffn_out.{p}"),
    ("transformer.layer.{n}.output_layer_norm.{p}", "layers.{n}.ffn_norm.{p}"),
]

#: Base tables, keyed by ``Family.base_names``.
_BASES = {"bert": _BERT_BASE, "distilbert": _DISTILBERT_BASE}

# Head tables, keyed by (``Family.head_names``, task). Names are top-level (no prefix) in HF checkpoints.
_CLS_HEAD = [("classifier.dense.{p}", "head.dense.{p}"), ("classifier.out_proj.{p}", "head.out_proj.{p}")]
_HEADS = {
    ("bert", "sequence-classification"): [("classifier.{p}", "head.out_proj.{p}")],
    ("roberta", "sequence-classification"): _CLS_HEAD,
    ("electra", "sequence-classification"): _CLS_HEAD,
    ("distilbert", "sequence-classification"): [
        ("pre_classifier.{p}", "head.dense.{p}"),
        ("classifier.{p}", "head.out_proj.{p}"),
    ],
    ("bert", "masked-lm"): [
        ("cls.predictions.transform.dense.{p}", "head.dense.{p}"),
        ("cls.predictions.transform.LayerNorm.{p}", "head.norm.{p}"),
        ("cls.predictions.decoder.weight", "head.decoder.weight"),
        ("cls.predictions.bias", "head.bias"),
        ("cls.predictions.decoder.bias", "head.bias"),
    ],
    ("roberta", "masked-lm"): [
        ("lm_head.dense.{p}", "head.dense.{p}"),
        ("lm_head.layer_norm.{p}", "head.norm.{p}"),
        ("lm_head.decoder.weight", "head.decoder.weight"),
        ("lm_head.bias", "head.bias"),
        ("lm_head.decoder.bias", "head.bias"),
    ],
    ("electra", "masked-lm"): [
        ("generator_predictions.dense.{p}", "head.dense.{p}"),
        ("generator_predictions.LayerNorm.{p}", "head.norm.{p}"),
        ("generator_lm_head.weight", "head.decoder.weight"),
        ("generator_lm_head.bias", "head.bias"),
    ],
    ("distilbert", "masked-lm"): [
        ("vocab_transform.{p}", "head.dense.{p}"),
        ("vocab_layer_norm.{p}", "head.norm.{p}"),
        ("vocab_projector.weight", "head.decoder.weight"),
        ("vocab_projector.bias", "head.bias"),
    ],
}
for _kind in ("bert", "roberta", "electra", "distilbert"):
    _HEADS[(_kind, "token-classification")] = [("classifier.{p}", "head.out_proj.{p}")]
    _HEADS[(_kind, "question-answering")] = [("qa_outputs.{p}", "head.out_proj.{p}")]


def _compile(table: list[tuple[str, str]]) -> list[tuple[re.Pattern, str, re.Pattern, str]]:
    def to_regex(pattern: str) -> re.Pattern:
        rx = re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        return re.compile(rx + "$")

    return [(to_regex(hf), ours, to_regex(ours), hf) for hf, ours in table]


def rules_for(config: EncoderConfig, task: str | None):
    family = config.family
    head = _HEADS.get((family.head_names, task), []) if task else []
    return _compile(_BASES[family.base_names]), _compile(head)


def rename(rules, name: str, forward: bool) -> str | None:
    for hf_rx, ours_fmt, ours_rx, hf_fmt in rules:
        m = (hf_rx if forward else ours_rx).match(name)
        if m:
            return (ours_fmt if forward else hf_fmt).format(**m.groupdict())
    return None


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def resolve_path(path_or_id: str | os.PathLike, **hub_kwargs) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded with huggingface_hub."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder (with config.json)")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise CheckpointError(f"checkpoint folder {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"{text!r} is not a local folder, and huggingface_hub (needed to download it) is not installed"
        ) from exc
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "2_Normalize/*"]
    try:
        local = snapshot_download(text, allow_patterns=patterns, **hub_kwargs)
    except Exception as exc:
        raise CheckpointError(f"could not download {text!r} from the hub: {type(exc).__name__}: {exc}") from exc
    if not any((Path(local) / f).exists() for f in WEIGHT_FILES):
        local = snapshot_download(text, allow_patterns=patterns + ["pytorch_model*.bin"], **hub_kwargs)
    return Path(local)


def load_hf_config(path: Path):
    """The transformers config of a checkpoint folder."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path / 'config.json'} could not be read: {type(exc).__name__}: {exc}") from exc


def _read_file(file: Path, safetensors: bool) -> dict[str, Tensor]:
    """The tensors of one weight file: a safetensors file, or a torch pickle read with ``weights_only=True``."""
    try:
        if safetensors:
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"corrupt or unreadable checkpoint file {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors (got {type(state).__name__})")
    return state


def read_torch_file(file: str | os.PathLike) -> dict[str, Tensor]:
    """A torch pickle (``pytorch_model.bin``) as a flat dict of tensors, read with ``weights_only=True``.

    A pickle that would run code (UnpicklingError), a truncated or missing file, or anything but a flat
    ``{str: Tensor}`` dict raises CheckpointError naming the file.
    """
    return _read_file(Path(file), safetensors=False)


def _shard_file(path: Path, index: str, shard: object) -> Path:
    """The file of one shard named in an index, refused unless it lies inside the checkpoint folder.

    The name must stay inside the folder as written (no ``..``, not absolute) and once symlinks are resolved;
    in a huggingface_hub cache the snapshot's files are symlinks into the repo's ``blobs/``, which is allowed.
    """
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{path / index}: shard name {shard!r} is not a file name")
    folder = Path(os.path.normpath(path.absolute()))
    file = folder / shard
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>/
        allowed.append((root.parent.parent / "blobs").resolve())
    inside = Path(os.path.normpath(file)).is_relative_to(folder)
    target = file.resolve()
    if not inside or not any(target.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"shard {shard!r} listed in {path / index} lies outside the checkpoint folder {path}")
    return file


def _read_index(path: Path, index: str) -> dict[str, Tensor]:
    """All tensors of a sharded checkpoint: the index's weight_map ({tensor: shard file}) and its shards."""
    try:
        weight_map = json.loads((path / index).read_text())["weight_map"]
    except Exception as exc:
        raise CheckpointError(f"corrupt shard index {path / index}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"corrupt shard index {path / index}: weight_map must be a non-empty object of tensor name -> shard "
            f"file, got {type(weight_map).__name__}"
        )
    shards: dict[str, Path] = {}
    for shard in weight_map.values():
        if not isinstance(shard, str) or shard not in shards:  # _shard_file refuses a non-string name
            shards[shard] = _shard_file(path, index, shard)
    state: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    for shard in sorted(shards):
        if not shards[shard].is_file():
            raise CheckpointError(f"shard {shard} listed in {index} is missing from {path}")
        for name, tensor in _read_file(shards[shard], safetensors=index.startswith("model.safetensors")).items():
            if name in state:
                raise CheckpointError(f"{path}: tensor {name} is in two shards, {source[name]} and {shard}")
            state[name], source[name] = tensor, shard
    missing = set(weight_map) - set(state)
    if missing:
        raise CheckpointError(f"{index} lists tensors its shards do not hold: {sorted(missing)[:5]}")
    return state


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: single or sharded safetensors, else single or sharded .bin."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / single).is_file():
            return _read_file(path / single, safetensors=single.endswith(".safetensors"))
        if (path / index).is_file():
            return _read_index(path, index)
    raise CheckpointError(f"{path} holds no weights; expected one of: {', '.join(WEIGHT_FILES)}")


# ----------------------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------------------

# Non-persistent buffers that old checkpoints still carry: dropped without a report, as transformers does.
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")


def hf_to_fastbert(
    state: dict[str, Tensor], config: EncoderConfig, task: str | None
) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """Rename an HF state dict to fastbert's names and fuse Q/K/V.

    Returns (state, unexpected HF keys, fastbert name -> the HF key(s) it came from, for error messages).
    """
    base_rules, head_rules = rules_for(config, task)
    prefix = config.prefix + "."
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        name = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        ours = None
        if name.startswith(prefix):
            ours = rename(base_rules, name[len(prefix) :], forward=True)
        if ours is None:
            ours = rename(base_rules, name, forward=True) or rename(head_rules, name, forward=True)
        if ours is None:
            if not _IGNORED.search(name):
                unexpected.append(key)
            continue
        if ours in out and ours == "head.bias":
            continue  # decoder.bias and predictions.bias are one tied tensor
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {key} has dtype {tensor.dtype}; weights must be floating point")
        out[ours] = tensor
        origin[ours] = key
    for n in sorted(layer_indices(out)):  # what the checkpoint holds, never range(config.num_layers)
        for p in ("weight", "bias"):
            parts = [out.pop(f"layers.{n}.{x}.{p}", None) for x in "qkv"]
            if all(t is not None for t in parts):
                out[f"layers.{n}.qkv.{p}"] = torch.cat(parts, dim=0)
                origin[f"layers.{n}.qkv.{p}"] = " + ".join(origin.pop(f"layers.{n}.{x}.{p}") for x in "qkv")
            elif any(t is not None for t in parts):
                absent = [x for x, t in zip("qkv", parts, strict=False) if t is None]
                raise CheckpointError(
                    f"layer {n}: {'/'.join(absent)} projection {p} missing while the others are present"
                )
    return out, unexpected, origin


def fastbert_to_hf(
    state: dict[str, Tensor], config: EncoderConfig, task: str | None, with_prefix: bool
) -> dict[str, Tensor]:
    """fastbert names back to transformers names (Q/K/V split), ready for save_pretrained."""
    base_rules, head_rules = rules_for(config, task)
    prefix = config.prefix + "." if with_prefix else ""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        m = re.match(r"layers\.(\d+)\.qkv\.(weight|bias)$", name)
        if m:
            for x, part in zip("qkv", tensor.chunk(3, dim=0), strict=False):
                out[prefix + rename(base_rules, f"layers.{m[1]}.{x}.{m[2]}", forward=False)] = part
            continue
        hf = rename(base_rules, name, forward=False)
        if hf is not None:
            out[prefix + hf] = tensor
            continue
        hf = rename(head_rules, name, forward=False)
        if hf is None:
            raise CheckpointError(f"no transformers name for fastbert parameter {name!r}")
        out[hf] = tensor
    return out


_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_indices(names: Iterable[str]) -> set[int]:
    """The indices n of fastbert names ``layers.{n}.*``."""
    return {int(m[1]) for name in names if (m := _LAYER.match(name))}


def parameter_count(cfg: EncoderConfig) -> int:
    """Parameters of the encoder a config implies: embeddings, layers and pooler (a task head adds at most a
    hidden x vocab table, and a masked-LM decoder is tied to the word embeddings)."""
    h, e, i = cfg.hidden_size, cfg.embedding_size, cfg.intermediate_size
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size + 2) * e
    if e != h:
        embeddings += e * h + h  # ELECTRA's projection to the hidden width
    layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h  # qkv + attn_out, ffn_in + ffn_out, two LayerNorms
    pooler = h * h + h if cfg.has_pooler else 0
    return embeddings + cfg.num_layers * layer + pooler


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (os.sysconf), None where the platform does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def check_fits(cfg: EncoderConfig, state: dict[str, Tensor], source: str, origin: dict[str, str] | None = None) -> None:
    """Check a config against a checkpoint's tensors before any model is built (call it after hf_to_fastbert).

    state / origin: what hf_to_fastbert returns (fastbert names; origin gives the HF names for messages).
    Raises CheckpointError naming the config field when the checkpoint's layer count (max n + 1 among
    ``layers.{n}.*``) differs from the config's; when an embedding table is not (vocab_size |
    max_position_embeddings | type_vocab_size, hidden_size), a token-type table included where type_vocab_size
    is 0; or when the parameters the config implies would not fit, in float32, in this machine's physical
    memory. Reads names and shapes only.
    """

    def field(name: str) -> str:
        return cfg.family.config_fields.get(name, name)

    def tensor(name: str) -> str:
        hf = origin.get(name) if origin else None
        return f"tensor {hf} (fastbert {name})" if hf else f"tensor {name}"

    indices = layer_indices(state)
    held = max(indices) + 1 if indices else 0
    if held != cfg.num_layers:
        raise CheckpointError(
            f"{source}: config field {field('num_layers')} is {cfg.num_layers} but the checkpoint holds {held} "
            "layers (highest layer index + 1)"
        )
    width = field("embedding_size" if "embedding_size" in cfg.family.config_fields else "hidden_size")
    for name, rows_field, rows in (
        ("embeddings.word.weight", "vocab_size", cfg.vocab_size),
        ("embeddings.position.weight", "max_position_embeddings", cfg.max_position_embeddings),
        ("embeddings.token_type.weight", "type_vocab_size", cfg.type_vocab_size),
    ):
        table = state.get(name)
        if table is None:
            continue
        shape = tuple(table.shape)
        if rows == 0 and table.numel() > 0:
            raise CheckpointError(
                f"{source}: the checkpoint holds {tensor(name)} of shape {shape} but config field {rows_field} "
                f"is 0 (no table): set {rows_field} to {shape[0]}, or remove the tensor"
            )
        if len(shape) != 2 or shape[0] != rows:
            raise CheckpointError(
                f"{source}: {tensor(name)} has shape {shape} but config field {rows_field} is {rows} "
                f"(expected ({rows}, {cfg.embedding_size}))"
            )
        if shape[1] != cfg.embedding_size:
            raise CheckpointError(
                f"{source}: {tensor(name)} has shape {shape} but config field {width} is {cfg.embedding_size}"
            )
    memory, count = physical_memory(), parameter_count(cfg)
    if memory is not None and 4 * count > memory:
        sizes = ("vocab_size", "hidden_size", "num_layers", "intermediate_size", "max_position_embeddings")
        raise CheckpointError(
            f"{source}: the config implies {count:,} parameters ({4 * count / 2**30:,.1f} GiB in float32), more "
            f"than this machine's {memory / 2**30:,.1f} GiB of memory: "
            + ", ".join(f"{field(n)}={getattr(cfg, n)}" for n in sizes)
        )


def check_shapes(expected: dict[str, Tensor], loaded: dict[str, Tensor], origin: dict[str, str], source: str) -> None:
    """Every loaded tensor must have the shape of the model's parameter of the same name."""
    for name, tensor in loaded.items():
        want = expected.get(name)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {origin.get(name, name)} (fastbert {name}) has shape {tuple(tensor.shape)} "
                f"but the config implies {tuple(want.shape)}"
            )


def split_missing(missing: Iterable[str]) -> tuple[list[str], list[str]]:
    """Missing names that may be initialised (heads, pooler) vs ones that make the checkpoint unusable."""
    optional, required = [], []
    for name in missing:
        (optional if name.startswith(("head.", "pooler.")) else required).append(name)
    return optional, required
