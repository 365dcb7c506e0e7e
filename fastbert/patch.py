"""optimize(hf_model): run an existing transformers model through fastbert, in place and reversibly.

The transformers object stays what it was (save_pretrained, pipelines, Trainer keep working): its base model
(``model.bert``, ``model.roberta``, ...) gets a fastbert encoder built over the *same* parameter tensors (the
Q/K/V parameters become views of one fused weight, so nothing is copied and no write to them can be missed) and
its ``forward`` is routed there.
Heads stay transformers' own modules. ``restore(model)`` undoes it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from . import loading
from .config import EncoderConfig
from .modeling import AutoModel, Linear

_ATTR = "_fastbert_encoder"


def _base_of(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if getattr(base, "config", None) is None:
        raise TypeError(f"optimize() takes a transformers PreTrainedModel, got {type(model).__name__}")
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
    return enc(*args, **kwargs)


def optimize(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make a transformers BERT-family model run on fastbert's fused, padding-free path; returns the same object.

    Parameters are shared, not copied. Outputs keep transformers' classes. Call ``restore(model)`` to undo.
    """
    base = _base_of(model)
    if _ATTR in base.__dict__:
        return model
    enc = _shared_encoder(base, backend)
    object.__setattr__(base, _ATTR, enc)  # not a submodule: stays out of state_dict / save_pretrained
    base.forward = types.MethodType(_fast_forward, base)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: the model runs transformers' own forward again."""
    base = _base_of(model)
    base.__dict__.pop(_ATTR, None)
    base.__dict__.pop("forward", None)
    return model


def is_optimized(model: nn.Module) -> bool:
    return _ATTR in _base_of(model).__dict__
