"""Inputs: argument checks and the one packed batch type every encoder entry point runs on.

Three ways build a ``PackedBatch``: ``prepare`` from transformers-style padded arguments (ids + mask),
``PackedBatch.from_lengths`` / the tokeniser (``fastbert.tokenize``) straight from token lists, and
``PackedBatch.packed`` from already packed tensors (``forward_packed``). ``with_defaults`` is the only place
that fills default positions (RoBERTa: after ``pad_token_id``) and token types.

Checks that read tensor values (id ranges, mask values) raise a ``ValueError`` naming the offending value. Under
``torch.compile`` / ``torch.export`` values cannot be read while tracing: the same conditions are traced into the
graph as ``torch._assert_async`` (a ``RuntimeError`` naming the bound, not the value, when one fails), so no check is
dropped in either mode. Shape checks are ordinary Python on (symbolic) sizes and become guards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import padding
from .config import EncoderConfig
from .padding import tracing


@dataclass(frozen=True)
class PackedBatch:
    """A batch of sequences as packed tokens, with no padding anywhere.

    cu_seqlens: (batch + 1,) int32 cumulative lengths; max_seqlen: the longest sequence (a host int, so kernels
    never need a device-to-host sync). Exactly one of input_ids (total_tokens,) int64 and inputs_embeds
    (total_tokens, embedding_size). position_ids / token_type_ids: (total_tokens,) int64, None until
    ``with_defaults`` fills them (token_type_ids stays None for families without token types).
    packing: where the tokens sat in the padded (batch, seqlen) input, when there was one (to re-pad outputs).
    checked: whether ``check_batch`` (or ``prepare``, which checks as it builds) has validated it against a
    config; the model checks every other batch once before any kernel sees it.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    input_ids: Tensor | None = None
    inputs_embeds: Tensor | None = None
    position_ids: Tensor | None = None
    token_type_ids: Tensor | None = None
    packing: padding.Packing | None = None
    checked: bool = False

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        return (self.input_ids if self.input_ids is not None else self.inputs_embeds).shape[0]

    def replace(self, **changes) -> PackedBatch:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return t.to(device) if t is not None else None

        return self.replace(
            cu_seqlens=self.cu_seqlens.to(device),
            input_ids=move(self.input_ids),
            inputs_embeds=move(self.inputs_embeds),
            position_ids=move(self.position_ids),
            token_type_ids=move(self.token_type_ids),
        )

    def pad(self, packed: Tensor) -> Tensor:
        """(total_tokens, ...) rows back to the padded (batch, seqlen, ...) layout of the input."""
        if self.packing is None:
            raise ValueError("this batch was not built from a padded input; there is no padded layout to restore")
        return padding.pad(packed, self.packing)

    @classmethod
    def from_lengths(
        cls, input_ids: Tensor, lengths: Sequence[int] | Tensor, token_type_ids: Tensor | None = None
    ) -> PackedBatch:
        """Packed ids (total_tokens,) of sequences of the given lengths, in order."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        cu = padding.cu_seqlens_from_lengths(lengths, device=input_ids.device)
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
        return cls(cu, max_seqlen, input_ids=input_ids, token_type_ids=token_type_ids)

    @classmethod
    def packed(
        cls,
        input_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> PackedBatch:
        """A batch from already packed tensors (the arguments of ``forward_packed``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return cls(
            cu_seqlens,
            int(max_seqlen),
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
        )


def with_defaults(cfg: EncoderConfig, batch: PackedBatch) -> PackedBatch:
    """Fill default position ids (0.. per sequence; RoBERTa: pad_token_id + 1 ..) and token types (zeros)."""
    changes = {}
    if batch.position_ids is None:
        pos = padding.sequence_positions(batch.cu_seqlens, batch.total_tokens)
        if cfg.family.positions_after_pad:
            pos = pos + (cfg.pad_token_id + 1)
        changes["position_ids"] = pos
    if cfg.type_vocab_size > 0 and batch.token_type_ids is None:
        ref = changes.get("position_ids", batch.position_ids)
        changes["token_type_ids"] = torch.zeros(batch.total_tokens, dtype=torch.long, device=ref.device)
    return batch.replace(**changes) if changes else batch


# ----------------------------------------------------------------------------------------------------------
# transformers-style arguments (padded) -> one PackedBatch
# ----------------------------------------------------------------------------------------------------------

_UNSUPPORTED = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values")
# Accepted and ignored, as transformers' encoders do: cache flags, and what transformers.Trainer passes to every
# model (num_items_in_batch, for its loss normalisation).
_IGNORABLE = ("use_cache", "cache_position", "num_items_in_batch")


def check_kwargs(kwargs: dict) -> None:
    """Refuse what fastbert cannot honour; unknown names are a TypeError, as a Python function would raise."""
    for name, value in kwargs.items():
        if name in _UNSUPPORTED:
            if value is not None:
                raise NotImplementedError(
                    f"fastbert does not support {name}= (it runs encoders without head masks or caches)"
                )
        elif name == "output_attentions":
            if value:
                raise NotImplementedError(
                    "fastbert does not return attention probabilities (output_attentions=True): its fused attention "
                    "never materialises them; use transformers with attn_implementation='eager' for that"
                )
        elif name not in _IGNORABLE:
            raise TypeError(f"unexpected argument {name!r}")


#: What transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True) adds.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def pop_packed_kwargs(kwargs: dict) -> Tensor | None:
    """Remove the flattening collator's boundary arguments from ``kwargs``; return ``cu_seq_lens_q`` (or None).

    An encoder's queries and keys are the same tokens, so ``cu_seq_lens_k`` must equal ``cu_seq_lens_q``; the
    lengths and ``seq_idx`` repeat what the offsets say (the offsets are validated before use).
    """
    found = {name: kwargs.pop(name) for name in _PACKED_KWARGS if name in kwargs}
    cu_q, cu_k = found.get("cu_seq_lens_q"), found.get("cu_seq_lens_k")
    if cu_q is None:
        return cu_k
    if not isinstance(cu_q, Tensor):
        raise TypeError(f"cu_seq_lens_q must be a torch.Tensor, got {type(cu_q).__name__}")
    if cu_k is not None and (cu_k.shape != cu_q.shape or not torch.equal(cu_k.to(cu_q.device), cu_q)):
        raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q; an encoder's keys are its queries")
    return cu_q


def require(ok: Tensor, message: str, detail: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message + detail())`` unless the one-element bool tensor ``ok`` holds.

    Eager: one device read; ``detail`` (called only on failure) names the offending value. Under ``tracing()``:
    ``torch._assert_async(ok, message)``, traced into the graph and checked when it runs (a RuntimeError).
    """
    if tracing():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message + (detail() if detail is not None else ""))


def key_mask(attention_mask: Tensor | None, batch: int, seqlen: int, device: torch.device) -> Tensor:
    """A (batch, seqlen) bool mask, True = real token, from a 2-D 0/1/bool mask or a 4-D padding mask."""
    if attention_mask is None:
        return torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    m = attention_mask.to(device)
    if m.dim() == 2:
        if tuple(m.shape) != (batch, seqlen):
            raise ValueError(f"attention_mask has shape {tuple(m.shape)} but input has shape {(batch, seqlen)}")
        if m.dtype != torch.bool:
            bad = (m != 0) & (m != 1)
            require(~bad.any(), "2-D attention_mask must hold 0/1 or bools", lambda: f", found {m[bad][0].item()}")
            m = m != 0
        return m
    if m.dim() == 4:
        if m.shape[0] != batch or m.shape[-1] != seqlen or m.shape[1] not in (1,) or m.shape[2] not in (1, seqlen):
            raise ValueError(
                f"4-D attention_mask has shape {tuple(m.shape)}; expected (batch, 1, seqlen or 1, seqlen) = "
                f"({batch}, 1, {seqlen}, {seqlen})"
            )
        if seqlen == 0:
            return torch.ones(batch, 0, dtype=torch.bool, device=device)
        if m.dtype == torch.bool:
            keep = m  # True = attend
        elif m.is_floating_point():
            require(
                ~torch.isnan(m).any(),
                "4-D additive attention_mask contains NaN; use 0 (attend) or a large negative value",
            )
            keep = m == 0  # additive: 0 = attend, a large negative value = masked
            require(
                ~((m != 0) & (m > torch.finfo(m.dtype).min / 2)).any(),
                "4-D additive attention_mask must hold 0 (attend) or a large negative value (masked)",
            )
        else:
            raise ValueError(f"4-D attention_mask must be bool or an additive float mask, got {m.dtype}")
        require(
            (keep == keep[:, :, :1, :]).all(),
            "4-D attention_mask is not a plain padding mask (it differs between query positions); fastbert "
            "supports padding masks only",
        )
        return keep[:, 0, 0, :]
    raise ValueError(
        f"attention_mask must be 2-D (batch, seqlen) or a 4-D padding mask, got {m.dim()}-D shape {tuple(m.shape)}"
    )


def check_ids(name: str, ids: Tensor, upper: int, what: str) -> Tensor:
    """``ids`` as int64, checked to be an integer tensor with values in [0, upper).

    Any integer dtype is accepted (uint8 / int16 / int32 ids are cast, as an embedding lookup needs int64).
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.is_meta:
        raise ValueError(f"{name} is a meta tensor (no data); pass real ids")
    ids = ids.long()
    if ids.numel() == 0:
        return ids
    if tracing():  # the bounds as one assertion in the graph (see the module docstring)
        require(((ids >= 0) & (ids < upper)).all(), f"{name} must hold values in [0, {upper}) ({what} is {upper})")
        return ids
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one device sync for both bounds
    if lo < 0:
        raise ValueError(f"{name} contains {lo}, a negative value")
    if hi >= upper:
        raise ValueError(f"{name} contains {hi} but {what} is {upper}")
    return ids


def check_batch(cfg: EncoderConfig, batch: PackedBatch) -> PackedBatch:
    """Validate a PackedBatch that did not come from ``prepare`` before any kernel indexes with it.

    cu_seqlens must be a 1-D integer tensor starting at 0, non-decreasing and ending at total_tokens, and
    max_seqlen at least the longest sequence (a kernel sized by a smaller one would leave rows unwritten); ids,
    positions and token types must be in range and one per token. One host round trip for all of it (none when
    the tensors are on the host, as the tokeniser builds them). Returns the batch with int64 ids, marked checked.
    """
    if batch.checked:
        return batch
    cu = batch.cu_seqlens
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of batch + 1 offsets, got {_describe(cu)}")
    if cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu.dtype}")
    if (batch.input_ids is None) == (batch.inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if batch.inputs_embeds is not None:
        embeds = batch.inputs_embeds
        if embeds.dim() != 2 or embeds.shape[-1] != cfg.embedding_size:
            raise ValueError(
                f"packed inputs_embeds must be (total_tokens, {cfg.embedding_size}), got shape {tuple(embeds.shape)}"
            )
    elif batch.input_ids.dim() != 1:
        raise ValueError(f"packed input_ids must be 1-D (total_tokens,), got shape {tuple(batch.input_ids.shape)}")
    total = batch.total_tokens
    max_seqlen = batch.max_seqlen
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    host = cu.detach().to("cpu", torch.int64)
    lengths = host[1:] - host[:-1]
    if int(host[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(host[0])}")
    if lengths.numel() and int(lengths.min()) < 0:
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"cu_seqlens must be non-decreasing; it falls from {int(host[i])} to {int(host[i + 1])}")
    if int(host[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(host[-1])} but the batch holds {total} tokens")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen is {max_seqlen} but the longest sequence in cu_seqlens has {longest} tokens")
    if longest > cfg.max_sequence_length and batch.position_ids is None:
        raise ValueError(
            f"sequence length {longest} exceeds the model's maximum of {cfg.max_sequence_length} positions "
            "(max_position_embeddings); truncate the input"
        )
    changes: dict = {"checked": True, "cu_seqlens": cu if cu.dtype == torch.int32 else cu.to(torch.int32)}
    if batch.input_ids is not None:
        changes["input_ids"] = check_ids("input_ids", batch.input_ids, cfg.vocab_size, "vocab_size")
    for name, upper, what in (
        ("position_ids", cfg.max_position_embeddings, "max_position_embeddings"),
        ("token_type_ids", cfg.type_vocab_size, "type_vocab_size"),
    ):
        t = getattr(batch, name)
        if t is None:
            continue
        if name == "token_type_ids" and cfg.type_vocab_size == 0:
            raise ValueError(f"{cfg.model_type} has no token types; do not pass token_type_ids")
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != total:
            raise ValueError(f"packed {name} must be 1-D with one entry per token ({total}), got {_describe(t)}")
        changes[name] = check_ids(name, t, upper, what)
    return batch.replace(**changes)


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def prepare(
    cfg: EncoderConfig,
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    token_type_ids: Tensor | None,
    position_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    device: torch.device,
    packed_cu_seqlens: Tensor | None = None,
) -> PackedBatch:
    """Check transformers-style padded arguments and unpad them once into a PackedBatch on ``device``.

    Padding-free rows (transformers' ``DataCollatorWithFlattening``: sequences concatenated into one row, no
    attention_mask): with no ``attention_mask``, a row's ``position_ids`` restarting (not counting up by one)
    begin a new sequence, as transformers' flash-attention path reads them; ``packed_cu_seqlens`` (the collator's
    ``cu_seq_lens_q``, offsets into the flattened rows) gives the boundaries directly. Outputs keep the row shape.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seqlen), got shape {tuple(input_ids.shape)}")
        input_ids = check_ids("input_ids", input_ids, cfg.vocab_size, "vocab_size")
        batch, seqlen = input_ids.shape
        input_ids = input_ids.to(device)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.embedding_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seqlen, {cfg.embedding_size}), got shape {tuple(inputs_embeds.shape)}"
            )
        batch, seqlen = inputs_embeds.shape[:2]
    if seqlen > cfg.max_sequence_length and position_ids is None:
        raise ValueError(
            f"sequence length {seqlen} exceeds the model's maximum of {cfg.max_sequence_length} positions "
            "(max_position_embeddings); truncate the input"
        )
    packing = padding.unpad(key_mask(attention_mask, batch, seqlen, device))

    if position_ids is not None:
        shape = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else None
        if shape not in ((seqlen,), (1, seqlen), (batch, seqlen)):
            raise ValueError(
                f"position_ids has shape {shape} but input has shape {(batch, seqlen)} (also accepted: (seqlen,) "
                "or (1, seqlen), the same positions for every row)"
            )
        position_ids = check_ids("position_ids", position_ids, cfg.max_position_embeddings, "max_position_embeddings")
        position_ids = position_ids.to(device).expand(batch, seqlen)
    elif cfg.family.positions_after_pad and input_ids is not None:
        # transformers: a cumulative count over non-pad ids, so pads (wherever they sit) keep pad_token_id.
        pad = cfg.pad_token_id
        real = (input_ids != pad).int()
        position_ids = torch.cumsum(real, dim=1) * real + pad
    else:  # column indices of the padded row (RoBERTa with inputs_embeds: from pad_token_id + 1), as transformers
        start = cfg.pad_token_id + 1 if cfg.family.positions_after_pad else 0
        position_ids = torch.arange(start, start + seqlen, device=device).expand(batch, seqlen)

    if token_type_ids is not None:
        if cfg.type_vocab_size == 0:
            raise ValueError(f"{cfg.model_type} has no token types; do not pass token_type_ids")
        if tuple(token_type_ids.shape) != (batch, seqlen):
            raise ValueError(
                f"token_type_ids has shape {tuple(token_type_ids.shape)} but input has shape {(batch, seqlen)}"
            )
        token_type_ids = check_ids("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")

    def gather(t: Tensor | None) -> Tensor | None:
        return padding.gather(t.to(device).contiguous(), packing) if t is not None else None

    flat_cu = None
    if attention_mask is not None and packed_cu_seqlens is not None:
        raise ValueError(
            "pass either attention_mask (padded rows) or cu_seq_lens_q (sequences packed into rows), not both"
        )
    if attention_mask is None and packed_cu_seqlens is not None:
        flat_cu = packed_cu_seqlens.to(device)
    elif attention_mask is None and position_ids is not None and seqlen > 1:
        flat_cu = _restarts(position_ids)
    packed = with_defaults(
        cfg,
        PackedBatch(
            packing.cu_seqlens,
            packing.max_seqlen,
            input_ids=gather(input_ids),
            inputs_embeds=gather(inputs_embeds),
            position_ids=gather(position_ids),
            token_type_ids=gather(token_type_ids),
            packing=packing,
            checked=True,
        ),
    )
    if flat_cu is None:
        return packed
    # Sequences packed into rows: the same tokens, other boundaries (check_batch validates them at encode time).
    lengths = flat_cu[1:].long() - flat_cu[:-1].long()
    longest = seqlen if tracing() else (int(lengths.max()) if lengths.numel() else 0)
    return packed.replace(cu_seqlens=flat_cu, max_seqlen=longest, checked=False)


def _restarts(position_ids: Tensor) -> Tensor | None:
    """cu_seqlens (int32) of the sequences packed into rows whose position ids restart, or None if none restarts.

    A sequence begins at each row's first token and wherever a position is not its left neighbour's plus one
    (transformers' rule for packed rows).
    """
    batch, seqlen = position_ids.shape
    begins = torch.ones(batch, seqlen, dtype=torch.bool, device=position_ids.device)
    begins[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not tracing() and not bool(begins[:, 1:].any()):
        return None
    starts = begins.reshape(-1).nonzero().reshape(-1)
    end = torch.full((1,), batch * seqlen, dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)
