"""The systems the report compares: one way of running an encoder each (fastbert on one backend, transformers
eager or sdpa, ``torch.compile`` of the sdpa model, ONNX Runtime in fp32 and in dynamic int8, OpenVINO), and the
names that pick them."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .models import BenchModel

#: ``--dtype int8`` is not a model dtype but the int8 inference mode: fastbert loads float32 models with
#: ``quantize="int8"`` (int8 GEMMs in the encoder), a system with an int8 mode of its own runs that
#: (onnxruntime-int8), and every other system runs fp32, the baseline the int8 rows are compared with.
#: ``torch.int8`` stands for that mode wherever a system is handed a dtype.
INT8 = torch.int8

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": INT8}


def dtype_name(dtype: torch.dtype) -> str:
    """The report's name of a dtype of ``DTYPES`` (``torch.int8`` -> ``"int8"``)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def model_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights are loaded in: float32 for the int8 mode (int8 models are float32 models whose
    encoder linears run int8 GEMMs), else ``dtype`` itself."""
    return torch.float32 if dtype == INT8 else dtype


class System:
    """One way of running an encoder. ``run`` maps padded (ids, mask) to the padded last hidden state."""

    name: str = "?"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this system cannot run here (None when it can); checked before ``prepare``."""
        return None

    def precision(self, dtype: torch.dtype) -> str:
        """What this system computes in when the report asks for ``dtype`` ("fp32", "bf16", "fp16" or "int8"):
        that dtype, except in int8 panels, where a system without an int8 mode runs fp32 (the baseline)."""
        return "fp32" if dtype == INT8 else dtype_name(dtype)

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        raise NotImplementedError

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drop the loaded model (systems are prepared once per model and dtype)."""
        self.__dict__.pop("model", None)


class FastbertSystem(System):
    """fastbert on one backend, frozen for inference (``AutoModel.freeze``: weights prepacked once, as
    ``SentenceEncoder`` runs), optionally under ``torch.compile`` (``compile-fastbert-<backend>``); or in plain
    ``eval()``, weights read (and reordered by oneDNN) on every call (``fastbert-<backend>-unfrozen``)."""

    def __init__(self, backend: str, compile: bool = False, freeze: bool = True):
        self.backend = backend
        self.compile = compile
        self.freeze = freeze
        self.name = f"compile-fastbert-{backend}" if compile else f"fastbert-{backend}"
        if not freeze:
            self.name += "-unfrozen"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            import fastbert.modeling  # noqa: F401
            from fastbert import ops
        except Exception as exc:
            return f"fastbert.modeling failed to import: {type(exc).__name__}: {exc}"
        if dtype == INT8:
            if device.type != "cpu":
                return "int8 (quantize='int8') runs on CPU only"
            if importlib.util.find_spec("fastbert.quantize") is None:
                return "this fastbert has no int8 mode (fastbert.quantize is missing)"
        return ops.unavailable_reason(self.backend, device)

    def precision(self, dtype: torch.dtype) -> str:
        return dtype_name(dtype)  # int8 included: quantize="int8"

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        import fastbert

        extra = {"quantize": "int8"} if dtype == INT8 else {}
        self.model = fastbert.AutoModel.from_pretrained(
            model.path, device=device, dtype=model_dtype(dtype), backend=self.backend, **extra
        )
        if self.freeze:
            self.model.freeze()
        else:
            self.model.eval()
        actual = self.model.backend.name
        if actual != self.backend:
            raise RuntimeError(f"asked for backend {self.backend!r} but the model runs {actual!r}")
        if dtype == INT8 and getattr(self.model, "quantization", None) is None:
            raise RuntimeError("quantize='int8' gave a float model (no .quantization)")
        if self.compile:
            with torch.inference_mode():  # one eager call first: the packed weights, which the graph keeps
                ids = torch.ones(1, 4, dtype=torch.long, device=device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            self.model = torch.compile(self.model, dynamic=True, fullgraph=True)

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

        hf = AutoModel.from_pretrained(model.path, dtype=model_dtype(dtype), attn_implementation=self.attn)
        hf = hf.to(device).eval()
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


def quantize_onnx_int8(model: BenchModel, workdir: str) -> str:
    """ONNX Runtime's dynamic int8 of ``export_onnx``'s fp32 graph, once per model: ``quantize_dynamic`` with
    symmetric int8 weights per output channel (``per_channel=True, weight_type=QuantType.QInt8``) and activations
    quantized at run time (uint8, one scale per tensor), ORT's own CPU recipe, at its defaults otherwise."""
    source = export_onnx(model, workdir)
    path = Path(source).with_name("model-int8.onnx")
    if path.exists():
        return str(path)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = path.with_name("model-int8.partial.onnx")  # renamed when complete: an interrupted run leaves no stub
    root = logging.getLogger()
    quiet, level = logging.NullHandler(), root.level
    # quantize_dynamic logs a "consider pre-processing" advice on the root logger, and logging there would
    # install a stderr handler for the whole process: a handler of ours and a higher level keep both away.
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(source, str(partial), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)
    os.replace(partial, path)
    return str(path)


