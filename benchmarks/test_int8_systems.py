"""int8 systems, from a padded batch to the padded last hidden state: ONNX Runtime dynamic int8 with per-channel
weights (``onnxruntime-int8``) and fastbert with ``quantize="int8"`` on each backend, on the same shapes as
test_model.py (tiny under ``--benchmark-disable``); and a ``fastbert bench --dtype int8`` report on the tiny model
that says which precision each system ran.

One group per model and size ("model <label> int8 <size>"); extra_info as in test_model.py, with the max abs error
against transformers eager fp32. Systems that cannot run here (onnxruntime not installed, a fastbert without its
int8 mode) are skipped with the reason.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from fastbert import bench
from fastbert.bench.systems import INT8

TINY = os.environ.get("FASTBERT_BENCH_TINY", "0") not in ("", "0")  # set by conftest under --benchmark-disable
INT8_SYSTEMS = ["onnxruntime-int8", "fastbert-cpp", "fastbert-torch"]
INT8_MODELS = ["tiny"] if TINY else ["minilm-l6", "bert-base"]
INT8_SIZES = ["2x16", "3x4-16"] if TINY else ["1x128", "8x128", "16x8-128"]


class _Int8Cache:
    """Checkpoints, fp32 references and prepared int8 systems shared by the module (one system alive at a time)."""

    def __init__(self, workdir: str, device: torch.device):
        self.workdir, self.device = workdir, device
        self.models: dict[str, bench.BenchModel] = {}
        self.refs: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]] = {}
        self.key: tuple[str, str] | None = None
        self.prepared: bench.System | None = None

    def model(self, name: str) -> bench.BenchModel:
        if name not in self.models:
            self.models[name] = bench.load_bench_model(name, self.workdir)
        return self.models[name]

    def case(self, model: bench.BenchModel, size: str) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        """(ids, mask, lengths, transformers eager fp32 output)."""
        key = (model.label, size)
        if key not in self.refs:
            ids, mask, lengths = bench.parse_size(size).make_inputs(model)
            eager = bench.make_system("hf-eager")
            eager.prepare(model, torch.float32, self.device, torch.get_num_threads(), self.workdir)
            self.refs[key] = (ids, mask, lengths, eager.run(ids, mask).float())
            eager.release()
        return self.refs[key]

    def system(self, name: str, model: bench.BenchModel) -> bench.System:
        if self.key != (name, model.label):
            if self.prepared is not None:
                self.prepared.release()
            self.key, self.prepared = None, None
            system = bench.make_system(name)
            system.prepare(model, INT8, self.device, torch.get_num_threads(), self.workdir)
            self.key, self.prepared = (name, model.label), system
        assert self.prepared is not None
        return self.prepared


@pytest.fixture(scope="module")
def int8_cache(workdir: str, device: torch.device, threads: int) -> _Int8Cache:
    return _Int8Cache(workdir, device)


@pytest.mark.parametrize("int8_size", INT8_SIZES)
@pytest.mark.parametrize("int8_model", INT8_MODELS)
@pytest.mark.parametrize("int8_system", INT8_SYSTEMS)
def test_int8_model(
    int8_cache: _Int8Cache, measure: Any, device: torch.device, int8_system: str, int8_model: str, int8_size: str
) -> None:
    reason = bench.make_system(int8_system).unavailable(device, INT8)
    if reason is not None:
        pytest.skip(f"{int8_system}: {reason}")
    model = int8_cache.model(int8_model)
    ids, mask, lengths, ref = int8_cache.case(model, int8_size)
    runner = int8_cache.system(int8_system, model)
    assert runner.precision(INT8) == "int8"
    if int8_system == "onnxruntime-int8":  # the graph really is int8: integer GEMMs on dynamically quantized inputs
        ops = {node.op_type for node in _graph_nodes(model, int8_cache.workdir)}
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, sorted(ops)
    size = bench.parse_size(int8_size)
    measure(
        lambda: runner.run(ids, mask),
        group=f"model {model.label} int8 {size.label}",
        tokens=sum(lengths),
        flops=bench.encoder_flops(lengths, model.layers, model.hidden, model.intermediate),
        error=lambda out: bench.max_abs_error(out, ref, mask),
        padded_tokens=ids.numel(),
        system=int8_system,
        model=model.label,
        dtype="int8",
        precision="int8",
        size=size.label,
    )


def _graph_nodes(model: bench.BenchModel, workdir: str) -> list[Any]:
    import onnx

    from fastbert.bench.systems import quantize_onnx_int8

    return list(onnx.load(quantize_onnx_int8(model, workdir), load_external_data=False).graph.node)


def test_int8_report_says_each_precision(tmp_path) -> None:
    """An int8 panel: fastbert quantize="int8", onnxruntime-int8 int8, every other system its fp32 baseline."""
    threads = torch.get_num_threads()
    try:
        report = bench.run_report(
            models=["tiny"],
            sizes=[bench.parse_size("2x8")],
            systems=["fastbert", "hf-eager", "onnxruntime", "onnxruntime-int8"],
            dtypes=["int8"],
            device=torch.device("cpu"),
            threads=1,
            rounds=1,
            warmup=0,
            progress=False,
            workdir=str(tmp_path),
        )
    finally:
        torch.set_num_threads(threads)
    expected = {"hf-eager": "fp32", "onnxruntime": "fp32", "onnxruntime-int8": "int8"}
    expected.update({f"fastbert-{b}": "int8" for b in ("torch", "cpp")})
    ran = {r["system"]: r for r in report["results"]}
    skipped = {s["system"]: s["reason"] for s in report["skipped"]}
    print(bench.render_text(report))
    assert "hf-eager" in ran
    for name, precision in expected.items():
        assert (name in ran) != (name in skipped), f"{name} neither run nor listed as not run"
        if name in ran:
            assert ran[name]["status"] == "ok", ran[name]["message"]
            assert ran[name]["precision"] == precision and ran[name]["dtype"] == "int8", ran[name]
    text, md = bench.render_text(report), bench.render_markdown(report)
    for out in (text, md):
        assert "precision" in out and "quantize='int8'" in out
    line = next(ln for ln in text.splitlines() if ln.startswith("hf-eager "))
    assert line.split()[1] == "fp32", line
