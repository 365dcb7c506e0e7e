"""Pooling: packed token states -> one vector per text, as sentence-transformers' ``Pooling`` module computes it.

``PoolingConfig`` reads a ``1_Pooling/config.json`` (the legacy ``pooling_mode_*_tokens`` keys and the newer
``pooling_mode``); ``pool`` is a segment reduction over ``cu_seqlens``, so no padded grid is ever built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .tokenize import read_json

#: Pooling modes in the order sentence-transformers concatenates them when several are set (legacy configs).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

#: Legacy ``1_Pooling/config.json`` keys -> pooling mode (sentence-transformers < 6 writes these).
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

#: Spellings people use for the same modes (documentation, other libraries) -> the canonical name.
_MODE_ALIASES = {
    "cls_token": "cls",
    "mean_tokens": "mean",
    "max_tokens": "max",
    "mean_sqrt_len": "mean_sqrt_len_tokens",
    "last_token": "lasttoken",
    "weighted_mean": "weightedmean",
}


def _canonical_mode(mode: str) -> str:
    name = _MODE_ALIASES.get(mode, mode)
    if name not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; supported: {', '.join(POOLING_MODES)}")
    return name


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: one or more modes (concatenated in the given order).

    ``include_prompt=False`` leaves the prompt's tokens (including the leading special token) out of pooling,
    as sentence-transformers does for instruction models.
    """

    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("a pooling config needs at least one mode")
        object.__setattr__(self, "modes", tuple(_canonical_mode(m) for m in self.modes))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PoolingConfig:
        """Read a ``1_Pooling/config.json`` dict in either the legacy or the sentence-transformers 6 form."""
        include_prompt = bool(config.get("include_prompt", True))
        mode = config.get("pooling_mode")
        if mode is not None:  # the newer form wins when both are present, as in sentence-transformers
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
        else:
            modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key, False))
            if not modes:
                modes = ("mean",)
        return cls(modes=modes, include_prompt=include_prompt)

    @classmethod
    def from_folder(cls, folder: str) -> PoolingConfig:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pooling module folder {folder!r} has no config.json")
        return cls.from_dict(read_json(path))


def pool(hidden: Tensor, cu_seqlens: Tensor, modes: Sequence[str] = ("mean",), prompt_length: int = 0) -> Tensor:
    """Pool packed token states per sequence, matching ``sentence_transformers`` ``Pooling``.

    hidden: (total_tokens, H); cu_seqlens: int (batch + 1,) on hidden's device. ``prompt_length`` > 0 drops
    each sequence's first ``prompt_length`` tokens from pooling (``include_prompt=False``). Returns
    (batch, H * len(modes)) in hidden's dtype; sums are accumulated in fp32 for fp16/bf16 input.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (total_tokens, hidden), got shape {tuple(hidden.shape)}")
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]  # (batch,)
    batch = lengths.numel()
    total = hidden.shape[0]
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but hidden has {total} tokens")
    acc_dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype

    # Tokens that take part in pooling: all, or those past the prompt.
    keep: Tensor | None = None
    positions: Tensor | None = None
    kept_lengths = lengths
    if prompt_length > 0 or "weightedmean" in modes:
        starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
        positions = torch.arange(total, device=hidden.device) - starts  # (total,) position in own sequence
    if prompt_length > 0:
        keep = positions >= prompt_length
        kept_lengths = (lengths - prompt_length).clamp(min=0)
    kept = hidden if keep is None else hidden[keep]  # (kept_tokens, H)

    outputs: list[Tensor] = []
    sums: Tensor | None = None
    for mode in modes:
        if mode == "cls":
            first = cu[:-1]
            if prompt_length > 0:  # first pooled token; the very first token when the prompt fills the text
                first = first + torch.where(lengths > prompt_length, prompt_length, 0)
            outputs.append(
                hidden[first.clamp(max=max(total - 1, 0))] if total else hidden.new_zeros(batch, hidden.shape[1])
            )
        elif mode == "lasttoken":
            last = hidden[(cu[1:] - 1).clamp(min=0)] if total else hidden.new_zeros(batch, hidden.shape[1])
            if prompt_length > 0:  # a text made only of prompt tokens pools to zeros, as with a masked grid
                last = last * (kept_lengths > 0).to(last.dtype)[:, None]
            outputs.append(last)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if sums is None:
                sums = torch.segment_reduce(kept.to(acc_dtype), "sum", lengths=kept_lengths, axis=0)  # (batch, H)
            count = kept_lengths.to(acc_dtype).clamp(min=1e-9)[:, None]
            denominator = count if mode == "mean" else count.sqrt()
            outputs.append((sums / denominator).to(hidden.dtype))
        elif mode == "max":
            outputs.append(torch.segment_reduce(kept, "max", lengths=kept_lengths, axis=0))
        elif mode == "weightedmean":
            weights = (positions + 1).to(acc_dtype)
            if keep is not None:
                weights = weights[keep]
            weighted = torch.segment_reduce(kept.to(acc_dtype) * weights[:, None], "sum", lengths=kept_lengths, axis=0)
            weight_sum = torch.segment_reduce(weights, "sum", lengths=kept_lengths, axis=0)
            outputs.append((weighted / weight_sum.clamp(min=1e-9)[:, None]).to(hidden.dtype))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; supported: {', '.join(POOLING_MODES)}")
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
