"""The fastbert modules: a padding-free BERT-family encoder and its task heads.

Data flow: (batch, seqlen) ids + mask are unpadded once into packed tokens (total_tokens, hidden) with int32
cu_seqlens; every layer runs on packed tokens through the fused ops of one backend (chosen when the model is
built); attention is the only op that sees sequence boundaries; outputs are re-padded at the end.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import loading, padding
from .config import EncoderConfig
from .ops import Backend, resolve_backend

# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x @ W.T + b with the backend's fused epilogues and a cached prepacked weight.

    The weight is either this module's own parameter, or (for ``fastbert.optimize``) the row-concatenation of
    other modules' parameters, shared, not copied: the concatenation and the backend's prepacked form are
    derived caches, rebuilt when a source parameter changes (tracked by its version counter).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._sources: list[tuple[Tensor, Tensor | None]] | None = None
        self._cache_key: tuple | None = None
        self._cache: tuple[Tensor, Tensor | None, Any] | None = None

    @classmethod
    def shared(cls, parts: list[tuple[Tensor, Tensor | None]]) -> Linear:
        """A Linear computing the row-concatenation of (weight, bias) ``parts`` (e.g. Q, K, V), not copying them."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self._sources = list(parts)
        self._cache_key = None
        self._cache = None
        return self

    def _params(self) -> list[tuple[Tensor, Tensor | None]]:
        return self._sources if self._sources is not None else [(self.weight, self.bias)]

    def resolved(self, ops: Backend) -> tuple[Tensor, Tensor | None, Any]:
        """(weight, bias, packed) for the current parameter values."""
        params = self._params()
        key = (ops.name,) + tuple(
            (id(t), t._version, t.dtype, t.device) for w, b in params for t in (w, b) if t is not None
        )
        if key != self._cache_key:
            with torch.no_grad():
                if len(params) == 1:
                    weight, bias = params[0]
                else:
                    weight = torch.cat([w for w, _ in params]).detach()
                    biases = [b for _, b in params]
                    bias = None if biases[0] is None else torch.cat(biases).detach()
                packed = ops.prepack_linear(weight)
            self._cache, self._cache_key = (weight, bias, packed), key
        return self._cache

    def forward(self, x: Tensor, ops: Backend, act: str | None = None) -> Tensor:
        weight, bias, packed = self.resolved(ops)
        return ops.linear(x, weight, bias, act, packed=packed)

    def residual_layernorm(self, x: Tensor, residual: Tensor, norm: nn.LayerNorm, ops: Backend) -> Tensor:
        """LayerNorm(x @ W.T + b + residual), fused."""
        weight, bias, packed = self.resolved(ops)
        return ops.linear_residual_layernorm(x, weight, bias, residual, norm.weight, norm.bias, norm.eps, packed=packed)

    def extra_repr(self) -> str:
        w = self._params()
        return f"in_features={w[0][0].shape[1]}, out_features={sum(p[0].shape[0] for p in w)}"


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        e = cfg.embedding_size
        self.word = nn.Embedding(cfg.vocab_size, e)
        self.position = nn.Embedding(cfg.max_position_embeddings, e)
        self.token_type = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
        self.project = Linear(e, cfg.hidden_size) if e != cfg.hidden_size else None

    def forward(
        self, ids: Tensor | None, embeds: Tensor | None, pos: Tensor, tt: Tensor | None, ops: Backend
    ) -> Tensor:
        """ids (T,) or embeds (T, E); pos, tt (T,). Returns (T, hidden)."""
        type_w = self.token_type.weight if self.token_type is not None else None
        if embeds is not None:
            x = embeds + self.position.weight[pos]  # (T, E)
            extra = type_w[tt] if type_w is not None else None
            h = ops.add_layernorm(x, extra, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            h = ops.embeddings(
                ids,
                pos,
                tt,
                self.word.weight,
                self.position.weight,
                type_w,
                self.norm.weight,
                self.norm.bias,
                self.norm.eps,
            )
        return self.project(h, ops) if self.project is not None else h


class EncoderLayer(nn.Module):
    """Post-LN transformer layer on packed tokens: 5 fused calls (QKV, attention, out-proj+LN, FFN1+act, FFN2+LN)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.act = cfg.activation
        self.qkv = Linear(h, 3 * h)
        self.attn_out = Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = Linear(h, cfg.intermediate_size)
        self.ffn_out = Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, ops: Backend) -> Tensor:
        qkv = self.qkv(x, ops)  # (T, 3 * hidden)
        ctx = ops.attention(qkv, cu_seqlens, max_seqlen, self.num_heads, self.scale)  # (T, hidden)
        x = self.attn_out.residual_layernorm(ctx, x, self.attn_norm, ops)
        h = self.ffn_in(x, ops, act=self.act)  # (T, intermediate)
        return self.ffn_out.residual_layernorm(h, x, self.ffn_norm, ops)


# ----------------------------------------------------------------------------------------------------------
# Input checks and preparation (padded -> packed)
# ----------------------------------------------------------------------------------------------------------

_UNSUPPORTED = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values")
_IGNORABLE = ("use_cache", "cache_position")


def _check_kwargs(kwargs: dict) -> None:
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


def _key_mask(attention_mask: Tensor | None, batch: int, seqlen: int, device: torch.device) -> Tensor:
    """A (batch, seqlen) bool mask, True = real token, from a 2-D 0/1/bool mask or a 4-D padding mask."""
    if attention_mask is None:
        return torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    m = attention_mask.to(device)
    if m.dim() == 2:
        if tuple(m.shape) != (batch, seqlen):
            raise ValueError(f"attention_mask has shape {tuple(m.shape)} but input has shape {(batch, seqlen)}")
        if m.dtype != torch.bool:
            bad = (m != 0) & (m != 1)
            if bool(bad.any()):
                raise ValueError(f"2-D attention_mask must hold 0/1 or bools, found {m[bad].flatten()[0].item()}")
            m = m != 0
        return m
    if m.dim() == 4:
        if m.shape[0] != batch or m.shape[-1] != seqlen or m.shape[1] not in (1,) or m.shape[2] not in (1, seqlen):
            raise ValueError(
                f"4-D attention_mask has shape {tuple(m.shape)}; expected (batch, 1, seqlen or 1, seqlen) = "
                f"({batch}, 1, {seqlen}, {seqlen})"
            )
        if m.dtype == torch.bool:
            keep = m  # True = attend
        elif m.is_floating_point():
            keep = m == 0  # additive: 0 = attend, a large negative value = masked
            if bool(((m != 0) & (m > torch.finfo(m.dtype).min / 2)).any()):
                raise ValueError("4-D additive attention_mask must hold 0 (attend) or a large negative value (masked)")
        else:
            raise ValueError(f"4-D attention_mask must be bool or an additive float mask, got {m.dtype}")
        if not bool((keep == keep[:, :, :1, :]).all()):
            raise ValueError(
                "4-D attention_mask is not a plain padding mask (it differs between query positions); fastbert "
                "supports padding masks only"
            )
        return keep[:, 0, 0, :]
    raise ValueError(
        f"attention_mask must be 2-D (batch, seqlen) or a 4-D padding mask, got {m.dim()}-D shape {tuple(m.shape)}"
    )


def _check_ids(name: str, ids: Tensor, upper: int, what: str) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one device sync for both bounds
    if lo < 0:
        raise ValueError(f"{name} contains {lo}, a negative value")
    if hi >= upper:
        raise ValueError(f"{name} contains {hi} but {what} is {upper}")


class _Inputs:
    """Packed view of one forward call's inputs."""

    __slots__ = ("ids", "embeds", "pos", "tt", "packing")


def _prepare(
    cfg: EncoderConfig, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, device
) -> _Inputs:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seqlen), got shape {tuple(input_ids.shape)}")
        _check_ids("input_ids", input_ids, cfg.vocab_size, "vocab_size")
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
    mask = _key_mask(attention_mask, batch, seqlen, device)
    packing = padding.unpad(mask)

    if position_ids is not None:
        position_ids = position_ids.to(device).expand(batch, seqlen) if position_ids.dim() <= 2 else position_ids
        if tuple(position_ids.shape) != (batch, seqlen):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)} but input has shape {(batch, seqlen)}"
            )
        _check_ids("position_ids", position_ids, cfg.max_position_embeddings, "max_position_embeddings")
    elif cfg.roberta_positions:
        pad = cfg.pad_token_id
        if input_ids is not None:  # transformers: cumsum over non-pad ids, pads keep position pad_token_id
            real = (input_ids != pad).int()
            position_ids = torch.cumsum(real, dim=1) * real + pad
        else:
            position_ids = torch.arange(pad + 1, seqlen + pad + 1, device=device).expand(batch, seqlen)
    else:
        position_ids = torch.arange(seqlen, device=device).expand(batch, seqlen)

    if token_type_ids is not None:
        if cfg.type_vocab_size == 0:
            raise ValueError(f"{cfg.model_type} has no token types; do not pass token_type_ids")
        if tuple(token_type_ids.shape) != (batch, seqlen):
            raise ValueError(
                f"token_type_ids has shape {tuple(token_type_ids.shape)} but input has shape {(batch, seqlen)}"
            )
        _check_ids("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")
        token_type_ids = token_type_ids.to(device)

    inp = _Inputs()
    inp.packing = packing
    inp.ids = padding.gather(input_ids, packing) if input_ids is not None else None
    inp.embeds = padding.gather(inputs_embeds.to(device), packing) if inputs_embeds is not None else None
    inp.pos = padding.gather(position_ids.contiguous(), packing)
    if cfg.type_vocab_size > 0:
        tt = (
            token_type_ids
            if token_type_ids is not None
            else torch.zeros(batch, seqlen, dtype=torch.long, device=device)
        )
        inp.tt = padding.gather(tt, packing)
    else:
        inp.tt = None
    return inp


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def _default_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


