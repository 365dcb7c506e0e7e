"""The padding-free BERT-family encoder: its building blocks and the base model (task heads: ``fastbert.heads``).

Data flow: (batch, seqlen) ids + mask are unpadded once into a ``PackedBatch`` (``fastbert.inputs``): packed
tokens (total_tokens, hidden) with int32 cu_seqlens; every layer runs on packed tokens through the fused ops
of one backend (chosen when the model is built); attention is the only op that sees sequence boundaries;
outputs are re-padded at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import inputs, loading, padding
from .config import EncoderConfig
from .inputs import PackedBatch
from .ops import Backend, resolve_backend

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = act(x @ W.T + b) and LayerNorm(x @ W.T + b + residual) through the backend's fused epilogues.

    The weight is read where it lives, on every call: there is no derived copy that a write through ``.data``
    (PEFT's LoRA merge, pruning, weight tying; ``.data`` writes do not bump the version counter) could leave
    stale. A oneDNN-prepacked copy, kept until issue 15, measured 1-6% faster on the whole model (AMD EPYC,
    AVX2, 2 threads) and is not worth a silently wrong answer.

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

    @classmethod
    def fused(cls, parts: list[tuple[Tensor, Tensor | None]]) -> Linear:
        """A Linear over the row-concatenation of (weight, bias) ``parts``, which become views of it (no copy)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self._parts = list(parts)
        self._fused = None
        return self

    def _fuse(self) -> tuple[Tensor, Tensor | None]:
        """Concatenate the parts' current values and make each part a view of the result."""
        weights = [w for w, _ in self._parts]
        biases = [b for _, b in self._parts]
        with torch.no_grad():
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
        """(weight, bias) as the kernels read them."""
        if self._parts is None:
            return self.weight, self.bias
        if self._fused is None or not self._still_fused():
            return self._fuse()
        return self._fused

    def forward(self, x: Tensor, ops: Backend, act: str | None = None) -> Tensor:
        weight, bias = self.resolved()
        return ops.linear(x, weight, bias, act)

    def residual_layernorm(self, x: Tensor, residual: Tensor, norm: nn.LayerNorm, ops: Backend) -> Tensor:
        """LayerNorm(x @ W.T + b + residual), fused."""
        weight, bias = self.resolved()
        return ops.linear_residual_layernorm(x, weight, bias, residual, norm.weight, norm.bias, norm.eps)

    def extra_repr(self) -> str:
        parts = self._parts or [(self.weight, self.bias)]
        return f"in_features={parts[0][0].shape[1]}, out_features={sum(w.shape[0] for w, _ in parts)}"


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
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


