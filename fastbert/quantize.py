"""int8 inference: ``quantize="int8"`` on ``from_pretrained``, ``SentenceEncoder``, ``CrossEncoder`` and ``optimize``.

What is quantized: the four GEMMs of every encoder layer (QKV, attention output, FFN in, FFN out). Embeddings,
attention, LayerNorms, the residual stream, the pooler and task heads stay float32.

- Weights: symmetric int8 per output channel, quantized once here (``quantize_weight``) and packed once for
  oneDNN. On a CPU whose int8 GEMM adds u8 x s8 pairs in saturating int16 (AVX2, AVX-512 without VNNI; the
  cpp backend probes it, ``int8_info() == "onednn-7bit"``) the weights use 7 bits ([-63, 63]), which keeps the
  products exact; with VNNI / AMX they use 8.
- Activations: asymmetric uint8 per row (token), with scales that follow the data, computed in the epilogue of
  the op that produces them (the LayerNorm, the activation), so quantizing costs no extra pass over memory.
- Smoothing (SmoothQuant, alpha 0.5): each GEMM input channel j is divided by s_j = sqrt(max|x_j| / max|w_j|),
  and the weight's column multiplied by it, so outlier channels of the activations move into the weights.
  The division is folded into the producing op's quantization (``smooth_inv``), the multiplication into the
  weights here. max|x_j| comes from one float32 forward over calibration inputs: by default a fixed synthetic
  batch of random vocabulary ids (no data needed), or the caller's texts / batches (``calibration=``).

The arithmetic is ``fastbert.reference.int8_*``; the cpp backend computes it with oneDNN's int8 GEMM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import inputs
from .modeling import Linear, _version

#: The linears of an encoder layer that int8 quantizes (``keep=`` names a subset to leave in float32).
LINEARS = ("qkv", "attn_out", "ffn_in", "ffn_out")
MODES = ("int8",)
SMOOTH_ALPHA = 0.5


class QuantizedLinear(nn.Module):
    """y = dequantized(q @ weight_q.T) + bias: an int8 weight (out, in), its per-channel scales and row sums.

    Buffers (in ``state_dict``): ``weight_q`` int8, ``weight_scale`` / ``weight_sum`` float32 (out,), ``bias``
    float32 (out,) or None, ``smooth_inv`` float32 (in,) or None (what the producing op multiplies its output by
    before quantizing it for this GEMM). ``packed`` is oneDNN's form of ``weight_q``, rebuilt when it changes.
    """

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None, smooth_inv: Tensor | None):
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_sum", weight_q.sum(1, dtype=torch.int32).float())
        self.register_buffer("bias", bias)
        self.register_buffer("smooth_inv", smooth_inv)
        self._packed: tuple[tuple, Any] | None = None

    @property
    def in_features(self) -> int:
        return self.weight_q.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_q.shape[0]

    def packed(self, ops) -> Any:
        """oneDNN's packed weight for backend ``ops``, packed once (again if ``weight_q`` was replaced or written).
        While torch.compile traces: the pack made by an eager call, if any (the graph holds it as a constant, so
        run the model once before compiling it), else None (the op then reads ``weight_q`` as it is)."""
        if torch.compiler.is_compiling():
            return self._packed[1] if self._packed is not None and self._packed[0][0] == ops.name else None
        key = (ops.name, self.weight_q.data_ptr(), _version(self.weight_q), tuple(self.weight_q.shape))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, ops.int8_prepack(self.weight_q))
        return self._packed[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_weight(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(weight_q int8, scale float32 (out,)): symmetric per output channel, |weight_q| <= 2**(bits-1) - 1."""
    if bits not in (7, 8):
        raise ValueError(f"weight bits must be 7 or 8, got {bits!r}")
    top = 2 ** (bits - 1) - 1
    w = weight.detach().double()
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp(-top, top).to(torch.int8)
    return q, scale.float()


