"""``fastbert bench`` on the command line: the options, the presets and the run that writes the files."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import env
from .models import BUILTIN_MODELS, parse_size
from .report import jsonable, render_markdown, render_plot, render_text, run_report
from .systems import ALL_SYSTEM_NAMES, DTYPES, expand_systems

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


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastbert bench``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="MiniLM-L6, 3 sizes, fastbert + hf eager/sdpa (about 5 min on 2 shared cores, load ~7)",
    )
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
        "--dtype",
        type=_csv,
        default=None,
        help="comma-separated fp32, bf16, fp16, int8 (default: fp32 on CPU, fp16 on CUDA). int8 (CPU only): fastbert "
        "loads with quantize='int8', onnxruntime-int8 runs ONNX Runtime's dynamic int8, every other system runs fp32 "
        "as the baseline; the report's precision column says which",
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


def run_bench(args: argparse.Namespace) -> int:
    """Run ``fastbert bench`` with parsed ``args``; print the table, write the requested files."""
    preset = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = args.dtype or (["fp32"] if device.type == "cpu" else ["fp16"])
    for d in dtypes:
        if d not in DTYPES:
            print(f"fastbert bench: unknown dtype {d!r}; choose from {', '.join(DTYPES)}", file=sys.stderr)
            return 2
        if d == "int8" and device.type != "cpu":
            print("fastbert bench: --dtype int8 runs on CPU only (use --device cpu)", file=sys.stderr)
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
    threads = args.threads or env.available_cpus()
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
        Path(args.json).write_text(json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(report, args.note))
    if args.plot:
        render_plot(report, args.plot)
    return 0 if all(r["status"] == "ok" for r in report["results"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastbert.bench``: the same options as ``fastbert bench``."""
    from fastbert import bench

    parser = argparse.ArgumentParser(prog="python -m fastbert.bench", description=bench.__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "fastbert.bench", *(sys.argv[1:] if argv is None else argv)])
    return run_bench(args)
