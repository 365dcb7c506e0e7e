"""fastbert: fast, faithful BERT-family encoders, a drop-in for Hugging Face transformers."""

from .config import EncoderConfig, UnsupportedModelError
from .loading import CheckpointError
from .modeling import AutoModel
from .heads import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .ops import BackendUnavailable, available_backends
from .patch import optimize, restore

__version__ = "0.1.0"

__all__ = [
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "BackendUnavailable",
    "CheckpointError",
    "EncoderConfig",
    "UnsupportedModelError",
    "available_backends",
    "optimize",
    "restore",
]