def weight_bits(ops) -> int:
    """8, or 7 where this CPU's int8 GEMM saturates pairs of u8 x s8 products (``int8_info() == "onednn-7bit"``)."""
    return 7 if ops.int8_info() == "onednn-7bit" else 8


def describe(model: nn.Module) -> dict[str, Any] | None:
    """What ``quantize_`` did to ``model`` (None for a float model): the mode, GEMM kind, weight bits, etc."""
    return getattr(model, "quantization", None)


# ----------------------------------------------------------------------------------------------------------
# Calibration: per-channel max |x| of every quantized GEMM's input, from one float32 forward
# ----------------------------------------------------------------------------------------------------------


def synthetic_batch(cfg, batch: int = 16, seqlen: int = 128, seed: int = 0) -> dict[str, Tensor]:
    """A fixed batch of random vocabulary ids (the default calibration: no data needed), lengths 8..seqlen."""
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    seqlen = max(1, min(seqlen, cfg.max_position_embeddings - 2))  # RoBERTa's positions start at pad + 1
    low = min(1000, vocab // 2)  # skip the reserved / unused slots at the start of BERT-style vocabularies
    ids = torch.randint(low, vocab, (batch, seqlen), generator=g)
    lengths = torch.linspace(8, seqlen, batch).round().long().clamp(max=seqlen)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _calibration_batches(model, calibration: Any, tokenizer: Any) -> list[Mapping[str, Tensor]]:
    if calibration is None:
        return [synthetic_batch(model.cfg)]
    if isinstance(calibration, Mapping):
        return [calibration]
    items = list(calibration) if isinstance(calibration, Iterable) else None
    if not items:
        raise ValueError(
            "calibration= takes a list of texts, a batch (a mapping with input_ids and attention_mask) or a list "
            f"of batches; got {type(calibration).__name__}"
        )
    if all(isinstance(t, str) for t in items):
        if tokenizer is None:
            raise ValueError(
                "calibration texts need a tokenizer: pass tokenized batches instead (input_ids, attention_mask)"
            )
        return [tokenizer(items[i : i + 64]) for i in range(0, len(items), 64)]
    if all(isinstance(b, Mapping) for b in items):
        return items
    raise ValueError("calibration= items must all be texts (str) or all batches (mappings with input_ids)")


def folder_tokenizer(folder) -> Any:
    """texts -> padded batch with the tokenizer of a model folder, built on first use (calibration texts only)."""

    def tokenize(texts: list[str]) -> dict[str, Tensor]:
        from .tokenize import TextTokenizer

        tok = TextTokenizer.from_folder(str(folder), model_limit=512)
        return tok.pad(tok.encode(texts))

    return tokenize


def text_tokenizer(tok) -> Any:
    """texts -> padded batch with a fastbert TextTokenizer."""
    return lambda texts: tok.pad(tok.encode(texts))


@torch.no_grad()
def collect_absmax(model, batches: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Per layer, per linear name: max |x_j| over every token of ``batches`` of that linear's input (float32)."""
    ops = model.backend
    stats: list[dict[str, Tensor]] = [{} for _ in model.layers]

    def note(i: int, name: str, x: Tensor) -> None:
        m = x.abs().amax(0) if x.shape[0] else x.new_zeros(x.shape[1])
        stats[i][name] = torch.maximum(stats[i][name], m) if name in stats[i] else m

    for b in batches:
        batch = inputs.prepare(
            model.cfg, b["input_ids"], b.get("attention_mask"), b.get("token_type_ids"), None, None, model.device
        )
        batch = inputs.with_defaults(model.cfg, inputs.check_batch(model.cfg, batch))
        x = model.embeddings(batch, ops)
        for i, layer in enumerate(model.layers):
            note(i, "qkv", x)
            w, bias = layer.qkv.resolved()
            qkv = ops.linear(x, w, bias)
            ctx = ops.attention(qkv, batch.cu_seqlens, batch.max_seqlen, layer.num_heads, layer.scale)
            note(i, "attn_out", ctx)
            w, bias = layer.attn_out.resolved()
            x = ops.linear_residual_layernorm(
                ctx, w, bias, x, layer.attn_norm.weight, layer.attn_norm.bias, layer.attn_norm.eps
            )
            note(i, "ffn_in", x)
            w, bias = layer.ffn_in.resolved()
            h = ops.linear(x, w, bias, layer.act)
            note(i, "ffn_out", h)
            w, bias = layer.ffn_out.resolved()
            x = ops.linear_residual_layernorm(
                h, w, bias, x, layer.ffn_norm.weight, layer.ffn_norm.bias, layer.ffn_norm.eps
            )
    return stats


# ----------------------------------------------------------------------------------------------------------
# Quantizing a model
# ----------------------------------------------------------------------------------------------------------


def check_mode(quantize: Any) -> str | None:
    """``quantize`` as given to from_pretrained / optimize: None, or a supported mode (else ValueError)."""
    if quantize is None or quantize is False:
        return None
    if quantize not in MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {', '.join(map(repr, MODES))} or None")
    return quantize


def _check_keep(keep: Iterable[str]) -> tuple[str, ...]:
    keep = tuple(keep)
    bad = [k for k in keep if k not in LINEARS]
    if bad:
        raise ValueError(f"keep= names linears to leave in float32, from {', '.join(LINEARS)}; got {bad}")
    return keep


@torch.no_grad()
def quantize_(
    model,
    mode: str = "int8",
    calibration: Any = None,
    keep: Iterable[str] = (),
    tokenizer: Any = None,
    alpha: float = SMOOTH_ALPHA,
):
    """Quantize a fastbert model's encoder linears in place (see the module docstring); returns the model.

    ``calibration``: None (a synthetic batch), texts (tokenized with ``tokenizer``), a batch or a list of
    batches. ``keep``: linear names (``LINEARS``) left in float32 in every layer. Inference only: ``train()``
    raises on the result. The model must be float32 on the CPU, on a backend with int8 ops (cpp or torch).
    """
    check_mode(mode)
    keep = _check_keep(keep)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError("this model is already quantized")
    if model.training:
        raise ValueError("quantize_() takes a model in eval() mode: int8 models are for inference only")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"int8 quantization takes a float32 model on the CPU, got {model.dtype} on {model.device} "
            "(load with dtype=torch.float32, device='cpu')"
        )
    ops = model.backend
    if not ops.int8:
        raise ValueError(f"the {ops.name} backend has no int8 ops; int8 runs on the cpp or torch backend (CPU)")
    stats = collect_absmax(model, _calibration_batches(model, calibration, tokenizer))
    bits = weight_bits(ops)
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            if name in keep:
                continue
            lin: Linear = getattr(layer, name)
            weight, bias = lin.resolved()
            weight = weight.detach().float()
            x_max = stats[i][name].float().clamp_min(1e-5)
            w_max = weight.abs().amax(0).clamp_min(1e-5)
            smooth = (x_max**alpha / w_max ** (1 - alpha)).clamp(1e-2, 1e2) if alpha > 0 else None
            wq, scale = quantize_weight(weight * smooth if smooth is not None else weight, bits)
            b = bias.detach().float().clone() if bias is not None else None
            setattr(layer, name, QuantizedLinear(wq, scale, b, (1.0 / smooth) if smooth is not None else None))
    model.quantization = {
        "mode": mode,
        "gemm": ops.int8_info(),
        "weight_bits": bits,
        "weights": "symmetric int8 per output channel",
        "activations": "asymmetric uint8 per token",
        "smoothing_alpha": alpha,
        "calibration": "synthetic (random vocabulary ids)" if calibration is None else "caller's inputs",
        "float32_linears": list(keep),
    }
    return model


# ----------------------------------------------------------------------------------------------------------
# The int8 layer
# ----------------------------------------------------------------------------------------------------------

Quantized = tuple[Tensor, Tensor, Tensor]  # (q uint8 (rows, n), scale float32 (rows,), zp int32 (rows,))


def _smooth(consumer: nn.Module | None) -> Tensor | None:
    return consumer.smooth_inv if isinstance(consumer, QuantizedLinear) else None


def _wants_int8(consumer: nn.Module | None) -> bool:
    return isinstance(consumer, QuantizedLinear)


def _input(lin: QuantizedLinear, x: Tensor | None, xq: Quantized | None, ops) -> Quantized:
    return xq if xq is not None else ops.int8_quantize(x, lin.smooth_inv)


def linear(lin, x, xq, ops, act=None, then=None) -> tuple[Tensor | None, Quantized | None]:
    """act(lin(x)): (float32 output or None, its quantized form for ``then`` or None)."""
    if isinstance(lin, QuantizedLinear):
        q = _input(lin, x, xq, ops)
        args = (*q, lin.weight_q, lin.weight_scale, lin.weight_sum, lin.bias)
        if _wants_int8(then):
            return None, ops.int8_linear_quantize(*args, act, _smooth(then), lin.packed(ops))
        return ops.int8_linear(*args, act, lin.packed(ops)), None
    weight, bias = lin.resolved()
    y = ops.linear(x, weight, bias, act, lin.packed(weight, ops))  # a kept float Linear (keep=...)
    return y, (ops.int8_quantize(y, _smooth(then)) if _wants_int8(then) else None)


def residual_layernorm(lin, x, xq, residual, norm, ops, then=None) -> tuple[Tensor, Quantized | None]:
    """LayerNorm(lin(x) + residual): (float32 output, its quantized form for ``then`` or None)."""
    if isinstance(lin, QuantizedLinear):
        q = _input(lin, x, xq, ops)
        args = (
            *q,
            lin.weight_q,
            lin.weight_scale,
            lin.weight_sum,
            lin.bias,
            residual,
            norm.weight,
            norm.bias,
            norm.eps,
        )
        if _wants_int8(then):
            y, *yq = ops.int8_linear_residual_layernorm_quantize(*args, _smooth(then), lin.packed(ops))
            return y, tuple(yq)
        return ops.int8_linear_residual_layernorm(*args, lin.packed(ops)), None
    weight, bias = lin.resolved()
    y = ops.linear_residual_layernorm(
        x, weight, bias, residual, norm.weight, norm.bias, norm.eps, lin.packed(weight, ops)
    )
    return y, (ops.int8_quantize(y, _smooth(then)) if _wants_int8(then) else None)


def encode_layers(model, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, ops, hidden_states=None) -> Tensor:
    """The encoder layers of an int8 model on packed tokens ``x`` (the embeddings' output)."""
    layers = list(model.layers)
    first = layers[0].qkv if layers else None
    xq = ops.int8_quantize(x, _smooth(first)) if _wants_int8(first) else None
    for i, layer in enumerate(layers):
        nxt = layers[i + 1].qkv if i + 1 < len(layers) else None
        qkv, _ = linear(layer.qkv, x, xq, ops)
        ctx = ops.attention(qkv, cu_seqlens, max_seqlen, layer.num_heads, layer.scale)
        ctx_q = ops.int8_quantize(ctx, _smooth(layer.attn_out)) if _wants_int8(layer.attn_out) else None
        x, xq = residual_layernorm(layer.attn_out, ctx, ctx_q, x, layer.attn_norm, ops, then=layer.ffn_in)
        h, hq = linear(layer.ffn_in, x, xq, ops, act=layer.act, then=layer.ffn_out)
        x, xq = residual_layernorm(layer.ffn_out, h, hq, x, layer.ffn_norm, ops, then=nxt)
        if hidden_states is not None:
            hidden_states.append(x)
    return x
