"""What happens to sentence vectors after the encoder: quantisation and similarity, as sentence-transformers 6 does it.

``quantize_embeddings`` follows ``sentence_transformers.quantize_embeddings`` (same buckets, same dtypes, same
bit packing); the similarity functions follow ``sentence_transformers.util`` (``cos_sim``, ``dot_score``,
``euclidean_sim``, ``manhattan_sim`` and their pairwise forms). Written here so fastbert needs no
sentence-transformers; tests check the two agree where it is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()
    return np.asarray(x)


def quantization_ranges(embeddings: np.ndarray, precision: str) -> np.ndarray:
    """(2, dim): per-dimension min and max, the int8/uint8 buckets' range."""
    if embeddings.ndim == 1 or embeddings.shape[0] == 1:
        raise ValueError(
            f"cannot compute {precision} quantization ranges from a single embedding; pass ranges= or "
            "calibration_embeddings= computed from a representative set of embeddings"
        )
    if embeddings.shape[0] < 100:
        logger.warning(
            "fastbert: %s quantization buckets computed from %d embeddings; ranges from more embeddings "
            "(or calibration_embeddings=) are more stable",
            precision,
            embeddings.shape[0],
        )
    return np.vstack((embeddings.min(axis=0), embeddings.max(axis=0)))


def quantize_embeddings(
    embeddings: Any,
    precision: str,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Float vectors -> ``precision``: int8 / uint8 (256 buckets per dimension between the ranges' min and max),
    binary / ubinary (sign bits packed 8 per byte, int8 shifted by -128 / uint8), or float32.

    embeddings: (n, dim) array or tensor, or a list of (tokens, dim) matrices (quantised with shared ranges).
    ranges: (2, dim) min/max; else taken from ``calibration_embeddings``, else from ``embeddings``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
    if isinstance(embeddings, list):
        if not embeddings:
            return []
        mats = [_as_numpy(e) for e in embeddings]
        if mats[0].ndim == 2:
            if precision.endswith("int8") and ranges is None:
                calib = np.concatenate(mats, axis=0) if calibration_embeddings is None else calibration_embeddings
                if len(calib):
                    ranges = quantization_ranges(np.asarray(calib), precision)
            return [quantize_embeddings(m, precision, ranges, calibration_embeddings) for m in mats]
        embeddings = np.stack(mats)
    x = _as_numpy(embeddings)
    if x.dtype in (np.int8, np.uint8):
        raise ValueError("embeddings to quantize must be float, not int8 or uint8")
    if x.ndim == 2 and x.shape[0] == 0:
        dim = x.shape[1]
        signed = precision in ("int8", "binary")
        if precision != "float32":
            width = dim if precision.endswith("int8") else (dim + 7) // 8
            return np.zeros((0, width), dtype=np.int8 if signed else np.uint8)
    if precision == "float32":
        return x.astype(np.float32)
    if precision in ("int8", "uint8"):
        if ranges is None:
            ranges = quantization_ranges(
                x if calibration_embeddings is None else np.asarray(calibration_embeddings), precision
            )
        ranges = np.asarray(ranges).astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)  # a constant dimension: every value in bucket 0
        buckets = np.clip(np.floor((x - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
    bits = np.packbits(x > 0, axis=-1)  # (..., ceil(dim / 8)) uint8
    return bits if precision == "ubinary" else (bits - 128).astype(np.int8)


# ----------------------------------------------------------------------------------------------------------
# Similarity
# ----------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any) -> Tensor:
    """A float tensor (sub-32-bit floats upcast to float32), lists of rows stacked, as sentence-transformers does."""
    if isinstance(x, list):
        if x and all(isinstance(r, Tensor) for r in x):
            x = torch.stack(x)
        elif x and all(isinstance(r, np.ndarray) for r in x):
            x = torch.from_numpy(np.stack(x))
        else:
            x = torch.tensor(x)
    elif isinstance(x, np.ndarray):
        x = torch.from_numpy(x) if x.flags.writeable else torch.tensor(x)
    elif not isinstance(x, Tensor):
        x = torch.tensor(x)
    if torch.is_floating_point(x) and torch.finfo(x.dtype).bits < 32:
        x = x.to(torch.float32)
    return x


def _as_batch(x: Any) -> Tensor:
    x = _as_tensor(x)
    return x.unsqueeze(0) if x.dim() == 1 else x


def cos_sim(a: Any, b: Any) -> Tensor:
    """(n, m) cosine similarities; 1-D inputs count as one row."""
    a, b = _as_batch(a), _as_batch(b)
    return torch.nn.functional.normalize(a, p=2, dim=-1) @ torch.nn.functional.normalize(b, p=2, dim=-1).T


def dot_score(a: Any, b: Any) -> Tensor:
    a, b = _as_batch(a), _as_batch(b)
    return a @ b.T


def euclidean_sim(a: Any, b: Any) -> Tensor:
    """(n, m) negative Euclidean distances."""
    return -torch.cdist(_as_batch(a), _as_batch(b), p=2.0)


def manhattan_sim(a: Any, b: Any) -> Tensor:
    """(n, m) negative Manhattan distances."""
    return -torch.cdist(_as_batch(a), _as_batch(b), p=1.0)


def pairwise_cos_sim(a: Any, b: Any) -> Tensor:
    a, b = _as_tensor(a), _as_tensor(b)
    return pairwise_dot_score(
        torch.nn.functional.normalize(a, p=2, dim=-1), torch.nn.functional.normalize(b, p=2, dim=-1)
    )


def pairwise_dot_score(a: Any, b: Any) -> Tensor:
    return (_as_tensor(a) * _as_tensor(b)).sum(dim=-1)


def pairwise_euclidean_sim(a: Any, b: Any) -> Tensor:
    diff = _as_tensor(a) - _as_tensor(b)
    if not diff.is_floating_point():
        return -diff.square().sum(dim=-1).sqrt()
    return -torch.linalg.vector_norm(diff, dim=-1)


def pairwise_manhattan_sim(a: Any, b: Any) -> Tensor:
    return -(_as_tensor(a) - _as_tensor(b)).abs().sum(dim=-1)


#: similarity_fn_name -> (matrix function, pairwise function); "dot_product" is sentence-transformers' alias.
SIMILARITY_FUNCTIONS: dict[str, tuple[Callable[[Any, Any], Tensor], Callable[[Any, Any], Tensor]]] = {
    "cosine": (cos_sim, pairwise_cos_sim),
    "dot": (dot_score, pairwise_dot_score),
    "euclidean": (euclidean_sim, pairwise_euclidean_sim),
    "manhattan": (manhattan_sim, pairwise_manhattan_sim),
}


def similarity_name(name: Any) -> str:
    """The canonical similarity_fn_name ("cosine", "dot", "euclidean", "manhattan"); ValueError for others."""
    value = getattr(name, "value", name)  # sentence_transformers.SimilarityFunction members
    value = "dot" if value == "dot_product" else value
    if value not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"similarity_fn_name {name!r} is not supported; use one of {', '.join(SIMILARITY_FUNCTIONS)}")
    return value
