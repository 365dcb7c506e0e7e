"""Tokenising straight to packed ids: texts -> ``tokenizers.Encoding`` -> token-budget batches -> ``PackedBatch``.

``TextTokenizer`` sets a ``tokenizers.Tokenizer`` up as sentence-transformers sets up its tokenizer (truncation
to the model's limit, no padding); ``token_budget_batches`` sorts texts by token count and cuts them into batches
of about the same number of tokens; ``TextTokenizer.pack`` concatenates a batch into ``fastbert.inputs.PackedBatch``
(ids and, for pairs, token types; positions are left to the model, which knows its family's numbering).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch

from .inputs import PackedBatch


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def read_json_if_exists(path: str) -> dict[str, Any]:
    return read_json(path) if os.path.isfile(path) else {}


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` set up like sentence-transformers' tokenizer: truncation, no padding.

    ``encode`` gives ``tokenizers.Encoding`` objects; ``pack`` turns a selection of them into a
    ``PackedBatch``. ``max_length`` counts special tokens; pairs are truncated longest-first.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        lowercase: bool = False,
        truncation_side: str = "right",
        pad_token_id: int = 0,
    ):
        self.tokenizer = tokenizer
        self.truncation_side = truncation_side
        self.pad_token_id = int(pad_token_id)
        if lowercase:
            self._add_lowercase()
        tokenizer.no_padding()
        self.set_max_length(max_length)

    def set_max_length(self, max_length: int) -> None:
        """Truncate at ``max_length`` tokens (special tokens included) from now on."""
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.max_length = int(max_length)
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first", direction=self.truncation_side)

    def _add_lowercase(self) -> None:
        # Same rule as sentence-transformers' do_lower_case: prepend a Lowercase normalizer unless one is there.
        from tokenizers import normalizers

        current = self.tokenizer.normalizer
        if isinstance(current, normalizers.Sequence):
            parts = [current[i] for i in range(len(current))]
        else:
            parts = [current] if current is not None else []
        if any(isinstance(p, normalizers.Lowercase) for p in parts):
            return
        self.tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *parts])

    @classmethod
    def from_folder(
        cls,
        folder: str,
        max_length: int | None = None,
        model_limit: int | None = None,
        lowercase: bool = False,
        pad_token_id: int | None = None,
    ) -> TextTokenizer:
        """Load ``tokenizer.json`` from ``folder`` (or convert a slow tokenizer there with transformers).

        The length limit is min(max_length or the tokenizer's ``model_max_length``, model_limit). The padding id
        (used only by ``pad``) is the tokenizer's pad token, else ``pad_token_id``, else 0.
        """
        tok_config = read_json_if_exists(os.path.join(folder, "tokenizer_config.json"))
        path = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(path):
            try:
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise ImportError(
                    "fastbert's text encoders need the tokenizers package: pip install 'fastbert[text]'"
                ) from exc
            tokenizer = Tokenizer.from_file(path)
        else:  # vocab.txt / sentencepiece only: let transformers build the fast (Rust) tokenizer once
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(folder)
            if not getattr(hf_tok, "is_fast", False):
                raise ValueError(f"{folder!r} has no tokenizer.json and transformers could not build a fast tokenizer")
            tokenizer = hf_tok.backend_tokenizer
        limits = [x for x in (max_length, model_limit) if x is not None]
        if max_length is None:
            tok_max = tok_config.get("model_max_length")
            if isinstance(tok_max, (int, float)) and 0 < tok_max < 1e9:
                limits.append(int(tok_max))
        if not limits:
            raise ValueError(f"cannot tell the maximum sequence length for {folder!r}; pass max_seq_length")
        side = tok_config.get("truncation_side", "right")
        pad = tok_config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        if pad_id is None:
            pad_id = pad_token_id if isinstance(pad_token_id, int) else 0
        return cls(tokenizer, min(limits), lowercase=lowercase, truncation_side=side, pad_token_id=pad_id)

    def encode(self, inputs: list[str] | list[tuple[str, str]]) -> list[Any]:
        """Tokenize texts (or (text, text) pairs) with special tokens, truncated to ``max_length``."""
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which nothing here needs.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return encode(inputs, add_special_tokens=True)

    def prompt_length(self, prompt: str) -> int:
        """Tokens a prompt occupies at the start of a text (the trailing special token is not counted)."""
        enc = self.tokenizer.encode(prompt, add_special_tokens=True)
        n = len(enc.ids)
        if n and enc.special_tokens_mask[-1]:
            n -= 1
        return n

    @staticmethod
    def pack(encodings: Sequence[Any], with_token_types: bool = False) -> PackedBatch:
        """Concatenate encodings into one PackedBatch, in the given order.

        input_ids (total_tokens,) int64, cu_seqlens (batch + 1,) int32; token_type_ids (total_tokens,) int64 with
        ``with_token_types`` (pairs), else None. position_ids stay None: the model fills them for its family.
        """
        lengths = [len(e.ids) for e in encodings]
        input_ids = torch.tensor(list(chain.from_iterable(e.ids for e in encodings)), dtype=torch.int64)
        token_types = None
        if with_token_types:
            token_types = torch.tensor(list(chain.from_iterable(e.type_ids for e in encodings)), dtype=torch.int64)
        return PackedBatch.from_lengths(input_ids, lengths, token_type_ids=token_types)

    def pad(self, encodings: Sequence[Any]) -> dict[str, torch.Tensor]:
        """A padded batch as transformers' tokenizer gives it (``padding=True``, right side): int64 (batch, L)
        ``input_ids``, ``token_type_ids`` and ``attention_mask``, L the longest encoding."""
        width = max((len(e.ids) for e in encodings), default=0)
        ids = torch.full((len(encodings), width), self.pad_token_id, dtype=torch.int64)
        types = torch.zeros((len(encodings), width), dtype=torch.int64)
        mask = torch.zeros((len(encodings), width), dtype=torch.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = torch.tensor(e.ids, dtype=torch.int64)
            types[row, :n] = torch.tensor(e.type_ids, dtype=torch.int64)
            mask[row, :n] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int | None, max_batch_size: int | None = None
) -> list[np.ndarray]:
    """Indices of batches: longest first, each filled with similar lengths up to ``max_tokens`` tokens and
    ``max_batch_size`` texts (either may be None: no limit of that kind).

    Sorting keeps lengths inside a batch close (little waste for any attention that pads per batch); the
    token budget keeps every encoder call about the same size, so neither many short texts nor a few long
    ones make a batch too small or too large. A text longer than the budget gets a batch of its own.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    tokens = max_tokens if max_tokens is not None else float("inf")
    texts = max_batch_size if max_batch_size is not None else len(order) + 1
    batches: list[np.ndarray] = []
    start, used = 0, 0
    for i, idx in enumerate(order):
        n = int(lens[idx])
        if i > start and (used + n > tokens or i - start >= texts):
            batches.append(order[start:i])
            start, used = i, 0
        used += n
    if start < len(order):
        batches.append(order[start:])
    return batches
