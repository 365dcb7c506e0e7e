"""optimize(model): run an existing transformers or sentence-transformers model through fastbert, in place and
reversibly.

A ``sentence_transformers.SentenceTransformer`` or ``sentence_transformers.CrossEncoder`` is optimised through the
transformers model(s) it holds (its ``Transformer`` module's ``auto_model``); the sentence-transformers object, its
pooling, prompts and ``encode``/``predict`` stay its own. sentence-transformers is never imported here: its objects
are recognised by class name and module.

The transformers object stays what it was (save_pretrained, pipelines, Trainer, training keep working): its base model
(``model.bert``, ``model.roberta``, ...) gets a fastbert encoder built over the *same* parameter tensors (the
Q/K/V parameters become views of one fused weight, so nothing is copied and no write to them can be missed) and
its ``forward`` is routed there.
Heads stay transformers' own modules. ``restore(model)`` undoes it.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import loading
from .config import EncoderConfig, UnsupportedModelError
from .modeling import AutoModel, Linear

_ATTR = "_fastbert_encoder"


#: What optimize() accepts, for error messages.
SUPPORTED = (
    "a transformers PreTrainedModel of a supported family (BERT, RoBERTa, XLM-R, DistilBERT, ELECTRA, MiniLM/BGE/E5 "
    "and their task heads), a sentence_transformers.SentenceTransformer, or a sentence_transformers.CrossEncoder"
)

#: sentence-transformers classes whose transformers models optimize() reaches.
_ST_CLASSES = ("SentenceTransformer", "CrossEncoder")


class NotOptimizableError(UnsupportedModelError, TypeError):
    """A transformers model of a family fastbert does not run: a TypeError (what optimize() raises for anything it
    cannot optimise) and still an UnsupportedModelError, as loading raises for the same checkpoint."""


def _is_sentence_transformers(obj: object) -> bool:
    """A SentenceTransformer / CrossEncoder (or a subclass), recognised without importing sentence_transformers."""
    return any(
        cls.__name__ in _ST_CLASSES and cls.__module__.split(".")[0] == "sentence_transformers"
        for cls in type(obj).__mro__
    )


def _is_transformers_model(obj: object) -> bool:
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(obj).__mro__
    )


def _transformers_models(st_model: nn.Module) -> list[nn.Module]:
    """The transformers models inside a sentence-transformers object (outermost ones; usually exactly one)."""

    def walk(module: nn.Module) -> Iterator[nn.Module]:
        for child in module.children():
            if _is_transformers_model(child):
                yield child
            else:
                yield from walk(child)

    found = list(walk(st_model))
    if not found:
        raise TypeError(
            f"optimize(): this {type(st_model).__name__} holds no transformers model (an ONNX/OpenVINO backend or "
            f"static embeddings?); fastbert optimises {SUPPORTED}"
        )
    return found


def _targets(model: object) -> list[nn.Module]:
    """The transformers models optimize()/restore()/is_optimized() act on."""
    if _is_sentence_transformers(model):
        return _transformers_models(model)  # type: ignore[arg-type]
    if isinstance(model, nn.Module) and _is_transformers_model(model):
        return [model]
    raise TypeError(f"optimize() takes {SUPPORTED}; got {type(model).__module__}.{type(model).__qualname__}")


def _base_of(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if getattr(base, "config", None) is None:
        raise TypeError(f"optimize() takes {SUPPORTED}; got {type(model).__name__} without a config")
    return base


def _set(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, attr = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, attr, param)


def _shared_encoder(base: nn.Module, backend: str) -> AutoModel:
    """A fastbert AutoModel whose parameters are ``base``'s own Parameter objects."""
    hf_config = base.config
    cfg = EncoderConfig.from_hf(hf_config)
    with torch.device("meta"):
        enc = AutoModel(hf_config, backend="torch", add_pooling_layer=getattr(base, "pooler", None) is not None)
    rules, _ = loading.rules_for(cfg, None)
    qkv: dict[int, dict[str, nn.Parameter]] = {}
    for hf_name, param in base.named_parameters():
        ours = loading.rename(rules, hf_name, forward=True)
        if ours is None:
            raise loading.CheckpointError(f"optimize(): no fastbert counterpart for {type(base).__name__}.{hf_name}")
        parts = ours.split(".")
        if parts[0] == "layers" and parts[2] in ("q", "k", "v"):
            qkv.setdefault(int(parts[1]), {})[f"{parts[2]}.{parts[3]}"] = param
        else:
            _set(enc, ours, param)
    for n, layer in enumerate(enc.layers):
        p = qkv[n]
        layer.qkv = Linear.fused([(p[f"{x}.weight"], p.get(f"{x}.bias")) for x in "qkv"])
    left = [name for name, t in enc.named_parameters() if t.is_meta]
    if left:
        raise loading.CheckpointError(f"optimize(): {type(base).__name__} lacks parameters for {left[:5]}")
    enc.set_backend(backend)
    return enc