class _PreTrained(nn.Module):
    """Loading, saving and device/backend handling shared by the base model and the heads."""

    task: str | None = None

    def __init__(self, hf_config: Any, backend: str | None = "auto", device=None):
        super().__init__()
        self.config = hf_config
        self.cfg = EncoderConfig.from_hf(hf_config)
        self._backend_request = backend
        self.backend: Backend = resolve_backend(backend, _default_device(device))

    # -- devices and backends --
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        params = list(self.parameters())
        if params and params[0].device.type != getattr(self, "_backend_device_type", None):
            self._backend_device_type = params[0].device.type
            self.backend = resolve_backend(self._backend_request, params[0].device)
        return out

    def set_backend(self, backend: str) -> None:
        """Switch backend ("torch", "cpp", "triton" or "auto"); raises if it cannot run on the model's device."""
        self.backend = resolve_backend(backend, self.device)
        self._backend_request = backend

    # -- loading --
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = "auto",
        output_loading_info: bool = False,
        **hub_kwargs,
    ):
        """Load a transformers checkpoint (local folder or hub id) unchanged.

        device: where the model runs (default CPU); dtype: parameter dtype (default float32);
        backend: "auto" (triton on CUDA, cpp on CPU when built, else torch), or "torch" / "cpp" / "triton".
        Missing head weights are initialised and reported (as transformers does); missing encoder weights,
        shape mismatches and corrupt files raise ``CheckpointError``.
        """
        path = loading.resolve_path(path_or_id, **hub_kwargs)
        hf_config = loading.load_hf_config(path)
        target = _default_device(device)
        with torch.device("meta"):
            model = cls(hf_config, backend="torch")
        raw = loading.read_state_dict(path)
        state, unexpected, origin = loading.hf_to_fastbert(raw, model.cfg, cls.task)
        expected = model.state_dict()
        loading.check_shapes(expected, state, origin, str(path))
        unexpected += [k for k in state if k not in expected]
        state = {k: v for k, v in state.items() if k in expected}
        missing = [k for k in expected if k not in state and not model._is_tied(k)]
        optional, required = loading.split_missing(missing)
        if required:
            names = list(loading.fastbert_to_hf({n: expected[n] for n in required}, model.cfg, None, with_prefix=False))
            raise loading.CheckpointError(
                f"{path}: checkpoint lacks encoder tensors {names[:6]}{' ...' if len(names) > 6 else ''} "
                f"(fastbert {required[:6]})"
            )
        model = model.to_empty(device="cpu")
        model.load_state_dict({**model.state_dict(), **state}, strict=True, assign=False)
        model._init_missing(optional)
        model._tie_weights()
        if optional or unexpected:
            warnings.warn(
                f"fastbert: loading {path.name} into {cls.__name__}: "
                + (f"newly initialised (train them before use): {optional}. " if optional else "")
                + (f"unused checkpoint tensors: {unexpected}." if unexpected else ""),
                stacklevel=2,
            )
        model = model.to(device=target, dtype=dtype) if dtype is not None else model.to(device=target)
        model.set_backend(backend if backend is not None else "auto")
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": optional, "unexpected_keys": unexpected}
        return model

    def _is_tied(self, name: str) -> bool:
        return False

    def _tie_weights(self) -> None:
        pass

    @torch.no_grad()
    def _init_missing(self, names: list[str]) -> None:
        """Initialise tensors a checkpoint lacked the way transformers does (normal(0, range), zeros, ones)."""
        params = dict(self.named_parameters())
        for name in names:
            p = params[name]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, self.cfg.initializer_range)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers loads back unchanged."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not self._is_tied(k)}
        hf_state = loading.fastbert_to_hf(state, self.cfg, self.task, with_prefix=self.task is not None)
        hf_state = {k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()}
        self.config.architectures = [self._hf_architecture()]
        self.config.save_pretrained(str(out))
        save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})

    def _hf_architecture(self) -> str:
        from transformers import AutoModel

        return AutoModel._model_mapping[type(self.config)].__name__


