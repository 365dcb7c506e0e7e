"""A fine-tuning step on the CPU: fastbert against transformers, fp32 and bf16 autocast, with peak memory.

One step = forward with labels (sequence classification), backward, AdamW step. Systems:

- ``fastbert``: fastbert's own ``AutoModelForSequenceClassification`` (padding-free, cpp backend);
- ``fastbert-optimize``: a transformers model after ``fastbert.optimize`` (its parameters, fastbert's encoder);
- ``hf-eager`` / ``hf-sdpa``: transformers with ``attn_implementation="eager"`` / ``"sdpa"`` on the padded batch.

Each (round, model, size, dtype, system) cell runs in its own process, so the peak memory of one cell is that
process's high-water mark (``VmHWM``) above its resident size just before the first step (model and inputs
built, optimizer state not yet); systems alternate in order between rounds, and the reported time is the median
over rounds of each cell's median step. The same run measures the GEMM ceiling (``torch.mm`` at the step's
shapes, in the same threads and dtype), and each dense fastbert step is given as a fraction of it, counting
3x the forward's FLOPs (``fastbert.bench.models.encoder_flops``).

    python benchmarks/train.py --models minilm-l6,bert-base --sizes 8x128,32x8-128 --dtypes float32,bfloat16 \\
        --rounds 2 --steps 3 --out benchmarks/results/train-cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastbert.bench import env
from fastbert.bench.models import BUILTIN_MODELS, build_random_model, encoder_flops, parse_size

SYSTEMS = ("fastbert", "fastbert-optimize", "hf-sdpa", "hf-eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(system: str, path: str):
    import transformers

    import fastbert

    if system == "fastbert":
        return fastbert.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, backend="cpp")
    attn = "eager" if system == "hf-eager" else "sdpa"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation=attn
    )
    if system == "fastbert-optimize":
        fastbert.optimize(model, backend="cpp")
    return model


def run_cell(args: argparse.Namespace) -> dict:
    """One cell, in this process: build, one warm-up step, ``args.steps`` timed steps; times and peak memory."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = parse_size(args.size)
    model = build(args.system, args.path).train()
    vocab = model.config.vocab_size
    lengths = size.lengths(seed=0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(min(1000, vocab // 2), vocab, (size.batch, max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(0, 2, (size.batch,), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = DTYPES[args.dtype]
    baseline = _status("VmRSS")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up: oneDNN primitives, AdamW state
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"times_s": times, "peak_bytes": _status("VmHWM") - baseline, "tokens": sum(lengths)}


def gemm_ceiling(hidden: int, intermediate: int, tokens: int, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of ``torch.mm`` at the step's GEMM shapes (forward, dX and dW of the FFN and QKV), best of 3."""
    torch.set_num_threads(threads)
    shapes = [
        (tokens, hidden, intermediate),  # FFN in, forward
        (tokens, intermediate, hidden),  # FFN out forward / FFN in dX
        (intermediate, tokens, hidden),  # dW
        (tokens, hidden, 3 * hidden),  # QKV
    ]
    flops, seconds = 0.0, 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        torch.mm(a, b)
        best = min(_time(lambda a=a, b=b: torch.mm(a, b)) for _ in range(3))
        flops += 2.0 * m * k * n
        seconds += best
    return flops / seconds


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spawn(system: str, path: str, size: str, dtype: str, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--cell", "--system", system, "--path", path, "--size", size]
    cmd += ["--dtype", dtype, "--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm-l6,bert-base")
    parser.add_argument("--sizes", default="8x128,32x8-128")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=env.available_cpus())
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args)))
        return 0

    workdir = tempfile.mkdtemp(prefix="fastbert-train-")
    models = [BUILTIN_MODELS[m] for m in args.models.split(",")]
    systems, sizes, dtypes = args.systems.split(","), args.sizes.split(","), args.dtypes.split(",")
    paths = {shape.label: build_random_model(shape, workdir) for shape in models}
    started = time.time()
    result = {
        "what": "fine-tuning step (forward + backward + AdamW), sequence classification, 2 labels",
        "command": "python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": env.environment(torch.device("cpu"), args.threads),
        "load_before": env.load_averages(),
        "cells": [],
        "ceilings": {},
    }
    for shape in models:
        for dtype in dtypes:
            tokens = 1024
            key = f"{shape.label}/{dtype}"
            result["ceilings"][key] = gemm_ceiling(
                shape.hidden, shape.intermediate, tokens, DTYPES[dtype], args.threads
            )
            print(f"GEMM ceiling {key}: {result['ceilings'][key] / 1e9:.1f} GFLOP/s", flush=True)
    samples: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        order = systems if rnd % 2 == 0 else systems[::-1]
        for shape in models:
            for size in sizes:
                for dtype in dtypes:
                    for system in order:
                        cell = spawn(system, paths[shape.label], size, dtype, args.steps, args.threads)
                        samples.setdefault((shape.label, size, dtype, system), []).append(cell)
                        what = cell.get("error") or f"{statistics.median(cell['times_s']) * 1e3:.0f} ms"
                        print(f"round {rnd} {shape.label} {size} {dtype} {system}: {what}", flush=True)
    for (label, size, dtype, system), cells in samples.items():
        shape = next(s for s in models if s.label == label)
        ok = [c for c in cells if "error" not in c]
        row = {"model": label, "size": size, "dtype": dtype, "system": system}
        if not ok:
            row["error"] = cells[0]["error"]
        else:
            lengths = parse_size(size).lengths(seed=0)
            fwd = encoder_flops(lengths, shape.layers, shape.hidden, shape.intermediate)
            ms = statistics.median(statistics.median(c["times_s"]) for c in ok) * 1e3
            row.update(
                median_ms=ms,
                rounds_ms=[statistics.median(c["times_s"]) * 1e3 for c in ok],
                tokens_per_s=ok[0]["tokens"] / (ms / 1e3),
                peak_mib=max(c["peak_bytes"] for c in ok) / 2**20,
                step_gflops=3 * fwd / 1e9,
                fraction_of_ceiling=3 * fwd / (ms / 1e3) / result["ceilings"][f"{label}/{dtype}"],
            )
        result["cells"].append(row)
    result["load_after"] = env.load_averages()
    result["wall_s"] = time.time() - started
    if args.out:
        from _results import save

        save(args.out, result, write_markdown)
    else:
        print(json.dumps(result, indent=1))
    return 0


