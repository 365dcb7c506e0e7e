"""Where fastbert's CPU time goes: a per-op profile of the cpp backend, and the fraction of the GEMM ceiling reached.

For each model and size: the whole forward (padded ids + mask in, padded last hidden state out, as in
``fastbert bench``) is timed without the profiler, then run again under ``torch.profiler`` and its self CPU time
split into GEMMs (oneDNN ``_linear_pointwise``, which includes the fused bias / activation post-ops), the residual +
LayerNorm that follows two of the four GEMMs of a layer, attention, embeddings + LayerNorm, other fastbert ops, aten
glue (unpadding, re-padding, position ids) and what is left of the wall time: Python and dispatch.

The GEMM ceiling is measured beside every cell (the shared host's speed drifts): fastbert's own linear (oneDNN on a
prepacked weight) at 1024 tokens on the model's feed-forward shape, weights hot in cache. The report gives the GFLOP/s the model's GEMMs and its
attention reach inside the forward, and the whole forward's useful FLOPs (``fastbert.bench.encoder_flops`` plus the
pooler) per second as a fraction of that ceiling.

    python benchmarks/cpu_profile.py            # writes benchmarks/results/cpu-profile.{json,md}
    python benchmarks/cpu_profile.py --models minilm-l6 --sizes 8x128 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from collections.abc import Callable

import torch
from _results import save

from fastbert import bench
from fastbert.bench import env, measure

CATEGORIES = [
    ("gemm", "GEMMs (oneDNN, fused bias/activation)"),
    ("residual_ln", "residual + LayerNorm after a GEMM"),
    ("attention", "attention"),
    ("embeddings", "embeddings + LayerNorm"),
    ("other_fastbert", "other fastbert ops"),
    ("aten", "aten glue (unpad, re-pad, positions)"),
    ("python", "Python + dispatch (rest of the wall time)"),
]


def category(op: str) -> str:
    if op in ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm"):
        return "gemm"
    if op == "fastbert::linear_residual_layernorm":
        return "residual_ln"
    if op == "fastbert::attention":
        return "attention"
    if op == "fastbert::embeddings":
        return "embeddings"
    if op.startswith("fastbert::"):
        return "other_fastbert"
    return "aten"


def gemm_case(hidden: int, intermediate: int) -> tuple[Callable[[], object], int]:
    """fastbert's cpp linear at (1024 x hidden) @ (hidden x intermediate) on a prepacked weight, and its FLOPs."""
    from fastbert import _cpp

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, hidden, generator=gen)
    w = torch.randn(intermediate, hidden, generator=gen)
    b = torch.randn(intermediate, generator=gen)
    packed = _cpp.prepack_linear(w)
    return (lambda: _cpp.linear(x, w, b, None, packed)), 2 * 1024 * hidden * intermediate


