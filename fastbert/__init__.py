"""fastbert: fast, faithful BERT-family encoders, a drop-in for Hugging Face transformers."""

from .config import EncoderConfig, UnsupportedModelError
from .heads import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .loading import CheckpointError
from .modeling import AutoModel
from .ops import BackendUnavailable, available_backends
from .patch import optimize, restore

__version__ = "0.1.0"

# The text API needs the optional ``tokenizers`` package: exported lazily, so ``import fastbert`` works without it.
_TEXT_API = ("SentenceEncoder", "CrossEncoder")


def __getattr__(name: str):
    if name in _TEXT_API:
        from . import sentence

        return getattr(sentence, name)
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TEXT_API])


__all__ = [
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "BackendUnavailable",
    "CheckpointError",
    "CrossEncoder",
    "EncoderConfig",
    "SentenceEncoder",
    "UnsupportedModelError",
    "available_backends",
    "optimize",
    "restore",
]
