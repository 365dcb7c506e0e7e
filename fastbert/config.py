"""One dataclass for every supported family, read from a transformers config (config.json), and one table of
family facts (``FAMILIES``) that loading, the model, the heads, the text encoders and the benchmarks read
instead of branching on ``model_type``."""

from __future__ import annotations

import math
import numbers
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

    Dropout (training), where transformers applies it: ``hidden_dropout`` (config_fields) on the embedding
    output, on the attention output before its residual (unless ``attention_output_dropout`` is False:
    DistilBERT has none there) and on the FFN output before its residual; ``attention_dropout`` on the attention
    probabilities. head_dropout: task -> the config fields holding the head's rate, the first one set wins (no
    entry: the head has no dropout, e.g. BERT's QA head). classifier_dropout_before_dense: the classification
    head with a dense layer drops out its input too (RoBERTa, ELECTRA), not only the dense layer's output.
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
    attention_output_dropout: bool = True
    head_dropout: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    classifier_dropout_before_dense: bool = True

    def max_sequence_length(self, max_position_embeddings: int, pad_token_id: int | None) -> int:
        """Longest sequence the position table allows (RoBERTa reserves ``pad_token_id + 1`` rows)."""
        if self.positions_after_pad:
            return int(max_position_embeddings) - int(0 if pad_token_id is None else pad_token_id) - 1
        return int(max_position_embeddings)


_BERT_FIELDS = {
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "activation": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
}
#: BERT, RoBERTa and ELECTRA: the classifier's rate is ``classifier_dropout``, else the hidden rate.
_CLASSIFIER_DROPOUT = ("classifier_dropout", "hidden_dropout_prob")
_BERT_HEAD_DROPOUT = {"sequence-classification": _CLASSIFIER_DROPOUT, "token-classification": _CLASSIFIER_DROPOUT}

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
    head_dropout=_BERT_HEAD_DROPOUT,
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
        head_dropout=_BERT_HEAD_DROPOUT,
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
            "hidden_dropout": "dropout",
            "attention_dropout": "attention_dropout",
            "hidden_size": "dim",
            "num_layers": "n_layers",
            "num_heads": "n_heads",
            "intermediate_size": "hidden_dim",
            "activation": "activation",
        },
        attention_output_dropout=False,
        head_dropout={
            "sequence-classification": ("seq_classif_dropout",),
            "token-classification": ("dropout",),
            "question-answering": ("qa_dropout",),
        },
        classifier_dropout_before_dense=False,
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
        config_fields={**_BERT_FIELDS, "embedding_size": "embedding_size"},
        head_dropout=_BERT_HEAD_DROPOUT,
    ),
}

_FIELD_DEFAULTS = {"layer_norm_eps": 1e-12, "type_vocab_size": 0, "hidden_dropout": 0.0, "attention_dropout": 0.0}

#: fastbert size field -> the least value it may take (type_vocab_size is 0 when a family has no token types).
_SIZE_MINIMUM = {
    "vocab_size": 1,
    "hidden_size": 1,
    "num_layers": 1,
    "num_heads": 1,
    "intermediate_size": 1,
    "max_position_embeddings": 1,
    "type_vocab_size": 0,
    "embedding_size": 1,
}


def _integer(name: str, value: Any, minimum: int | None) -> int:
    """``value`` as an int (>= minimum unless None); UnsupportedModelError naming the HF config field otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UnsupportedModelError(f"config field {name} is {value!r} ({type(value).__name__}); it must be an integer")
    if minimum is not None and value < minimum:
        raise UnsupportedModelError(f"config field {name} is {value}; it must be an integer >= {minimum}")
    return int(value)


def dropout_rate(name: str, value: Any) -> float:
    """``value`` as a dropout rate in [0, 1); UnsupportedModelError naming the HF config field otherwise."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise UnsupportedModelError(f"config field {name} is {value!r}; a dropout rate must be a number in [0, 1)")
    return float(value)


def _positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float > 0, never clamped (BERT's LayerNorm eps is 1e-12)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise UnsupportedModelError(f"config field {name} is {value!r}; it must be a finite number > 0")
    return float(value)


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
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def attention_output_dropout(self) -> float:
        """The dropout rate on the attention block's output, before its residual (0 where the family has none)."""
        return self.hidden_dropout if self.family.attention_output_dropout else 0.0

    def head_dropout(self, hf: Any, task: str | None) -> float:
        """The dropout rate of ``task``'s head, read from the transformers config ``hf`` (0 for none)."""
        for name in self.family.head_dropout.get(task or "", ()):
            value = getattr(hf, name, None)
            if value is not None:
                return dropout_rate(name, value)
        return 0.0

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
        values = {ours: getattr(hf, theirs) for ours, theirs in family.config_fields.items() if hasattr(hf, theirs)}
        for name, default in _FIELD_DEFAULTS.items():
            values.setdefault(name, default)
        act_name = values.get("activation")
        if not isinstance(act_name, str) or act_name not in ACTIVATION_NAMES:
            raise UnsupportedModelError(
                f"activation {act_name!r} is not supported; fastbert supports: {', '.join(ACTIVATION_NAMES)}"
            )
        values["vocab_size"] = getattr(hf, "vocab_size", None)
        values["max_position_embeddings"] = getattr(hf, "max_position_embeddings", None)
        values.setdefault("embedding_size", values.get("hidden_size"))  # only ELECTRA's differs
        if not family.token_types:
            values["type_vocab_size"] = 0
        sizes = {
            name: _integer(family.config_fields.get(name, name), values.get(name), minimum)
            for name, minimum in _SIZE_MINIMUM.items()
        }
        hidden, heads = sizes["hidden_size"], sizes["num_heads"]
        if hidden % heads != 0:
            raise UnsupportedModelError(
                f"hidden size {hidden} ({family.config_fields['hidden_size']}) is not a multiple of the number of "
                f"heads {heads} ({family.config_fields['num_heads']})"
            )
        eps = _positive_float(family.config_fields.get("layer_norm_eps", "layer_norm_eps"), values["layer_norm_eps"])
        pad = getattr(hf, "pad_token_id", None)  # only RoBERTa-style positions use it (so must be >= 0)
        pad = 0 if pad is None else _integer("pad_token_id", pad, 0 if family.positions_after_pad else None)
        longest = family.max_sequence_length(sizes["max_position_embeddings"], pad)
        if longest < 1:
            raise UnsupportedModelError(
                f"config field pad_token_id is {pad} and max_position_embeddings {sizes['max_position_embeddings']}: "
                f"{model_type} numbers positions from pad_token_id + 1, so the longest sequence would be "
                f"max_position_embeddings - pad_token_id - 1 = {longest}; it must be >= 1"
            )
        init_range = getattr(hf, "initializer_range", None) or 0.02
        rates = {
            name: dropout_rate(family.config_fields.get(name, name), values[name])
            for name in ("hidden_dropout", "attention_dropout")
        }
        return cls(
            **rates,
            model_type=model_type,
            activation=ACTIVATION_NAMES[act_name],
            layer_norm_eps=eps,
            pad_token_id=pad,
            initializer_range=_positive_float("initializer_range", init_range),
            **sizes,
        )
