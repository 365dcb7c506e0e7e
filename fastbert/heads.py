"""Task heads: subclasses of the encoder model that add ``self.head`` and say three things.

``logits(batch, packed)``: the head on the packed last hidden state (per sequence or per token), ``loss``:
transformers' loss for that task, ``output``: transformers' output class. One generic ``forward`` (padded
transformers-style arguments) and ``forward_batch`` / ``forward_packed`` (packed) serve every head; state
dicts hold the encoder's names plus ``head.*``, mapped to each family's HF head names by ``fastbert.loading``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .inputs import PackedBatch
from .modeling import AutoModel, Linear, finish, first_tokens


class _Head(AutoModel):
    """An encoder plus a task head."""

    per_token = True  # logits per token (re-padded to (batch, seqlen, ...)) or per sequence (batch, ...)

    def logits(self, batch: PackedBatch, packed: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, logits: Tensor, targets: tuple[Tensor | None, ...], batch: PackedBatch) -> Tensor | None:
        raise NotImplementedError

    def output(self, loss: Tensor | None, logits: Tensor, hidden_states: tuple[Tensor, ...] | None) -> Any:
        raise NotImplementedError

    def forward_batch(self, batch: PackedBatch, hidden_states: list[Tensor] | None = None) -> Tensor:
        """Packed logits: (batch, ...) for a per-sequence head, (total_tokens, ...) for a per-token head."""
        return self.logits(batch, self.encode_batch(batch, hidden_states))

    def _forward(self, args: tuple, targets: tuple, output_hidden_states, return_dict, kwargs):
        batch, packed, hidden = self._run_padded(*args, output_hidden_states, kwargs)
        logits = self.logits(batch, packed)
        if self.per_token:
            logits = batch.pad(logits)
        loss = self.loss(logits, targets, batch) if all(t is not None for t in targets) else None
        return finish(self.output(loss, logits, hidden), return_dict)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        args = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        return self._forward(args, (labels,), output_hidden_states, return_dict, kwargs)

    @classmethod
    def _hf_auto_class(cls):
        import transformers

        auto = next(c for c in cls.__mro__ if c.__name__.startswith("AutoModelFor"))
        return getattr(transformers, auto.__name__)  # fastbert's head classes carry transformers' Auto names


class ClassificationHead(nn.Module):
    """[dense -> act ->] out_proj; ``dense`` is absent where the pooler (BERT) or nothing precedes out_proj.

    dropout: the head's rate in training (transformers applies it to out_proj's input, and to dense's input too
    where ``dropout_before_dense``).
    """

    def __init__(
        self,
        hidden: int,
        num_labels: int,
        act: str | None = None,
        with_dense: bool = False,
        dropout: float = 0.0,
        dropout_before_dense: bool = False,
    ):
        super().__init__()
        self.dense = Linear(hidden, hidden) if with_dense else None
        self.act = act
        self.out_proj = Linear(hidden, num_labels)
        self.dropout = dropout
        self.dropout_before_dense = dropout_before_dense

    def drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x


class AutoModelForSequenceClassification(_Head):
    """Sequence classification / regression; logits and loss as transformers computes them."""

    task = "sequence-classification"
    per_token = False

    def uses_pooler(self) -> bool:
        return self.cfg.family.classifier.uses_pooler

    def build_head(self) -> nn.Module:
        cfg = self.cfg
        layout = cfg.family.classifier
        return ClassificationHead(
            cfg.hidden_size,
            self.config.num_labels,
            layout.act,
            with_dense=not layout.uses_pooler,
            dropout=cfg.head_dropout(self.config, self.task),
            dropout_before_dense=cfg.family.classifier_dropout_before_dense,
        )

    def logits(self, batch: PackedBatch, packed: Tensor) -> Tensor:
        ops, head = self.backend, self.head
        if head.dense is None:
            x = self.pool(packed, batch.cu_seqlens)  # (batch, hidden)
        else:
            x = first_tokens(packed, batch.cu_seqlens)
            if head.dropout_before_dense:
                x = head.drop(x)
            x = head.dense(x, ops, act=head.act)
        return head.out_proj(head.drop(x), ops)  # (batch, num_labels)

    def loss(self, logits: Tensor, targets: tuple[Tensor | None, ...], batch: PackedBatch) -> Tensor:
        labels = targets[0].to(logits.device)
        num_labels = self.config.num_labels
        problem = self.config.problem_type
        if problem is None:
            if num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem
        if problem == "regression":
            return F.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)

    def output(self, loss, logits, hidden_states):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


class _PerTokenLinearHead(_Head):
    """A head that is one linear layer on every token (token classification, extractive QA)."""

    def uses_pooler(self) -> bool:
        return False

    def build_head(self) -> nn.Module:
        dropout = self.cfg.head_dropout(self.config, self.task)
        return ClassificationHead(self.cfg.hidden_size, self.config.num_labels, dropout=dropout)

    def logits(self, batch: PackedBatch, packed: Tensor) -> Tensor:
        return self.head.out_proj(self.head.drop(packed), self.backend)  # (T, num_labels)


class AutoModelForTokenClassification(_PerTokenLinearHead):
    """Per-token classification (NER); logits (batch, seqlen, num_labels), loss ignores label -100."""

    task = "token-classification"

    def loss(self, logits: Tensor, targets: tuple[Tensor | None, ...], batch: PackedBatch) -> Tensor:
        labels = targets[0].to(logits.device)
        return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))

    def output(self, loss, logits, hidden_states):
        from transformers.modeling_outputs import TokenClassifierOutput

        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


class AutoModelForQuestionAnswering(_PerTokenLinearHead):
    """Extractive QA: start/end logits (batch, seqlen); loss = mean of start and end cross-entropies."""

    task = "question-answering"  # num_labels == 2: start and end logits

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        args = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        return self._forward(args, (start_positions, end_positions), output_hidden_states, return_dict, kwargs)

    def loss(self, logits: Tensor, targets: tuple[Tensor | None, ...], batch: PackedBatch) -> Tensor:
        """transformers' QA loss over each sequence's real tokens.

        transformers' softmax also counts the padding positions' logits (computed from padding tokens' hidden
        states); fastbert computes nothing for padding, so its padded positions are left out of the softmax: the
        loss each sequence has unpadded, as transformers computes it for that sequence alone.
        """
        start_logits, end_logits = _split_start_end(logits)
        if batch.packing is not None and batch.packing.seqlen == start_logits.size(1):
            real = batch.pad(start_logits.new_ones(batch.total_tokens, 1))[..., 0] > 0  # (batch, seqlen)
            lowest = torch.finfo(start_logits.dtype).min
            start_logits, end_logits = (t.masked_fill(~real, lowest) for t in (start_logits, end_logits))
        ignored = start_logits.size(1)
        start, end = (t.to(logits.device).view(-1).clamp(0, ignored) for t in targets)
        return (
            F.cross_entropy(start_logits, start, ignore_index=ignored)
            + F.cross_entropy(end_logits, end, ignore_index=ignored)
        ) / 2

    def output(self, loss, logits, hidden_states):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        start_logits, end_logits = _split_start_end(logits)
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=hidden_states
        )


def _split_start_end(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(batch, seqlen, 2) -> start, end logits (batch, seqlen) each."""
    start, end = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
    return start, end


