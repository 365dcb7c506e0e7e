"""What the report runs on: built-in random-weight shapes or local checkpoints, input sizes, the FLOP count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import sequence_length_limit


@dataclass(frozen=True)
class ModelShape:
    """A built-in BERT shape, instantiated with random weights (no download)."""

    label: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 30522
    max_positions: int = 512


BUILTIN_MODELS: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny", hidden=32, layers=2, heads=4, intermediate=64, vocab=1000, max_positions=128),
    "minilm-l6": ModelShape("MiniLM-L6", hidden=384, layers=6, heads=12, intermediate=1536),
    "bert-base": ModelShape("BERT-base", hidden=768, layers=12, heads=12, intermediate=3072),
    "bert-large": ModelShape("BERT-large", hidden=1024, layers=24, heads=16, intermediate=4096),
}


@dataclass
class BenchModel:
    """A checkpoint on disk plus the numbers the report needs (FLOPs, valid ids and lengths)."""

    label: str
    path: str
    random_weights: bool
    model_type: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_len: int
    pad_id: int


def build_random_model(shape: ModelShape, directory: str | Path, seed: int = 0) -> str:
    """Save a randomly initialised transformers ``BertModel`` of ``shape`` under ``directory``; return its path."""
    from transformers import BertConfig, BertModel

    path = Path(directory) / shape.label
    if not (path / "config.json").exists():
        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=shape.max_positions,
        )
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(path)
    return str(path)


def load_bench_model(name_or_path: str, workdir: str | Path) -> BenchModel:
    """A built-in shape name (saved with random weights into ``workdir``) or a local checkpoint directory."""
    from transformers import AutoConfig

    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        shape = BUILTIN_MODELS[key]
        path, label, random_weights = build_random_model(shape, workdir), shape.label, True
    elif Path(name_or_path).is_dir():
        resolved = Path(name_or_path).resolve()
        path, label, random_weights = str(resolved), f"{resolved.parent.name}/{resolved.name}", False
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {', '.join(BUILTIN_MODELS)} or a local checkpoint directory"
        )
    cfg = AutoConfig.from_pretrained(path)
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "hidden_dim", None)
    if intermediate is None:
        raise ValueError(f"{path}: config has neither intermediate_size nor hidden_dim; cannot count FLOPs")
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    # The family table's rule (RoBERTa positions start after padding_idx); a family fastbert does not know
    # (transformers still runs it) keeps its whole position table.
    max_len = sequence_length_limit(cfg)
    if max_len is None:
        max_len = cfg.max_position_embeddings
    return BenchModel(
        label=label,
        path=path,
        random_weights=random_weights,
        model_type=cfg.model_type,
        hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        intermediate=int(intermediate),
        vocab=cfg.vocab_size,
        max_len=int(max_len),
        pad_id=int(pad_id),
    )


def encoder_flops(lengths: Sequence[int], layers: int, hidden: int, intermediate: int) -> int:
    """Useful FLOPs of an encoder stack over the real tokens of sequences of these lengths.

    Per layer and token: the four H x H projections and the two H x I feed-forward GEMMs, 2 * (4 H^2 + 2 H I);
    per layer and sequence of length s: QK^T and PV, 4 * s^2 * H. For a dense (B, S) batch this is the usual
    ``2 L T (4 H^2 + 2 H I) + 4 L T S H`` (= L T (24 H^2 + 4 S H) when I = 4 H). Embeddings, LayerNorm,
    softmax, activations and the pooler are not counted. Padding is never counted, so a system that computes
    on padding does more work than this for the same result.
    """
    tokens = sum(lengths)
    squares = sum(s * s for s in lengths)
    return 2 * layers * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * layers * squares * hidden


@dataclass(frozen=True)
class Size:
    """``batch`` sequences of ``seqlen`` tokens, or of lengths drawn from U[min_len, seqlen] when varlen."""

    batch: int
    seqlen: int
    min_len: int | None = None

    @property
    def varlen(self) -> bool:
        return self.min_len is not None

    @property
    def label(self) -> str:
        if self.varlen:
            return f"varlen {self.batch}x[{self.min_len},{self.seqlen}]"
        return f"({self.batch},{self.seqlen})"

    def lengths(self, seed: int = 0) -> list[int]:
        if not self.varlen:
            return [self.seqlen] * self.batch
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(self.min_len, self.seqlen + 1, (self.batch,), generator=gen).tolist()

    def make_inputs(self, model: BenchModel, seed: int = 0) -> tuple[Tensor, Tensor, list[int]]:
        """(input_ids, attention_mask) int64 (batch, longest length), padded with the model's pad id."""
        lengths = self.lengths(seed)
        if max(lengths) > model.max_len:
            raise ValueError(
                f"size {self.label}: {max(lengths)} tokens exceed {model.label}'s limit of {model.max_len}"
            )
        gen = torch.Generator().manual_seed(seed + 1)
        low = min(1000, model.vocab // 2)  # above the special tokens of every BERT-family vocabulary
        ids = torch.randint(low, model.vocab, (self.batch, max(lengths)), generator=gen)
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        ids = ids.masked_fill(~mask, model.pad_id)
        return ids, mask.long(), lengths


def parse_size(text: str) -> Size:
    """``8x128`` (dense) or ``32x8-128`` (varlen: 32 sequences with lengths uniform in [8, 128])."""
    try:
        batch, rest = text.lower().split("x")
        if "-" in rest:
            lo, hi = rest.split("-")
            size = Size(int(batch), int(hi), int(lo))
        else:
            size = Size(int(batch), int(rest))
    except ValueError:
        raise ValueError(f"bad size {text!r}: write BATCHxSEQ (8x128) or BATCHxMIN-MAX (32x8-128)") from None
    if size.batch < 1 or size.seqlen < 1 or (size.min_len is not None and not 1 <= size.min_len <= size.seqlen):
        raise ValueError(f"bad size {text!r}: batch and lengths must be >= 1 and MIN <= MAX")
    return size
