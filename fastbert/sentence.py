"""Text in, vectors out: sentence-transformers folders and cross-encoders on fastbert encoders.

The path from text to the encoder never builds a padded tensor: ``tokenizers`` turns a chunk of texts into
token ids (multi-threaded, in Rust), the texts are sorted by token count and cut into batches by a token budget
(``fastbert.tokenize``), and each batch goes to ``model.forward_batch`` as one ``fastbert.inputs.PackedBatch``.
Pooling is a segment reduction over ``cu_seqlens`` (``fastbert.pooling``).

``SentenceEncoder`` reads what ``sentence_transformers.SentenceTransformer`` reads: ``modules.json``, the
pooling config (legacy ``pooling_mode_*_tokens`` keys and the newer ``pooling_mode``), ``Dense`` and
``Normalize`` modules, ``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``) and the prompts of
``config_sentence_transformers.json``, and reproduces ``SentenceTransformer.encode``. ``CrossEncoder`` scores
text pairs with a sequence-classification checkpoint like ``sentence_transformers.CrossEncoder.predict``.

Both share one loader (``_load``: model + tokenizer limited to the model's positions) and one batching loop
(``_TextModel._run``: tokenise -> token-budget batches -> pack -> model -> rows back in input order).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import sequence_length_limit
from .heads import AutoModelForSequenceClassification
from .inputs import PackedBatch
from .loading import read_state_dict
from .modeling import AutoModel
from .pooling import PoolingConfig, pool
from .tokenize import TextTokenizer, read_json, read_json_if_exists, token_budget_batches

logger = logging.getLogger(__name__)

#: Texts tokenized at once; bounds the memory taken by ``tokenizers.Encoding`` objects for huge inputs.
_TOKENIZE_CHUNK = 16384

#: Default token budget per encoder call, per unit of ``batch_size`` (32 -> 4096 tokens).
_TOKENS_PER_BATCH_ITEM = 128

_HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*", "rust_model*"]


# ----------------------------------------------------------------------------------------------------------
# The loader both encoders share
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


def _load(
    model_class: Any,
    folder: str,
    device: torch.device | str | None,
    dtype: torch.dtype | str | None,
    backend: str,
    max_length: int | None,
    lowercase: bool = False,
) -> tuple[torch.nn.Module, TextTokenizer]:
    """The model of ``folder`` (eval mode) and its tokenizer, truncating at the model's own length limit."""
    model = model_class.from_pretrained(folder, device=device, dtype=_parse_dtype(dtype), backend=backend)
    model.eval()
    tokenizer = TextTokenizer.from_folder(
        folder, max_length=max_length, model_limit=sequence_length_limit(model.config), lowercase=lowercase
    )
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------
# The batching loop both encoders share
# ----------------------------------------------------------------------------------------------------------


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


