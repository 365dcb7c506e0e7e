"""``fastbert bench``: how much faster is fastbert than what you run today, and are the outputs the same?

One report, one method. A *system* is one way of running an encoder (fastbert on one backend, transformers
eager or sdpa, ``torch.compile`` of the sdpa model, ONNX Runtime, OpenVINO). For every model, dtype and input
size the report:

1. builds the inputs once (random token ids; variable-length batches draw lengths uniformly with a fixed seed
   and are padded to their longest sequence, as a tokenizer with ``padding=True`` would);
2. runs every system once and compares its output with transformers eager in fp32 (max abs error over the
   valid tokens, padding excluded);
3. times the systems interleaved (round r runs A B C, round r+1 runs B C A, ...), so that load drift on a
   shared machine hits all of them alike, and reports median and spread of the per-call time;
4. derives tokens/s (real tokens, not padding), TFLOP/s (one FLOP count for every system, see
   ``encoder_flops``) and speed-ups as the median of the per-round paired ratios.

Included in a timed call: the model forward from padded ``input_ids``/``attention_mask`` already on the
device to the padded last hidden state (fastbert unpads and re-pads inside that call; ONNX Runtime and
OpenVINO see the padded batch, and OpenVINO's output is copied out of its reused buffer). Excluded:
tokenisation, host-to-device copies of the inputs, model loading and compilation (the first call is timed
separately as ``first_call_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SCHEMA = "fastbert-bench/1"

# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A built-in BERT shape, instantiated with random weights (no download)."""

    label: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 30522
    max_positions: int = 512


BUILTIN_MODELS: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny", hidden=32, layers=2, heads=4, intermediate=64, vocab=1000, max_positions=128),
    "minilm-l6": ModelShape("MiniLM-L6", hidden=384, layers=6, heads=12, intermediate=1536),
    "bert-base": ModelShape("BERT-base", hidden=768, layers=12, heads=12, intermediate=3072),
    "bert-large": ModelShape("BERT-large", hidden=1024, layers=24, heads=16, intermediate=4096),
}

_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")


@dataclass
class BenchModel:
    """A checkpoint on disk plus the numbers the report needs (FLOPs, valid ids and lengths)."""

    label: str
    path: str
    random_weights: bool
    model_type: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_len: int
    pad_id: int


def build_random_model(shape: ModelShape, directory: str | Path, seed: int = 0) -> str:
    """Save a randomly initialised transformers ``BertModel`` of ``shape`` under ``directory``; return its path."""
    from transformers import BertConfig, BertModel

    path = Path(directory) / shape.label
    if not (path / "config.json").exists():
        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=shape.max_positions,
        )
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(path)
    return str(path)


def load_bench_model(name_or_path: str, workdir: str | Path) -> BenchModel:
    """A built-in shape name (saved with random weights into ``workdir``) or a local checkpoint directory."""
    from transformers import AutoConfig

    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        shape = BUILTIN_MODELS[key]
        path, label, random_weights = build_random_model(shape, workdir), shape.label, True
    elif Path(name_or_path).is_dir():
        resolved = Path(name_or_path).resolve()
        path, label, random_weights = str(resolved), f"{resolved.parent.name}/{resolved.name}", False
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {', '.join(BUILTIN_MODELS)} or a local checkpoint directory"
        )
    cfg = AutoConfig.from_pretrained(path)
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "hidden_dim", None)
    if intermediate is None:
        raise ValueError(f"{path}: config has neither intermediate_size nor hidden_dim; cannot count FLOPs")
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    max_len = cfg.max_position_embeddings
    if cfg.model_type in _ROBERTA_LIKE:  # positions start after padding_idx
        max_len -= pad_id + 1
    return BenchModel(
        label=label,
        path=path,
        random_weights=random_weights,
        model_type=cfg.model_type,
        hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        intermediate=int(intermediate),
        vocab=cfg.vocab_size,
        max_len=int(max_len),
        pad_id=int(pad_id),
    )


