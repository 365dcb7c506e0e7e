"""What SentenceEncoder and CrossEncoder share: the loader, input checks and the batching loop.

``_load`` gives a model and its tokenizer limited to the model's positions; ``_TextModel._run`` tokenises a chunk
of texts, sorts it by token count, cuts it into batches of at most ``batch_size`` texts (and, when asked, at most
``max_tokens_per_batch`` tokens), runs each packed batch and puts the rows back in input order.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import sequence_length_limit
from .inputs import PackedBatch
from .tokenize import TextTokenizer, token_budget_batches

#: Texts tokenized at once; bounds the memory taken by ``tokenizers.Encoding`` objects for huge inputs.
_TOKENIZE_CHUNK = 16384

_HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*", "rust_model*"]


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
    quantize: str | None = None,
    calibration: Any = None,
    keep: tuple[str, ...] = (),
) -> tuple[torch.nn.Module, TextTokenizer]:
    """The model of ``folder`` (frozen for inference: ``AutoModel.freeze``) and its tokenizer, truncating at the
    model's own length limit; ``quantize`` / ``calibration`` / ``keep``: ``fastbert.quantize.quantize_`` (texts
    tokenized as encode does)."""
    from . import quantize as _quantize

    _quantize.check_mode(quantize)
    model = model_class.from_pretrained(folder, device=device, dtype=_parse_dtype(dtype), backend=backend)
    model.eval()
    tokenizer = TextTokenizer.from_folder(
        folder,
        max_length=max_length,
        model_limit=sequence_length_limit(model.config),
        lowercase=lowercase,
        pad_token_id=getattr(model.config, "pad_token_id", None),
    )
    if quantize is not None:
        _quantize.quantize_(model, quantize, calibration, keep, tokenizer=_quantize.text_tokenizer(tokenizer))
    model.freeze()  # text in, vectors out: inference only, weights prepacked once (AutoModel.freeze)
    return model, tokenizer


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


def _check_batching(batch_size: int, max_tokens_per_batch: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch <= 0:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")


def _check_device(device: Any) -> None:
    if isinstance(device, (list, tuple)):
        raise NotImplementedError(
            "device= as a list (sentence-transformers' multi-process encoding) is not supported by fastbert; "
            "pass one device"
        )


def _show_progress(show_progress_bar: bool | None, logger: logging.Logger) -> bool:
    """sentence-transformers 6's rule: None shows the bar only when the logger's effective level is INFO or DEBUG."""
    if show_progress_bar is not None:
        return bool(show_progress_bar)
    return logger.getEffectiveLevel() in (logging.INFO, logging.DEBUG)


def _to_numpy(t: Tensor) -> np.ndarray:
    """As sentence-transformers converts: bfloat16 (which numpy lacks) becomes float32, other dtypes stay."""
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


class _TruncationNotice:
    """Say once per encoder that inputs were cut to the model's limit."""

    def __init__(self, logger: logging.Logger) -> None:
        self.said = False
        self.logger = logger

    def check(self, encodings: Sequence[Any], max_length: int) -> None:
        if self.said:
            return
        cut = sum(1 for e in encodings if e.overflowing)
        if cut:
            self.said = True
            self.logger.warning(
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
        self.logger = logging.getLogger(type(self).__module__)
        self._truncation = _TruncationNotice(self.logger)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> _TextModel:
        """Move the model to ``device``; returns self."""
        self.model.to(device)
        return self

    def _use_device(self, device: torch.device | str | None) -> torch.device:
        """``device=`` of encode/predict: move the model there, as sentence-transformers does; None keeps it."""
        _check_device(device)
        if device is not None:
            target = torch.empty(0, device=device).device  # canonical form: "cpu:0" -> cpu
            if target != self.device:
                self.to(target)
        return self.device

    def _run(
        self,
        items: list[str] | list[tuple[str, str]],
        batch_size: int,
        max_tokens_per_batch: int | None,
        step: Callable[[PackedBatch], Any],
        empty_width: int,
        show_progress_bar: bool | None,
        progress: tuple[str, str],
        with_token_types: bool = False,
        ragged: bool = False,
    ) -> Any:
        """Tokenise ``items`` chunk by chunk, cut each chunk into length-sorted batches of at most ``batch_size``
        items (and ``max_tokens_per_batch`` tokens when given), run ``step`` on each packed batch (on the model's
        device) and return its rows, in the order of ``items``.

        step: PackedBatch -> (batch, width) rows; returns (n, width), or zeros (0, empty_width) float32 with no
        items. With ``ragged``, step returns a list of per-item objects and ``_run`` a list of n of them.
        progress: the progress bar's (description, unit).
        """
        _check_batching(batch_size, max_tokens_per_batch)
        n = len(items)
        device = self.device
        out: Tensor | None = None
        parts: list[Any] = [None] * n if ragged else []
        from tqdm.auto import tqdm

        desc, unit = progress
        with tqdm(total=n, desc=desc, unit=unit, disable=not _show_progress(show_progress_bar, self.logger)) as bar:
            for lo in range(0, n, _TOKENIZE_CHUNK):
                chunk = self.tokenizer.encode(items[lo : lo + _TOKENIZE_CHUNK])
                self._truncation.check(chunk, self.tokenizer.max_length)
                lengths = [len(e.ids) for e in chunk]
                for idx in token_budget_batches(lengths, max_tokens_per_batch, max_batch_size=batch_size):
                    batch = TextTokenizer.pack([chunk[i] for i in idx], with_token_types=with_token_types)
                    rows = step(batch.to(device))  # (len(idx), width), or a list of len(idx) objects
                    if ragged:
                        for i, row in zip(idx.tolist(), rows, strict=True):
                            parts[lo + i] = row
                    else:
                        if out is None:
                            out = torch.empty(n, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
                        out[torch.as_tensor(idx + lo, device=rows.device)] = rows
                    bar.update(len(idx))
        if ragged:
            return parts
        if out is None:
            out = torch.zeros(0, empty_width, dtype=torch.float32, device=device)
        return out