def _token_budget(batch_size: int, max_tokens_per_batch: int | None) -> int:
    """Tokens per encoder call: ``max_tokens_per_batch``, else ``batch_size * 128``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    budget = max_tokens_per_batch if max_tokens_per_batch is not None else batch_size * _TOKENS_PER_BATCH_ITEM
    if budget <= 0:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")
    return budget


def _show_progress(show_progress_bar: bool | None, n: int) -> bool:
    if show_progress_bar is not None:
        return bool(show_progress_bar)
    return n >= 1000 or logger.getEffectiveLevel() <= logging.INFO


def _convert(out: Tensor, single: bool, convert_to_numpy: bool, convert_to_tensor: bool) -> Any:
    """(n, ...) rows as numpy float32 (default), one tensor, or a list of tensors; row 0 alone for one input."""
    if convert_to_tensor:
        result: Any = out
    elif convert_to_numpy:
        result = out.float().cpu().numpy()
    else:
        result = list(out.unbind(0))
    return result[0] if single else result


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


class _TextModel:
    """What SentenceEncoder and CrossEncoder share: a model, its tokenizer and the batching loop."""

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._truncation = _TruncationNotice()

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _run(
        self,
        items: list[str] | list[tuple[str, str]],
        budget: int,
        step: Callable[[PackedBatch], Tensor],
        empty_width: int,
        show_progress_bar: bool | None,
        progress: tuple[str, str],
        with_token_types: bool = False,
    ) -> Tensor:
        """Tokenise ``items`` chunk by chunk, cut each chunk into token-budget batches, run ``step`` on each packed
        batch (on the model's device) and return its rows, (n, width), in the order of ``items``.

        step: PackedBatch -> (batch, width) rows. With no items: zeros (0, empty_width) float32.
        progress: the progress bar's (description, unit).
        """
        n = len(items)
        device = self.device
        out: Tensor | None = None
        from tqdm.auto import tqdm

        desc, unit = progress
        with tqdm(total=n, desc=desc, unit=unit, disable=not _show_progress(show_progress_bar, n)) as bar:
            for lo in range(0, n, _TOKENIZE_CHUNK):
                chunk = self.tokenizer.encode(items[lo : lo + _TOKENIZE_CHUNK])
                self._truncation.check(chunk, self.tokenizer.max_length)
                for idx in token_budget_batches([len(e.ids) for e in chunk], budget):
                    batch = TextTokenizer.pack([chunk[i] for i in idx], with_token_types=with_token_types)
                    rows = step(batch.to(device))  # (len(idx), width)
                    if out is None:
                        out = torch.empty(n, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
                    out[torch.as_tensor(idx + lo, device=rows.device)] = rows
                    bar.update(len(idx))
        if out is None:
            out = torch.zeros(0, empty_width, dtype=torch.float32, device=device)
        return out


# ----------------------------------------------------------------------------------------------------------
# SentenceEncoder: the modules of a sentence-transformers folder
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


class SentenceEncoder(_TextModel):
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
        super().__init__(model, tokenizer)
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
        self._prompt_lengths: dict[str, int] = {}

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
        )
        prompts = {k: v for k, v in (st_model_config.get("prompts") or {}).items() if isinstance(v, str)}
        default = st_model_config.get("default_prompt_name")
        param = next(model.parameters(), None)
        for m in after:
            if isinstance(m, _Dense) and param is not None:
                m.to(device=param.device, dtype=param.dtype)
        return cls(model, tokenizer, pooling, after, prompts=prompts, default_prompt_name=default)

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_length

    def get_sentence_embedding_dimension(self) -> int | None:
        return self.embedding_dimension

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
        budget = _token_budget(batch_size, max_tokens_per_batch)
        prompt_text = self._resolve_prompt(prompt, prompt_name)
        prompt_length = 0
        if prompt_text is not None:
            texts = [prompt_text + t for t in texts]
            if not self.pooling.include_prompt:
                if prompt_text not in self._prompt_lengths:
                    self._prompt_lengths[prompt_text] = self.tokenizer.prompt_length(prompt_text)
                prompt_length = self._prompt_lengths[prompt_text]

        def embed(batch: PackedBatch) -> Tensor:
            hidden = self.model.forward_batch(batch)  # (total_tokens, hidden)
            pooled = pool(hidden, batch.cu_seqlens, self.pooling.modes, prompt_length)  # (batch, hidden * modes)
            return self._finish(pooled, bool(normalize_embeddings))  # (batch, dim)

        out = self._run(texts, budget, embed, self.embedding_dimension or 0, show_progress_bar, ("Encoding", "text"))
        return _convert(out, single, convert_to_numpy, convert_to_tensor)

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


class CrossEncoder(_TextModel):
    """Scores (query, passage) pairs with a sequence-classification checkpoint (a reranker).

    ``predict`` returns the model's logits passed through ``activation_fn``: by default, as in
    sentence-transformers 6.2, the activation saved in the checkpoint's config
    (``sentence_transformers.activation_fn``), else Sigmoid when ``num_labels == 1`` and Identity otherwise.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer, activation_fn: Any = None):
        super().__init__(model, tokenizer)
        self.num_labels = int(getattr(model.config, "num_labels", 1))
        if activation_fn is None:
            activation_fn, _ = _default_cross_activation(model.config, self.num_labels)
        self.activation_fn = activation_fn
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
        root = _resolve_folder(path_or_hub_id)
        model, tokenizer = _load(AutoModelForSequenceClassification, root, device, dtype, backend, max_length)
        return cls(model, tokenizer, activation_fn)

    @staticmethod
    def _check_pairs(inputs: Any) -> tuple[list[tuple[str, str]], bool]:
        """(list of (text, text) pairs, was a single pair); a clear TypeError for anything else."""

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
        budget = _token_budget(batch_size, max_tokens_per_batch)
        act = activation_fn if activation_fn is not None else self.activation_fn
        width = self.num_labels

        def score(batch: PackedBatch) -> Tensor:
            scores = self.model.forward_batch(batch).float()  # (batch, num_labels) logits
            if act is not None:
                scores = act(scores)
            if apply_softmax and width > 1:
                scores = torch.softmax(scores, dim=-1)
            return scores.reshape(batch.batch_size, width).to(torch.float32)

        out = self._run(
            items, budget, score, width, show_progress_bar, ("Scoring", "pair"), with_token_types=self._token_types
        )
        if width == 1:
            out = out[:, 0]
        return _convert(out, single, convert_to_numpy, convert_to_tensor)

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