def encoder_flops(lengths: Sequence[int], layers: int, hidden: int, intermediate: int) -> int:
    """Useful FLOPs of an encoder stack over the real tokens of sequences of these lengths.

    Per layer and token: the four H x H projections and the two H x I feed-forward GEMMs, 2 * (4 H^2 + 2 H I);
    per layer and sequence of length s: QK^T and PV, 4 * s^2 * H. For a dense (B, S) batch this is the usual
    ``2 L T (4 H^2 + 2 H I) + 4 L T S H`` (= L T (24 H^2 + 4 S H) when I = 4 H). Embeddings, LayerNorm,
    softmax, activations and the pooler are not counted. Padding is never counted, so a system that computes
    on padding does more work than this for the same result.
    """
    tokens = sum(lengths)
    squares = sum(s * s for s in lengths)
    return 2 * layers * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * layers * squares * hidden


# --------------------------------------------------------------------------------------------------------
# Input sizes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """``batch`` sequences of ``seqlen`` tokens, or of lengths drawn from U[min_len, seqlen] when varlen."""

    batch: int
    seqlen: int
    min_len: int | None = None

    @property
    def varlen(self) -> bool:
        return self.min_len is not None

    @property
    def label(self) -> str:
        if self.varlen:
            return f"varlen {self.batch}x[{self.min_len},{self.seqlen}]"
        return f"({self.batch},{self.seqlen})"

    def lengths(self, seed: int = 0) -> list[int]:
        if not self.varlen:
            return [self.seqlen] * self.batch
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(self.min_len, self.seqlen + 1, (self.batch,), generator=gen).tolist()

    def make_inputs(self, model: BenchModel, seed: int = 0) -> tuple[Tensor, Tensor, list[int]]:
        """(input_ids, attention_mask) int64 (batch, longest length), padded with the model's pad id."""
        lengths = self.lengths(seed)
        if max(lengths) > model.max_len:
            raise ValueError(
                f"size {self.label}: {max(lengths)} tokens exceed {model.label}'s limit of {model.max_len}"
            )
        gen = torch.Generator().manual_seed(seed + 1)
        low = min(1000, model.vocab // 2)  # above the special tokens of every BERT-family vocabulary
        ids = torch.randint(low, model.vocab, (self.batch, max(lengths)), generator=gen)
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        ids = ids.masked_fill(~mask, model.pad_id)
        return ids, mask.long(), lengths


def parse_size(text: str) -> Size:
    """``8x128`` (dense) or ``32x8-128`` (varlen: 32 sequences with lengths uniform in [8, 128])."""
    try:
        batch, rest = text.lower().split("x")
        if "-" in rest:
            lo, hi = rest.split("-")
            size = Size(int(batch), int(hi), int(lo))
        else:
            size = Size(int(batch), int(rest))
    except ValueError:
        raise ValueError(f"bad size {text!r}: write BATCHxSEQ (8x128) or BATCHxMIN-MAX (32x8-128)") from None
    if size.batch < 1 or size.seqlen < 1 or (size.min_len is not None and not 1 <= size.min_len <= size.seqlen):
        raise ValueError(f"bad size {text!r}: batch and lengths must be >= 1 and MIN <= MAX")
    return size


# --------------------------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class System:
    """One way of running an encoder. ``run`` maps padded (ids, mask) to the padded last hidden state."""

    name: str = "?"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this system cannot run here (None when it can); checked before ``prepare``."""
        return None

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        raise NotImplementedError

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop the loaded model (systems are prepared once per model and dtype)."""
        self.__dict__.pop("model", None)


class FastbertSystem(System):
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastbert-{backend}"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            import fastbert.modeling  # noqa: F401
            from fastbert import ops
        except Exception as exc:
            return f"fastbert.modeling failed to import: {type(exc).__name__}: {exc}"
        return ops.unavailable_reason(self.backend, device)

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        import fastbert

        self.model = fastbert.AutoModel.from_pretrained(model.path, device=device, dtype=dtype, backend=self.backend)
        self.model.eval()
        actual = self.model.backend.name
        if actual != self.backend:
            raise RuntimeError(f"asked for backend {self.backend!r} but the model runs {actual!r}")

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TransformersSystem(System):
    """transformers ``AutoModel`` with an attention implementation, optionally under ``torch.compile``."""

    def __init__(self, attn: str, compile: bool = False):
        self.attn = attn
        self.compile = compile
        self.name = f"compile-{attn}" if compile else f"hf-{attn}"

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(model.path, dtype=dtype, attn_implementation=self.attn).to(device).eval()
        self.model = torch.compile(hf) if self.compile else hf

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _LastHiddenState(torch.nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state, the two-input graph the ONNX systems run."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_onnx(model: BenchModel, workdir: str) -> str:
    """Export transformers eager fp32 to ONNX once per model (TorchScript exporter, opset 17, dynamic axes)."""
    path = Path(workdir) / "onnx" / model.label / "model.onnx"
    if path.exists():
        return str(path)
    from transformers import AutoModel

    path.parent.mkdir(parents=True, exist_ok=True)
    # eval() on the wrapper too: a fresh Module is in training mode and the exporter would trace dropout.
    wrapper = _LastHiddenState(AutoModel.from_pretrained(model.path, attn_implementation="eager")).eval()
    ids = torch.full((2, 8), min(1000, model.vocab - 1), dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python control flow on shapes
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            opset_version=17,
            dynamo=False,
        )
    return str(path)


class OnnxRuntimeSystem(System):
    name = "onnxruntime"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "benchmarked on CPU only"
        if dtype != torch.float32:
            return "runs the fp32 export only"
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"not installed ({exc.name}); pip install 'fastbert[bench]'"
        return None

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads would keep burning the cores into the next system's interleaved call.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.model = ort.InferenceSession(export_onnx(model, workdir), options, providers=["CPUExecutionProvider"])

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(self.model.run(["last_hidden_state"], feed)[0])


class OpenVinoSystem(System):
    name = "openvino"
    _HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "benchmarked on CPU only"
        if dtype not in self._HINTS:
            return f"no {dtype} inference precision on CPU here (fp32 and bf16 only)"
        try:
            import onnx  # noqa: F401
            import openvino  # noqa: F401
        except ImportError as exc:
            return f"not installed ({exc.name}); pip install 'fastbert[bench]'"
        return None

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        import openvino

        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": self._HINTS[dtype]}
        compiled = openvino.Core().compile_model(export_onnx(model, workdir), "CPU", config)
        self.model = compiled.create_infer_request()
        self.output = compiled.output(0)

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        result = self.model.infer({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(result[self.output].copy())  # the request reuses its output buffer


BASELINES = ("hf-eager", "hf-sdpa", "compile-sdpa", "onnxruntime", "openvino")
FASTBERT_BACKENDS = ("torch", "cpp", "triton")
ALL_SYSTEM_NAMES = tuple(f"fastbert-{b}" for b in FASTBERT_BACKENDS) + BASELINES


def make_system(name: str) -> System:
    if name.startswith("fastbert-") and name[len("fastbert-") :] in FASTBERT_BACKENDS:
        return FastbertSystem(name[len("fastbert-") :])
    factories: dict[str, Callable[[], System]] = {
        "hf-eager": lambda: TransformersSystem("eager"),
        "hf-sdpa": lambda: TransformersSystem("sdpa"),
        "compile-sdpa": lambda: TransformersSystem("sdpa", compile=True),
        "onnxruntime": OnnxRuntimeSystem,
        "openvino": OpenVinoSystem,
    }
    if name not in factories:
        choices = ", ".join(("fastbert", "all", *ALL_SYSTEM_NAMES))
        raise ValueError(f"unknown system {name!r}; choose from {choices}")
    return factories[name]()


def expand_systems(names: Iterable[str], device: torch.device) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand ``fastbert`` / ``all`` aliases. Returns (system names, [(name, why not run)])."""
    out: list[str] = []
    notes: list[tuple[str, str]] = []
    for name in names:
        if name in ("fastbert", "all"):
            for backend in FASTBERT_BACKENDS:
                if backend == "triton" and device.type == "cpu":
                    notes.append((f"fastbert-{backend}", "not timed on CPU: the Triton interpreter is for correctness"))
                else:
                    out.append(f"fastbert-{backend}")
            if name == "all":
                out.extend(BASELINES)
        else:
            make_system(name)  # validates the name
            out.append(name)
    return list(dict.fromkeys(out)), notes


# --------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------


def max_abs_error(output: Tensor, reference: Tensor, mask: Tensor) -> float:
    """max |output - reference| over valid tokens (mask set); NaN if the output has a NaN or a wrong shape."""
    if output.shape != reference.shape:
        return math.nan
    diff = (output.detach().float().cpu() - reference)[mask.bool()]
    if diff.numel() == 0:
        return 0.0
    if not torch.isfinite(diff).all():
        return math.nan
    return float(diff.abs().max())


@dataclass
class Row:
    """One system at one (model, dtype, size): its timing, throughput and error."""

    model: str
    dtype: str
    size: str
    batch: int
    seqlen: int
    tokens: int
    padded_tokens: int
    flops: int
    system: str
    status: str = "ok"
    message: str = ""
    first_call_ms: float = math.nan
    inner: int = 1
    samples_ms: list[float] = field(default_factory=list)
    median_ms: float = math.nan
    q25_ms: float = math.nan
    q75_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    tokens_per_s: float = math.nan
    tflops: float = math.nan
    speedup_vs_eager: float | None = None
    speedup_vs_best_other: float | None = None
    best_other: str | None = None
    max_abs_err: float = math.nan


def _quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _timed(system: System, ids: Tensor, mask: Tensor, device: torch.device, inner: int) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls (device synchronised at both ends)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        system.run(ids, mask)
    synchronize(device)
    return (time.perf_counter() - start) / inner


def measure_cell(
    systems: dict[str, System],
    ids: Tensor,
    mask: Tensor,
    reference: Tensor,
    device: torch.device,
    rows: dict[str, Row],
    rounds: int,
    warmup: int,
    min_sample_s: float,
    tick: Callable[[str, int], None],
) -> None:
    """Check and time every system on one input batch, interleaved; fills ``rows`` in place."""
    live: list[str] = []
    for name, system in systems.items():  # first call: correctness and cold start (compilation, caches)
        tick(name, 1)
        row = rows[name]
        try:
            synchronize(device)
            start = time.perf_counter()
            out = system.run(ids, mask)
            synchronize(device)
            row.first_call_ms = (time.perf_counter() - start) * 1e3
            row.max_abs_err = max_abs_error(out, reference, mask)
            del out
            live.append(name)
        except Exception as exc:  # one failing system must not sink the report
            row.status, row.message = "error", f"{type(exc).__name__}: {exc}"
            tick(name, warmup + rounds)  # the calls it will not make
    per_call: dict[str, float] = {}
    for r in range(warmup + rounds):
        if r == warmup:  # repeat very short calls inside one sample so the timer's resolution does not matter
            for name in live:
                estimate = per_call.get(name, rows[name].first_call_ms / 1e3)
                rows[name].inner = max(1, min(1000, math.ceil(min_sample_s / max(estimate, 1e-7))))
        shift = r % max(len(live), 1)  # rotate the order: A B C, B C A, C A B, ...
        for name in live[shift:] + live[:shift]:
            row = rows[name]
            tick(name, 1)
            if row.status != "ok":
                continue
            try:
                if r < warmup:
                    per_call[name] = _timed(systems[name], ids, mask, device, 1)
                else:
                    row.samples_ms.append(_timed(systems[name], ids, mask, device, row.inner) * 1e3)
            except Exception as exc:
                row.status, row.message = "error", f"{type(exc).__name__}: {exc}"
                row.samples_ms.clear()


def summarize(rows: list[Row]) -> None:
    """Fill medians, spread, throughput and paired speed-ups of the rows of one cell."""
    ok = [r for r in rows if r.status == "ok" and r.samples_ms]
    for r in ok:
        r.median_ms = statistics.median(r.samples_ms)
        r.q25_ms, r.q75_ms = _quantile(r.samples_ms, 0.25), _quantile(r.samples_ms, 0.75)
        r.min_ms, r.max_ms = min(r.samples_ms), max(r.samples_ms)
        r.tokens_per_s = r.tokens / (r.median_ms / 1e3)
        r.tflops = r.flops / (r.median_ms / 1e3) / 1e12

    def paired(num: Row, den: Row) -> float:  # median over rounds of t_num / t_den, robust to load drift
        return statistics.median(a / b for a, b in zip(num.samples_ms, den.samples_ms, strict=True))

    eager = next((r for r in ok if r.system == "hf-eager"), None)
    for r in ok:
        if eager is not None:
            r.speedup_vs_eager = paired(eager, r)
        others = [o for o in ok if o is not r]
        if others:
            best = min(others, key=lambda o: o.median_ms)
            r.best_other, r.speedup_vs_best_other = best.system, paired(best, r)


# --------------------------------------------------------------------------------------------------------
# Presets and the run
# --------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "models": ["minilm-l6"],
        "sizes": ["1x128", "8x128", "16x8-128"],
        "systems": ["fastbert", "hf-eager", "hf-sdpa"],
        "rounds": 5,
        "warmup": 1,
    },
    "default": {
        "models": ["bert-base"],
        "sizes": ["1x128", "8x128", "16x8-128"],
        "systems": ["fastbert", "hf-eager", "hf-sdpa"],
        "rounds": 5,
        "warmup": 1,
    },
    "full": {
        "models": ["minilm-l6", "bert-base", "bert-large"],
        "sizes": ["1x32", "1x128", "8x128", "32x128", "8x512", "32x8-128"],
        "systems": ["all"],
        "rounds": 7,
        "warmup": 2,
    },
}


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _git_sha() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None, None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Device, versions and git state: what a reader needs to reproduce or compare a result."""
    sha, dirty = _git_sha()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("fastbert", "torch", "transformers", "onnxruntime", "onnx", "openvino", "numpy")
        },
        "git_sha": sha,
        "git_dirty": dirty,
    }


@contextlib.contextmanager
def _hf_progress_bars_off() -> Iterator[None]:
    """One progress bar, ours: silence transformers' per-checkpoint "Loading weights" bars for the run."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_report(
    models: Sequence[str],
    sizes: Sequence[Size],
    systems: Sequence[str],
    dtypes: Sequence[str],
    device: torch.device,
    threads: int,
    rounds: int,
    warmup: int,
    min_sample_s: float = 0.02,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
    workdir: str | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark and return the report (the JSON document ``--json`` writes)."""
    from tqdm import tqdm

    torch.set_num_threads(threads)
    names, notes = expand_systems(systems, device)
    skipped = [{"system": name, "reason": why} for name, why in notes]
    start_load = _load()
    if start_load is not None and start_load > (os.cpu_count() or 1) - threads + 0.5:
        print(f"fastbert bench: the machine is busy (load average {start_load:.1f} on {os.cpu_count()} CPUs): timings "
              f"will be noisy; with {threads} threads on shared cores, OpenMP waits can dominate (try --threads 1)",
              file=sys.stderr)  # fmt: skip
    started = datetime.now(timezone.utc)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fastbert-bench-") as tmp, _hf_progress_bars_off():
        workdir = workdir or tmp
        bench_models = [load_bench_model(m, workdir) for m in models]
        calls_per_cell = 1 + warmup + rounds
        bar = tqdm(
            total=len(bench_models) * len(dtypes) * len(sizes) * len(names) * calls_per_cell,
            file=sys.stderr,
            disable=None if progress else True,  # None: off when stderr is not a terminal
            unit="call",
            dynamic_ncols=True,
        )
        for model in bench_models:
            inputs = {size: size.make_inputs(model, seed) for size in sizes}
            references = _references(model, inputs, device)
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                prepared: dict[str, System] = {}
                for name in names:
                    system = make_system(name)
                    reason = system.unavailable(device, dtype)
                    if reason is None:
                        bar.set_description(f"{model.label} {dtype_name}: loading {name}")
                        try:
                            system.prepare(model, dtype, device, threads, workdir)
                            prepared[name] = system
                            continue
                        except Exception as exc:
                            reason = f"failed to load: {type(exc).__name__}: {exc}"
                    skipped.append({"system": name, "reason": f"{model.label} {dtype_name}: {reason}"})
                    bar.update(len(sizes) * calls_per_cell)
                for size in sizes:
                    ids, mask, lengths = inputs[size]
                    cell = {
                        name: Row(
                            model=model.label,
                            dtype=dtype_name,
                            size=size.label,
                            batch=size.batch,
                            seqlen=max(lengths),
                            tokens=sum(lengths),
                            padded_tokens=ids.numel(),
                            flops=encoder_flops(lengths, model.layers, model.hidden, model.intermediate),
                            system=name,
                        )
                        for name in prepared
                    }

                    def tick(name: str, n: int, _label: str = f"{model.label} {dtype_name} {size.label}") -> None:
                        bar.set_description(f"{_label} {name}")
                        bar.update(n)

                    measure_cell(
                        prepared,
                        ids.to(device),
                        mask.to(device),
                        references[size],
                        device,
                        cell,
                        rounds,
                        warmup,
                        min_sample_s,
                        tick,
                    )
                    summarize(list(cell.values()))
                    rows.extend(cell.values())
                for system in prepared.values():
                    system.release()
        bar.close()
    meta = environment(device, threads)
    meta.update(
        {
            "command": command,
            "started": started.isoformat(timespec="seconds"),
            "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
            "load_average_1min": {"start": start_load, "end": _load()},
            "models": {m.label: {k: v for k, v in asdict(m).items() if k != "path"} for m in bench_models},
            "rounds": rounds,
            "warmup": warmup,
            "seed": seed,
        }
    )
    return {"schema": SCHEMA, "meta": meta, "results": [asdict(r) for r in rows], "skipped": skipped}


def _references(
    model: BenchModel, inputs: dict[Size, tuple[Tensor, Tensor, list[int]]], device: torch.device
) -> dict[Size, Tensor]:
    """transformers eager fp32 outputs (on CPU) for every input: the yardstick for every system's error."""
    system = TransformersSystem("eager")
    system.prepare(model, torch.float32, device, torch.get_num_threads(), "")
    refs = {size: system.run(ids.to(device), mask.to(device)).float().cpu() for size, (ids, mask, _) in inputs.items()}
    system.release()
    return refs


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _fmt_ms(ms: float) -> str:
    return "-" if math.isnan(ms) else f"{ms:.3g}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _fmt_rate(x: float) -> str:
    if math.isnan(x):
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt_err(x: float) -> str:
    return "NaN" if math.isnan(x) else f"{x:.1e}"


TABLE_HEADER = ("system", "median ms", "IQR ms", "tokens/s", "TFLOP/s", "vs hf-eager", "vs best other", "max abs err")


def table_rows(rows: Iterable[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append((r["system"], "error", "", "", "", "", "", r["message"][:80]))
            continue
        other = f"{_fmt_x(r['speedup_vs_best_other'])} ({r['best_other']})" if r["best_other"] else "-"
        out.append(
            (
                r["system"],
                _fmt_ms(r["median_ms"]),
                _fmt_ms(r["q75_ms"] - r["q25_ms"]),
                _fmt_rate(r["tokens_per_s"]),
                f"{r['tflops']:.3g}",
                _fmt_x(r["speedup_vs_eager"]),
                other,
                _fmt_err(r["max_abs_err"]),
            )
        )
    return out


def _cells(report: dict[str, Any]) -> list[tuple[tuple[str, str, str], list[dict[str, Any]]]]:
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in report["results"]:
        cells.setdefault((r["model"], r["dtype"], r["size"]), []).append(r)
    return list(cells.items())


def _cell_title(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    return (
        f"{r['model']} {r['dtype']} {r['size']}: {r['tokens']} tokens ({r['padded_tokens']} with padding), "
        f"{r['flops'] / 1e9:.3g} GFLOP"
    )


def summary_tables(report: dict[str, Any]) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """Per model and dtype: (title, header, rows) with one row per system and "ms (speed-up vs hf-eager)" per size."""
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["results"]:
        panels.setdefault((r["model"], r["dtype"]), []).append(r)
    out = []
    for (model, dtype), rows in panels.items():
        sizes = list(dict.fromkeys(r["size"] for r in rows))
        body = []
        for system in dict.fromkeys(r["system"] for r in rows):
            mine = {r["size"]: r for r in rows if r["system"] == system}
            cells = []
            for size in sizes:
                r = mine.get(size)
                if r is None or r["status"] != "ok":
                    cells.append("-" if r is None else "error")
                else:
                    cells.append(f"{_fmt_ms(r['median_ms'])} ({_fmt_x(r['speedup_vs_eager'])})")
            errors = [r["max_abs_err"] for r in mine.values() if r["status"] == "ok"]
            worst = max(errors, key=lambda e: math.inf if math.isnan(e) else e) if errors else math.nan
            body.append((system, *cells, _fmt_err(worst)))
        out.append((f"{model} {dtype}: median ms (speed-up vs hf-eager)", ("system", *sizes, "max abs err"), body))
    return out


def _aligned(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    return [
        "  ".join(
            str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()
        for values in (header, *body)
    ]


def render_text(report: dict[str, Any]) -> str:
    meta = report["meta"]
    v = meta["versions"]
    lines = [
        f"fastbert bench on {meta['device_name']} ({meta['device']}, {meta['threads']} threads); "
        f"torch {v['torch']}, transformers {v['transformers']}, git {(meta['git_sha'] or '?')[:10]}",
    ]
    for _, rows in _cells(report):
        lines += ["", _cell_title(rows), *_aligned(TABLE_HEADER, table_rows(rows))]
    for title, header, body in summary_tables(report):
        lines += ["", f"summary, {title}", *_aligned(header, body)]
    if report["skipped"]:
        lines += ["", "not run:"] + [f"  {s['system']}: {s['reason']}" for s in report["skipped"]]
    lines += [
        "",
        "max abs err: vs transformers eager fp32, valid tokens only. Speed-ups: median of per-round paired ratios.",
    ]
    return "\n".join(lines)


METHOD = """\
- Inputs: random token ids (seed {seed}); a varlen batch draws each length uniformly from [min, max] and is padded to
  its longest sequence. Built-in models have random weights (transformers `BertModel` init, seed 0), so speed depends
  only on shape; a local checkpoint is used as is.
- A timed call runs the model from padded `input_ids` + `attention_mask` (already on the device) to the padded last
  hidden state. fastbert unpads and re-pads inside the call and computes on real tokens only; transformers,
  ONNX Runtime and OpenVINO compute on the padded batch (what a user runs). Tokenisation, host-device copies of
  the inputs, loading, export and compilation are excluded (the first call is recorded as `first_call_ms` in JSON).
- Systems are interleaved: each of {rounds} rounds runs every system once, in rotated order, after {warmup} warm-up
  round(s); calls shorter than 20 ms are repeated inside a sample. Times are medians over rounds; IQR is the spread.
  Speed-ups are the median over rounds of the paired ratio (t_other / t_system in the same round).
- tokens/s counts real tokens (not padding). TFLOP/s uses one count for every system:
  2 L T (4 H^2 + 2 H I) + 4 L H sum(s_i^2) over the real tokens T and sequence lengths s_i (no padding, no
  embeddings/LayerNorm/softmax/pooler).
- max abs err: max |h - h_ref| over valid tokens, h_ref = transformers eager in fp32 on the same device.
- Threads: torch.set_num_threads({threads}); ONNX Runtime intra-op {threads} / inter-op 1 with spinning off; OpenVINO
  INFERENCE_NUM_THREADS {threads}. ONNX export: TorchScript exporter, opset 17, dynamic batch and sequence axes;
  ONNX Runtime at its default graph optimisation level; OpenVINO precision hint = the dtype (f32 / bf16)."""


def _fmt_load(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def render_markdown(report: dict[str, Any], note: str = "") -> str:
    meta = report["meta"]
    v = meta["versions"]
    load = meta["load_average_1min"]
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    sha = meta["git_sha"] or "unknown"
    lines = [
        f"# fastbert bench: {meta['device_name']}",
        "",
        f"- **Command:** `{meta['command']}`",
        f"- **Date:** {meta['started']} (took {meta['seconds']} s)",
        f"- **Device:** {meta['device']} = {meta['device_name']}, {meta['cpu_count']} logical CPUs, "
        f"{meta['threads']} threads; {meta['platform']}, Python {meta['python']}",
        f"- **Versions:** {versions}",
        f"- **Commit:** {sha}{' (uncommitted changes)' if meta['git_dirty'] else ''}",
        f"- **Load average (1 min):** {_fmt_load(load['start'])} at start, {_fmt_load(load['end'])} at end "
        f"({meta['cpu_count']} CPUs; the benchmark itself accounts for about {meta['threads']}, more means other work "
        "shared the cores)",
    ]
    if note:
        lines.append(f"- **Conditions:** {note}")
    models = ", ".join(
        f"{label} (L={m['layers']}, H={m['hidden']}, heads={m['heads']}, I={m['intermediate']}"
        f"{', random weights' if m['random_weights'] else ''})"
        for label, m in meta["models"].items()
    )
    lines += [f"- **Models:** {models}", "", "## Summary"]
    for title, header, body in summary_tables(report):
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", "## Method", "", METHOD.format(**meta), "", "## Results by size"]
    for _, rows in _cells(report):
        lines += [
            "",
            f"**{_cell_title(rows)}**",
            "",
            "| " + " | ".join(TABLE_HEADER) + " |",
            "|" + "---|" * len(TABLE_HEADER),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    if report["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {s['system']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: str) -> None:
    """Bar chart of speed-up vs transformers eager, by size, one bar per system; one panel per model and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["results"]:
        panels.setdefault((r["model"], r["dtype"]), []).append(r)
    systems = [s for s in dict.fromkeys(r["system"] for r in report["results"]) if s != "hf-eager"]
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(systems)}  # one colour per system throughout
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.4 * len(panels) + 0.6), squeeze=False)
    width = 0.8 / max(len(systems), 1)
    for ax, ((model, dtype), rows) in zip(axes[:, 0], panels.items(), strict=True):
        sizes = list(dict.fromkeys(r["size"] for r in rows))
        for i, system in enumerate(systems):
            by_size = {r["size"]: r["speedup_vs_eager"] for r in rows if r["system"] == system}
            heights = [by_size.get(s) or 0.0 for s in sizes]
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(sizes))]
            bars = ax.bar(xs, heights, width, color=colors[system], label=system)
            ax.bar_label(bars, labels=[f"{h:.2f}" if h else "" for h in heights], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel("speed-up vs hf-eager")
        ax.set_title(f"{model} {dtype}", fontsize=10)
    meta = report["meta"]
    height = fig.get_figheight()
    fig.suptitle(
        f"{meta['device_name']}, {meta['threads']} threads (higher is better)", y=1 - 0.1 / height, fontsize=10
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in systems]
    fig.legend(handles, systems, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height), ncols=min(len(systems), 7),
               fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastbert bench``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="MiniLM-L6, 3 sizes, fastbert + hf eager/sdpa (< 1 min)")
    mode.add_argument("--full", action="store_true", help="every built-in model, size and system (long)")
    parser.add_argument(
        "--models",
        "--model",
        dest="models",
        type=_csv,
        default=None,
        help=f"comma-separated: {', '.join(BUILTIN_MODELS)} or a local checkpoint directory",
    )
    parser.add_argument(
        "--systems",
        type=_csv,
        default=None,
        help=f"comma-separated: fastbert (every available backend), all, {', '.join(ALL_SYSTEM_NAMES)}",
    )
    parser.add_argument(
        "--sizes", type=_csv, default=None, help="comma-separated BATCHxSEQ (8x128) or varlen BATCHxMIN-MAX (32x8-128)"
    )
    parser.add_argument(
        "--dtype", type=_csv, default=None, help="comma-separated fp32, bf16, fp16 (default: fp32 on CPU, fp16 on CUDA)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every system (default: all cores)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per size (default from the preset)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds after the first call")
    parser.add_argument("--seed", type=int, default=0, help="seed of token ids and varlen lengths")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the full report as JSON")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="write a self-contained markdown report")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="speed-up chart (needs matplotlib)")
    parser.add_argument("--note", default="", help="free text recorded in the markdown (e.g. machine conditions)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _jsonable(value: Any) -> Any:
    """NaN -> None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def run_bench(args: argparse.Namespace) -> int:
    """Run ``fastbert bench`` with parsed ``args``; print the table, write the requested files."""
    preset = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = args.dtype or (["fp32"] if device.type == "cpu" else ["fp16"])
    for d in dtypes:
        if d not in DTYPES:
            print(f"fastbert bench: unknown dtype {d!r}; choose from {', '.join(DTYPES)}", file=sys.stderr)
            return 2
        if d == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            print(f"fastbert bench: {torch.cuda.get_device_name(device)} has no bf16 support", file=sys.stderr)
            return 2
    try:
        sizes = [parse_size(s) for s in (args.sizes or preset["sizes"])]
        expand_systems(args.systems or preset["systems"], device)
    except ValueError as exc:
        print(f"fastbert bench: {exc}", file=sys.stderr)
        return 2
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    command = getattr(args, "command_line", None) or shlex.join(["fastbert", "bench", *sys.argv[2:]])
    report = run_report(
        models=args.models or preset["models"],
        sizes=sizes,
        systems=args.systems or preset["systems"],
        dtypes=dtypes,
        device=device,
        threads=threads or 1,
        rounds=args.rounds or preset["rounds"],
        warmup=preset["warmup"] if args.warmup is None else args.warmup,
        seed=args.seed,
        progress=not args.no_progress,
        command=command,
    )
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(report, args.note))
    if args.plot:
        render_plot(report, args.plot)
    return 0 if all(r["status"] == "ok" for r in report["results"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbert.bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "fastbert.bench", *(sys.argv[1:] if argv is None else argv)])
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
