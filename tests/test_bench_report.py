"""The ``fastbert bench`` report on a tiny random model: every system present, errors computed, valid JSON."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import torch

from fastbert import bench

TINY_SIZES = [bench.parse_size("2x16"), bench.parse_size("3x4-16")]


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _expected_systems() -> list[str]:
    from fastbert import ops

    names = [f"fastbert-{b}" for b in ("torch", "cpp") if ops.unavailable_reason(b, "cpu") is None]
    names += ["hf-eager", "hf-sdpa"]
    if _installed("onnx", "onnxruntime"):
        names.append("onnxruntime")
    if _installed("onnx", "openvino"):
        names.append("openvino")
    return names


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    threads = torch.get_num_threads()
    try:
        return bench.run_report(
            models=["tiny"],
            sizes=TINY_SIZES,
            systems=["fastbert", "hf-eager", "hf-sdpa", "onnxruntime", "openvino"],
            dtypes=["fp32"],
            device=torch.device("cpu"),
            threads=1,
            rounds=2,
            warmup=0,
            progress=False,
            command="pytest tests/test_bench_report.py",
            workdir=str(tmp_path_factory.mktemp("bench")),
        )
    finally:
        torch.set_num_threads(threads)


def test_every_system_in_every_cell(report: dict) -> None:
    expected = _expected_systems()
    text = bench.render_text(report)
    print(text)
    for size in TINY_SIZES:
        rows = {r["system"]: r for r in report["results"] if r["size"] == size.label}
        assert sorted(rows) == sorted(expected), f"{size.label}: {sorted(rows)} != {sorted(expected)}"
        for name, row in rows.items():
            assert row["status"] == "ok", f"{name} {size.label}: {row['message']}"
            assert len(row["samples_ms"]) == 2 and row["median_ms"] > 0
    for name in expected:
        assert f"\n{name} " in text, f"{name} missing from the table"
    skipped = {s["system"] for s in report["skipped"]}
    assert "fastbert-triton" in skipped  # never timed on CPU, and the report says so
    for name in ("onnxruntime", "openvino"):
        assert (name in expected) != (name in skipped), f"{name} neither run nor listed as skipped"


def test_errors_against_transformers_fp32(report: dict) -> None:
    for row in report["results"]:
        err = row["max_abs_err"]
        print(f"{row['system']:<15} {row['size']:<18} max abs err {err:.2e}")
        # fp32 systems vs transformers fp32: the model-level fp32 tolerance of STYLE.md.
        assert math.isfinite(err) and err < 1e-4, f"{row['system']} {row['size']}: {err}"
    eager = [r for r in report["results"] if r["system"] == "hf-eager"]
    assert all(r["max_abs_err"] == 0.0 for r in eager)  # the reference is transformers eager fp32 itself


def test_throughput_and_speedups(report: dict) -> None:
    for row in report["results"]:
        size = next(s for s in TINY_SIZES if s.label == row["size"])
        lengths = size.lengths()
        assert row["tokens"] == sum(lengths)
        assert row["padded_tokens"] == size.batch * max(lengths)
        assert row["flops"] == bench.encoder_flops(lengths, 2, 32, 64)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (row["median_ms"] / 1e3))
        assert row["min_ms"] <= row["q25_ms"] <= row["median_ms"] <= row["q75_ms"] <= row["max_ms"]
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_best_other"] > 0
        assert row["best_other"] != row["system"]
        if row["system"] == "hf-eager":
            assert row["speedup_vs_eager"] == 1.0


def test_json_markdown_plot(report: dict, tmp_path) -> None:
    text = json.dumps(bench.jsonable(report), allow_nan=False)  # strict JSON: NaN becomes null
    loaded = json.loads(text)
    assert loaded["schema"] == bench.SCHEMA
    assert len(loaded["results"]) == len(report["results"])
    meta = loaded["meta"]
    assert meta["device"] == "cpu" and meta["threads"] == 1 and meta["versions"]["torch"] == torch.__version__
    assert meta["command"] == "pytest tests/test_bench_report.py"
    md = bench.render_markdown(report, note="test run")
    for needle in ("pytest tests/test_bench_report.py", "## Method", "test run", "fastbert-torch", "max abs err"):
        assert needle in md
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedup.png"
    bench.render_plot(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_entry_point(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["--models", "tiny", "--sizes", "2x8", "--systems", "hf-eager,fastbert-torch", "--rounds", "1",
         "--threads", "1", "--json", str(out), "--no-progress"]
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.run_bench(args) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["results"]
    assert {r["system"] for r in rows} == {"hf-eager", "fastbert-torch"}


def test_bad_arguments_are_rejected(capsys) -> None:
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    assert bench.run_bench(parser.parse_args(["--sizes", "8by128"])) == 2
    assert "8by128" in capsys.readouterr().err
    assert bench.run_bench(parser.parse_args(["--systems", "tensorrt"])) == 2
    assert "tensorrt" in capsys.readouterr().err
    assert bench.run_bench(parser.parse_args(["--dtype", "fp8"])) == 2
    assert "fp8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="MIN <= MAX"):
        bench.parse_size("4x64-8")


def test_a_failing_system_is_reported_not_fatal(monkeypatch, tmp_path) -> None:
    class Broken(bench.TransformersSystem):
        def run(self, input_ids, attention_mask):
            raise RuntimeError("kernel exploded at token 3")

    real = bench.make_system  # run_report looks it up in fastbert.bench.report
    monkeypatch.setattr(bench.report, "make_system", lambda name: Broken("eager") if name == "hf-sdpa" else real(name))
    report = bench.run_report(["tiny"], TINY_SIZES[:1], ["hf-eager", "hf-sdpa"], ["fp32"], torch.device("cpu"),
                              threads=1, rounds=1, warmup=0, progress=False, workdir=str(tmp_path))  # fmt: skip
    rows = {r["system"]: r for r in report["results"]}
    assert rows["hf-eager"]["status"] == "ok"
    assert rows["hf-sdpa"]["status"] == "error" and "kernel exploded at token 3" in rows["hf-sdpa"]["message"]
    assert "kernel exploded" in bench.render_text(report)


def test_flop_count_and_inputs() -> None:
    # BERT-base (8,128): 2*12*1024*(4*768^2 + 2*768*3072) + 4*12*1024*128*768 = 178.8 GFLOP.
    assert bench.encoder_flops([128] * 8, 12, 768, 3072) == 12 * 1024 * (24 * 768**2 + 4 * 128 * 768)
    model = bench.BenchModel("m", "", True, "bert", 32, 2, 4, 64, vocab=1000, max_len=128, pad_id=0)
    size = bench.parse_size("32x8-128")
    ids, mask, lengths = size.make_inputs(model, seed=0)
    assert lengths == size.make_inputs(model, seed=0)[2] != size.make_inputs(model, seed=1)[2]
    assert all(8 <= n <= 128 for n in lengths) and ids.shape == (32, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] >= 500).all()
    with pytest.raises(ValueError, match="exceed"):
        bench.parse_size("1x512").make_inputs(model)


def test_local_checkpoint_shapes(tmp_path) -> None:
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=800, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=66, pad_token_id=1)  # fmt: skip
    RobertaModel(cfg).save_pretrained(tmp_path / "tiny-roberta")
    model = bench.load_bench_model(str(tmp_path / "tiny-roberta"), tmp_path / "work")
    assert (model.model_type, model.hidden, model.layers, model.heads, model.intermediate) == ("roberta", 32, 1, 4, 48)
    assert model.max_len == 64 and model.pad_id == 1 and not model.random_weights  # positions start after padding_idx
    ids, mask, _ = bench.parse_size("3x2-64").make_inputs(model)
    assert (ids[mask == 0] == 1).all()
    with pytest.raises(ValueError, match="unknown model"):
        bench.load_bench_model(str(tmp_path / "missing"), tmp_path / "work")
