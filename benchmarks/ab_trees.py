"""Before/after: the same ``fastbert bench`` cells from two checkouts, run alternately on one machine.

Each round runs ``python -m fastbert.cli bench`` once in every tree (the order alternates between rounds), each
in its own process with the tree first on ``PYTHONPATH`` (the old tree needs its extension built in place:
``python setup.py build_ext --inplace``). Within a run, every fastbert cell is divided by transformers eager's
time in the same run, which cancels most of the host's drift; the reported change is the median over rounds of
(new ratio / old ratio) per cell, with its min and max, so a cell is slower only if that median exceeds the
spread the rounds themselves show.

    python benchmarks/ab_trees.py --old /work/old --new . --rounds 5 \\
        --bench-args "--models minilm-l6,bert-base --systems fastbert-cpp,fastbert-torch,hf-eager \\
                      --sizes 1x32,8x128,32x8-128 --rounds 3 --warmup 1"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import save

from fastbert.bench import env


def env_git(tree: Path) -> str | None:
    """The tree's commit (with ``+dirty`` for uncommitted changes)."""
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True)
    return sha.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha else None


def run_tree(tree: Path, bench_args: list[str], out: Path) -> dict:
    environ = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "fastbert.cli", "bench", *bench_args, "--json", str(out), "--no-progress"]
    subprocess.run(cmd, cwd=tree, env=environ, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def ratios(report: dict) -> dict[tuple[str, str, str, str], float]:
    """(model, dtype, size, system) -> median time / hf-eager median time, for every fastbert cell."""
    rows = [r for r in report["results"] if r["status"] == "ok"]
    eager = {(r["model"], r["dtype"], r["size"]): r["median_ms"] for r in rows if r["system"] == "hf-eager"}
    return {
        (r["model"], r["dtype"], r["size"], r["system"]): r["median_ms"] / eager[(r["model"], r["dtype"], r["size"])]
        for r in rows
        if r["system"].startswith("fastbert") and (r["model"], r["dtype"], r["size"]) in eager
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, type=Path)
    parser.add_argument("--new", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bench-args", required=True)
    parser.add_argument("--out", default="benchmarks/results/ab-trees")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    bench_args = shlex.split(args.bench_args)
    per_round: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            got = {}
            for name in order:
                got[name] = ratios(run_tree(trees[name], bench_args, Path(tmp) / f"{name}-{r}.json"))
                print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
            per_round.append(got)
    cells = sorted(set(per_round[0]["old"]) & set(per_round[0]["new"]))
    table = []
    for cell in cells:
        changes = [rd["new"][cell] / rd["old"][cell] for rd in per_round if cell in rd["new"] and cell in rd["old"]]
        table.append(
            {
                "model": cell[0],
                "dtype": cell[1],
                "size": cell[2],
                "system": cell[3],
                "old_vs_eager": statistics.median(rd["old"][cell] for rd in per_round),
                "new_vs_eager": statistics.median(rd["new"][cell] for rd in per_round),
                "new_over_old_median": statistics.median(changes),
                "new_over_old_min": min(changes),
                "new_over_old_max": max(changes),
            }
        )
    meta = {
        "cpu": env.cpu_name(),
        "versions": env.versions(),
        "host": env.host(),
        "git": {name: env_git(tree) for name, tree in trees.items()},
        "command": " ".join(["python", *sys.argv]),
        "FASTBERT_CPU_ISA": os.environ.get("FASTBERT_CPU_ISA"),
        "trees": {k: str(v) for k, v in trees.items()},
        "rounds": args.rounds,
    }
    lines = [
        "# Before/after: the same fastbert bench cells from two trees, alternating runs",
        "",
        f"- command: `{meta['command']}`",
        f"- bench arguments: `{args.bench_args}`",
        "- each cell: time / transformers eager's time in the same run; change = median over rounds of new/old "
        "(min-max); above 1 = the new tree is slower",
        "",
        "| model | size | system | old / eager | new / eager | new / old (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['model']} | {t['size']} | {t['system']} | {t['old_vs_eager']:.3f} | {t['new_vs_eager']:.3f} | "
            f"{t['new_over_old_median']:.3f} ({t['new_over_old_min']:.3f}-{t['new_over_old_max']:.3f}) |"
        )
    isa = meta["FASTBERT_CPU_ISA"]
    lines[1:1] = [
        "",
        f"- CPU: {meta['cpu']}; trees: " + ", ".join(f"{k} {v}" for k, v in meta["git"].items()),
        f"- FASTBERT_CPU_ISA={isa} for both trees" if isa else "- each tree's own kernel-table choice",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    save(args.out, {"meta": meta, "cells": table}, lambda path, _result: Path(path).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