def write_markdown(path: str, result: dict) -> None:
    e = result["environment"]
    lines = [
        "# Fine-tuning step on the CPU: fastbert vs transformers",
        "",
        f"{result['what']}. Machine: {e['device_name']}, {e['threads']} threads; torch {e['versions'].get('torch')}, "
        f"transformers {e['versions'].get('transformers')}, "
        f"git {e.get('git_sha')}{' (dirty)' if e.get('git_dirty') else ''}. Load average before "
        f"{result['load_before']}, after {result['load_after']}; {result['wall_s'] / 60:.1f} min.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Each cell ran in its own process, systems alternating between rounds; time = median over rounds of each "
        "round's median step. Peak = the process's high-water RSS above its RSS just before the first step. "
        "vs best HF = the faster of hf-sdpa / hf-eager divided by this system. Ceiling = `torch.mm` FLOP/s at the "
        "step's GEMM shapes in the same run; 'of ceiling' counts 3x the forward's useful FLOPs (no padding).",
        "",
        "GEMM ceilings: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in result["ceilings"].items()),
        "",
        "| model | size | dtype | system | ms/step | tokens/s | vs best HF | of ceiling | peak MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    cells = result["cells"]
    for row in cells:
        if "error" in row:
            lines.append(
                f"| {row['model']} | {row['size']} | {row['dtype']} | {row['system']} | error: {row['error']} |||||"
            )
            continue
        peers = [
            c["median_ms"]
            for c in cells
            if (c["model"], c["size"], c["dtype"]) == (row["model"], row["size"], row["dtype"])
            and c["system"].startswith("hf-")
            and "median_ms" in c
        ]
        vs = f"{min(peers) / row['median_ms']:.2f}x" if peers else "-"
        lines.append(
            f"| {row['model']} | {row['size']} | {row['dtype']} | {row['system']} | {row['median_ms']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {vs} | {row['fraction_of_ceiling']:.0%} | {row['peak_mib']:.0f} |"
        )
    Path(path).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