def profile_cell(
    system: bench.FastbertSystem, model: bench.BenchModel, size: bench.Size, rounds: int, seconds: float
) -> dict:
    """``rounds`` rounds of (GEMM ceiling, unprofiled forward, profiled forward), back to back.

    The host is shared and its speed drifts by up to 2x within minutes, so every ratio (share of the ceiling) is
    taken within a round and the median over rounds is reported; the per-op split sums the profiled rounds.
    """
    ids, mask, lengths = size.make_inputs(model)
    run = lambda: system.run(ids, mask)  # noqa: E731
    gemm, gemm_flops_1024 = gemm_case(model.hidden, model.intermediate)
    with torch.inference_mode():
        gemm()
        gemm_calls = measure.calls_for(gemm, 0.2)
    for _ in range(2):
        run()
    calls = measure.calls_for(run, seconds / 2)
    gemm_flops = 2 * model.layers * sum(lengths) * (4 * model.hidden**2 + 2 * model.hidden * model.intermediate)
    gemm_flops += 2 * len(lengths) * model.hidden**2  # pooler
    attn_flops = 4 * model.layers * model.hidden * sum(s * s for s in lengths)
    ms = {key: 0.0 for key, _ in CATEGORIES}
    walls, ceilings, fractions, profiled_total = [], [], [], 0.0
    for _ in range(rounds):
        with torch.inference_mode():
            ceiling = gemm_flops_1024 / measure.timed(gemm, gemm_calls) / 1e9
        wall = measure.timed(run, calls)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = measure.timed(run, calls)
        for evt in prof.key_averages():
            ms[category(evt.key)] += evt.self_cpu_time_total / 1e3 / calls
        profiled_total += profiled * 1e3
        walls.append(wall)
        ceilings.append(ceiling)
        fractions.append((gemm_flops + attn_flops) / wall / 1e9 / ceiling)
    # What the ops leave of the profiled wall time: Python, dispatch, and the profiler's own per-op cost (a few us
    # per op call: visible only at the smallest sizes).
    ms["python"] = max(0.0, profiled_total - sum(ms.values()))
    total = sum(ms.values())
    ms = {k: v / rounds for k, v in ms.items()}
    wall = statistics.median(walls)
    return {
        "model": model.label,
        "size": size.label,
        "tokens": sum(lengths),
        "rounds": rounds,
        "wall_ms": wall * 1e3,
        "walls_ms": [w * 1e3 for w in walls],
        "ms": ms,
        "share": {k: v * rounds / total for k, v in ms.items()},
        "gemm_gflops": gemm_flops / (ms["gemm"] / 1e3) / 1e9 if ms["gemm"] > 0 else None,
        "attention_gflops": attn_flops / (ms["attention"] / 1e3) / 1e9 if ms["attention"] > 0 else None,
        "model_gflops": (gemm_flops + attn_flops) / wall / 1e9,
        "ceiling_gflops": statistics.median(ceilings),
        "ceilings_gflops": ceilings,
        "ceiling_fraction": statistics.median(fractions),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-l6,bert-base")
    ap.add_argument("--sizes", default="1x32,1x128,8x128,32x128,8x512,32x8-128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (ceiling, forward, profiled forward) per cell")
    ap.add_argument("--seconds", type=float, default=1.0, help="about this many seconds of forwards per round")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-profile"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    sizes = [bench.parse_size(s) for s in args.sizes.split(",") if s]
    cells, ceilings = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in [m for m in args.models.split(",") if m]:
            model = bench.load_bench_model(name, workdir)
            system = bench.FastbertSystem("cpp")
            system.prepare(model, torch.float32, torch.device("cpu"), args.threads, workdir)
            for size in sizes:
                cell = profile_cell(system, model, size, args.rounds, args.seconds)
                ceilings.setdefault(model.label, []).extend(cell["ceilings_gflops"])
                cells.append(cell)
                print(
                    f"  {model.label} {size.label}: {cell['wall_ms']:.1f} ms, GEMM {cell['share']['gemm']:.0%} at "
                    f"{cell['gemm_gflops']:.0f} GFLOP/s, attention {cell['share']['attention']:.0%}, "
                    f"model {cell['model_gflops']:.0f} GFLOP/s = {cell['ceiling_fraction']:.0%} of the ceiling "
                    f"(median {cell['ceiling_gflops']:.0f})",
                    flush=True,
                )
            system.release()
    environment = env.environment(torch.device("cpu"), args.threads)
    result = {
        "command": "python benchmarks/cpu_profile.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "ceilings_gflops": ceilings,
        "cells": cells,
    }
    if not args.no_write:
        save(args.out, result, write_markdown)
    return 0


def write_markdown(path: str, r: dict) -> None:
    info = r["environment"]
    head = ["model", "size", "ms", *[label for _, label in CATEGORIES], "GEMM GFLOP/s", "attention GFLOP/s"]
    lines = [
        "# Where fastbert's CPU time goes (cpp backend, fp32)",
        "",
        f"`{r['command'].strip()}`, {r['date']}, commit {info['git_sha']}"
        + (" (uncommitted changes)" if info["git_dirty"] else "")
        + f". {info['device_name']}, {info['cpu_count']} CPUs, {info['threads']} threads; torch "
        + f"{info['versions']['torch']}.",
        "",
        f"Each cell runs {r['cells'][0]['rounds'] if r['cells'] else '?'} rounds of: the GEMM ceiling (fastbert's "
        "oneDNN linear at 1024 tokens on the model's feed-forward shape, weights hot), the forward without the "
        "profiler, the forward under torch.profiler; the host's speed drifts, so ratios are taken within a round. "
        "ms: median unprofiled forward. Shares: each op's self CPU time over the profiled wall time; Python + "
        "dispatch is what the ops leave (it includes the profiler's own few microseconds per op call). GEMM and "
        "attention GFLOP/s: their FLOPs over their profiled time. GEMM ceiling: median over the rounds. Whole "
        "model: useful FLOPs (fastbert.bench.encoder_flops + pooler) per unprofiled second, and the median over "
        "rounds of its ratio to that round's ceiling. Ceilings seen: "
        + ", ".join(f"{k} {min(v):.0f}-{max(v):.0f} GFLOP/s" for k, v in r["ceilings_gflops"].items())
        + ".",
        "",
        "| " + " | ".join(head) + " | GEMM ceiling | whole model, share of the ceiling |",
        "|" + "---|" * (len(head) + 2),
    ]
    for c in r["cells"]:
        shares = [f"{c['share'][k]:.1%}" for k, _ in CATEGORIES]
        gemm = f"{c['gemm_gflops']:.0f}" if c["gemm_gflops"] else "-"
        attn = f"{c['attention_gflops']:.0f}" if c["attention_gflops"] else "-"
        frac = c["ceiling_fraction"]
        lines.append(
            f"| {c['model']} | {c['size']} | {c['wall_ms']:.1f} | "
            + " | ".join(shares)
            + f" | {gemm} | {attn} | {c['ceiling_gflops']:.0f} | {c['model_gflops']:.0f} GFLOP/s = {frac:.0%} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
