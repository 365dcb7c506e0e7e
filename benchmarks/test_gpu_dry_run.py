"""``benchmarks/gpu.py --dry-run``: every cell of the GPU command, on the CPU, so the command cannot rot.

The dry run runs each cell once at tiny shapes under TRITON_INTERPRET=1 and writes a report labelled dry-run to
a temp dir. It must exit 0 and report every planned cell as ok. The triton training cells and the gradient
check may fail only while the triton backend has no gradients (``fastbert.kernels.DIFFERENTIABLE`` unset), and
only with ``model.train()``'s NotImplementedError; once the flag is set they must pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TIMEOUT_S = 600  # ~1.5-2 min on 2 busy cores; the limit only stops a hang
#: Cell-name prefixes every dry run must plan: the forward cells that predate training, and issue 12's.
REQUIRED = (
    "peak ",
    "check bias_residual_layernorm ",
    "check bias_activation(gelu) ",
    "check attention ",
    "attention ",
    "build forward models ",
    "model check ",
    "forward fastbert ",
    "forward fastbert-packed ",
    "forward hf-eager ",
    "forward hf-sdpa ",
    "train fastbert ",
    "train hf-sdpa ",
    "train hf-eager ",
    "grad check reference float64",
    "grad check float32",
    "compile hf-sdpa ",
)


def _needs_triton_gradients(cell: str) -> bool:
    return cell.startswith("train fastbert ") or (cell.startswith("grad check ") and "float64" not in cell)


def _load_gpu_module(monkeypatch: pytest.MonkeyPatch):
    name = "fastbert_benchmarks_gpu"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_dry_run(tmp_path: Path) -> None:
    import fastbert.kernels as K

    if K.UNAVAILABLE_REASON:
        pytest.skip(f"triton: {K.UNAVAILABLE_REASON}")
    trains = bool(getattr(K, "DIFFERENTIABLE", False))
    results_before = sorted(p.name for p in RESULTS.iterdir()) if RESULTS.is_dir() else []
    environ = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    environ.pop("TRITON_INTERPRET", None)  # the script sets it itself, before triton is imported
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    seconds = time.perf_counter() - start
    print(f"gpu.py --dry-run: exit {done.returncode} in {seconds:.0f} s")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    reports = sorted(tmp_path.glob("dry-run-gpu-cpu-*.json"))
    assert len(reports) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert reports[0].with_suffix(".md").read_text().count("DRY RUN: not a measurement") == 1
    after = sorted(p.name for p in RESULTS.iterdir()) if RESULTS.is_dir() else []
    assert after == results_before, "a dry run wrote under benchmarks/results"

    data = json.loads(reports[0].read_text())
    assert data["meta"]["dry_run"] is True
    planned = data["planned_cells"]
    for prefix in REQUIRED:
        assert any(c.startswith(prefix) for c in planned), f"no planned cell {prefix!r}: {planned}"
    cells = {c["cell"]: c for c in data["cells"]}
    assert sorted(cells) == sorted(planned), "cells run differ from the plan"
    assert not [c for c in data["cells"] if c.get("unplanned")]
    bad = []
    for name in planned:
        cell = cells[name]
        if cell["status"] == "ok":
            continue
        if not trains and _needs_triton_gradients(name) and cell["status"] == "error":
            assert cell["message"].startswith("NotImplementedError"), (name, cell["message"])
            continue
        bad.append(f"{name}: {cell['status']}: {cell['message']}")
    assert not bad, (
        "cells not ok" + (" (fastbert.kernels.DIFFERENTIABLE is set)" if trains else "") + ":\n" + "\n".join(bad)
    )
    if trains:  # the triton training cells produced numbers and the gradient check its rows
        assert all(isinstance(row.get("fastbert_ms"), float) for row in data["train"]), data["train"]
        assert len(data["grad"]) == len([c for c in planned if _needs_triton_gradients(c) and "grad" in c])


def test_dry_run_refuses_triton_imported_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    gpu = _load_gpu_module(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" in sys.modules
    message = gpu.interpreter_refusal()
    assert message is not None and "TRITON_INTERPRET=1" in message
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu.interpreter_refusal() is None