class MaskedLMHead(nn.Module):
    """dense -> act -> LayerNorm -> decoder (tied to the word embeddings unless the config unties it) + bias."""

    def __init__(self, cfg: EncoderConfig, act: str, tied: bool):
        super().__init__()
        out = cfg.embedding_size if cfg.family.mlm_width_is_embedding else cfg.hidden_size
        self.dense = Linear(cfg.hidden_size, out)
        self.act = act
        self.norm = nn.LayerNorm(out, eps=cfg.layer_norm_eps)
        self.decoder = Linear(out, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.tied = tied


class AutoModelForMaskedLM(_Head):
    """Masked-token prediction; logits (batch, seqlen, vocab), loss ignores label -100."""

    task = "masked-lm"

    def uses_pooler(self) -> bool:
        return False

    def build_head(self) -> nn.Module:
        act = self.cfg.family.mlm_act or self.cfg.activation
        return MaskedLMHead(self.cfg, act, tied=bool(getattr(self.config, "tie_word_embeddings", True)))

    def _is_tied(self, name: str) -> bool:
        return name == "head.decoder.weight" and self.head.tied

    def _tie_weights(self) -> None:
        if self.head.tied:
            self.head.decoder.weight = self.embeddings.word.weight

    def get_output_embeddings(self) -> Linear:
        """The decoder onto the vocabulary, weight (vocab_size, width); its bias is ``self.head.bias``."""
        return self.head.decoder

    def _resize_output_embeddings(self, new_num_tokens: int, mean_resizing: bool) -> None:
        """Resize the decoder and its bias as transformers does: tied, the weight already follows the embeddings
        and the bias is padded with zeros; untied, both are rebuilt like an ``nn.Linear`` and filled by
        ``_resized_rows`` (bias: normal(mean, 1e-9 x std) of the old bias for added rows)."""
        head = self.head
        old_bias = head.bias
        if head.tied:
            bias = old_bias.new_zeros(new_num_tokens)
        else:
            old_weight = head.decoder.weight
            fresh = nn.Linear(
                old_weight.shape[1], new_num_tokens, device=old_weight.device, dtype=old_weight.dtype
            )  # built like transformers' new lm head, so the random numbers drawn match for one seed
            weight, bias = fresh.weight.data, fresh.bias.data
            self._resized_rows(old_weight, weight, mean_resizing)
            added = new_num_tokens - old_weight.shape[0]
            if added > 0 and not mean_resizing:
                bias.zero_()
            elif added > 0:
                mean, std = old_bias.float().mean(), old_bias.std().float()
                bias[-added:].normal_(mean=float(mean), std=float(1e-9 * std))
            head.decoder.weight = nn.Parameter(weight, requires_grad=old_weight.requires_grad)
        keep = min(new_num_tokens, old_bias.shape[0])
        bias[:keep] = old_bias[:keep]
        head.bias = nn.Parameter(bias, requires_grad=old_bias.requires_grad)

    def logits(self, batch: PackedBatch, packed: Tensor) -> Tensor:
        ops, head = self.backend, self.head
        h = head.dense(packed, ops, act=head.act)
        h = ops.add_layernorm(h, None, head.norm.weight, head.norm.bias, head.norm.eps)
        weight, _ = head.decoder.resolved()
        return ops.linear(h, weight, head.bias, None)  # (T, vocab)

    def loss(self, logits: Tensor, targets: tuple[Tensor | None, ...], batch: PackedBatch) -> Tensor:
        labels = targets[0].to(logits.device)
        return F.cross_entropy(logits.view(-1, self.cfg.vocab_size), labels.view(-1), ignore_index=-100)

    def output(self, loss, logits, hidden_states):
        from transformers.modeling_outputs import MaskedLMOutput

        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)


