"""The pytest-benchmark suite: per-op groups (test_ops.py) and whole-model groups (test_model.py).

Not part of the test run (tests/ is). ``pytest benchmarks/ --benchmark-json=out.json`` times BERT-base-like
shapes; ``pytest benchmarks/ --benchmark-disable`` (or ``FASTBERT_BENCH_TINY=1``) runs every case once on tiny
shapes, so CI keeps the suite from rotting in about a minute on 2 cores.

Environment: ``FASTBERT_BENCH_DEVICE`` (default cuda if available), ``FASTBERT_BENCH_THREADS`` (default: all
cores; 1 in tiny mode), ``FASTBERT_BENCH_ROUNDS`` / ``FASTBERT_BENCH_WARMUP``.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run on CPU tensors

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from fastbert import bench  # noqa: E402
from fastbert.bench import env  # noqa: E402
from fastbert.bench.measure import synchronize  # noqa: E402  (by name: a fixture below is called measure)


def pytest_configure(config: pytest.Config) -> None:
    # Runs before the test modules are imported, so their shape tables see it.
    if config.getoption("benchmark_disable", default=False):
        os.environ.setdefault("FASTBERT_BENCH_TINY", "1")


def tiny() -> bool:
    return os.environ.get("FASTBERT_BENCH_TINY", "0") not in ("", "0")


def bench_device() -> torch.device:
    return torch.device(os.environ.get("FASTBERT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def bench_dtypes() -> list[str]:
    if tiny():
        return ["fp32"]
    return ["fp32", "bf16"] if bench_device().type == "cpu" else ["fp16", "bf16"]


@dataclass(frozen=True)
class OpShape:
    """Shapes of the per-op cases: one encoder layer's tensors (BERT-base, or tiny under --benchmark-disable)."""

    hidden: int
    heads: int
    intermediate: int
    vocab: int
    dense: bench.Size  # norms, activation, embeddings, linears, dense attention
    varlen: bench.Size  # packed attention over mixed lengths


BASE_SHAPE = OpShape(768, 12, 3072, 30522, bench.Size(8, 128), bench.Size(16, 128, 8))
TINY_SHAPE = OpShape(64, 4, 256, 1000, bench.Size(2, 16), bench.Size(3, 16, 4))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize by name, so the tiny/full choice (made at configure time) is read once, here."""
    names = metafunc.fixturenames
    if "dtype" in names:
        metafunc.parametrize("dtype", bench_dtypes())
    if "backend" in names:
        metafunc.parametrize("backend", bench.FASTBERT_BACKENDS)
    if "model_name" in names:
        metafunc.parametrize("model_name", ["tiny"] if tiny() else ["minilm-l6", "bert-base"])
    if "size" in names:
        sizes = ["2x16", "3x4-16"] if tiny() else ["1x128", "8x128", "16x8-128"]
        metafunc.parametrize("size", [bench.parse_size(s) for s in sizes], ids=sizes)
    if "system" in names:
        extra = [] if tiny() else ["compile-sdpa"]  # a cold torch.compile takes minutes on 2 cores
        systems = [f"fastbert-{b}" for b in bench.FASTBERT_BACKENDS] + ["hf-eager", "hf-sdpa", *extra]
        metafunc.parametrize("system", systems + ["onnxruntime", "openvino"])


@pytest.fixture(scope="session")
def shape() -> OpShape:
    return TINY_SHAPE if tiny() else BASE_SHAPE


@pytest.fixture
def backend_ops(backend: str, device: torch.device, dtype: str) -> Any:
    """The resolved ``fastbert.ops.Backend``; skips with the reason when it cannot be timed here."""
    from fastbert import ops

    reason = ops.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend}: {reason}")
    if backend == "triton" and device.type == "cpu" and (not tiny() or dtype != "fp32"):
        pytest.skip("the Triton interpreter is for correctness: on CPU only tiny fp32 shapes (FASTBERT_BENCH_TINY=1)")
    torch.manual_seed(0)
    return ops.resolve_backend(backend, device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def threads() -> int:
    default = 1 if tiny() else env.available_cpus()
    n = int(os.environ.get("FASTBERT_BENCH_THREADS", default))
    torch.set_num_threads(n)
    return n


@pytest.fixture(scope="session")
def environment_info(device: torch.device, threads: int) -> dict[str, Any]:
    info = env.environment(device, threads)
    info["tiny"] = tiny()
    return info


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Random-weight checkpoints and ONNX exports, shared by the whole session."""
    return str(tmp_path_factory.mktemp("fastbert-bench"))


Measure = Callable[..., Any]


@pytest.fixture
def measure(benchmark: Any, device: torch.device, environment_info: dict[str, Any]) -> Measure:
    """``measure(fn, group=, tokens=, error=, flops=, bytes=, **extra)``: time ``fn`` and fill extra_info.

    ``error(output)`` gives the max abs error of the (last) output against its reference; it is recorded as
    ``max_abs_err`` and must be finite (the suite checks that it runs and yields numbers, not tolerances:
    those are tests/' job).

    The target synchronises the device, so CUDA time is the kernels' time, not the launch time. Throughputs
    come from the median; with ``--benchmark-disable`` (one untimed call) they are recorded as None.
    """
    rounds = int(os.environ.get("FASTBERT_BENCH_ROUNDS", 10))
    warmup = int(os.environ.get("FASTBERT_BENCH_WARMUP", 2))

    def run(
        fn: Callable[[], Any],
        *,
        group: str,
        tokens: int,
        error: Callable[[Any], float],
        flops: int = 0,
        bytes: int = 0,
        **extra: Any,
    ) -> Any:
        def target() -> Any:
            out = fn()
            synchronize(device)
            return out

        benchmark.group = group
        benchmark.extra_info.update(environment_info)
        benchmark.extra_info.update(extra, tokens=tokens, flops=flops, bytes=bytes)
        out = benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
        median = benchmark.stats.stats.median if benchmark.stats is not None else None
        benchmark.extra_info["tokens_per_s"] = tokens / median if median else None
        benchmark.extra_info["tflops"] = flops / median / 1e12 if median and flops else None
        benchmark.extra_info["gb_per_s"] = bytes / median / 1e9 if median and bytes else None
        err = error(out)
        benchmark.extra_info["max_abs_err"] = err
        print(f"{group} [{extra}]: max abs err {err:.2e}")
        assert math.isfinite(err), f"{group}: non-finite output ({err})"
        return out

    return run
