"""CPU kernel ceilings: how fast the GEMMs and the attention op run on this machine, in GFLOP/s.

Answers "what is the ceiling a whole-model number should be compared with?". GEMMs: BERT-base's linear shapes at
a small (32 tokens) and a large (1024 tokens) M, through torch's default path (``F.linear``: MKL on CPU) and
through fastbert's cpp backend (oneDNN on a weight prepacked once), fp32 and bf16. Attention: fastbert's cpp
attention op alone at dense shapes of MiniLM (head_dim 32) and BERT-base (head_dim 64).

Every case runs once per round, rounds interleaved; a case's time is its median over rounds.

    python benchmarks/cpu_kernels.py                  # writes benchmarks/results/cpu-kernels.{json,md}
    python benchmarks/cpu_kernels.py --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastbert.bench import env, measure


def gemm_cases(dtypes: list[torch.dtype]) -> list[tuple[str, int, Callable[[], object]]]:
    from fastbert import _cpp

    cases = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for m in (32, 1024):
            for k, n in ((768, 2304), (768, 3072), (3072, 768)):
                x = torch.randn(m, k, generator=gen).to(dtype)
                w = torch.randn(n, k, generator=gen).to(dtype)
                b = torch.randn(n, generator=gen).to(dtype)
                packed = _cpp.prepack_linear(w)
                label = f"{str(dtype).removeprefix('torch.')} ({m}x{k}) @ ({k}x{n})"
                flops = 2 * m * k * n
                cases.append((f"gemm {label} F.linear", flops, lambda x=x, w=w, b=b: F.linear(x, w, b)))
                cases.append(
                    (
                        f"gemm {label} fastbert cpp (oneDNN, prepacked)",
                        flops,
                        lambda x=x, w=w, b=b, p=packed: _cpp.linear(x, w, b, None, p),
                    )
                )
    return cases


def attention_cases() -> list[tuple[str, int, Callable[[], object]]]:
    from fastbert import _cpp

    cases = []
    gen = torch.Generator().manual_seed(0)
    # Long sequences of both head_dims, then short ones: (32,32) and (32,128) at head_dim 32 are the shapes of
    # sentence-embedding batches (text -> vectors with MiniLM), where per-(sequence, head) costs dominate.
    shapes = ((8, 512, 384, 12), (8, 512, 768, 12), (32, 128, 768, 12), (32, 128, 384, 12), (32, 32, 384, 12))
    for batch, seqlen, hidden, heads in shapes:
        tokens = batch * seqlen
        qkv = torch.randn(tokens, 3 * hidden, generator=gen)
        cu = torch.arange(0, tokens + 1, seqlen, dtype=torch.int32)
        scale = 1.0 / math.sqrt(hidden // heads)
        flops = 4 * hidden * seqlen * tokens  # QK^T and PV
        label = f"attention fp32 ({batch},{seqlen}) heads={heads} head_dim={hidden // heads}"
        cases.append((label, flops, lambda q=qkv, c=cu, s=seqlen, h=heads, sc=scale: _cpp.attention(q, c, s, h, sc)))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 GEMMs only")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-kernels"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtypes = [torch.float32] if args.no_bf16 else [torch.float32, torch.bfloat16]
    cases = gemm_cases(dtypes) + attention_cases()
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    with torch.inference_mode():
        for _name, _, fn in cases:  # warm-up (oneDNN primitive creation, first-touch)
            fn()
        for r in range(args.rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for name, _, fn in order:
                times[name].append(measure.timed(fn, min_seconds=0.05))  # repeated until 50 ms passed
    rows = []
    for name, flops, _ in cases:
        ts = sorted(times[name])
        median = ts[len(ts) // 2]
        rows.append({"case": name, "flops": flops, "ms_median": median * 1e3, "gflops": flops / median / 1e9})
        print(f"{name:<75} {median * 1e3:9.3f} ms {flops / median / 1e9:7.1f} GFLOP/s", flush=True)

    sha = env.git_sha(short=True) or "unknown"
    cpu = env.cpu_name() or platform.processor()
    from fastbert import _cpp

    result = {
        "benchmark": "cpu-kernels",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "git_sha": sha,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "native_bf16": _cpp.native_bf16(),
        "kernel_table": _cpp.isa(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "loadavg_after": env.load_averages(),
        "rows": rows,
    }
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
        lines = [
            "# CPU kernel ceilings",
            "",
            f"`{result['command']}` at {sha}, {result['date']}. {cpu}, {result['cpus']} CPUs, {args.threads} "
            f"threads, torch {torch.__version__}, fastbert kernel table `{result['kernel_table']}`, bfloat16 "
            f"instructions: {'yes' if result['native_bf16'] else 'no (oneDNN emulates bf16)'}. Median of "
            f"{args.rounds} interleaved rounds; load average after {tuple(round(x, 2) for x in result['loadavg_after'])}.",
            "",
            "| case | median ms | GFLOP/s |",
            "|---|---|---|",
            *(f"| {r['case']} | {r['ms_median']:.3f} | {r['gflops']:.1f} |" for r in rows),
            "",
        ]
        with open(args.out + ".md", "w") as fh:
            fh.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