# ----------------------------------------------------------------------------------------------------------
# The classes from_pretrained builds: named as transformers names its class for the checkpoint's model_type
# ----------------------------------------------------------------------------------------------------------

#: transformers' class-name prefix per model_type (``BertForMaskedLM``, ``XLMRobertaModel``, ...).
_NAME_PREFIX = {
    "bert": "Bert",
    "roberta": "Roberta",
    "xlm-roberta": "XLMRoberta",
    "distilbert": "DistilBert",
    "electra": "Electra",
}
#: transformers' class-name suffix per fastbert Auto class.
_NAME_SUFFIX = {
    AutoModel: "Model",
    AutoModelForSequenceClassification: "ForSequenceClassification",
    AutoModelForTokenClassification: "ForTokenClassification",
    AutoModelForQuestionAnswering: "ForQuestionAnswering",
    AutoModelForMaskedLM: "ForMaskedLM",
}


def _define_named_classes() -> None:
    """Define ``BertModel``, ``RobertaForSequenceClassification``, ... here: what fastbert's ``from_pretrained``
    returns for each model_type (as transformers' Auto classes return ``BertModel``).

    transformers checks some models by class name (pipelines compare ``type(model).__name__`` with its mapping
    tables and log an error otherwise); these names pass that check. They are plain subclasses of the Auto class,
    with nothing added, importable from ``fastbert.heads`` (so pickling works).
    """
    for model_type, prefix in _NAME_PREFIX.items():
        for auto, suffix in _NAME_SUFFIX.items():
            name = prefix + suffix
            doc = f"fastbert's {auto.__name__} built for {model_type} checkpoints (named as transformers names it)."
            named = type(name, (auto,), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
            globals()[name] = named
            AutoModel._named[(auto, model_type)] = named


_define_named_classes()