class AutoModel(_PreTrained):
    """The encoder: ``model(input_ids, attention_mask, ...)`` returns what the transformers base model returns."""

    def __init__(self, hf_config: Any, backend: str | None = "auto", device=None, add_pooling_layer: bool = True):
        super().__init__(hf_config, backend, device)
        cfg = self.cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.pooler = Linear(cfg.hidden_size, cfg.hidden_size) if cfg.has_pooler and add_pooling_layer else None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        if any(p.is_meta for p in self.parameters()):
            return
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, self.cfg.initializer_range)

    def forward_packed(
        self,
        input_ids: Tensor | None,
        cu_seqlens: Tensor,
        max_seqlen: int,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        hidden_states: list[Tensor] | None = None,
    ) -> Tensor:
        """Packed last hidden state (total_tokens, hidden) for packed ids (total_tokens,) and int32 cu_seqlens.

        position_ids default to 0.. within each sequence (RoBERTa: pad_token_id + 1 ..). If ``hidden_states``
        is a list, the embedding output and every layer's output are appended to it.
        """
        cfg, ops = self.cfg, self.backend
        total = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        if position_ids is None:
            position_ids = padding.sequence_positions(cu_seqlens, total)
            if cfg.roberta_positions:
                position_ids = position_ids + cfg.pad_token_id + 1
        if cfg.type_vocab_size > 0 and token_type_ids is None:
            token_type_ids = torch.zeros_like(position_ids)
        x = self.embeddings(input_ids, inputs_embeds, position_ids, token_type_ids, ops)  # (T, hidden)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, ops)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def pool(self, packed: Tensor, cu_seqlens: Tensor) -> Tensor | None:
        """tanh(W h_first + b) on each sequence's first real token: (batch, hidden); empty rows pool zeros."""
        if self.pooler is None:
            return None
        return self.pooler(first_tokens(packed, cu_seqlens), self.backend, act="tanh")

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, want_hidden: bool):
        inp = _prepare(self.cfg, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, self.device)
        if inp.embeds is not None:
            inp.embeds = inp.embeds.to(self.dtype)
        p = inp.packing
        hidden = [] if want_hidden else None
        packed = self.forward_packed(inp.ids, p.cu_seqlens, p.max_seqlen, inp.tt, inp.pos, inp.embeds, hidden)
        return inp, packed, hidden

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        _check_kwargs(kwargs)
        inp, packed, hidden = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        p = inp.packing
        last = padding.pad(packed, p)  # (batch, seqlen, hidden)
        pooled = self.pool(packed, p.cu_seqlens)
        hs = tuple(padding.pad(h, p) for h in hidden) if hidden is not None else None
        return _base_output(self.cfg, last, pooled, hs, return_dict)


