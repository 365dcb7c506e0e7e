"""The padding-free BERT-family encoder: its building blocks and the base model (task heads: ``fastbert.heads``).

Data flow: (batch, seqlen) ids + mask are unpadded once into a ``PackedBatch`` (``fastbert.inputs``): packed
tokens (total_tokens, hidden) with int32 cu_seqlens; every layer runs on packed tokens through the fused ops
of one backend (chosen when the model is built); attention is the only op that sees sequence boundaries;
outputs are re-padded at the end.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import inputs
from .config import EncoderConfig
from .inputs import PackedBatch
from .ops import Backend, resolve_backend
from .pretrained import PreTrainedMixin

# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


def _version(t: Tensor) -> int:
    """The version counter of ``t`` (bumped by every tracked in-place write); -1 for an inference tensor, which
    has none (it can be written in place only inside inference_mode, where such a write is not seen)."""
    return -1 if t.is_inference() else t._version


class Linear(nn.Module):
    """y = act(x @ W.T + b) and LayerNorm(x @ W.T + b + residual) through the backend's fused epilogues.

    The weight is read where it lives, on every call: there is no derived copy that a write through ``.data``
    (PEFT's LoRA merge, pruning, weight tying; ``.data`` writes do not bump the version counter) could leave
    stale. The cost, measured on a quiet 2-core AMD EPYC (AVX2): oneDNN then reorders the weight on every call,
    17-27% slower at (1,32) and ~20% on MiniLM's var-len batch, 0-7% at (8,128) (benchmarks/results/ab-trees.md).
    ``AutoModel.freeze()`` (inference) wins it back: a frozen Linear keeps the backend's prepacked form of its
    weight (``ops.prepack_linear``), keyed on the weight's storage, version counter, dtype and shape, so every
    tracked write (optimizer steps, ``torch.no_grad()`` in-place updates, ``load_state_dict``, re-pointing
    ``.data``) repacks it on the next call; only in-place writes through ``.data`` (which bypass the version
    counter) are not seen, as ``freeze()`` documents.

    ``Linear.fused(parts)`` (for ``fastbert.optimize``): the row-concatenation of other modules' (weight, bias)
    parameters, e.g. transformers' Q, K and V. Those parameters become views of one fused tensor, so every write
    to them (optimizer steps, ``.data`` writes, ``load_state_dict``) lands in the weight this layer reads; if one is
    re-pointed at other storage (``param.data = t``, ``.to()``), the next call sees it and fuses again.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._parts: list[tuple[Tensor, Tensor | None]] | None = None
        self._fused: tuple[Tensor, Tensor | None] | None = None
        self.frozen = False  # AutoModel.freeze(): keep the prepacked weight between calls
        self._pack: tuple[tuple, Any] | None = None  # (key, packed) while frozen

    @classmethod
    def fused(cls, parts: list[tuple[Tensor, Tensor | None]]) -> Linear:
        """A Linear over the row-concatenation of (weight, bias) ``parts``, which become views of it (no copy)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self._parts = list(parts)
        self._fused = None
        self.frozen = False
        self._pack = None
        return self

    def _fuse(self) -> tuple[Tensor, Tensor | None]:
        """Concatenate the parts' current values and make each part a view of the result."""
        weights = [w for w, _ in self._parts]
        biases = [b for _, b in self._parts]
        # (never inference tensors, even when the first call runs under inference_mode: the parts become views
        # of these, and the model must still train afterwards, e.g. after fastbert.restore)
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([w.detach() for w in weights])
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        rows = [w.shape[0] for w in weights]
        for w, view in zip(weights, weight.split(rows), strict=True):
            w.data = view
        if bias is not None:
            for b, view in zip(biases, bias.split(rows), strict=True):
                b.data = view
        self._fused = (weight, bias)
        return self._fused

    def _still_fused(self) -> bool:
        """Whether every part still is its view of the fused tensors (a few pointer compares)."""
        weight, bias = self._fused
        row = 0
        for w, b in self._parts:
            n = w.shape[0]
            if w.data_ptr() != weight[row].data_ptr() or w.dtype != weight.dtype or w.shape[1:] != weight.shape[1:]:
                return False
            if bias is not None and (b is None or b.data_ptr() != bias[row:].data_ptr() or b.dtype != bias.dtype):
                return False
            row += n
        return row == weight.shape[0]

    def resolved(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) as the kernels read them.

        Fused parts under autograd: the fused tensors are joined to the parts' Parameters by ``_JoinParts`` (no
        copy), so gradients land on the parts (transformers' Q, K, V) themselves.
        """
        if self._parts is None:
            return self.weight, self.bias
        if self._fused is None or not self._still_fused():
            self._fuse()
        weight, bias = self._fused
        if torch.is_grad_enabled():
            weights = [w for w, _ in self._parts]
            if any(w.requires_grad for w in weights):
                weight = _JoinParts.apply(weight, *weights)
            biases = [b for _, b in self._parts]
            if bias is not None and any(b.requires_grad for b in biases):
                bias = _JoinParts.apply(bias, *biases)
        return weight, bias

    def packed(self, weight: Tensor, ops: Backend) -> Any:
        """The prepacked form of ``weight`` for ``ops`` when frozen (packed on first use, again after any tracked
        write to the weight), else None. None under autocast too (the GEMM then reads a per-call cast of the
        weight, not the weight itself). While torch.compile traces: the pack of an earlier eager call, if any."""
        if not self.frozen or torch.is_autocast_enabled(weight.device.type):
            return None
        if torch.compiler.is_compiling():
            # The graph keeps the pack an eager call made as a constant (no version checks in the graph): freeze,
            # run once, then compile, and compile again after changing the weights.
            return self._pack[1] if self._pack is not None and self._pack[0][0] == ops.name else None
        # A fused Linear's parts (transformers' Q, K, V Parameters) are views of ``weight`` through ``.data``,
        # which gives each its own version counter: an in-place write to a part bumps only the part's.
        parts = tuple(_version(w) for w, _ in self._parts) if self._parts is not None else ()
        key = (ops.name, weight.data_ptr(), _version(weight), parts, weight.dtype, tuple(weight.shape), weight.device)
        if self._pack is None or self._pack[0] != key:
            self._pack = None  # the old pack is freed before the new one is made
            self._pack = (key, ops.prepack_linear(weight))
        return self._pack[1]

    def forward(self, x: Tensor, ops: Backend, act: str | None = None) -> Tensor:
        weight, bias = self.resolved()
        if self.training and act is not None:
            # Training: the activation as its own op, whose backward reads the saved GEMM output (the fused
            # epilogue would have to recompute the GEMM in backward).
            return ops.bias_activation(ops.linear(x, weight, bias), None, act)
        return ops.linear(x, weight, bias, act, self.packed(weight, ops))

    def residual_layernorm(
        self, x: Tensor, residual: Tensor, norm: nn.LayerNorm, ops: Backend, dropout: float = 0.0
    ) -> Tensor:
        """LayerNorm(dropout(x @ W.T + b) + residual): fused in inference; in training the GEMM, dropout and
        add + LayerNorm run as three ops, each with its own backward."""
        weight, bias = self.resolved()
        if self.training:
            h = (
                F.dropout(ops.linear(x, weight, bias), dropout, training=True)
                if dropout
                else ops.linear(x, weight, bias)
            )
            return ops.add_layernorm(h, residual, norm.weight, norm.bias, norm.eps)
        return ops.linear_residual_layernorm(
            x, weight, bias, residual, norm.weight, norm.bias, norm.eps, self.packed(weight, ops)
        )

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_pack": None}  # copies (deepcopy, pickle) pack again on first use

    def extra_repr(self) -> str:
        parts = self._parts or [(self.weight, self.bias)]
        return f"in_features={parts[0][0].shape[1]}, out_features={sum(w.shape[0] for w, _ in parts)}"


class _JoinParts(torch.autograd.Function):
    """The fused tensor, as a function of the Parameters that are views of it: its gradient is split into theirs.

    Forward returns the fused tensor itself (a view, no copy); backward hands each part its rows of the gradient.
    """

    @staticmethod
    def forward(ctx, fused: Tensor, *parts: Tensor) -> Tensor:
        ctx.rows = [p.shape[0] for p in parts]
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, *grad.split(ctx.rows))


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dropout = cfg.hidden_dropout
        e = cfg.embedding_size
        self.word = nn.Embedding(cfg.vocab_size, e)
        self.position = nn.Embedding(cfg.max_position_embeddings, e)
        self.token_type = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(e, eps=cfg.layer_norm_eps)
        self.project = Linear(e, cfg.hidden_size) if e != cfg.hidden_size else None

    def forward(self, batch: PackedBatch, ops: Backend) -> Tensor:
        """LayerNorm(word[ids] (or embeds) + position[pos] + type[tt]) for a batch with defaults filled: (T, hidden)."""
        type_w = self.token_type.weight if self.token_type is not None else None
        pos, tt = batch.position_ids, batch.token_type_ids
        if batch.inputs_embeds is not None:
            x = batch.inputs_embeds + self.position.weight[pos]  # (T, E)
            extra = type_w[tt] if type_w is not None else None
            h = ops.add_layernorm(x, extra, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            norm = self.norm
            h = ops.embeddings(
                batch.input_ids,
                pos,
                tt,
                self.word.weight,
                self.position.weight,
                type_w,
                norm.weight,
                norm.bias,
                norm.eps,
            )
        if self.training and self.dropout:
            h = F.dropout(h, self.dropout, training=True)
        return self.project(h, ops) if self.project is not None else h


class EncoderLayer(nn.Module):
    """Post-LN transformer layer on packed tokens: 5 fused calls (QKV, attention, out-proj+LN, FFN1+act, FFN2+LN)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.act = cfg.activation
        self.attention_dropout = cfg.attention_dropout
        self.output_dropout = cfg.attention_output_dropout
        self.ffn_dropout = cfg.hidden_dropout
        self.qkv = Linear(h, 3 * h)
        self.attn_out = Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = Linear(h, cfg.intermediate_size)
        self.ffn_out = Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(
        self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, ops: Backend, gemm_dtype: torch.dtype | None = None
    ) -> Tensor:
        """One layer on packed tokens x (T, hidden). ``gemm_dtype`` (bfloat16 inference, ``AutoModel.encode_batch``):
        x is the float32 residual stream of a bfloat16 model; GEMM inputs are cast to ``gemm_dtype``, and the
        residual + LayerNorm epilogues add the bfloat16 GEMM outputs into float32, which they return."""
        xg = x if gemm_dtype is None else x.to(gemm_dtype)
        qkv = self.qkv(xg, ops)  # (T, 3 * hidden)
        if self.training and self.attention_dropout:
            # The mask comes from a counter-based hash of this seed (reference.dropout_bits): drawn from torch's
            # generator, so torch.manual_seed repeats it, and backward regenerates it instead of storing it.
            seed = torch.randint(0, 2**32, (1,), dtype=torch.int64, device=x.device)
            ctx = ops.attention(qkv, cu_seqlens, max_seqlen, self.num_heads, self.scale, self.attention_dropout, seed)
        else:
            ctx = ops.attention(qkv, cu_seqlens, max_seqlen, self.num_heads, self.scale)  # (T, hidden)
        x = self.attn_out.residual_layernorm(ctx, x, self.attn_norm, ops, self.output_dropout)
        h = self.ffn_in(x if gemm_dtype is None else x.to(gemm_dtype), ops, act=self.act)  # (T, intermediate)
        return self.ffn_out.residual_layernorm(h, x, self.ffn_norm, ops, self.ffn_dropout)


def first_tokens(packed: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Each sequence's first packed token, (batch, hidden); zeros for empty sequences.

    Selected, not multiplied by a 0/1 mask: a neighbour's NaN must not leak into an empty sequence's row. An
    empty sequence reads a zero row appended after the last token, so nothing branches on total_tokens (a
    data-dependent size under torch.compile / torch.export).
    """
    total = packed.shape[0]
    nonempty = cu_seqlens[1:] > cu_seqlens[:-1]
    starts = torch.where(nonempty, cu_seqlens[:-1].long(), total)  # (batch,)
    return torch.cat([packed, packed.new_zeros(1, packed.shape[1])]).index_select(0, starts)


def refuse_onnx_export() -> None:
    """Raise a clear error inside ``torch.onnx.export``, which cannot translate fastbert's own ops."""
    if torch.onnx.is_in_onnx_export():
        raise NotImplementedError(
            "fastbert models cannot be exported to ONNX: their fused ops (torch.ops.fastbert.*) have no ONNX form. "
            "Export the transformers model instead: the one the checkpoint came from "
            "(transformers.AutoModel.from_pretrained(path)), or a model given to fastbert.optimize() after "
            "fastbert.restore(model). torch.export.export works on fastbert models."
        )


def training_unsupported(backend: Backend) -> str:
    """Why ``backend`` cannot train (its ops have no registered gradients), naming what can."""
    return (
        f"the {backend.name} backend's fused ops have no gradients registered in this build, so training through it "
        "would leave the encoder untouched; train with backend='torch' (model.set_backend('torch')) or on a backend "
        "whose ops are differentiable"
    )


def finish(out, return_dict: bool | None):
    """A transformers ModelOutput, or its tuple form for ``return_dict=False``."""
    return out if return_dict is not False else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class AutoModel(PreTrainedMixin, nn.Module):
    """The encoder: ``model(input_ids, attention_mask, ...)`` returns what the transformers base model returns.

    Task heads (``fastbert.heads``) are subclasses that add ``self.head``: one module tree, one backend, one
    state dict with the encoder's names plus ``head.*``.
    """

    task: str | None = None  # the head's task; None for the base model
    #: ``fastbert.quantize.quantize_``'s description of an int8 model; None for a float one
    quantization: dict | None = None

    def __init__(self, hf_config: Any, backend: str | None = "auto", device=None, add_pooling_layer: bool = True):
        super().__init__()
        self.config = hf_config
        self.cfg = cfg = EncoderConfig.from_hf(hf_config)
        self._backend_request = backend
        self._backend_for = (torch.device(device or "cpu").type, torch.get_default_dtype())
        self.backend: Backend = resolve_backend(backend, torch.device(device or "cpu"))
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        with_pooler = cfg.family.pooler and add_pooling_layer and self.uses_pooler()
        self.pooler = Linear(cfg.hidden_size, cfg.hidden_size) if with_pooler else None
        self.head = self.build_head()
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self._init_missing([name for name, _ in self.named_parameters()])
        self._tie_weights()
        self.train(False)  # built for inference, as transformers' from_pretrained returns models in eval()

    #: transformers.Trainer reads this: the losses here are means over the batch that ignore
    #: ``num_items_in_batch``, so the Trainer must scale them for gradient accumulation itself.
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True

    def train(self, mode: bool = True):
        """Training mode (dropout on) or ``eval()``; a backend whose ops cannot be differentiated is refused here.

        Every backend's fused ops have registered gradients (``fastbert.ops``); the check guards a build without
        them, where training would otherwise leave the encoder untouched without an error.
        """
        if mode and self.quantization is not None:
            raise NotImplementedError(
                "an int8 model (quantize='int8') is for inference only: train the float32 model, then quantize it"
            )
        if mode and self.frozen:
            raise NotImplementedError("this model is frozen for inference (freeze()): call unfreeze() to train it")
        if mode and not self.backend.trains:
            raise NotImplementedError(training_unsupported(self.backend))
        return super().train(mode)

    #: whether ``freeze()`` is in effect
    frozen: bool = False

    def freeze(self) -> AutoModel:
        """Inference mode that keeps every linear weight prepacked for the backend's GEMM; returns ``self``.

        Puts the model in ``eval()``; ``train()`` then raises until ``unfreeze()``. Outputs are unchanged. What it
        buys: the cpp backend's oneDNN GEMMs read a weight already in their blocked layout instead of reordering
        it on every call, which matters most for small batches (batch 1, short texts), where streaming the weights
        is most of the work (benchmarks/results/). The packed copies take as much memory again as the linear
        weights.

        Weights may still change while frozen: an optimizer step, an in-place update under ``torch.no_grad()``,
        ``load_state_dict`` or re-pointing ``param.data`` is seen (the weight's version counter or storage
        changes) and repacked on the next call, as are ``.to()`` and ``set_backend``. A write *in place through
        ``.data``* (``p.data += delta``, ``p.data.copy_(w)``) bypasses the version counter and is not seen: call
        ``freeze()`` again after such writes (each call drops the packs, which are made again on first use).
        """
        self.train(False)
        return self._set_frozen(True)

    def unfreeze(self) -> AutoModel:
        """Undo ``freeze()``: the packed weights are dropped and the model can train again; returns ``self``."""
        return self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> AutoModel:
        for module in self.modules():
            if isinstance(module, Linear):
                module.frozen = frozen
                module._pack = None  # made again on first use
        self.frozen = frozen
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in backward instead of keeping them (transformers' method and name).

        Applies in training (``model.train()``); dropout masks are the same in the recomputation (the RNG state is
        restored, so the attention seed drawn there is too). ``gradient_checkpointing_kwargs`` go to
        ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` defaults to False).
        """
        self._checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self._checkpoint_every = 1
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers 5.2x's name and arguments (what its Trainer calls): recompute every ``every_n_layers``-th
        layer in backward. ``offload=True`` (activations to the CPU) is not supported and raises."""
        if offload:
            raise NotImplementedError("activation_checkpointing_enable(offload=True) is not supported by fastbert")
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be an integer >= 1, got {every_n_layers!r}")
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)
        self._checkpoint_every = every_n_layers

    activation_checkpointing_disable = gradient_checkpointing_disable
    is_activation_checkpointing = is_gradient_checkpointing

    def uses_pooler(self) -> bool:
        """Whether this model builds the pooler when its family has one (a head may not need it)."""
        return True

    def build_head(self) -> nn.Module | None:
        """The task head's modules (None for the base model)."""
        return None

    # -- devices and backends --
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.follow_device()
        return out

    def follow_device(self) -> None:
        """Pick the backend again if the parameters moved to another device type or dtype (``.to()``, ``optimize``)."""
        params = list(self.parameters())
        if params and (params[0].device.type, params[0].dtype) != self._backend_for:
            self._backend_for = (params[0].device.type, params[0].dtype)
            self.backend = resolve_backend(self._backend_request, params[0].device, params[0].dtype)

    def set_backend(self, backend: str) -> None:
        """Switch backend ("torch", "cpp", "triton" or "auto"); raises if it cannot run on the model's device."""
        chosen = resolve_backend(backend, self.device, self.dtype)
        if self.training and not chosen.trains:
            raise NotImplementedError(training_unsupported(chosen))
        self.backend = chosen
        self._backend_request = backend
        self._backend_for = (self.device.type, self.dtype)

    # -- running --
    def encode_batch(self, batch: PackedBatch, hidden_states: list[Tensor] | None = None) -> Tensor:
        """The packed last hidden state (total_tokens, hidden) of a PackedBatch.

        A batch not built by ``inputs.prepare`` is validated first (``inputs.check_batch``: offsets, lengths, id
        ranges), so no kernel ever indexes with unchecked values. Missing positions / token types get their
        defaults (``inputs.with_defaults``). If ``hidden_states`` is a list, the embedding output and every
        layer's output are appended to it.
        """
        refuse_onnx_export()
        batch = inputs.with_defaults(self.cfg, inputs.check_batch(self.cfg, batch))
        ops = self.backend
        max_seqlen = batch.max_seqlen
        x = self.embeddings(batch, ops)  # (T, hidden)
        if hidden_states is not None:
            hidden_states.append(x)
        if self.quantization is not None:
            from . import quantize

            if not ops.int8:
                raise RuntimeError(
                    f"this int8 model is on the {ops.name} backend ({self.device}), which has no int8 ops; int8 runs "
                    "on the CPU (cpp or torch backend)"
                )
            return quantize.encode_layers(self, x, batch.cu_seqlens, max_seqlen, ops, hidden_states)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        stream = self.float32_stream(x, ops)
        if stream is not None:
            x = x.float()
        for i, layer in enumerate(self.layers):
            if recompute and i % self._checkpoint_every == 0:
                x = checkpoint(layer, x, batch.cu_seqlens, max_seqlen, ops, **self._checkpoint_kwargs)
            else:
                x = layer(x, batch.cu_seqlens, max_seqlen, ops, stream)
            if hidden_states is not None:
                hidden_states.append(x if stream is None else x.to(stream))
        return x if stream is None else x.to(stream)

    def float32_stream(self, x: Tensor, ops: Backend) -> torch.dtype | None:
        """bfloat16 when this forward keeps a bfloat16 model's residual stream in float32, else None.

        bfloat16 inference (eval, no gradients: ``torch.no_grad()`` / ``inference_mode``, as every fastbert text API
        and pipeline runs) on a backend whose residual + LayerNorm epilogue takes a float32 residual (cpp, torch):
        the GEMMs and attention still run in bfloat16, but the residual stream (each LayerNorm's output, which
        every later layer adds to) stays float32 and is rounded to bfloat16 once, at the end. Rounding that stream
        every layer was most of a bfloat16 model's error: on BERT-base (random weights, (8,128), emulated in
        float64) the max abs error against float32 is 2.5e-2 with bfloat16 GEMMs and attention alone and 6.1e-2
        when the stream is bfloat16 too (benchmarks/bf16_error_sources.py). Training and forwards that record
        gradients keep the whole model in bfloat16 (their backward kernels take one dtype).
        """
        if x.dtype != torch.bfloat16 or self.training or torch.is_grad_enabled() or not ops.float32_residual:
            return None
        return torch.bfloat16

    def forward_batch(self, batch: PackedBatch, hidden_states: list[Tensor] | None = None) -> Tensor:
        """The model's packed output for a PackedBatch: the last hidden state here, logits for a head."""
        return self.encode_batch(batch, hidden_states)

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
        """``forward_batch`` for packed ids (total_tokens,) and int32 cu_seqlens (batch + 1,), no padded tensor.

        position_ids default to 0.. within each sequence (RoBERTa: pad_token_id + 1 ..).
        """
        batch = PackedBatch.packed(input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids, inputs_embeds)
        return self.forward_batch(batch, hidden_states)

    def pool(self, packed: Tensor, cu_seqlens: Tensor) -> Tensor | None:
        """tanh(W h_first + b) on each sequence's first real token: (batch, hidden); empty rows pool zeros."""
        if self.pooler is None:
            return None
        return self.pooler(first_tokens(packed, cu_seqlens), self.backend, act="tanh")

    def _run_padded(
        self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, kwargs
    ) -> tuple[PackedBatch, Tensor, tuple[Tensor, ...] | None]:
        """Check and pack transformers-style arguments, run the encoder: (batch, packed output, padded hidden states)."""
        packed_cu = inputs.pop_packed_kwargs(kwargs)
        inputs.check_kwargs(kwargs)
        batch = inputs.prepare(
            self.cfg, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, self.device, packed_cu
        )
        if batch.inputs_embeds is not None:
            batch = batch.replace(inputs_embeds=batch.inputs_embeds.to(self.dtype))
        hidden = [] if output_hidden_states else None
        packed = self.encode_batch(batch, hidden)
        return batch, packed, (tuple(batch.pad(h) for h in hidden) if hidden is not None else None)

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
        from transformers import modeling_outputs

        batch, packed, hidden = self._run_padded(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states, kwargs
        )
        output_class = getattr(modeling_outputs, self.cfg.family.base_output)
        fields = {"last_hidden_state": batch.pad(packed), "hidden_states": hidden}
        if "pooler_output" in output_class.__dataclass_fields__:  # BERT, RoBERTa; not DistilBERT, ELECTRA
            fields["pooler_output"] = self.pool(packed, batch.cu_seqlens)
        return finish(output_class(**fields), return_dict)
