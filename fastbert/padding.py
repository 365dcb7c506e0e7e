"""Padding helpers: the encoder works on packed tokens, padded batches exist only at its edges.

``unpad`` turns a (batch, seqlen) mask into the indices of the real tokens and int32 ``cu_seqlens``;
``pad`` scatters packed rows back. ``cu_seqlens_from_lengths`` builds the same from a list of lengths
(text encoders produce lengths directly and never build a padded tensor).

Under ``torch.compile`` / ``torch.export`` (``tracing()``) the number of real tokens is a data-dependent size:
``real_token_indices`` is ``nonzero`` as an op of its own whose fake implementation gives its length an
unbacked size, so dynamo traces it instead of breaking the graph, and ``max_seqlen`` is the padded width (an
upper bound of every length, known from the shape) instead of a value read back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing this call (tensor values cannot be read)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


@torch.library.custom_op("fastbert::real_token_indices", mutates_args=())
def real_token_indices(mask: Tensor) -> Tensor:
    """Flat row-major indices (total_tokens,) int64 of the True entries of a (batch, seqlen) bool mask.

    ``torch.nonzero``, wrapped as an op so that its value-dependent length is an unbacked size under tracing
    (dynamo breaks the graph at a bare ``nonzero`` unless ``capture_dynamic_output_shape_ops`` is set).
    """
    return torch.nonzero(mask.reshape(-1)).flatten()


@real_token_indices.register_fake
def _real_token_indices_fake(mask: Tensor) -> Tensor:
    total = torch.library.get_ctx().new_dynamic_size()
    torch._check(total <= mask.numel())
    return mask.new_empty(total, dtype=torch.int64)


@dataclass
class Packing:
    """Where the real tokens of a padded (batch, seqlen) batch live in the packed stream.

    indices: (total_tokens,) int64 flat indices into batch * seqlen, row-major, in sequence order.
    cu_seqlens: (batch + 1,) int32 cumulative lengths. max_seqlen: longest sequence (a host int, so kernels
    never need a device-to-host sync; under ``tracing()`` the padded width seqlen, a symbolic upper bound).
    lengths: (batch,) int64.
    """

    indices: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    lengths: Tensor
    batch: int
    seqlen: int

    @property
    def total_tokens(self) -> int:
        return self.indices.numel()


def unpad(mask: Tensor) -> Packing:
    """Packing of the positions where ``mask`` (batch, seqlen; bool or 0/1) is set."""
    batch, seqlen = mask.shape
    mask = mask.bool()
    lengths = mask.sum(dim=1)
    indices = real_token_indices(mask)
    cu_seqlens = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0)]).to(torch.int32)
    if tracing():
        max_seqlen = seqlen  # the longest length is a device value; the padded width bounds it
    else:
        max_seqlen = int(lengths.max()) if batch > 0 else 0
    return Packing(indices, cu_seqlens, max_seqlen, lengths, batch, seqlen)


def cu_seqlens_from_lengths(lengths: list[int] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """int32 (batch + 1,) cumulative lengths, starting at 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    torch.cumsum(lengths, dim=0, out=cu[1:])
    return cu.to(device) if device is not None else cu


def gather(x: Tensor, packing: Packing) -> Tensor:
    """Rows of a (batch, seqlen, ...) tensor at the real tokens: (total_tokens, ...)."""
    return x.reshape(packing.batch * packing.seqlen, *x.shape[2:]).index_select(0, packing.indices)


def pad(packed: Tensor, packing: Packing, fill: float = 0.0) -> Tensor:
    """Scatter (total_tokens, ...) rows back to (batch, seqlen, ...); padding positions get ``fill``."""
    out = packed.new_full((packing.batch * packing.seqlen, *packed.shape[1:]), fill)
    out.index_copy_(0, packing.indices, packed)
    return out.view(packing.batch, packing.seqlen, *packed.shape[1:])


def sequence_positions(cu_seqlens: Tensor, total_tokens: int) -> Tensor:
    """0-based position of each packed token within its own sequence: (total_tokens,) int64."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total_tokens)
    return torch.arange(total_tokens, device=cu_seqlens.device) - starts


def first_token_index(cu_seqlens: Tensor) -> Tensor:
    """Packed index of each sequence's first token: (batch,) int64 (empty sequences clamp into range)."""
    return cu_seqlens[:-1].long()