def first_tokens(packed: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Each sequence's first packed token, (batch, hidden); zeros for empty sequences."""
    starts = cu_seqlens[:-1].long()
    nonempty = cu_seqlens[1:] > cu_seqlens[:-1]
    rows = (
        packed.index_select(0, starts.clamp(max=max(packed.shape[0] - 1, 0)))
        if packed.shape[0]
        else packed.new_zeros(starts.shape[0], packed.shape[1])
    )
    return rows * nonempty[:, None].to(rows.dtype)


def _base_output(
    cfg: EncoderConfig, last: Tensor, pooled: Tensor | None, hidden: tuple | None, return_dict: bool | None
):
    from transformers import modeling_outputs as mo

    if cfg.model_type == "distilbert":
        out = mo.BaseModelOutput(last_hidden_state=last, hidden_states=hidden)
    elif cfg.model_type == "electra":
        out = mo.BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=last, hidden_states=hidden
        )  # what ElectraModel returns
    else:
        out = mo.BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=last, pooler_output=pooled, hidden_states=hidden
        )
    return out if return_dict is not False else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------


class _WithHead(_PreTrained):
    """An encoder plus a task head; ``self.encoder`` is an AutoModel sharing this model's backend."""

    def __init__(self, hf_config: Any, backend: str | None = "auto", device=None):
        super().__init__(hf_config, backend, device)
        self.encoder = AutoModel(hf_config, backend="torch", add_pooling_layer=self._uses_pooler())
        self.head = self._build_head()
        self.encoder.backend = self.backend
        if not any(p.is_meta for p in self.head.parameters()):
            self._init_missing([f"head.{n}" for n, _ in self.head.named_parameters()])

    def _uses_pooler(self) -> bool:
        return False

    def _build_head(self) -> nn.Module:
        raise NotImplementedError

    def state_dict(self, *args, **kwargs):
        # The encoder's tensors go under fastbert's base names (no "encoder." prefix), the head's under "head.".
        sd = super().state_dict(*args, **kwargs)
        return type(sd)((k[len("encoder.") :] if k.startswith("encoder.") else k, v) for k, v in sd.items())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        renamed = {(k if k.startswith("head.") else "encoder." + k): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            yield (name[len("encoder.") :] if name.startswith("encoder.") else name), p

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if hasattr(self, "encoder"):
            self.encoder.backend = self.backend
        return out

    def set_backend(self, backend: str) -> None:
        super().set_backend(backend)
        self.encoder.backend = self.backend

    def _hf_architecture(self) -> str:
        from transformers import (
            AutoModelForMaskedLM,
            AutoModelForQuestionAnswering,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
        )

        auto = {
            "sequence-classification": AutoModelForSequenceClassification,
            "token-classification": AutoModelForTokenClassification,
            "question-answering": AutoModelForQuestionAnswering,
            "masked-lm": AutoModelForMaskedLM,
        }[self.task]
        return auto._model_mapping[type(self.config)].__name__

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, want_hidden):
        return self.encoder._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, want_hidden)


