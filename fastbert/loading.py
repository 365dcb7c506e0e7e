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


def _read_file(file: Path) -> dict[str, Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"corrupt or unreadable checkpoint file {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return state


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: single or sharded safetensors, else single or sharded .bin."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / single).is_file():
            return _read_file(path / single)
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except Exception as exc:
                raise CheckpointError(f"corrupt shard index {path / index}: {type(exc).__name__}: {exc}") from exc
            state: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise CheckpointError(f"shard {shard} listed in {index} is missing from {path}")
                state.update(_read_file(path / shard))
            missing = set(weight_map) - set(state)
            if missing:
                raise CheckpointError(f"{index} lists tensors its shards do not hold: {sorted(missing)[:5]}")
            return state
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
        out[ours] = tensor
        origin[ours] = key
    for n in range(config.num_layers):
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
