"""GPU benchmark of the triton backend: BERT-base forward vs transformers eager / sdpa / torch.compile.

One command on a CUDA machine (no network needed):

    python -m benchmarks.gpu                     # writes benchmarks/results/gpu-<device>-<time>.{json,md}
    python -m benchmarks.gpu --out DIR --budget 540

What it does, most important first (a time budget skips what does not fit, and results are rewritten after
every measurement, so an interrupted run still leaves everything measured so far):

1. environment (device, versions, git sha, command); the bf16 and fp16 tensor-core peak measured with a large
   matmul;
2. correctness at full size: each kernel vs fastbert.reference in fp32 on the GPU, and the whole model vs
   transformers fp32 (error must be < 3x transformers' own error at the same dtype, STYLE.md);
3. the attention kernel alone (TFLOP/s, d=64, seq 128/512, plus the varlen batch) next to torch sdpa;
4. BERT-base forward, fp16 and bf16, at (1,128), (8,128), (32,128), (32,512) and a varlen batch (32 sequences,
   lengths uniform in 8..512): fastbert (padded API and forward_packed) vs transformers eager and sdpa, then
   torch.compile of the sdpa model. Timed with CUDA events after warm-up, median of repeats.

FLOPs = 12 x sum over sequences of L x (24 H^2 + 4 L H) (real tokens only, so padding counts as waste).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

INSTALL_HINT = "from the repository root: pip install --no-build-isolation -e ."
try:
    from fastbert.bench import env, measure
except ImportError as exc:  # fastbert is always pip-installed (editable or wheel); this script does not patch paths
    sys.exit(f"benchmarks/gpu.py: cannot import fastbert ({exc}); install it {INSTALL_HINT}")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 128), (8, 128), (32, 128), (32, 512), "varlen"]
VARLEN_BATCH, VARLEN_MIN, VARLEN_MAX = 32, 8, 512
TARGETS = {
    "pct_peak_32x128": 55.0,
    "pct_peak_32x512": 55.0,
    "speedup_vs_sdpa_fp16_32x128": 2.0,
    "speedup_vs_sdpa_varlen": 3.0,
    "attention_tflops_d64_s512": 250.0,
}


# ------------------------------------------------------------------------------------------------------------
# plumbing


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


class Report:
    """Collects rows and rewrites the JSON and markdown after every addition."""

    def __init__(self, out_dir: Path, meta: dict):
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dev = meta.get("device", "gpu").replace(" ", "_").replace("/", "_")
        self.json_path = out_dir / f"gpu-{dev}-{stamp}.json"
        self.md_path = out_dir / f"gpu-{dev}-{stamp}.md"
        self.data = {"meta": meta, "peak": {}, "correctness": [], "attention": [], "model": [], "errors": []}

    def add(self, section: str, row) -> None:
        if isinstance(self.data[section], list):
            self.data[section].append(row)
        else:
            self.data[section].update(row)
        self.write()

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {exc}"
        print("ERROR", msg, file=sys.stderr)
        self.add("errors", {"what": what, "error": msg, "traceback": traceback.format_exc()[-3000:]})

    def write(self) -> None:
        self.json_path.write_text(json.dumps(self.data, indent=1, default=str))
        self.md_path.write_text(markdown(self.data))


def iters_for(fn) -> int:
    """Calls per repeat so that one repeat takes about 200 ms (3 to 200)."""
    return measure.calls_for(fn, 0.2, device=torch.device("cuda"), least=3, most=200)


def versions() -> dict:
    out = {"python": env.host()["python"], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        out[name] = env.version(name) or "unavailable (not installed)"
    out["git_sha"] = env.git_sha() or "unknown"
    return out


# ------------------------------------------------------------------------------------------------------------
# inputs and FLOPs


def shape_lengths(shape) -> list[int]:
    if shape == "varlen":
        g = torch.Generator().manual_seed(0)
        return torch.randint(VARLEN_MIN, VARLEN_MAX + 1, (VARLEN_BATCH,), generator=g).tolist()
    batch, seqlen = shape
    return [seqlen] * batch


def shape_name(shape) -> str:
    return "varlen(32, 8..512)" if shape == "varlen" else f"({shape[0]},{shape[1]})"


def model_flops(lengths: list[int], hidden: int = 768, layers: int = 12) -> float:
    return float(sum(layers * n * (24 * hidden * hidden + 4 * n * hidden) for n in lengths))


def padded_batch(lengths: list[int], vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    seqlen = max(lengths)
    ids = torch.randint(1000, vocab, (len(lengths), seqlen), generator=g)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------------------
# measurements


def measure_peak(report: Report, n: int = 8192) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms = measure.cuda_event_ms(lambda a=a, b=b: a @ b, warmup=5, iters=20)
        tflops = 2 * n**3 / (ms * 1e-3) / 1e12
        print(f"peak {dtype}: {tflops:.1f} TFLOP/s ({n}^3 matmul, {ms:.3f} ms)")
        report.add("peak", {str(dtype).replace("torch.", ""): {"tflops": tflops, "n": n, "ms": ms}})
        del a, b


def check_kernels(report: Report, K, R) -> None:
    """Each kernel at BERT-base size vs the reference in fp32 on the GPU (fp16/bf16/fp32 storage)."""
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = shape_lengths("varlen")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.cuda()
    total, hidden = int(cu[-1]), 768
    for dtype in (torch.float32, torch.float16, torch.bfloat16):

        def r(*shape, scale=1.0, dtype=dtype):
            return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

        x, res, bias = r(total, hidden), r(total, hidden), r(hidden)
        w, b = r(hidden), r(hidden)
        qkv = r(total, 3 * hidden, scale=2.0)
        up = r(total, 3072, scale=2.0)
        cases = _kernel_cases(R, x, res, bias, w, b, qkv, up, cu, max(lengths))
        for name, (run, exact_fn) in cases.items():
            try:
                exact = exact_fn()
                err = (run(K).double() - exact).abs().max().item()
                base = (run(R).double() - exact).abs().max().item()
                ok = err <= 2 * base + tol[dtype]
                row = {"what": name, "dtype": str(dtype), "err": err, "torch_err": base, "ok": ok}
                print(f"check {name} {dtype}: err {err:.3g} (torch {base:.3g}) {'ok' if ok else 'FAIL'}")
                report.add("correctness", row)
            except Exception as exc:
                report.error(f"check {name} {dtype}", exc)
        torch.cuda.empty_cache()


def _kernel_cases(R, x, res, bias, w, b, qkv, up, cu, max_len) -> dict:
    """name -> (run(backend module), float64 reference) at BERT-base size."""
    t64 = [t.double() for t in (x, bias, res, w, b)]
    return {
        "bias_residual_layernorm": (
            lambda m: m.bias_residual_layernorm(x, bias, res, w, b, 1e-12),
            lambda: R.bias_residual_layernorm(*t64, 1e-12),
        ),
        "bias_activation(gelu)": (
            lambda m: m.bias_activation(up, bias.repeat(4), "gelu"),
            lambda: R.bias_activation(up.double(), bias.repeat(4).double(), "gelu"),
        ),
        "attention(d=64)": (
            lambda m: m.attention(qkv, cu, max_len, 12, 0.125),
            lambda: R.attention(qkv.float(), cu, max_len, 12, 0.125).double(),
        ),
    }


def measure_attention(report: Report, K, budget: Budget) -> None:
    import torch.nn.functional as F

    for dtype in (torch.float16, torch.bfloat16):
        for shape in [(32, 128), (32, 512), (8, 512), "varlen"]:
            if budget.left() < 60:
                return
            try:
                lengths = shape_lengths(shape)
                cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
                cu[1:] = torch.tensor(lengths).cumsum(0)
                cu = cu.cuda()
                total, heads, d = int(cu[-1]), 12, 64
                qkv = torch.randn(total, 3 * heads * d, device="cuda", dtype=dtype)
                flops = sum(4 * n * n * heads * d for n in lengths)
                fn = functools.partial(K.attention, qkv, cu, max(lengths), heads, d**-0.5)
                ms = measure.cuda_event_ms(fn, warmup=10, iters=iters_for(fn))
                row = {"dtype": str(dtype), "shape": shape_name(shape), "head_dim": d, "fastbert_ms": ms}
                row["fastbert_tflops"] = flops / (ms * 1e-3) / 1e12
                if shape != "varlen":  # dense sdpa (flash backend when available) on the same problem
                    b, s = shape
                    q, k, v = (torch.randn(b, heads, s, d, device="cuda", dtype=dtype) for _ in range(3))
                    sd = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    row["sdpa_ms"] = measure.cuda_event_ms(sd, warmup=10, iters=iters_for(sd))
                    row["sdpa_tflops"] = flops / (row["sdpa_ms"] * 1e-3) / 1e12
                print("attention", row)
                report.add("attention", row)
            except Exception as exc:
                report.error(f"attention {dtype} {shape}", exc)


def build_models(path: str, dtype, fastbert) -> dict:
    import transformers

    models = {}
    models["fastbert"] = fastbert.AutoModel.from_pretrained(path, device="cuda", dtype=dtype, backend="triton")
    assert models["fastbert"].backend.name == "triton", models["fastbert"].backend
    for impl in ("eager", "sdpa"):
        m = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, dtype=dtype)
        models[f"hf-{impl}"] = m.to("cuda").eval()
    return models


def check_model(report: Report, models: dict, hf32, dtype, shape) -> None:
    lengths = shape_lengths(shape)
    ids, mask = padded_batch(lengths, 30522, "cuda")
    valid = mask.bool()
    with torch.inference_mode():
        ref = hf32(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        base = models["hf-eager"](input_ids=ids, attention_mask=mask).last_hidden_state.float()
        got = models["fastbert"](input_ids=ids, attention_mask=mask).last_hidden_state.float()
    err = (got[valid] - ref[valid]).abs().max().item()
    base_err = (base[valid] - ref[valid]).abs().max().item()
    ok = bool(err < 3 * base_err) and math.isfinite(err)
    row = {"what": f"model {shape_name(shape)}", "dtype": str(dtype), "err": err, "torch_err": base_err, "ok": ok}
    print(f"model check {shape_name(shape)} {dtype}: fastbert err {err:.3g}, HF {dtype} err {base_err:.3g}")
    report.add("correctness", row)


def time_system(name: str, model, shape, warmup: int) -> float:
    lengths = shape_lengths(shape)
    ids, mask = padded_batch(lengths, 30522, "cuda")
    if name == "fastbert-packed":
        import fastbert.padding as padding

        p = padding.unpad(mask)
        packed_ids = ids.reshape(-1)[p.indices]
        cu, max_len = p.cu_seqlens, p.max_seqlen

        def fn():
            with torch.inference_mode():
                return model.forward_packed(packed_ids, cu, max_len)

    else:

        def fn():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask)

    return measure.cuda_event_ms(fn, warmup=warmup, iters=iters_for(fn))


def measure_models(report: Report, path: str, dtypes, budget: Budget, fastbert, with_compile: bool) -> None:
    import transformers

    hf32 = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").to("cuda").eval()
    for dtype in dtypes:
        if budget.left() < 60:
            report.add("errors", {"what": f"models {dtype}", "error": "skipped: time budget"})
            continue
        try:
            models = build_models(path, dtype, fastbert)
        except Exception as exc:
            report.error(f"build models {dtype}", exc)
            continue
        for shape in SHAPES:
            try:
                check_model(report, models, hf32, dtype, shape)
            except Exception as exc:
                report.error(f"model check {shape_name(shape)} {dtype}", exc)
        for shape in SHAPES:
            lengths = shape_lengths(shape)
            row = {"dtype": str(dtype), "shape": shape_name(shape), "tokens": sum(lengths)}
            row["gflop"] = model_flops(lengths) / 1e9
            for name, model in (
                ("fastbert", models["fastbert"]),
                ("fastbert-packed", models["fastbert"]),
                ("hf-eager", models["hf-eager"]),
                ("hf-sdpa", models["hf-sdpa"]),
            ):
                if budget.left() < 30:
                    row[f"{name}_ms"] = "skipped: time budget"
                    continue
                try:
                    row[f"{name}_ms"] = time_system(name, model, shape, warmup=10)
                except Exception as exc:
                    report.error(f"time {name} {shape_name(shape)} {dtype}", exc)
            print("model", row)
            report.add("model", row)
        del models
        torch.cuda.empty_cache()
    del hf32
    if not with_compile:
        return
    # torch.compile last: it is the slowest to set up and the least important to finish.
    dynamo = importlib.import_module("torch._dynamo")
    dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    for dtype in dtypes:
        try:
            m = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to("cuda").eval()
            compiled = torch.compile(m)
        except Exception as exc:
            report.error(f"torch.compile setup {dtype}", exc)
            continue
        for row in report.data["model"]:
            if row["dtype"] != str(dtype):
                continue
            if budget.left() < 90:
                row["hf-sdpa-compile_ms"] = "skipped: time budget"
                continue
            shape = next(s for s in SHAPES if shape_name(s) == row["shape"])
            try:
                timing = functools.partial(time_system, "compile", compiled, shape, warmup=3)
                row["hf-sdpa-compile_ms"], seconds = measure.timed_call(timing)  # seconds: compile included
                row["compile_setup_s"] = round(seconds, 1)
                print("compile", row["shape"], dtype, row["hf-sdpa-compile_ms"])
            except Exception as exc:
                report.error(f"torch.compile {row['shape']} {dtype}", exc)
            report.write()
        del m, compiled
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------
# report


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) else None


def derived(data: dict) -> dict:
    """%-of-peak, speedups and the targets, computed from the rows."""
    peak = data["peak"].get("bfloat16", {}).get("tflops")
    out = {"rows": [], "targets": {}}
    for row in data["model"]:
        fb = _num(row.get("fastbert_ms"))
        d = {"dtype": row["dtype"], "shape": row["shape"]}
        if fb:
            d["fastbert_tflops"] = row["gflop"] / fb
            d["pct_of_bf16_peak"] = 100 * d["fastbert_tflops"] / peak if peak else None
            for base in ("hf-eager", "hf-sdpa", "hf-sdpa-compile"):
                if _num(row.get(f"{base}_ms")):
                    d[f"x_vs_{base}"] = row[f"{base}_ms"] / fb
        out["rows"].append(d)

    def find(dtype, shape):
        return next((r for r in out["rows"] if r["dtype"] == dtype and r["shape"] == shape), {})

    t = out["targets"]
    for shape in ("(32,128)", "(32,512)"):
        key = f"pct_peak_{shape.strip('()').replace(',', 'x')}"
        vals = [find(dt, shape).get("pct_of_bf16_peak") for dt in ("torch.bfloat16", "torch.float16")]
        vals = [v for v in vals if v is not None]
        t[key] = {"target": TARGETS[key], "measured": max(vals) if vals else None}
    t["speedup_vs_sdpa_fp16_32x128"] = {
        "target": TARGETS["speedup_vs_sdpa_fp16_32x128"],
        "measured": find("torch.float16", "(32,128)").get("x_vs_hf-sdpa"),
    }
    vals = [find(dt, "varlen(32, 8..512)").get("x_vs_hf-sdpa") for dt in ("torch.float16", "torch.bfloat16")]
    vals = [v for v in vals if v is not None]
    t["speedup_vs_sdpa_varlen"] = {"target": TARGETS["speedup_vs_sdpa_varlen"], "measured": max(vals) if vals else None}
    att = [r["fastbert_tflops"] for r in data["attention"] if r["shape"] == "(32,512)"]
    t["attention_tflops_d64_s512"] = {
        "target": TARGETS["attention_tflops_d64_s512"],
        "measured": max(att) if att else None,
    }
    for v in t.values():
        v["met"] = None if v["measured"] is None else v["measured"] >= v["target"]
    return out


def _f(x, fmt=".3f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def markdown(data: dict) -> str:
    m = data["meta"]
    d = derived(data)
    lines = [
        f"# fastbert GPU benchmark: {m.get('device')}",
        "",
        f"- command: `{m.get('command')}`",
        f"- versions: {json.dumps(m.get('versions'))}",
        f"- fastbert.kernels: {m.get('kernels_from')}; started {m.get('started')}",
        "- peak (measured, 8192^3 matmul): "
        + ", ".join(f"{k} {_f(v.get('tflops'), '.1f')} TFLOP/s" for k, v in data["peak"].items()),
        "",
        "## Targets",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---|---|",
    ]
    for k, v in d["targets"].items():
        lines.append(f"| {k} | >= {v['target']} | {_f(v['measured'], '.2f')} | {v['met']} |")
    lines += ["", "## BERT-base forward (ms; median of repeats, CUDA events)", ""]
    lines.append(
        "| dtype | shape | tokens | fastbert | fastbert packed | HF eager | HF sdpa | HF sdpa + compile "
        "| fastbert TFLOP/s | % bf16 peak | x eager | x sdpa | x compile |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, dr in zip(data["model"], d["rows"], strict=False):
        lines.append(
            f"| {row['dtype'].replace('torch.', '')} | {row['shape']} | {row['tokens']} | {_f(row.get('fastbert_ms'))} "
            f"| {_f(row.get('fastbert-packed_ms'))} | {_f(row.get('hf-eager_ms'))} | {_f(row.get('hf-sdpa_ms'))} "
            f"| {_f(row.get('hf-sdpa-compile_ms'))} | {_f(dr.get('fastbert_tflops'), '.1f')} "
            f"| {_f(dr.get('pct_of_bf16_peak'), '.1f')} | {_f(dr.get('x_vs_hf-eager'), '.2f')} "
            f"| {_f(dr.get('x_vs_hf-sdpa'), '.2f')} | {_f(dr.get('x_vs_hf-sdpa-compile'), '.2f')} |"
        )
    lines += ["", "## Attention kernel alone (12 heads x 64)", ""]
    lines += ["| dtype | shape | fastbert ms | TFLOP/s | sdpa ms | sdpa TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in data["attention"]:
        lines.append(
            f"| {r['dtype'].replace('torch.', '')} | {r['shape']} | {_f(r['fastbert_ms'])} "
            f"| {_f(r['fastbert_tflops'], '.1f')} | {_f(r.get('sdpa_ms'))} | {_f(r.get('sdpa_tflops'), '.1f')} |"
        )
    lines += [
        "",
        "## Correctness at full size",
        "",
        "| what | dtype | max err | torch err | ok |",
        "|---|---|---|---|---|",
    ]
    for r in data["correctness"]:
        lines.append(
            f"| {r['what']} | {r['dtype']} | {_f(r['err'], '.3g')} | {_f(r['torch_err'], '.3g')} | {r['ok']} |"
        )
    if data["errors"]:
        lines += ["", "## Errors and skips", ""] + [f"- {e['what']}: {e['error']}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastbert triton backend vs transformers on a CUDA GPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for JSON + markdown")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; later phases are skipped past it")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to set up)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    budget = Budget(args.budget)
    try:
        import fastbert.kernels as K
    except ImportError as exc:
        print(f"cannot import fastbert.kernels ({exc}): install fastbert {INSTALL_HINT}", file=sys.stderr)
        return 2
    import transformers

    import fastbert
    from fastbert import reference as R

    if getattr(K, "UNAVAILABLE_REASON", None):
        print(f"triton backend unavailable: {K.UNAVAILABLE_REASON}", file=sys.stderr)
        return 3
    meta = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu", *sys.argv[1:]]),
        "kernels_from": K.__file__,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "flop_model": "12 x sum_seq L (24 H^2 + 4 L H), H=768, real tokens only",
    }
    report = Report(Path(args.out), meta)
    print(json.dumps(meta, indent=1))
    torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    for what, step in (
        ("peak", lambda: measure_peak(report)),
        ("kernel checks", lambda: check_kernels(report, K, R)),
        ("attention", lambda: measure_attention(report, K, budget)),
    ):
        try:
            step()
        except Exception as exc:
            report.error(what, exc)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            torch.manual_seed(0)
            hf = transformers.BertModel(transformers.BertConfig())  # bert-base-uncased shapes, random weights
            hf.save_pretrained(tmp)
            del hf
            measure_models(report, tmp, dtypes, budget, fastbert, with_compile=not args.no_compile)
        except Exception as exc:
            report.error("models", exc)
    report.write()
    print(report.md_path.read_text())
    print(f"wrote {report.json_path} and {report.md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
