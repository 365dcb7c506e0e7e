"""One dataclass for every supported family, read from a transformers config (config.json), and one table of
family facts (``FAMILIES``) that loading, the model, the heads, the text encoders and the benchmarks read
instead of branching on ``model_type``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------------------------------------
# The family table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierLayout:
    """The sequence-classification head: the pooler (BERT) or ``dense -> act`` on the first token, then out_proj."""

    uses_pooler: bool
    act: str | None = None  # the dense layer's activation (None when the pooler is used)


@dataclass(frozen=True)
class Family:
    """What differs between the BERT-family architectures, in one place.

    prefix: the base-model attribute and weight prefix transformers uses (``bert.``, ``roberta.``, ...).
    base_names / head_names: keys of the name tables in ``fastbert.loading`` (HF name <-> fastbert name).
    config_fields: fastbert field -> the HF config attribute holding it (DistilBERT names them differently).
    positions_after_pad: RoBERTa/XLM-R number positions from ``pad_token_id + 1``, pads keep ``pad_token_id``.
    token_types / pooler: whether the family has a token-type table / a pooler.
    base_output: the transformers output class of the base model's forward.
    classifier: the sequence-classification head layout. mlm_act: the masked-LM transform's activation
    (None = the config's hidden activation); mlm_width_is_embedding: ELECTRA's generator head maps to
    ``embedding_size``.
    """

    prefix: str
    base_names: str
    head_names: str
    positions_after_pad: bool
    token_types: bool
    pooler: bool
    base_output: str
    classifier: ClassifierLayout
    mlm_act: str | None = None
    mlm_width_is_embedding: bool = False
    config_fields: Mapping[str, str] = field(default_factory=dict)

    def max_sequence_length(self, max_position_embeddings: int, pad_token_id: int | None) -> int:
        """Longest sequence the position table allows (RoBERTa reserves ``pad_token_id + 1`` rows)."""
        if self.positions_after_pad:
            return int(max_position_embeddings) - int(0 if pad_token_id is None else pad_token_id) - 1
        return int(max_position_embeddings)


_BERT_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "activation": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
}
_ROBERTA = Family(
    prefix="roberta",
    base_names="bert",
    head_names="roberta",
    positions_after_pad=True,
    token_types=True,
    pooler=True,
    base_output="BaseModelOutputWithPoolingAndCrossAttentions",
    classifier=ClassifierLayout(uses_pooler=False, act="tanh"),
    mlm_act="gelu",
    config_fields=_BERT_FIELDS,
)

#: model_type -> its family facts. Anything not listed here is refused with UnsupportedModelError.
FAMILIES: dict[str, Family] = {
    "bert": Family(
        prefix="bert",
        base_names="bert",
        head_names="bert",
        positions_after_pad=False,
        token_types=True,
        pooler=True,
        base_output="BaseModelOutputWithPoolingAndCrossAttentions",
        classifier=ClassifierLayout(uses_pooler=True),
        config_fields=_BERT_FIELDS,
    ),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "distilbert": Family(
        prefix="distilbert",
        base_names="distilbert",
        head_names="distilbert",
        positions_after_pad=False,
        token_types=False,
        pooler=False,
        base_output="BaseModelOutput",
        classifier=ClassifierLayout(uses_pooler=False, act="relu"),
        # DistilBERT hard-codes LayerNorm eps 1e-12 and has no token types: no config field for either.
        config_fields={
            "hidden_size": "dim",
            "num_layers": "n_layers",
            "num_heads": "n_heads",
            "intermediate_size": "hidden_dim",
            "activation": "activation",
        },
    ),
    "electra": Family(
        prefix="electra",
        base_names="bert",
        head_names="electra",
        positions_after_pad=False,
        token_types=True,
        pooler=False,
        base_output="BaseModelOutputWithPastAndCrossAttentions",  # what ElectraModel returns
        classifier=ClassifierLayout(uses_pooler=False, act="gelu"),
        mlm_act="gelu",
        mlm_width_is_embedding=True,
        config_fields=_BERT_FIELDS,
    ),
}

_FIELD_DEFAULTS = {"layer_norm_eps": 1e-12, "type_vocab_size": 0}


def family_of(model_type: Any) -> Family:
    """The family facts of ``model_type``; UnsupportedModelError naming the supported ones otherwise."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; fastbert runs: {', '.join(FAMILIES)} "
            "(BERT-based sentence encoders such as MiniLM, BGE, E5, GTE load as 'bert')"
        )
    return family


def sequence_length_limit(config: Mapping[str, Any] | Any) -> int | None:
    """Longest sequence a model allows, from a config dict or a transformers config; None when unknown.

    The one copy of the rule (text encoders and benchmarks call it): the position table's size, less
    ``pad_token_id + 1`` rows for RoBERTa-style positions.
    """

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    family = FAMILIES.get(get("model_type"))
    max_pos = get("max_position_embeddings")
    if family is None or not isinstance(max_pos, int) or max_pos <= 0:
        return None
    return family.max_sequence_length(max_pos, get("pad_token_id"))


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


# ----------------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and behaviour of a BERT-family encoder, independent of the family's naming.

    ``type_vocab_size`` is 0 for DistilBERT (no token types). ``embedding_size`` differs from ``hidden_size``
    only for ELECTRA (then a projection follows the embeddings). Family facts (position numbering, pooler,
    output classes, head layouts) are in ``self.family``.
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
    initializer_range: float = 0.02

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def prefix(self) -> str:
        return self.family.prefix

    @property
    def roberta_positions(self) -> bool:
        """Positions count from ``pad_token_id + 1`` and skip pads (RoBERTa, XLM-R)."""
        return self.family.positions_after_pad

    @property
    def has_pooler(self) -> bool:
        return self.family.pooler

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the position table allows (RoBERTa reserves pad_token_id + 1 rows)."""
        return self.family.max_sequence_length(self.max_position_embeddings, self.pad_token_id)

    @classmethod
    def from_hf(cls, hf: Any) -> EncoderConfig:
        """Read a transformers ``PretrainedConfig``; raise UnsupportedModelError for anything fastbert can't run."""
        model_type = getattr(hf, "model_type", None)
        family = family_of(model_type)
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
        values = {
            ours: getattr(hf, theirs) for ours, theirs in family.config_fields.items() if hasattr(hf, theirs)
        }
        for name, default in _FIELD_DEFAULTS.items():
            values.setdefault(name, default)
        act_name = values["activation"]
        if not isinstance(act_name, str) or act_name not in ACTIVATION_NAMES:
            raise UnsupportedModelError(
                f"activation {act_name!r} is not supported; fastbert supports: {', '.join(ACTIVATION_NAMES)}"
            )
        hidden, heads = values["hidden_size"], values["num_heads"]
        if hidden % heads != 0:
            raise UnsupportedModelError(f"hidden size {hidden} is not a multiple of the number of heads {heads}")
        pad = getattr(hf, "pad_token_id", None)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hidden,
            num_layers=values["num_layers"],
            num_heads=heads,
            intermediate_size=values["intermediate_size"],
            activation=ACTIVATION_NAMES[act_name],
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=values["type_vocab_size"] if family.token_types else 0,
            layer_norm_eps=float(values["layer_norm_eps"]),
            pad_token_id=0 if pad is None else int(pad),
            embedding_size=getattr(hf, "embedding_size", None) or hidden,  # ELECTRA only; absent elsewhere
            initializer_range=float(getattr(hf, "initializer_range", 0.02) or 0.02),
        )