def _ort_session(path: str, threads: int) -> Any:
    """An onnxruntime.InferenceSession on the CPU with fastbert bench's thread settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning worker threads would keep burning the cores into the next system's interleaved call.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_missing() -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install 'fastbert[bench]'"
    return None


class OnnxRuntimeSystem(System):
    """ONNX Runtime on the fp32 export (also the fp32 baseline of int8 panels)."""

    name = "onnxruntime"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "benchmarked on CPU only"
        if model_dtype(dtype) != torch.float32:
            return "runs the fp32 export only (and onnxruntime-int8 its dynamic int8)"
        return _ort_missing()

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        self.model = _ort_session(export_onnx(model, workdir), threads)

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(self.model.run(["last_hidden_state"], feed)[0])


class OnnxRuntimeInt8System(OnnxRuntimeSystem):
    """ONNX Runtime dynamic int8 with per-channel weights (``quantize_onnx_int8``): the int8 anchor users run."""

    name = "onnxruntime-int8"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "benchmarked on CPU only"
        if dtype != INT8:
            return "an int8 system: it runs in int8 panels only (--dtype int8)"
        return _ort_missing()

    def precision(self, dtype: torch.dtype) -> str:
        return "int8"

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        self.model = _ort_session(quantize_onnx_int8(model, workdir), threads)


class OpenVinoSystem(System):
    name = "openvino"
    _HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "benchmarked on CPU only"
        if model_dtype(dtype) not in self._HINTS:
            return f"no {dtype} inference precision on CPU here (fp32 and bf16 only)"
        try:
            import onnx  # noqa: F401
            import openvino  # noqa: F401
        except ImportError as exc:
            return f"not installed ({exc.name}); pip install 'fastbert[bench]'"
        return None

    def prepare(self, model: BenchModel, dtype: torch.dtype, device: torch.device, threads: int, workdir: str) -> None:
        import openvino

        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": self._HINTS[model_dtype(dtype)]}
        compiled = openvino.Core().compile_model(export_onnx(model, workdir), "CPU", config)
        self.model = compiled.create_infer_request()
        self.output = compiled.output(0)

    def run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        result = self.model.infer({"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        return torch.from_numpy(result[self.output].copy())  # the request reuses its output buffer


BASELINES = ("hf-eager", "hf-sdpa", "compile-sdpa", "onnxruntime", "onnxruntime-int8", "openvino")
FASTBERT_BACKENDS = ("torch", "cpp", "triton")
#: fastbert under torch.compile: not in ``fastbert`` / ``all`` (compiling takes minutes), asked for by name
COMPILED = tuple(f"compile-fastbert-{b}" for b in ("torch", "cpp"))
#: fastbert not frozen (the A/B for AutoModel.freeze), asked for by name
UNFROZEN = tuple(f"fastbert-{b}-unfrozen" for b in ("torch", "cpp"))
ALL_SYSTEM_NAMES = tuple(f"fastbert-{b}" for b in FASTBERT_BACKENDS) + BASELINES + COMPILED + UNFROZEN


def make_system(name: str) -> System:
    if name.startswith("fastbert-") and name[len("fastbert-") :] in FASTBERT_BACKENDS:
        return FastbertSystem(name[len("fastbert-") :])
    if name in COMPILED:
        return FastbertSystem(name[len("compile-fastbert-") :], compile=True)
    if name in UNFROZEN:
        return FastbertSystem(name[len("fastbert-") : -len("-unfrozen")], freeze=False)
    factories: dict[str, Callable[[], System]] = {
        "hf-eager": lambda: TransformersSystem("eager"),
        "hf-sdpa": lambda: TransformersSystem("sdpa"),
        "compile-sdpa": lambda: TransformersSystem("sdpa", compile=True),
        "onnxruntime": OnnxRuntimeSystem,
        "onnxruntime-int8": OnnxRuntimeInt8System,
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
