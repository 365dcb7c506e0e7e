"""Text in, vectors out: sentence-transformers folders and cross-encoders on fastbert encoders.

The path from text to the encoder never builds a padded tensor: ``tokenizers`` turns a chunk of texts into
token ids (multi-threaded, in Rust), the texts are sorted by token count and cut into batches by a token budget,
and each batch goes to ``model.forward_packed`` as packed ids ``(total_tokens,)`` with int32 ``cu_seqlens``.
Pooling is a segment reduction over ``cu_seqlens``.

``SentenceEncoder`` reads what ``sentence_transformers.SentenceTransformer`` reads: ``modules.json``, the
pooling config (legacy ``pooling_mode_*_tokens`` keys and the newer ``pooling_mode``), ``Dense`` and
``Normalize`` modules, ``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``) and the prompts of
``config_sentence_transformers.json``, and reproduces ``SentenceTransformer.encode``. ``CrossEncoder`` scores
text pairs with a sequence-classification checkpoint like ``sentence_transformers.CrossEncoder.predict``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

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

#: RoBERTa-style families number positions from pad_token_id + 1, so their usable length is shorter.
_ROBERTA_POSITION_FAMILIES = ("roberta", "xlm-roberta", "camembert")

#: Texts tokenized at once; bounds the memory taken by ``tokenizers.Encoding`` objects for huge inputs.
_TOKENIZE_CHUNK = 16384

#: Default token budget per encoder call, per unit of ``batch_size`` (32 -> 4096 tokens).
_TOKENS_PER_BATCH_ITEM = 128

_HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*", "rust_model*"]


# ----------------------------------------------------------------------------------------------------------
# Configuration files
# ----------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _read_json_if_exists(path: str) -> dict[str, Any]:
    return _read_json(path) if os.path.isfile(path) else {}


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
        return cls.from_dict(_read_json(path))


# ----------------------------------------------------------------------------------------------------------
# Pooling: segment reductions over cu_seqlens
# ----------------------------------------------------------------------------------------------------------


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
    kept = hidden if keep is None else hidden[keep]

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
                sums = torch.segment_reduce(kept.to(acc_dtype), "sum", lengths=kept_lengths, axis=0)
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


# ----------------------------------------------------------------------------------------------------------
# Modules after pooling
# ----------------------------------------------------------------------------------------------------------


def _torch_activation(path: str | None, what: str) -> Any:
    """Instantiate a ``torch.nn`` activation from its dotted path (only ``torch.`` paths are imported)."""
    if path is None:
        return torch.nn.Identity()
    if not path.startswith("torch."):
        raise ValueError(f"{what}: activation {path!r} is not a torch.nn module; only torch.* paths are loaded")
    module_name, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{what}: activation {path!r} is not a torch.nn.Module class")
    return cls()


class _Dense(torch.nn.Module):
    """sentence-transformers ``Dense``: activation(linear(x)) on the pooled vector."""

    def __init__(self, folder: str):
        super().__init__()
        config = _read_json(os.path.join(folder, "config.json"))
        try:
            in_features, out_features = int(config["in_features"]), int(config["out_features"])
        except KeyError as exc:
            raise ValueError(f"Dense config in {folder!r} lacks {exc.args[0]!r}") from exc
        self.linear = torch.nn.Linear(in_features, out_features, bias=bool(config.get("bias", True)))
        self.activation = _torch_activation(
            config.get("activation_function", "torch.nn.modules.activation.Tanh"), f"Dense module {folder!r}"
        )
        st_path, pt_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
        if os.path.isfile(st_path):
            from safetensors.torch import load_file

            state = load_file(st_path)
        elif os.path.isfile(pt_path):
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"Dense module {folder!r} has no model.safetensors or pytorch_model.bin")
        self.linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()}, strict=True)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x.to(self.linear.weight.dtype)))


# ----------------------------------------------------------------------------------------------------------
# Tokenization straight to packed ids
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """A batch of tokenized texts as the encoder takes it: no padding anywhere.

    input_ids, token_type_ids: (total_tokens,) int64 (token_type_ids None for single texts: all zeros);
    cu_seqlens: (batch + 1,) int32; max_seqlen: longest sequence (host int).
    """

    input_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    token_type_ids: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str) -> PackedBatch:
        tt = self.token_type_ids.to(device) if self.token_type_ids is not None else None
        return PackedBatch(self.input_ids.to(device), self.cu_seqlens.to(device), self.max_seqlen, tt)


def _model_length_limit(config: dict[str, Any] | Any) -> int | None:
    """Longest sequence the model's position table allows, from a config dict or a transformers config."""

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    max_pos = get("max_position_embeddings")
    if max_pos is None or max_pos <= 0:
        return None
    if get("model_type") in _ROBERTA_POSITION_FAMILIES:
        return int(max_pos) - int(get("pad_token_id") or 1) - 1
    return int(max_pos)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` set up like sentence-transformers' tokenizer: truncation, no padding.

    ``encode`` gives ``tokenizers.Encoding`` objects; ``pack`` turns a selection of them into a
    ``PackedBatch``. ``max_length`` counts special tokens; pairs are truncated longest-first.
    """

    def __init__(self, tokenizer: Any, max_length: int, lowercase: bool = False, truncation_side: str = "right"):
        if max_length is None or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        if lowercase:
            self._add_lowercase()
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length, strategy="longest_first", direction=truncation_side)

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
    ) -> TextTokenizer:
        """Load ``tokenizer.json`` from ``folder`` (or convert a slow tokenizer there with transformers).

        The length limit is min(max_length or the tokenizer's ``model_max_length``, model_limit).
        """
        tok_config = _read_json_if_exists(os.path.join(folder, "tokenizer_config.json"))
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
        return cls(tokenizer, min(limits), lowercase=lowercase, truncation_side=side)

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
        """Concatenate encodings into one PackedBatch (in the given order)."""
        lengths = [len(e.ids) for e in encodings]
        input_ids = torch.tensor(list(chain.from_iterable(e.ids for e in encodings)), dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        if lengths:
            torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0, out=cu[1:])
        token_types = None
        if with_token_types:
            token_types = torch.tensor(list(chain.from_iterable(e.type_ids for e in encodings)), dtype=torch.int64)
        return PackedBatch(input_ids, cu, max(lengths, default=0), token_types)


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[np.ndarray]:
    """Indices of batches: longest first, each filled with similar lengths up to ``max_tokens`` tokens.

    Sorting keeps lengths inside a batch close (little waste for any attention that pads per batch); the
    token budget keeps every encoder call about the same size, so neither many short texts nor a few long
    ones make a batch too small or too large. A text longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable")
    batches: list[np.ndarray] = []
    start, used = 0, 0
    for i, idx in enumerate(order):
        n = int(lens[idx])
        if i > start and used + n > max_tokens:
            batches.append(order[start:i])
            start, used = i, 0
        used += n
    if start < len(order):
        batches.append(order[start:])
    return batches


# ----------------------------------------------------------------------------------------------------------
# Shared pieces of both encoders
# ----------------------------------------------------------------------------------------------------------


def _resolve_folder(path_or_id: str) -> str:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache) by huggingface_hub."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{path!r} is a file; expected a model folder or a hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FileNotFoundError(
            f"{path!r} is not a local folder, and huggingface_hub (needed to download hub ids) is not installed"
        ) from exc
    try:
        return snapshot_download(repo_id=path, ignore_patterns=_HUB_IGNORE)
    except Exception as exc:
        raise FileNotFoundError(f"{path!r} is not a local folder and could not be fetched from the hub: {exc}") from exc


def _parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)} or a torch.dtype")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_texts(inputs: Any, what: str = "texts") -> tuple[list[str], bool]:
    """(list of strings, was a single string); a clear TypeError for anything else."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if not isinstance(inputs, Iterable) or isinstance(inputs, (bytes, dict)):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(inputs).__name__}")
    texts = list(inputs)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__} ({t!r:.60}), expected str")
    return texts, False


def _show_progress(show_progress_bar: bool | None, n: int) -> bool:
    if show_progress_bar is not None:
        return bool(show_progress_bar)
    return n >= 1000 or logger.getEffectiveLevel() <= logging.INFO


class _TruncationNotice:
    """Say once per encoder that inputs were cut to the model's limit."""

    def __init__(self) -> None:
        self.said = False

    def check(self, encodings: Sequence[Any], max_length: int) -> None:
        if self.said:
            return
        cut = sum(1 for e in encodings if e.overflowing)
        if cut:
            self.said = True
            logger.warning(
                "fastbert: %d input(s) in this call are longer than the model's limit of %d tokens and were "
                "truncated (said once per model)",
                cut,
                max_length,
            )


# ----------------------------------------------------------------------------------------------------------
# SentenceEncoder
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Pipeline:
    pooling: PoolingConfig
    after: list[Any] = field(default_factory=list)  # _Dense modules and "normalize" markers, in order
    normalize: bool = False


class SentenceEncoder:
    """Sentence embeddings from a sentence-transformers folder (or a plain HF folder, with mean pooling).

    ``encode`` follows ``SentenceTransformer.encode``: a single string gives one vector, the output keeps the
    input order, ``normalize_embeddings=True`` L2-normalizes (a ``Normalize`` module in the folder always
    applies, as in sentence-transformers), prompts come from ``config_sentence_transformers.json``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        pooling: PoolingConfig | None = None,
        after_pooling: Sequence[Any] = (),
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        embedding_dimension: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling or PoolingConfig()
        self._after = list(after_pooling)
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(
                f"default_prompt_name {default_prompt_name!r} is not among the prompts {sorted(self.prompts)}"
            )
        self.default_prompt_name = default_prompt_name
        if embedding_dimension is None:
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            embedding_dimension = hidden * len(self.pooling.modes) if hidden else None
            for m in self._after:
                if isinstance(m, _Dense):
                    embedding_dimension = m.out_features
        self.embedding_dimension = embedding_dimension
        self._truncation = _TruncationNotice()
        self._prompt_lengths: dict[str, int] = {}

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        max_seq_length: int | None = None,
    ) -> SentenceEncoder:
        """Load a sentence-transformers folder, a plain transformers folder, or a hub id (downloaded only when
        ``path_or_hub_id`` is not a local folder). ``max_seq_length`` overrides ``sentence_bert_config.json``."""
        from . import modeling

        root = _resolve_folder(path_or_hub_id)
        modules_path = os.path.join(root, "modules.json")
        transformer_dir = root
        pooling: PoolingConfig | None = None
        after: list[Any] = []
        if os.path.isfile(modules_path):
            with open(modules_path, encoding="utf-8") as fh:
                modules = json.load(fh)
            if not isinstance(modules, list) or not modules:
                raise ValueError(f"{modules_path} should list the model's modules")
            for i, entry in enumerate(sorted(modules, key=lambda m: m.get("idx", 0))):
                kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
                folder = os.path.join(root, entry.get("path", "") or "")
                if i == 0:
                    if kind != "Transformer":
                        raise NotImplementedError(
                            f"{modules_path}: first module is {kind!r}; fastbert needs a Transformer"
                        )
                    transformer_dir = folder
                elif kind == "Pooling":
                    if pooling is not None:
                        raise NotImplementedError(f"{modules_path}: more than one Pooling module")
                    pooling = PoolingConfig.from_folder(folder)
                elif pooling is None:
                    raise NotImplementedError(f"{modules_path}: module {kind!r} before Pooling is not supported")
                elif kind == "Normalize":
                    after.append("normalize")
                elif kind == "Dense":
                    after.append(_Dense(folder))
                else:
                    raise NotImplementedError(
                        f"{modules_path}: module type {entry.get('type')!r} is not supported by fastbert "
                        "(supported: Transformer, Pooling, Dense, Normalize)"
                    )
            if pooling is None:
                raise NotImplementedError(f"{modules_path} has no Pooling module; fastbert returns sentence embeddings")
            st_config = _read_json_if_exists(os.path.join(transformer_dir, "sentence_bert_config.json"))
        else:
            logger.warning(
                "fastbert: %s has no modules.json (not a sentence-transformers folder); using mean pooling, "
                "as sentence-transformers does",
                root,
            )
            pooling = PoolingConfig(("mean",))
            st_config = {}
        st_model_config = _read_json_if_exists(os.path.join(root, "config_sentence_transformers.json"))

        model = modeling.AutoModel.from_pretrained(
            transformer_dir, device=device, dtype=_parse_dtype(dtype), backend=backend
        )
        model.eval()
        limit = _model_length_limit(model.config)
        tokenizer = TextTokenizer.from_folder(
            transformer_dir,
            max_length=max_seq_length if max_seq_length is not None else st_config.get("max_seq_length"),
            model_limit=limit,
            lowercase=bool(st_config.get("do_lower_case", False)),
        )
        prompts = {k: v for k, v in (st_model_config.get("prompts") or {}).items() if isinstance(v, str)}
        default = st_model_config.get("default_prompt_name")
        param = next(model.parameters(), None)
        for m in after:
            if isinstance(m, _Dense) and param is not None:
                m.to(device=param.device, dtype=param.dtype)
        return cls(model, tokenizer, pooling, after, prompts=prompts, default_prompt_name=default)

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    def get_sentence_embedding_dimension(self) -> int | None:
        return self.embedding_dimension

    # -- encoding -----------------------------------------------------------------------------------------

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        if prompt is not None:
            if prompt_name is not None:
                logger.warning("fastbert: both prompt and prompt_name given; using prompt")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not among the model's prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts[self.default_prompt_name]
        return None

    def _finish(self, pooled: Tensor, normalize: bool) -> Tensor:
        x = pooled
        for m in self._after:
            x = torch.nn.functional.normalize(x, p=2, dim=-1) if m == "normalize" else m(x)
        if normalize:
            x = torch.nn.functional.normalize(x, p=2, dim=-1)
        return x

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool | None = None,
        max_tokens_per_batch: int | None = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Embed texts: (n, dim) numpy float32 by default; a single string gives (dim,).

        ``batch_size`` sets the token budget per encoder call (``batch_size * 128`` tokens unless
        ``max_tokens_per_batch`` is given); texts are grouped by token count, not by a fixed number.
        ``convert_to_tensor`` returns one tensor on the model's device (model dtype); with both conversions
        off, a list of 1-D tensors. ``normalize_embeddings=True`` L2-normalizes; None/False leave the
        folder's own pipeline as it is (its Normalize module still applies, as in sentence-transformers).
        """
        texts, single = _check_texts(sentences, "sentences")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        budget = max_tokens_per_batch if max_tokens_per_batch is not None else batch_size * _TOKENS_PER_BATCH_ITEM
        if budget <= 0:
            raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")
        if convert_to_tensor:
            convert_to_numpy = False
        prompt_text = self._resolve_prompt(prompt, prompt_name)
        prompt_length = 0
        if prompt_text is not None:
            texts = [prompt_text + t for t in texts]
            if not self.pooling.include_prompt:
                if prompt_text not in self._prompt_lengths:
                    self._prompt_lengths[prompt_text] = self.tokenizer.prompt_length(prompt_text)
                prompt_length = self._prompt_lengths[prompt_text]

        device = self.device
        dim = self.embedding_dimension
        n = len(texts)
        out: Tensor | None = None
        if n == 0:
            out = torch.zeros(0, dim or 0, dtype=torch.float32, device=device)
        show = _show_progress(show_progress_bar, n)
        from tqdm.auto import tqdm

        with tqdm(total=n, desc="Encoding", unit="text", disable=not show) as bar:
            for lo in range(0, n, _TOKENIZE_CHUNK):
                chunk = self.tokenizer.encode(texts[lo : lo + _TOKENIZE_CHUNK])
                self._truncation.check(chunk, self.tokenizer.max_length)
                for idx in token_budget_batches([len(e.ids) for e in chunk], budget):
                    packed = TextTokenizer.pack([chunk[i] for i in idx]).to(device)
                    hidden = self.model.forward_packed(packed.input_ids, packed.cu_seqlens, packed.max_seqlen)
                    emb = self._finish(
                        pool(hidden, packed.cu_seqlens, self.pooling.modes, prompt_length), bool(normalize_embeddings)
                    )
                    if out is None:
                        out = torch.empty(n, emb.shape[1], dtype=emb.dtype, device=emb.device)
                    out[torch.as_tensor(idx + lo, device=emb.device)] = emb
                    bar.update(len(idx))
        assert out is not None
        if convert_to_numpy:
            result: Any = out.float().cpu().numpy()
        elif convert_to_tensor:
            result = out
        else:
            result = list(out.unbind(0))
        return result[0] if single else result

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | Tensor | list[Tensor]:
        """``encode`` with the model's ``query`` prompt when it has one (sentence-transformers' encode_query)."""
        if "prompt" not in kwargs and "prompt_name" not in kwargs and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> np.ndarray | Tensor | list[Tensor]:
        """``encode`` with the model's ``document`` (or ``passage``/``corpus``) prompt when it has one."""
        if "prompt" not in kwargs and "prompt_name" not in kwargs:
            for name in ("document", "passage", "corpus"):
                if name in self.prompts:
                    kwargs["prompt_name"] = name
                    break
        return self.encode(sentences, **kwargs)

    def __repr__(self) -> str:
        backend = getattr(getattr(self.model, "backend", None), "name", "?")
        return (
            f"SentenceEncoder(max_seq_length={self.max_seq_length}, pooling={list(self.pooling.modes)}, "
            f"dim={self.embedding_dimension}, backend={backend!r}, device={self.device})"
        )


# ----------------------------------------------------------------------------------------------------------
# CrossEncoder
# ----------------------------------------------------------------------------------------------------------


def _default_cross_activation(config: Any, num_labels: int) -> tuple[Any, str]:
    """sentence-transformers 6.2's rule: the activation saved in the config, else Sigmoid for one label and
    Identity otherwise. Returns (callable, name)."""
    st = getattr(config, "sentence_transformers", None)
    path = st.get("activation_fn") if isinstance(st, dict) else None
    if path is None:
        path = getattr(config, "sbert_ce_default_activation_function", None)
    if path is not None:
        try:
            return _torch_activation(path, "CrossEncoder"), path
        except (ValueError, ImportError, AttributeError) as exc:
            logger.warning("fastbert: %s; using the default activation instead", exc)
    if num_labels == 1:
        return torch.nn.Sigmoid(), "torch.nn.modules.activation.Sigmoid"
    return torch.nn.Identity(), "torch.nn.modules.linear.Identity"


class CrossEncoder:
    """Scores (query, passage) pairs with a sequence-classification checkpoint (a reranker).

    ``predict`` returns the model's logits passed through ``activation_fn``: by default, as in
    sentence-transformers 6.2, the activation saved in the checkpoint's config
    (``sentence_transformers.activation_fn``), else Sigmoid when ``num_labels == 1`` and Identity otherwise.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer, activation_fn: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.num_labels = int(getattr(model.config, "num_labels", 1))
        if activation_fn is None:
            activation_fn, _ = _default_cross_activation(model.config, self.num_labels)
        self.activation_fn = activation_fn
        self._truncation = _TruncationNotice()
        # DistilBERT-style models have no token-type table: their pairs carry no segment ids.
        self._token_types = (getattr(model.config, "type_vocab_size", 0) or 0) > 0

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        max_length: int | None = None,
        activation_fn: Any = None,
    ) -> CrossEncoder:
        from . import modeling

        root = _resolve_folder(path_or_hub_id)
        model = modeling.AutoModelForSequenceClassification.from_pretrained(
            root, device=device, dtype=_parse_dtype(dtype), backend=backend
        )
        model.eval()
        tokenizer = TextTokenizer.from_folder(
            root, max_length=max_length, model_limit=_model_length_limit(model.config)
        )
        return cls(model, tokenizer, activation_fn)

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    @staticmethod
    def _check_pairs(inputs: Any) -> tuple[list[tuple[str, str]], bool]:
        def is_pair(x: Any) -> bool:
            return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x)

        if is_pair(inputs):
            return [(inputs[0], inputs[1])], True
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
            raise TypeError(f"pairs must be a (text, text) pair or a list of them, got {type(inputs).__name__}")
        pairs = list(inputs)
        for i, p in enumerate(pairs):
            if not is_pair(p):
                raise TypeError(f"pairs[{i}] is {p!r:.80} ({type(p).__name__}); expected a (str, str) pair")
        return [(a, b) for a, b in pairs], False

    @torch.inference_mode()
    def predict(
        self,
        pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Any = None,
        apply_softmax: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        max_tokens_per_batch: int | None = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Scores: (n,) for one label, (n, num_labels) otherwise; a single pair gives a scalar / (num_labels,)."""
        items, single = self._check_pairs(pairs)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        budget = max_tokens_per_batch if max_tokens_per_batch is not None else batch_size * _TOKENS_PER_BATCH_ITEM
        act = activation_fn if activation_fn is not None else self.activation_fn
        if convert_to_tensor:
            convert_to_numpy = False
        n = len(items)
        device = self.device
        width = self.num_labels
        out = torch.zeros(n, width, dtype=torch.float32, device=device)
        show = _show_progress(show_progress_bar, n)
        from tqdm.auto import tqdm

        with tqdm(total=n, desc="Scoring", unit="pair", disable=not show) as bar:
            for lo in range(0, n, _TOKENIZE_CHUNK):
                chunk = self.tokenizer.encode(items[lo : lo + _TOKENIZE_CHUNK])
                self._truncation.check(chunk, self.tokenizer.max_length)
                for idx in token_budget_batches([len(e.ids) for e in chunk], budget):
                    packed = TextTokenizer.pack([chunk[i] for i in idx], with_token_types=self._token_types).to(device)
                    logits = self.model.forward_packed(
                        packed.input_ids, packed.cu_seqlens, packed.max_seqlen, token_type_ids=packed.token_type_ids
                    )
                    scores = logits.float()
                    if act is not None:
                        scores = act(scores)
                    if apply_softmax and width > 1:
                        scores = torch.softmax(scores, dim=-1)
                    out[torch.as_tensor(idx + lo, device=device)] = scores.reshape(len(idx), width)
                    bar.update(len(idx))
        if width == 1:
            out = out[:, 0]
        if convert_to_numpy:
            result: Any = out.cpu().numpy()
        elif convert_to_tensor:
            result = out
        else:
            result = list(out.unbind(0))
        return result[0] if single else result

    def rank(
        self, query: str, documents: Sequence[str], top_k: int | None = None, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Documents sorted by score for ``query``: [{"corpus_id": i, "score": s}, ...] (best first)."""
        docs, _ = _check_texts(documents, "documents")
        scores = self.predict([(query, d) for d in docs], convert_to_numpy=True, **kwargs)
        if self.num_labels != 1:
            raise ValueError(f"rank needs a single-score model; this one has num_labels={self.num_labels}")
        order = np.argsort(-scores, kind="stable")[: top_k if top_k is not None else len(docs)]
        return [{"corpus_id": int(i), "score": float(scores[i])} for i in order]


# ----------------------------------------------------------------------------------------------------------
# `fastbert embed`
# ----------------------------------------------------------------------------------------------------------


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastbert embed``."""
    parser.add_argument("--model", required=True, help="sentence-transformers / transformers folder, or a hub id")
    parser.add_argument("--in", dest="input", default="-", help="UTF-8 text file, one text per line ('-' = stdin)")
    parser.add_argument(
        "--out", default="-", help="output: vectors.npy, vectors.jsonl, or '-' for JSON lines on stdout"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (token budget = N x 128 tokens)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the model's)")
    parser.add_argument("--backend", default="auto", help="auto | torch | cpp | triton")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the vectors")
    parser.add_argument("--prompt-name", default=None, help="a prompt of the model (e.g. query)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_lines(source: str) -> list[str]:
    if source == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        name = source
        with open(source, "rb") as fh:
            data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r})") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty text
    return [line.removesuffix("\r") for line in lines]


def run_embed(args: argparse.Namespace) -> int:
    """Run ``fastbert embed``; returns the exit status (2: bad input/output arguments, 1: model errors)."""
    prog = "fastbert embed"
    out = args.out
    if out != "-" and not (out.endswith(".npy") or out.endswith(".jsonl")):
        print(f"{prog}: --out {out!r} must end in .npy or .jsonl (or be '-' for JSON lines on stdout)", file=sys.stderr)
        return 2
    if args.batch_size <= 0:
        print(f"{prog}: --batch-size must be positive, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        texts = _read_lines(args.input)
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot read input {args.input!r}: {exc}", file=sys.stderr)
        return 2
    try:
        encoder = SentenceEncoder.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, backend=args.backend
        )
    except Exception as exc:
        print(f"{prog}: cannot load model {args.model!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        vectors = encoder.encode(
            texts,
            prompt_name=args.prompt_name,
            batch_size=args.batch_size,
            show_progress_bar=not args.no_progress,
            normalize_embeddings=args.normalize or None,
        )
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        if out.endswith(".npy"):
            np.save(out, vectors)
        else:
            fh = sys.stdout if out == "-" else open(out, "w", encoding="utf-8")
            try:
                for row in vectors:
                    fh.write(json.dumps(row.tolist()) + "\n")
            finally:
                if fh is not sys.stdout:
                    fh.close()
    except OSError as exc:
        print(f"{prog}: cannot write {out!r}: {exc}", file=sys.stderr)
        return 1
    if out != "-":
        print(f"{prog}: wrote {len(texts)} vectors of dimension {vectors.shape[1]} to {out}", file=sys.stderr)
    return 0
