"""CrossEncoder: (query, passage) scores from a sequence-classification checkpoint, like
``sentence_transformers.CrossEncoder.predict`` / ``rank``.

Pairs go through the same loop as sentence embeddings (``fastbert.text_model``): tokenised as pairs (with token
types where the family has them), sorted by length, batched, packed, scored, and put back in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .heads import AutoModelForSequenceClassification
from .inputs import PackedBatch
from .text_model import _check_texts, _load, _resolve_folder, _TextModel, _to_numpy, _torch_activation
from .tokenize import TextTokenizer

logger = logging.getLogger(__name__)


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
        quantize: str | None = None,
        calibration: Any = None,
        keep: tuple[str, ...] = (),
    ) -> CrossEncoder:
        """Load a cross-encoder folder; ``quantize="int8"`` (with optional ``calibration`` texts and ``keep``):
        int8 inference on the CPU (``fastbert.quantize``)."""
        root = _resolve_folder(path_or_hub_id)
        model, tokenizer = _load(
            AutoModelForSequenceClassification,
            root,
            device,
            dtype,
            backend,
            max_length,
            False,
            quantize,
            calibration,
            keep,
        )
        return cls(model, tokenizer, activation_fn)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @staticmethod
    def _check_pairs(inputs: Any) -> tuple[list[tuple[str, str]], bool]:
        """(list of (text, text) pairs, was a single pair); a clear TypeError for anything else."""

        def is_pair(x: Any) -> bool:
            return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x)

        if isinstance(inputs, np.ndarray):
            inputs = inputs.tolist()
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
        device: torch.device | str | None = None,
        max_tokens_per_batch: int | None = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Scores: (n,) for one label, (n, num_labels) otherwise; a single pair gives a scalar / (num_labels,).

        As in sentence-transformers: ``batch_size`` pairs per model call (pairs sorted by length first;
        ``max_tokens_per_batch`` also caps the tokens per call), ``device=`` moves the model there,
        ``convert_to_tensor`` gives one float32 tensor on the model's device, both conversions off a list of
        tensors; ``show_progress_bar=None`` shows a bar only when this module's logger is at INFO or DEBUG.
        """
        items, single = self._check_pairs(pairs)
        self._use_device(device)
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
            items,
            batch_size,
            max_tokens_per_batch,
            score,
            width,
            show_progress_bar,
            ("Scoring", "pair"),
            with_token_types=self._token_types,
        )
        if width == 1:
            out = out[:, 0]
        if convert_to_tensor:
            result: Any = out
        elif convert_to_numpy:
            result = _to_numpy(out)
        else:
            result = list(out.unbind(0))
        return result[0] if single else result

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Any = None,
        device: torch.device | str | None = None,
        max_tokens_per_batch: int | None = None,
    ) -> list[dict[str, Any]]:
        """Documents sorted by score for ``query``, best first: [{"corpus_id": i, "score": s}, ...], with
        ``"text"`` too when ``return_documents``; at most ``top_k`` of them. Needs a one-label model."""
        if self.num_labels != 1:
            raise ValueError(
                f"rank needs a single-score model (num_labels=1); this one has num_labels={self.num_labels}: "
                "use predict() on (query, document) pairs"
            )
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        docs, _ = _check_texts(documents, "documents")
        scores = self.predict(
            [(query, d) for d in docs],
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            activation_fn=activation_fn,
            convert_to_tensor=True,
            device=device,
            max_tokens_per_batch=max_tokens_per_batch,
        ).tolist()
        results: list[dict[str, Any]] = []
        for i, s in enumerate(scores):
            results.append(
                {"corpus_id": i, "score": s, "text": docs[i]} if return_documents else {"corpus_id": i, "score": s}
            )
        results.sort(key=lambda r: r["score"], reverse=True)  # stable: ties keep document order, as there
        return results[:top_k]

    def __repr__(self) -> str:
        backend = getattr(getattr(self.model, "backend", None), "name", "?")
        return (
            f"CrossEncoder(max_length={self.max_length}, num_labels={self.num_labels}, backend={backend!r}, "
            f"device={self.device})"
        )