class _ClassificationHead(nn.Module):
    """dense -> act -> out_proj on each sequence's first token (BERT: dense is the pooler)."""

    def __init__(self, hidden: int, num_labels: int, act: str, with_dense: bool = True):
        super().__init__()
        self.dense = Linear(hidden, hidden) if with_dense else None
        self.act = act
        self.out_proj = Linear(hidden, num_labels)


class AutoModelForSequenceClassification(_WithHead):
    """Sequence classification / regression; logits and loss as transformers computes them."""

    task = "sequence-classification"

    def _uses_pooler(self) -> bool:
        return self.cfg.model_type == "bert"

    def _build_head(self) -> nn.Module:
        act = {"bert": "tanh", "roberta": "tanh", "xlm-roberta": "tanh", "electra": "gelu", "distilbert": "relu"}[
            self.cfg.model_type
        ]
        return _ClassificationHead(
            self.cfg.hidden_size, self.config.num_labels, act, with_dense=self.cfg.model_type != "bert"
        )

    def forward_packed(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        hidden_states=None,
    ) -> Tensor:
        """Logits (batch, num_labels) for packed ids (total_tokens,) and int32 cu_seqlens."""
        packed = self.encoder.forward_packed(
            input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids, inputs_embeds, hidden_states
        )
        return self._logits(packed, cu_seqlens)

    def _logits(self, packed: Tensor, cu_seqlens: Tensor) -> Tensor:
        ops = self.backend
        if self.cfg.model_type == "bert":
            x = self.encoder.pool(packed, cu_seqlens)
        else:
            x = self.head.dense(first_tokens(packed, cu_seqlens), ops, act=self.head.act)
        return self.head.out_proj(x, ops)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        from transformers.modeling_outputs import SequenceClassifierOutput

        _check_kwargs(kwargs)
        inp, packed, hidden = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        logits = self._logits(packed, inp.packing.cu_seqlens)
        loss = self._loss(logits, labels) if labels is not None else None
        hs = tuple(padding.pad(h, inp.packing) for h in hidden) if hidden is not None else None
        return _finish(SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hs), return_dict)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        labels = labels.to(logits.device)
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


