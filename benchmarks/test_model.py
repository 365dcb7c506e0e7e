"""Whole-model benchmarks: fastbert on each backend against transformers (eager, sdpa, torch.compile), ONNX Runtime
and OpenVINO, on random-weight BERT shapes, from a padded batch to the padded last hidden state.

One group per model, dtype and size. extra_info carries real and padded token counts, tokens/s, TFLOP/s (the
same FLOP count for every system, ``fastbert.bench.encoder_flops``) and the max abs error against transformers
eager in fp32 over valid tokens. pytest-benchmark times one system after the other; for the interleaved,
load-drift-robust comparison with paired speed-ups use ``fastbert bench``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
import torch

from fastbert import bench


class _Cache:
    """Checkpoints, references and prepared systems shared across the session (few systems alive at once)."""

    def __init__(self, workdir: str, device: torch.device, keep: int = 3):
        self.workdir, self.device, self.keep = workdir, device, keep
        self.models: dict[str, bench.BenchModel] = {}
        self.inputs: dict[tuple[str, bench.Size], tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]] = {}
        self.systems: OrderedDict[tuple[str, str, str], bench.System] = OrderedDict()

    def model(self, name: str) -> bench.BenchModel:
        if name not in self.models:
            self.models[name] = bench.load_bench_model(name, self.workdir)
        return self.models[name]

    def reference_case(
        self, model: bench.BenchModel, size: bench.Size
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        """(ids, mask, lengths, transformers eager fp32 output) for one input size."""
        key = (model.label, size)
        if key not in self.inputs:
            ids, mask, lengths = size.make_inputs(model)
            ids, mask = ids.to(self.device), mask.to(self.device)
            ref = self.system("hf-eager", model, "fp32").run(ids, mask).float().cpu()
            self.inputs[key] = (ids, mask, lengths, ref)
        return self.inputs[key]

    def system(self, name: str, model: bench.BenchModel, dtype: str) -> bench.System:
        key = (name, model.label, dtype)
        if key in self.systems:
            self.systems.move_to_end(key)
            return self.systems[key]
        while len(self.systems) >= self.keep:
            self.systems.popitem(last=False)[1].release()
        system = bench.make_system(name)
        system.prepare(model, bench.DTYPES[dtype], self.device, torch.get_num_threads(), self.workdir)
        self.systems[key] = system
        return system


@pytest.fixture(scope="session")
def cache(workdir: str, device: torch.device, threads: int) -> _Cache:
    return _Cache(workdir, device)


@pytest.fixture
def case(
    cache: _Cache, system: str, model_name: str, dtype: str, size: bench.Size, device: torch.device
) -> tuple[bench.System, bench.BenchModel, tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]]:
    """(prepared system, model, (ids, mask, lengths, reference)); skips with the reason when it cannot run here."""
    reason = bench.make_system(system).unavailable(device, bench.DTYPES[dtype])
    if reason is not None:
        pytest.skip(f"{system}: {reason}")
    if system == "fastbert-triton" and device.type == "cpu" and model_name != "tiny":
        pytest.skip("the Triton interpreter is for correctness: on CPU only the tiny model (FASTBERT_BENCH_TINY=1)")
    model = cache.model(model_name)
    inputs = cache.reference_case(model, size)
    return cache.system(system, model, dtype), model, inputs


def test_model(case: Any, measure: Any, system: str, dtype: str, size: bench.Size) -> None:
    runner, model, (ids, mask, lengths, ref) = case
    measure(
        lambda: runner.run(ids, mask),
        group=f"model {model.label} {dtype} {size.label}",
        tokens=sum(lengths),
        flops=bench.encoder_flops(lengths, model.layers, model.hidden, model.intermediate),
        error=lambda out: bench.max_abs_error(out, ref, mask),
        padded_tokens=ids.numel(),
        system=system,
        model=model.label,
        dtype=dtype,
        size=size.label,
    )
