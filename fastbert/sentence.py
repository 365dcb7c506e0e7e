"""Text in, vectors out: sentence-transformers folders on fastbert encoders.

The path from text to the encoder never builds a padded tensor: ``tokenizers`` turns a chunk of texts into
token ids (multi-threaded, in Rust), the texts are sorted by token count and cut into batches of ``batch_size``
texts (``fastbert.tokenize``; ``max_tokens_per_batch`` also caps the tokens per call), and each batch goes to
``model.forward_batch`` as one ``fastbert.inputs.PackedBatch``. Pooling is a segment reduction over
``cu_seqlens`` (``fastbert.pooling``).

``SentenceEncoder`` reads what ``sentence_transformers.SentenceTransformer`` reads: ``modules.json``, the
pooling config (legacy ``pooling_mode_*_tokens`` keys and the newer ``pooling_mode``), ``Dense`` and
``Normalize`` modules, ``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``) and the prompts and
``similarity_fn_name`` of ``config_sentence_transformers.json``, and reproduces ``SentenceTransformer.encode``
(``precision``, ``truncate_dim``, ``output_value``, ``device``), ``similarity`` and ``tokenize``.
``CrossEncoder`` (``fastbert.cross_encoder``, re-exported here) scores text pairs like
``sentence_transformers.CrossEncoder``. The loader and batching loop both use live in ``fastbert.text_model``;
quantisation and similarity functions in ``fastbert.vectors``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._memory import release_free_memory
from .config import sequence_length_limit
from .cross_encoder import CrossEncoder
from .inputs import PackedBatch
from .loading import read_state_dict
from .modeling import AutoModel
from .pooling import PoolingConfig, pool
from .text_model import _check_texts, _load, _resolve_folder, _TextModel, _to_numpy, _torch_activation
from .tokenize import TextTokenizer, read_json, read_json_if_exists
from .vectors import PRECISIONS, SIMILARITY_FUNCTIONS, quantize_embeddings, similarity_name

__all__ = ["CrossEncoder", "SentenceEncoder"]

logger = logging.getLogger(__name__)

#: Prompts every SentenceTransformer has (sentence-transformers 6): empty unless the folder's config sets them,
#: so ``prompt_name="query"`` works on any model and ``encode_query`` never falls back to ``default_prompt_name``.
_DEFAULT_PROMPTS = {"query": "", "document": ""}

#: ``output_value`` choices of SentenceTransformer.encode.
_OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)


# ----------------------------------------------------------------------------------------------------------
# The modules of a sentence-transformers folder
# ----------------------------------------------------------------------------------------------------------


class _Dense(torch.nn.Module):
    """sentence-transformers ``Dense``: activation(linear(x)) on the pooled vector."""

    def __init__(self, folder: str):
        super().__init__()
        config = read_json(os.path.join(folder, "config.json"))
        try:
            in_features, out_features = int(config["in_features"]), int(config["out_features"])
        except KeyError as exc:
            raise ValueError(f"Dense config in {folder!r} lacks {exc.args[0]!r}") from exc
        self.linear = torch.nn.Linear(in_features, out_features, bias=bool(config.get("bias", True)))
        self.activation = _torch_activation(
            config.get("activation_function", "torch.nn.modules.activation.Tanh"), f"Dense module {folder!r}"
        )
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ("model.safetensors", "pytorch_model.bin")):
            raise FileNotFoundError(f"Dense module {folder!r} has no model.safetensors or pytorch_model.bin")
        # safetensors first; a torch pickle is read with weights_only=True, and anything that is not a flat
        # dict of tensors (a pickle that would run code, a corrupt file) raises CheckpointError naming the file.
        state = read_state_dict(Path(folder))
        self.linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()}, strict=True)
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x.to(self.linear.weight.dtype)))


def _read_modules(root: str) -> tuple[str, PoolingConfig, list[Any], dict[str, Any]]:
    """(Transformer folder, pooling, modules after pooling, sentence_bert_config) of a model folder.

    A sentence-transformers folder lists its modules in ``modules.json``; a plain transformers folder gets mean
    pooling, as sentence-transformers gives it.
    """
    modules_path = os.path.join(root, "modules.json")
    if not os.path.isfile(modules_path):
        logger.warning(
            "fastbert: %s has no modules.json (not a sentence-transformers folder); using mean pooling, "
            "as sentence-transformers does",
            root,
        )
        return root, PoolingConfig(("mean",)), [], {}
    with open(modules_path, encoding="utf-8") as fh:
        modules = json.load(fh)
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{modules_path} should list the model's modules")
    transformer_dir = root
    pooling: PoolingConfig | None = None
    after: list[Any] = []  # _Dense modules and "normalize" markers, in order
    for i, entry in enumerate(sorted(modules, key=lambda m: m.get("idx", 0))):
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        folder = os.path.join(root, entry.get("path", "") or "")
        if i == 0:
            if kind != "Transformer":
                raise NotImplementedError(f"{modules_path}: first module is {kind!r}; fastbert needs a Transformer")
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
    st_config = read_json_if_exists(os.path.join(transformer_dir, "sentence_bert_config.json"))
    return transformer_dir, pooling, after, st_config


# ----------------------------------------------------------------------------------------------------------
# SentenceEncoder
# ----------------------------------------------------------------------------------------------------------


class SentenceEncoder(_TextModel):
    """Sentence embeddings from a sentence-transformers folder (or a plain HF folder, with mean pooling).

    ``encode`` follows ``SentenceTransformer.encode`` (sentence-transformers 6): a single string gives one vector,
    the output keeps the input order, ``normalize_embeddings=True`` L2-normalizes (a ``Normalize`` module in the
    folder always applies, as there), prompts come from ``config_sentence_transformers.json``.
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
        similarity_fn_name: str | None = None,
        truncate_dim: int | None = None,
    ):
        super().__init__(model, tokenizer)
        self.pooling = pooling or PoolingConfig()
        self._after = list(after_pooling)
        self.prompts = {**_DEFAULT_PROMPTS, **(prompts or {})}
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
        self._similarity_fn_name = None if similarity_fn_name is None else similarity_name(similarity_fn_name)
        self.truncate_dim = truncate_dim
        self._prompt_lengths: dict[str, int] = {}
        self._token_types = (getattr(getattr(model, "config", None), "type_vocab_size", 0) or 0) > 0

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        max_seq_length: int | None = None,
        truncate_dim: int | None = None,
        similarity_fn_name: str | None = None,
        quantize: str | None = None,
        calibration: Any = None,
        keep: tuple[str, ...] = (),
    ) -> SentenceEncoder:
        """Load a sentence-transformers folder, a plain transformers folder, or a hub id (downloaded only when
        ``path_or_hub_id`` is not a local folder). ``max_seq_length`` overrides ``sentence_bert_config.json``;
        ``truncate_dim`` and ``similarity_fn_name`` are SentenceTransformer's arguments of the same names.
        ``quantize="int8"``: int8 inference on the CPU (``fastbert.quantize``), optionally calibrated on
        ``calibration`` texts; ``keep`` names encoder linears left in float32."""
        root = _resolve_folder(path_or_hub_id)
        transformer_dir, pooling, after, st_config = _read_modules(root)
        st_model_config = read_json_if_exists(os.path.join(root, "config_sentence_transformers.json"))
        model, tokenizer = _load(
            AutoModel,
            transformer_dir,
            device,
            dtype,
            backend,
            max_length=max_seq_length if max_seq_length is not None else st_config.get("max_seq_length"),
            lowercase=bool(st_config.get("do_lower_case", False)),
            quantize=quantize,
            calibration=calibration,
            keep=keep,
        )
        prompts = {k: v for k, v in (st_model_config.get("prompts") or {}).items() if isinstance(v, str)}
        default = st_model_config.get("default_prompt_name")
        param = next(model.parameters(), None)
        for m in after:
            if isinstance(m, _Dense) and param is not None:
                m.to(device=param.device, dtype=param.dtype)
        if similarity_fn_name is None:
            similarity_fn_name = st_model_config.get("similarity_fn_name")
        return cls(
            model,
            tokenizer,
            pooling,
            after,
            prompts=prompts,
            default_prompt_name=default,
            similarity_fn_name=similarity_fn_name,
            truncate_dim=truncate_dim,
        )

    def to(self, device: torch.device | str) -> SentenceEncoder:
        """Move the model and its Dense modules to ``device``; returns self."""
        self.model.to(device)
        for m in self._after:
            if isinstance(m, _Dense):
                m.to(device)
        return self

    # -- what SentenceTransformer exposes besides encode ------------------------------------------------------

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """Truncate inputs at ``value`` tokens from now on (at most the model's position table allows)."""
        limit = sequence_length_limit(self.model.config)
        if limit is not None and isinstance(value, int) and value > limit:
            raise ValueError(f"max_seq_length {value} is more than this model's {limit} positions allow")
        self.tokenizer.set_max_length(value)

    def get_sentence_embedding_dimension(self) -> int | None:
        """The width of ``encode``'s vectors (``truncate_dim`` when set and smaller)."""
        dim = self.embedding_dimension
        if self.truncate_dim is not None:
            return self.truncate_dim if dim is None else min(dim, self.truncate_dim)
        return dim

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def similarity_fn_name(self) -> str:
        """ "cosine" (the default), "dot", "euclidean" or "manhattan", from config_sentence_transformers.json."""
        if self._similarity_fn_name is None:
            self._similarity_fn_name = "cosine"
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value: Any) -> None:
        self._similarity_fn_name = None if value is None else similarity_name(value)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Tensor:
        """(n, m) float tensor of the model's similarity between every row of ``embeddings1`` and of ``embeddings2``
        (arrays, tensors or lists of rows; a 1-D input is one row)."""
        return SIMILARITY_FUNCTIONS[self.similarity_fn_name][0](embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Tensor:
        """(n,) float tensor: the model's similarity of ``embeddings1[i]`` and ``embeddings2[i]``."""
        return SIMILARITY_FUNCTIONS[self.similarity_fn_name][1](embeddings1, embeddings2)

    def tokenize(self, texts: Sequence[str] | Sequence[tuple[str, str]]) -> dict[str, Tensor]:
        """What the model sees for ``texts`` (no prompt added), padded as transformers pads: int64 (n, L)
        ``input_ids``, ``token_type_ids``, ``attention_mask``, truncated at ``max_seq_length``."""
        items = [t if isinstance(t, str) else tuple(t) for t in texts]
        return self.tokenizer.pad(self.tokenizer.encode(items))

    # -- encode -----------------------------------------------------------------------------------------------

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """sentence-transformers 6's rule: ``prompt`` wins (a warning when both are given), then ``prompt_name``
        (ValueError if the model has no such prompt), then ``default_prompt_name``."""
        if prompt is not None:
            if prompt_name is not None:
                logger.warning("fastbert: both prompt and prompt_name given; using prompt")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not among the model's prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def _finish(self, pooled: Tensor) -> Tensor:
        x = pooled
        for m in self._after:
            x = torch.nn.functional.normalize(x, p=2, dim=-1) if m == "normalize" else m(x)
        return x

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: torch.device | str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        *,
        max_tokens_per_batch: int | None = None,
    ) -> np.ndarray | Tensor | list[Any] | dict[str, Any]:
        """Embed texts: (n, dim) numpy by default (float32 for fp32/bf16 models); a single string gives (dim,).

        As ``SentenceTransformer.encode``: ``batch_size`` texts per encoder call (texts sorted by token count
        first; ``max_tokens_per_batch`` also caps the tokens per call). ``convert_to_tensor`` returns one tensor on
        the model's device; both conversions off, a list of 1-D tensors. ``truncate_dim`` keeps the first dims
        (before ``normalize_embeddings``); ``precision`` quantises as ``quantize_embeddings``. ``output_value=
        "token_embeddings"`` gives a list of (tokens, hidden) tensors, ``None`` a list of dicts per text (token
        tensors unpadded). ``device=`` moves the model there. ``show_progress_bar=None``: a bar only when this
        module's logger is at INFO or DEBUG.
        """
        if output_value not in _OUTPUT_VALUES:
            raise ValueError(f"output_value {output_value!r} is not supported; use one of {_OUTPUT_VALUES}")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
        quantize = output_value == "sentence_embedding" and precision not in (None, "float32")
        if convert_to_tensor:
            convert_to_numpy = False
        if output_value != "sentence_embedding":
            convert_to_numpy = convert_to_tensor = False
        texts, single = _check_texts(sentences, "sentences")
        self._use_device(device)
        truncate_dim = truncate_dim if truncate_dim is not None else self.truncate_dim
        prompt_text = self._resolve_prompt(prompt, prompt_name)
        prompt_length = 0
        if prompt_text:
            texts = [prompt_text + t for t in texts]
            if not self.pooling.include_prompt:
                if prompt_text not in self._prompt_lengths:
                    self._prompt_lengths[prompt_text] = self.tokenizer.prompt_length(prompt_text)
                prompt_length = self._prompt_lengths[prompt_text]

        def embed(batch: PackedBatch) -> Any:
            hidden = self.model.forward_batch(batch)  # (total_tokens, hidden)
            if output_value == "token_embeddings":
                return list(hidden.split(batch.cu_seqlens.diff().tolist()))  # (tokens_i, hidden) each
            pooled = pool(hidden, batch.cu_seqlens, self.pooling.modes, prompt_length)  # (batch, hidden * modes)
            x = self._finish(pooled)  # (batch, dim)
            if truncate_dim is not None:
                x = x[:, :truncate_dim]
            if output_value is None:
                return self._feature_dicts(batch, hidden, x)
            return torch.nn.functional.normalize(x, p=2, dim=-1) if normalize_embeddings else x

        width = self.get_sentence_embedding_dimension() or 0
        if truncate_dim is not None:
            width = min(width, truncate_dim) if width else truncate_dim
        out = self._run(
            texts,
            batch_size,
            max_tokens_per_batch,
            embed,
            width,
            show_progress_bar,
            ("Encoding", "text"),
            ragged=output_value != "sentence_embedding",
        )
        release_free_memory()  # glibc keeps freed activations of varied sizes; see fastbert/_memory.py
        if quantize and len(out):
            out = quantize_embeddings(out, precision)
        if convert_to_tensor:
            result: Any = torch.as_tensor(out) if isinstance(out, np.ndarray) else out
        elif convert_to_numpy:
            result = out if isinstance(out, np.ndarray) else _to_numpy(out)
        elif isinstance(out, np.ndarray):
            result = list(torch.from_numpy(out))
        else:
            result = list(out)
        return result[0] if single else result

    def _feature_dicts(self, batch: PackedBatch, hidden: Tensor, sentence: Tensor) -> list[dict[str, Any]]:
        """``output_value=None``: per text, what SentenceTransformer's modules produced (without padding rows)."""
        lengths = batch.cu_seqlens.diff().tolist()
        ids = batch.input_ids.split(lengths)
        types = batch.token_type_ids.split(lengths) if batch.token_type_ids is not None else None
        rows = []
        for i, (tokens, n) in enumerate(zip(hidden.split(lengths), lengths, strict=True)):
            row: dict[str, Any] = {"input_ids": ids[i]}
            if self._token_types:
                row["token_type_ids"] = types[i] if types is not None else torch.zeros_like(ids[i])
            row["attention_mask"] = torch.ones(n, dtype=torch.int64, device=ids[i].device)
            row.update({"modality": "text", "token_embeddings": tokens, "sentence_embedding": sentence[i]})
            rows.append(row)
        return rows

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> Any:
        """``encode`` with the model's ``query`` prompt (sentence-transformers' encode_query; "" unless the folder
        sets one, so the default prompt does not apply)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> Any:
        """``encode`` with the model's ``document`` (or ``passage``/``corpus``) prompt."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            for name in ("document", "passage", "corpus"):
                if name in self.prompts:
                    kwargs["prompt_name"] = name
                    break
        return self.encode(sentences, **kwargs)

    def __repr__(self) -> str:
        backend = getattr(getattr(self.model, "backend", None), "name", "?")
        return (
            f"SentenceEncoder(max_seq_length={self.max_seq_length}, pooling={list(self.pooling.modes)}, "
            f"dim={self.get_sentence_embedding_dimension()}, similarity={self.similarity_fn_name!r}, "
            f"backend={backend!r}, device={self.device})"
        )