def finish(out, return_dict: bool | None):
    """A transformers ModelOutput, or its tuple form for ``return_dict=False``."""
    return out if return_dict is not False else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class AutoModel(nn.Module):
    """The encoder: ``model(input_ids, attention_mask, ...)`` returns what the transformers base model returns.

    Task heads (``fastbert.heads``) are subclasses that add ``self.head``: one module tree, one backend, one
    state dict with the encoder's names plus ``head.*``.
    """

    task: str | None = None  # the head's task; None for the base model

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
        if not any(p.is_meta for p in self.parameters()):
            self._init_missing([name for name, _ in self.named_parameters()])
        self._tie_weights()

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
        self.backend = resolve_backend(backend, self.device, self.dtype)
        self._backend_request = backend
        self._backend_for = (self.device.type, self.dtype)

    # -- loading and saving --
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = "auto",
        output_loading_info: bool = False,
        **kwargs,
    ):
        """Load a transformers checkpoint (local folder or hub id) unchanged.

        device: where the model runs (default CPU); dtype: parameter dtype (default float32; a name such as
        "float16", or "auto" for the config's ``dtype``); backend: "auto" (triton on CUDA, cpp on CPU when
        built, else torch; torch for a dtype those lack), or "torch" / "cpp" / "triton".
        Missing head weights are initialised and reported (as transformers does); missing encoder weights,
        shape mismatches and corrupt files raise ``CheckpointError``.

        Other keyword arguments are read as transformers' ``from_pretrained`` reads them (``_loading_options``):
        hub ones (``revision``, ``token``, ``cache_dir``, ...) go to the download, ``subfolder`` and ``config``
        are honoured, ``torch_dtype`` is ``dtype`` (deprecated, as in transformers), a one-device ``device_map``
        is ``device``, config attributes (``num_labels=5``) update the config; options that do not apply here
        (``attn_implementation``, ``low_cpu_mem_usage``, ...) are accepted with a one-time log note, options
        that would change what is loaded raise ``ValueError``, and anything else raises ``TypeError``.
        """
        hub, kwargs = cls._hub_options(kwargs)
        path = loading.resolve_path(path_or_id, **hub)
        subfolder = kwargs.pop("subfolder", "")
        if subfolder:
            path = path / subfolder
        config = kwargs.pop("config", None)
        hf_config = copy.deepcopy(config) if config is not None else loading.load_hf_config(path)
        device, dtype = cls._loading_options(hf_config, device, dtype, kwargs)
        cfg = EncoderConfig.from_hf(hf_config)
        state, unexpected, origin = loading.hf_to_fastbert(loading.read_state_dict(path), cfg, cls.task)
        loading.check_fits(cfg, state, str(path), origin)  # before anything is built: a config can lie about sizes
        with torch.device("meta"):
            model = cls._class_for(hf_config)(hf_config, backend="torch")
        expected = model.state_dict()
        loading.check_shapes(expected, state, origin, str(path))
        unexpected += [k for k in state if k not in expected]
        state = {k: v for k, v in state.items() if k in expected}
        missing = [k for k in expected if k not in state and not model._is_tied(k)]
        optional, required = loading.split_missing(missing)
        if required:
            names = list(loading.fastbert_to_hf({n: expected[n] for n in required}, cfg, None, with_prefix=False))
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
        model = model.to(device=device or "cpu", dtype=dtype)
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
        self.config.architectures = [self._hf_auto_class()._model_mapping[type(self.config)].__name__]
        self.config.save_pretrained(str(out))
        save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})

    @staticmethod
    def _hf_auto_class():
        """The transformers Auto class whose mapping names this model's architecture."""
        import transformers

        return transformers.AutoModel

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
        if ops.name == "cpp" and padding.tracing():
            # Traced, max_seqlen is the symbolic padded width; the C++ op's schema takes an `int`, which would
            # specialise the graph on it (one compile per seqlen). 0 asks the op to find the longest sequence in
            # cu_seqlens itself, which it reads anyway to check it.
            max_seqlen = 0
        x = self.embeddings(batch, ops)  # (T, hidden)
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens, max_seqlen, ops)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

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
        inputs.check_kwargs(kwargs)
        batch = inputs.prepare(
            self.cfg, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, self.device
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

    # -- transformers' from_pretrained options --
    #: Passed to the hub download (``huggingface_hub.snapshot_download``); unused for a local folder, as in transformers.
    _HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")
    #: Accepted and ignored, with a one-time log note saying why (transformers' tuning of its own loader).
    _IGNORED_OPTIONS = {
        "attn_implementation": "fastbert runs its own fused attention; choose its kernels with backend=",
        "experts_implementation": "fastbert models have no experts",
        "low_cpu_mem_usage": "fastbert always builds on the meta device and loads each tensor once",
        "trust_remote_code": "fastbert never runs code from a checkpoint",
        "use_safetensors": "fastbert reads model.safetensors when present, else pytorch_model.bin",
        "weights_only": "fastbert always reads pytorch_model.bin with weights_only=True",
        "disable_mmap": "fastbert reads safetensors with their default memory mapping",
        "tqdm_class": "fastbert shows no progress bar while loading",
        "use_kernels": "fastbert's kernels are its backends (backend=)",
        "kernel_config": "fastbert's kernels are its backends (backend=)",
        "allow_all_kernels": "fastbert's kernels are its backends (backend=)",
        "fusion_config": "fastbert fuses its ops itself",
        "generation_config": "fastbert models are encoders and do not generate",
        "max_memory": "fastbert places the whole model on one device (device=)",
        "offload_folder": "fastbert places the whole model on one device (device=)",
        "offload_buffers": "fastbert places the whole model on one device (device=)",
        "offload_state_dict": "transformers 5 ignores it too",
        "mirror": "transformers 5 ignores it too",
        "from_tf": "transformers 5 ignores it too",
        "from_flax": "transformers 5 ignores it too",
        "_fast_init": "transformers 5 ignores it too",
    }
    #: transformers' internal flags (pipelines and Auto classes pass them): accepted without a note.
    _INTERNAL_OPTIONS = ("_from_pipeline", "_from_auto", "_commit_hash")
    #: Options that change what is loaded: accepted at transformers' default value, any other raises ValueError.
    _UNSUPPORTED_OPTIONS = {
        "state_dict": None,
        "quantization_config": None,
        "gguf_file": None,
        "variant": None,
        "key_mapping": None,
        "adapter_kwargs": None,
        "adapter_name": "default",
        "device_mesh": None,
        "distributed_config": None,
        "tp_plan": None,
        "tp_size": None,
        "ignore_mismatched_sizes": False,
    }
    _noted: set[str] = set()  # the ignored options already noted in this process

    @classmethod
    def _hub_options(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split from_pretrained's keyword arguments into (hub download options, the rest)."""
        hub = {k: v for k, v in kwargs.items() if k in cls._HUB_OPTIONS}
        return hub, {k: v for k, v in kwargs.items() if k not in cls._HUB_OPTIONS}

    @classmethod
    def _loading_options(
        cls, hf_config: Any, device: torch.device | str | None, dtype: Any, kwargs: dict[str, Any]
    ) -> tuple[torch.device | str | None, torch.dtype | None]:
        """Read transformers' from_pretrained options (``from_pretrained``'s docstring); return (device, dtype).

        Config attributes among ``kwargs`` are set on ``hf_config``, as transformers does. Ignored options are
        noted once per name through the ``fastbert.modeling`` logger (not ``warnings``): like transformers' own
        notes on ignored loading options they are advice, not a fault of the caller, and must not become errors
        under ``-W error`` in code that passes them for transformers' sake.
        """
        unknown = []
        torch_dtype = kwargs.pop("torch_dtype", None)
        if torch_dtype is not None:  # transformers 5: deprecated alias, dtype wins when both are given
            if "torch_dtype" not in AutoModel._noted:
                AutoModel._noted.add("torch_dtype")
                logger.warning("fastbert: `torch_dtype` is deprecated! Use `dtype` instead!")
            dtype = dtype if dtype is not None else torch_dtype
        device = cls._device_from_map(kwargs.pop("device_map", None), device)
        for name, value in kwargs.items():
            if name in cls._INTERNAL_OPTIONS:
                continue
            if name in cls._IGNORED_OPTIONS:
                if name not in AutoModel._noted:
                    AutoModel._noted.add(name)
                    reason = cls._IGNORED_OPTIONS[name]
                    logger.warning("fastbert: from_pretrained ignores %s=%r: %s", name, value, reason)
            elif name in cls._UNSUPPORTED_OPTIONS:
                if value is not None and value != {} and value != cls._UNSUPPORTED_OPTIONS[name]:
                    raise ValueError(
                        f"from_pretrained({name}=...) is not supported by fastbert (it loads plain transformers "
                        f"checkpoints as they are); leave it at {cls._UNSUPPORTED_OPTIONS[name]!r}"
                    )
            elif hasattr(hf_config, name) and not callable(getattr(hf_config, name)):
                setattr(hf_config, name, value)  # num_labels=5, id2label=..., problem_type=...: as transformers
            else:
                unknown.append(name)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unexpected keyword arguments {unknown} (neither loading options "
                f"nor attributes of {type(hf_config).__name__})"
            )
        return device, cls._dtype_option(dtype, hf_config)

    @staticmethod
    def _dtype_option(dtype: Any, hf_config: Any) -> torch.dtype | None:
        """A torch dtype from ``dtype=``: a dtype, its name ("float16"), or "auto" (the config's ``dtype``)."""
        if dtype == "auto":
            dtype = getattr(hf_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, its name, or 'auto'; got {dtype!r}")
        return dtype

    @staticmethod
    def _device_from_map(device_map: Any, device: torch.device | str | None) -> torch.device | str | None:
        """The one device a ``device_map`` places the whole model on ("cpu", 0, torch.device, {"": d})."""
        if device_map is None:
            return device
        target = device_map
        if isinstance(device_map, dict) and list(device_map) == [""]:
            target = device_map[""]
        try:
            if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
                target = torch.device("cuda", target)
            elif isinstance(target, (str, torch.device)):
                target = torch.device(target)
            else:
                raise TypeError
        except (TypeError, RuntimeError):
            raise ValueError(
                f"device_map={device_map!r} is not supported: fastbert places the whole model on one device; pass "
                "device= (or a one-device device_map such as 'cpu', 'cuda:0', 0 or {'': 'cuda:0'})"
            ) from None
        if device is not None and torch.device(device) != target:
            raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
        return target

    @classmethod
    def _class_for(cls, hf_config: Any) -> type[AutoModel]:
        """The class to build for ``hf_config``: the subclass named as transformers names its model (e.g.
        ``BertForSequenceClassification``, defined in ``fastbert.heads``), so that transformers' checks by class
        name (pipelines) accept it; ``cls`` itself when there is none."""
        return AutoModel._named.get((cls, getattr(hf_config, "model_type", None)), cls)

    _named: dict[tuple[type, str], type] = {}  # (fastbert Auto class, model_type) -> named subclass

    # -- transformers' embedding API --
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters, tied ones counted once; as transformers' ``num_parameters``."""
        embeddings = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not (exclude_embeddings and name in embeddings) and (p.requires_grad or not only_trainable)
        )

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table, (vocab_size, embedding_size)."""
        return self.embeddings.word

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding table (as transformers; a tied masked-LM decoder is tied to it at once)."""
        if not isinstance(value, nn.Embedding) or value.embedding_dim != self.cfg.embedding_size:
            raise ValueError(
                f"set_input_embeddings takes an nn.Embedding of width {self.cfg.embedding_size}, got {value!r}"
            )
        self.embeddings.word = value
        self.cfg = dataclasses.replace(self.cfg, vocab_size=value.num_embeddings)  # the ids check reads it
        self._tie_weights()

    def get_output_embeddings(self) -> nn.Module | None:
        """The output projection onto the vocabulary (the masked-LM decoder); None for other models."""
        return None

    @torch.no_grad()
    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary, as transformers' ``resize_token_embeddings`` does.

        Kept rows are copied; new rows are drawn like transformers draws them (same random numbers for the same
        seed): from a normal distribution with the old rows' mean and 1e-9 x their covariance
        (``mean_resizing=True``), or normal(0, initializer_range). ``config.vocab_size`` is updated and a masked-LM
        decoder and its bias are resized with the table (tied: new bias entries 0). Returns the embedding module.
        """
        old = self.embeddings.word
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int):
                raise ValueError(f"pad_to_multiple_of must be an integer, got {pad_to_multiple_of!r}")
            wanted = old.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-wanted // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if new_num_tokens != old.num_embeddings:
            fresh = nn.Embedding(new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
            self._resized_rows(old.weight, fresh.weight, mean_resizing)
            old.weight.data = fresh.weight.data  # the same Parameter: a tied decoder follows
            old.num_embeddings = new_num_tokens
            self._resize_output_embeddings(new_num_tokens, mean_resizing)
        self.config.vocab_size = new_num_tokens
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_num_tokens)
        self._tie_weights()
        return old

    def _resize_output_embeddings(self, new_num_tokens: int, mean_resizing: bool) -> None:
        """Resize what projects onto the vocabulary (the masked-LM head overrides this)."""

    def _resized_rows(self, old: Tensor, new: Tensor, mean_resizing: bool) -> None:
        """Fill ``new`` (rows, width) from ``old``: kept rows copied, added rows drawn as transformers does."""
        old_n, new_n = old.shape[0], new.shape[0]
        added = new_n - old_n
        if added > 0 and not mean_resizing:
            new.normal_(0.0, self.cfg.initializer_range)
        elif added > 0:
            rows = old.float()
            mean = rows.mean(0)
            centered = rows - mean
            covariance = centered.T @ centered / old_n
            if torch.distributions.constraints.positive_definite.check(1e-9 * covariance).all():
                dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
                new[-added:] = dist.sample((added,)).to(old.dtype)
            else:
                new[-added:] = mean[None].expand(added, -1).to(old.dtype)
        keep = min(old_n, new_n)
        new[:keep] = old[:keep]