def _fast_forward(self, *args, **kwargs):
    enc = getattr(self, _ATTR)
    enc.follow_device()  # the transformers model may have been moved: its parameters are the encoder's
    if enc.training != self.training:  # model.train() / eval() on the transformers object (Trainer calls them)
        enc.train(self.training)  # dropout as the transformers model applies it; refused where ops can't train
    # gradient_checkpointing_enable() on the transformers model marks its encoder modules; follow it.
    # (transformers 5.2x names the property is_activation_checkpointing and deprecates the older name)
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(self), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    enc.gradient_checkpointing = bool(getattr(self, flag, False))
    if enc.gradient_checkpointing and not hasattr(enc, "_checkpoint_kwargs"):
        enc.gradient_checkpointing_enable()
    return enc(*args, **kwargs)


def optimize(
    model: nn.Module,
    backend: str = "auto",
    quantize: str | None = None,
    calibration: Any = None,
    keep=(),
    freeze: bool = False,
) -> nn.Module:
    """Make a BERT-family model run on fastbert's fused, padding-free path; returns the same object.

    ``model`` is a transformers PreTrainedModel (its base model is optimised, heads stay transformers'), or a
    sentence-transformers ``SentenceTransformer`` / ``CrossEncoder`` (the transformers model inside it is; its
    ``encode`` / ``predict`` / ``similarity`` are unchanged). Parameters are shared, not copied. Outputs keep
    transformers' classes. Call ``restore(model)`` to undo. Anything else raises TypeError naming what is supported.

    ``quantize="int8"``: the encoder runs int8 GEMMs on the CPU (``fastbert.quantize``: int8 copies of the
    weights; the transformers parameters stay as they are, for ``restore``). Inference only: ``model.train()``
    then raises. ``calibration`` (batches, or texts for a sentence-transformers model, tokenized with its
    tokenizer) and ``keep`` are ``quantize_``'s arguments.

    ``freeze=True``: inference with the linear weights kept prepacked for the backend's GEMM (``AutoModel.freeze``:
    fastest at small batches; in-place writes through ``param.data`` need another ``optimize`` after ``restore``).
    Takes a model in eval() mode; ``model.train()`` then raises until ``restore``.
    """
    from . import quantize as _quantize

    _quantize.check_mode(quantize)
    tokenizer = _st_tokenizer(model) if quantize is not None else None
    pending = []
    for target in _targets(model):
        base = _base_of(target)
        done = base.__dict__.get(_ATTR)
        if done is not None and (
            (quantize is not None and getattr(done, "quantization", None) is None) or (freeze and not done.frozen)
        ):
            # optimising again is a no-op; an option the first call did not apply would be silently ignored
            raise ValueError(
                "this model is already optimised without the quantize= / freeze= asked for now: call "
                "fastbert.restore(model) first, then optimize it with them"
            )
        if done is None:
            try:
                pending.append((base, _shared_encoder(base, backend)))
            except UnsupportedModelError as exc:
                raise NotOptimizableError(f"optimize(): {exc}. fastbert optimises {SUPPORTED}") from exc
    inference_only = "quantize='int8'" if quantize is not None else "freeze=True" if freeze else None
    if inference_only is not None:
        for base, _ in pending:
            if base.training:
                raise ValueError(f"optimize({inference_only}) takes a model in eval() mode (it is inference only)")
    for _base, enc in pending:
        if inference_only is not None:
            enc.eval()
        if quantize is not None:
            _quantize.quantize_(enc, quantize, calibration, keep, tokenizer=tokenizer)
        if freeze:
            enc.freeze()
    for base, enc in pending:  # every model checked before any is changed
        object.__setattr__(base, _ATTR, enc)  # not a submodule: stays out of state_dict / save_pretrained
        base.forward = types.MethodType(_fast_forward, base)
        if inference_only is not None:
            base.train = types.MethodType(_inference_only_train, base)
            base.__dict__[_INFERENCE_ONLY] = inference_only
    return model


_INFERENCE_ONLY = "_fastbert_inference_only"


def _inference_only_train(self, mode: bool = True):
    """``train()`` of a transformers model optimised for inference only (``quantize="int8"``, ``freeze=True``):
    eval() works, train() raises."""
    if mode:
        why = self.__dict__.get(_INFERENCE_ONLY, "for inference only")
        raise NotImplementedError(
            f"this model was optimised with {why}, which is for inference only: fastbert.restore(model) gives back "
            "the transformers model to train"
        )
    return type(self).train(self, False)


def _st_tokenizer(model: object):
    """texts -> batch with a sentence-transformers object's tokenizer (calibration texts); None for others."""
    tok = getattr(model, "tokenizer", None) if _is_sentence_transformers(model) else None
    if tok is None:
        return None
    return lambda texts: dict(tok(texts, padding=True, truncation=True, return_tensors="pt"))


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the model (or the transformers model inside a sentence-transformers one) runs transformers'
    own forward again."""
    for target in _targets(model):
        base = _base_of(target)
        base.__dict__.pop(_ATTR, None)
        base.__dict__.pop("forward", None)
        base.__dict__.pop("train", None)
        base.__dict__.pop(_INFERENCE_ONLY, None)
    return model


def is_optimized(model: nn.Module) -> bool:
    """True when ``optimize`` has been applied (to every transformers model inside a sentence-transformers one)."""
    return all(_ATTR in _base_of(t).__dict__ for t in _targets(model))