class AutoModelForTokenClassification(_WithHead):
    """Per-token classification (NER); logits (batch, seqlen, num_labels), loss ignores label -100."""

    task = "token-classification"

    def _build_head(self) -> nn.Module:
        return _ClassificationHead(self.cfg.hidden_size, self.config.num_labels, "none", with_dense=False)

    def forward_packed(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        hidden_states=None,
    ) -> Tensor:
        """Packed logits (total_tokens, num_labels)."""
        packed = self.encoder.forward_packed(
            input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids, inputs_embeds, hidden_states
        )
        return self.head.out_proj(packed, self.backend)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        from transformers.modeling_outputs import TokenClassifierOutput

        _check_kwargs(kwargs)
        inp, packed, hidden = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        logits = padding.pad(self.head.out_proj(packed, self.backend), inp.packing)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.to(logits.device).view(-1))
        hs = tuple(padding.pad(h, inp.packing) for h in hidden) if hidden is not None else None
        return _finish(TokenClassifierOutput(loss=loss, logits=logits, hidden_states=hs), return_dict)


class AutoModelForQuestionAnswering(_WithHead):
    """Extractive QA: start/end logits (batch, seqlen); loss = mean of start and end cross-entropies."""

    task = "question-answering"

    def _build_head(self) -> nn.Module:
        return _ClassificationHead(self.cfg.hidden_size, self.config.num_labels, "none", with_dense=False)

    def forward_packed(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        hidden_states=None,
    ) -> Tensor:
        """Packed (total_tokens, 2) start/end logits."""
        packed = self.encoder.forward_packed(
            input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids, inputs_embeds, hidden_states
        )
        return self.head.out_proj(packed, self.backend)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        _check_kwargs(kwargs)
        inp, packed, hidden = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        logits = padding.pad(self.head.out_proj(packed, self.backend), inp.packing)  # (batch, seqlen, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            start = start_positions.to(start_logits.device).view(-1).clamp(0, ignored)
            end = end_positions.to(end_logits.device).view(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        hs = tuple(padding.pad(h, inp.packing) for h in hidden) if hidden is not None else None
        return _finish(
            QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=hs),
            return_dict,
        )


class _MaskedLMHead(nn.Module):
    """dense -> act -> LayerNorm -> decoder (tied to the word embeddings unless the config unties it) + bias."""

    def __init__(self, cfg: EncoderConfig, act: str, tied: bool):
        super().__init__()
        out = cfg.embedding_size if cfg.model_type == "electra" else cfg.hidden_size
        self.dense = Linear(cfg.hidden_size, out)
        self.act = act
        self.norm = nn.LayerNorm(out, eps=cfg.layer_norm_eps)
        self.decoder = Linear(out, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.tied = tied


class AutoModelForMaskedLM(_WithHead):
    """Masked-token prediction; logits (batch, seqlen, vocab), loss ignores label -100."""

    task = "masked-lm"

    def _build_head(self) -> nn.Module:
        act = {"bert": self.cfg.activation, "distilbert": self.cfg.activation}.get(self.cfg.model_type, "gelu")
        tied = bool(getattr(self.config, "tie_word_embeddings", True))
        return _MaskedLMHead(self.cfg, act, tied)

    def _is_tied(self, name: str) -> bool:
        return name == "head.decoder.weight" and self.head.tied

    def _tie_weights(self) -> None:
        if self.head.tied:
            self.head.decoder.weight = self.encoder.embeddings.word.weight

    def forward_packed(
        self,
        input_ids,
        cu_seqlens,
        max_seqlen,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        hidden_states=None,
    ) -> Tensor:
        """Packed (total_tokens, vocab) logits."""
        packed = self.encoder.forward_packed(
            input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids, inputs_embeds, hidden_states
        )
        return self._logits(packed)

    def _logits(self, packed: Tensor) -> Tensor:
        ops, head = self.backend, self.head
        h = head.dense(packed, ops, act=head.act)
        h = ops.add_layernorm(h, None, head.norm.weight, head.norm.bias, head.norm.eps)
        weight, _, packed_w = head.decoder.resolved(ops)
        return ops.linear(h, weight, head.bias, None, packed=packed_w)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        from transformers.modeling_outputs import MaskedLMOutput

        _check_kwargs(kwargs)
        inp, packed, hidden = self._encode(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bool(output_hidden_states)
        )
        logits = padding.pad(self._logits(packed), inp.packing)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.view(-1, self.cfg.vocab_size), labels.to(logits.device).view(-1), ignore_index=-100
            )
        hs = tuple(padding.pad(h, inp.packing) for h in hidden) if hidden is not None else None
        return _finish(MaskedLMOutput(loss=loss, logits=logits, hidden_states=hs), return_dict)


def _finish(out, return_dict: bool | None):
    return out if return_dict is not False else out.to_tuple()
