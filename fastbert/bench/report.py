"""The ``fastbert bench`` report: the run over models, dtypes, sizes and systems, and its text, markdown and
plot writers. The report is one JSON-able dict: ``{"schema", "meta", "results", "skipped"}``. Each result row
says what its system computed in (``precision``): the dtype of its panel, except in int8 panels, where systems
without an int8 mode run fp32 as the baseline."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from . import env
from .measure import Row, measure_cell, summarize
from .models import BenchModel, Size, encoder_flops, load_bench_model
from .systems import DTYPES, System, TransformersSystem, expand_systems, make_system

SCHEMA = "fastbert-bench/1"


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
    start_load = env.load_average()
    if start_load is not None and start_load > (os.cpu_count() or 1) - threads + 0.5:
        print(f"fastbert bench: the machine is busy (load average {start_load:.1f} on {os.cpu_count()} CPUs): timings "
              f"will be noisy; with {threads} threads on shared cores, OpenMP waits can dominate (try --threads 1)",
              file=sys.stderr)  # fmt: skip
    started = datetime.now(timezone.utc)
    rows: list[Row] = []
    precisions: dict[tuple[str, str, str], str] = {}  # (model, dtype, system) -> what the system computed in
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
                            precisions[(model.label, dtype_name, name)] = system.precision(dtype)
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
    meta = env.environment(device, threads)
    meta.update(
        {
            "command": command,
            "started": started.isoformat(timespec="seconds"),
            "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
            "load_average_1min": {"start": start_load, "end": env.load_average()},
            "models": {m.label: {k: v for k, v in asdict(m).items() if k != "path"} for m in bench_models},
            "rounds": rounds,
            "warmup": warmup,
            "seed": seed,
        }
    )
    results = [{**asdict(r), "precision": precisions[(r.model, r.dtype, r.system)]} for r in rows]
    return {"schema": SCHEMA, "meta": meta, "results": results, "skipped": skipped}


def _references(
    model: BenchModel, inputs: dict[Size, tuple[Tensor, Tensor, list[int]]], device: torch.device
) -> dict[Size, Tensor]:
    """transformers eager fp32 outputs (on CPU) for every input: the yardstick for every system's error."""
    system = TransformersSystem("eager")
    system.prepare(model, torch.float32, device, torch.get_num_threads(), "")
    refs = {size: system.run(ids.to(device), mask.to(device)).float().cpu() for size, (ids, mask, _) in inputs.items()}
    system.release()
    return refs


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


TABLE_HEADER = (
    "system",
    "precision",
    "median ms",
    "IQR ms",
    "tokens/s",
    "TFLOP/s",
    "vs hf-eager",
    "vs best other",
    "max abs err",
)


def _precision(row: dict[str, Any]) -> str:
    return row.get("precision") or row["dtype"]  # reports written before rows carried it: the panel's dtype


def table_rows(rows: Iterable[dict[str, Any]]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append((r["system"], _precision(r), "error", "", "", "", "", "", r["message"][:80]))
            continue
        other = f"{_fmt_x(r['speedup_vs_best_other'])} ({r['best_other']})" if r["best_other"] else "-"
        out.append(
            (
                r["system"],
                _precision(r),
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
            precision = "/".join(dict.fromkeys(_precision(r) for r in mine.values()))
            body.append((system, precision, *cells, _fmt_err(worst)))
        header = ("system", "precision", *sizes, "max abs err")
        out.append((f"{model} {dtype}: median ms (speed-up vs hf-eager)", header, body))
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
    if any(r["dtype"] == "int8" for r in report["results"]):
        lines.append(INT8_NOTE)
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
- fastbert systems run the model frozen for inference (`AutoModel.freeze()`: linear weights prepacked once for the
  backend's GEMM, as `SentenceEncoder` runs); `compile-fastbert-<backend>` is that model under
  `torch.compile(dynamic=True, fullgraph=True)` after one eager call (the graph keeps that call's packed weights);
  `fastbert-<backend>-unfrozen` is the model in plain `eval()` (oneDNN reorders each weight on every call).
- max abs err: max |h - h_ref| over valid tokens, h_ref = transformers eager in fp32 on the same device.
- Threads: torch.set_num_threads({threads}); ONNX Runtime intra-op {threads} / inter-op 1 with spinning off; OpenVINO
  INFERENCE_NUM_THREADS {threads}. ONNX export: TorchScript exporter, opset 17, dynamic batch and sequence axes;
  ONNX Runtime at its default graph optimisation level; OpenVINO precision hint = the dtype (f32 / bf16).
- Precision (the `precision` column): what each system computed in. In int8 panels fastbert loads with
  `quantize="int8"` (float32 models whose four encoder linears run int8 GEMMs), onnxruntime-int8 runs the same ONNX
  export through `onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QuantType.QInt8)`, and
  every other system (transformers, ONNX Runtime, OpenVINO) runs fp32, the baseline."""


INT8_NOTE = (
    "int8 panels: fastbert loads with quantize='int8' (float32 models whose encoder linears run int8 GEMMs); "
    "onnxruntime-int8 is ONNX Runtime's dynamic int8 (per-channel int8 weights); every other system runs fp32 as "
    "the baseline. The precision column says what each system computed in."
)


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
    if any(r["dtype"] == "int8" for r in report["results"]):
        lines += ["", INT8_NOTE]
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


def jsonable(value: Any) -> Any:
    """NaN -> None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
