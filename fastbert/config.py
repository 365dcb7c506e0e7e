"""One dataclass for every supported family, read from a transformers config (config.json)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: model_type -> the base-model attribute/weight prefix transformers uses for that family.
FAMILIES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "distilbert": "distilbert",
    "electra": "electra",
}

#: HF hidden_act -> fastbert activation name (see reference.ACTIVATIONS).
ACTIVATION_NAMES = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is outside what fastbert runs; the message lists what is supported."""


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and behaviour of a BERT-family encoder, independent of the family's naming.

    ``position_offset``: RoBERTa/XLM-R number positions from ``pad_token_id + 1`` and give pads the position
    ``pad_token_id``; the other families start at 0. ``type_vocab_size`` is 0 for DistilBERT (no token types).
    ``embedding_size`` differs from ``hidden_size`` only for ELECTRA (then a projection follows the embeddings).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    embedding_size: int
    roberta_positions: bool
    has_pooler: bool
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def prefix(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the position table allows (RoBERTa reserves pad_token_id + 1 rows)."""
        if self.roberta_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: Any) -> EncoderConfig:
        """Read a transformers ``PretrainedConfig``; raise UnsupportedModelError for anything fastbert can't run."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; fastbert runs: {', '.join(FAMILIES)} "
                "(BERT-based sentence encoders such as MiniLM, BGE, E5, GTE load as 'bert')"
            )
        pos_type = getattr(hf, "position_embedding_type", None) or "absolute"
        if pos_type != "absolute":
            raise UnsupportedModelError(
                f"position_embedding_type {pos_type!r} is not supported; fastbert supports 'absolute' position "
                "embeddings only (transformers 5 removed relative_key / relative_key_query too)"
            )
        if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
            raise UnsupportedModelError(
                "decoder / cross-attention configurations are not supported: fastbert runs encoders"
            )

        if model_type == "distilbert":
            hidden, heads, layers = hf.dim, hf.n_heads, hf.n_layers
            inter, act_name, eps = hf.hidden_dim, hf.activation, 1e-12  # DistilBERT hard-codes eps 1e-12
            type_vocab, embedding_size = 0, hf.dim
        else:
            hidden, heads, layers = hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers
            inter, act_name, eps = hf.intermediate_size, hf.hidden_act, hf.layer_norm_eps
            type_vocab = hf.type_vocab_size
            embedding_size = getattr(hf, "embedding_size", None) or hidden
        if not isinstance(act_name, str) or act_name not in ACTIVATION_NAMES:
            raise UnsupportedModelError(
                f"activation {act_name!r} is not supported; fastbert supports: {', '.join(ACTIVATION_NAMES)}"
            )
        if hidden % heads != 0:
            raise UnsupportedModelError(f"hidden size {hidden} is not a multiple of the number of heads {heads}")
        pad = getattr(hf, "pad_token_id", None)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=inter,
            activation=ACTIVATION_NAMES[act_name],
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=type_vocab,
            layer_norm_eps=float(eps),
            pad_token_id=0 if pad is None else int(pad),
            embedding_size=embedding_size,
            roberta_positions=model_type in ("roberta", "xlm-roberta"),
            has_pooler=model_type in ("bert", "roberta", "xlm-roberta"),
            initializer_range=float(getattr(hf, "initializer_range", 0.02) or 0.02),
        )
