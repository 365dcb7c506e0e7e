"""GPU benchmark of the triton backend: BERT-base forward and training vs transformers eager / sdpa / compile.

One command on a CUDA machine (no network needed):

    python -m benchmarks.gpu                     # writes benchmarks/results/gpu-<device>-<time>.{json,md}
    python -m benchmarks.gpu --out DIR --budget 540 --sections train,grad

And on any machine, without a GPU, to keep that command from rotting:

    python -m benchmarks.gpu --dry-run           # every cell, tiny shapes, CPU, TRITON_INTERPRET=1, temp dir

What it does, most important first (a time budget skips what does not fit, and results are rewritten after
every cell, so an interrupted run still leaves everything measured so far):

1. environment (device, versions, git sha, command); the bf16 and fp16 tensor-core peak measured with a large
   matmul;
2. correctness at full size: each kernel vs fastbert.reference in fp32 on the GPU, and the whole model vs
   transformers fp32 (error must be < 3x transformers' own error at the same dtype, STYLE.md);
3. the attention kernel alone (TFLOP/s, d=64, seq 128/512, plus the varlen batch) next to torch sdpa;
4. BERT-base forward, fp16 and bf16, at (1,128), (8,128), (32,128), (32,512) and a varlen batch (32 sequences,
   lengths uniform in 8..512): fastbert (padded API and forward_packed) vs transformers eager and sdpa. Timed
   with CUDA events after warm-up, median of repeats;
5. training steps (issue 12): BERT-base with a sequence-classification head, bf16, at (32,128) and the varlen
   batch; one step = forward + backward + AdamW step; fastbert (triton, ``model.train()``) vs transformers sdpa
   and eager on the padded batch: ms/step, tokens/s, peak memory, speed-up vs sdpa next to the targets;
6. gradient check: loss and every parameter's gradient, dropout 0, fp32 and bf16, fastbert and transformers
   each against transformers in float64 (error relative to the gradient's max-abs);
7. torch.compile of the transformers sdpa model (last: slowest to set up).

Every cell (one measurement or check) is recorded in the report's ``cells`` with status ok / error / skipped
and the reason; the plan's list of cells is recorded too, so a cell that never ran shows as "not run".

FLOPs = 12 x sum over sequences of L x (24 H^2 + 4 L H) (real tokens only, so padding counts as waste); a
training step is counted as 3x its forward.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

INSTALL_HINT = "from the repository root: pip install --no-build-isolation -e ."
try:
    from fastbert.bench import env, measure
except ImportError as exc:  # fastbert is always pip-installed (editable or wheel); this script does not patch paths
    sys.exit(f"benchmarks/gpu.py: cannot import fastbert ({exc}); install it {INSTALL_HINT}")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("peak", "checks", "attention", "forward", "train", "grad", "compile")
FORWARD_SYSTEMS = ("fastbert", "fastbert-packed", "hf-eager", "hf-sdpa")
TRAIN_SYSTEMS = ("fastbert", "hf-sdpa", "hf-eager")
KERNEL_CASES = ("bias_residual_layernorm", "bias_activation(gelu)", "attention")
TARGETS = {
    "pct_peak_32x128": 55.0,
    "pct_peak_32x512": 55.0,
    "speedup_vs_sdpa_fp16_32x128": 2.0,
    "speedup_vs_sdpa_varlen": 3.0,
    "attention_tflops_d64_s512": 250.0,
    "train_speedup_vs_sdpa_32x128": 1.3,  # issue 12: bf16 training step, dense batch
    "train_speedup_vs_sdpa_varlen": 2.5,  # issue 12: bf16 training step, 32 x U[8,512]
}
#: Relative gradient error floors (error / max-abs of the reference gradient), the STYLE.md floors per dtype.
GRAD_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: A reference gradient below this fraction of the largest one is taken as zero (``relative_errors``).
ZERO_GRAD = 1e-8
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


# ------------------------------------------------------------------------------------------------------------
# the plan: what runs, at which size, on which device


@dataclass(frozen=True)
class Plan:
    """Every size and count the cells use. ``Plan.gpu()`` is the benchmark; ``Plan.dry()`` runs the same cells on
    the CPU at tiny shapes (Triton interpreter), once each, to check that every code path still works."""

    dry_run: bool
    device: str
    bert: dict  # BertConfig keyword arguments (BERT-base shapes on the GPU)
    shapes: tuple  # forward cells: (batch, seqlen) or "varlen"
    attention_shapes: tuple
    train_shapes: tuple
    varlen: tuple[int, int, int]  # batch, min length, max length (uniform, fixed seed)
    grad_lengths: tuple[int, ...]  # the gradient check's small mixed-length batch
    roles: dict = field(default_factory=dict)  # target key -> the shape that plays it
    check_dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    attention_dtypes: tuple = (torch.float16, torch.bfloat16)
    forward_dtypes: tuple = (torch.float16, torch.bfloat16)  # --dtypes overrides
    train_dtype: torch.dtype = torch.bfloat16
    grad_dtypes: tuple = (torch.float32, torch.bfloat16)
    peak_n: int = 8192
    warmup: int = 10
    train_warmup: int = 3
    compile_backend: str = "inductor"

    @classmethod
    def gpu(cls) -> Plan:
        return cls(
            dry_run=False,
            device="cuda",
            bert={},  # BertConfig() defaults: bert-base-uncased shapes
            shapes=((1, 128), (8, 128), (32, 128), (32, 512), "varlen"),
            attention_shapes=((32, 128), (32, 512), (8, 512), "varlen"),
            train_shapes=((32, 128), "varlen"),
            varlen=(32, 8, 512),
            grad_lengths=(128, 77, 33, 9),
            roles={"32x128": (32, 128), "32x512": (32, 512), "varlen": "varlen"},
        )

    @classmethod
    def dry(cls) -> Plan:
        # 2 layers, hidden 64: every kernel and every branch of the model, at a few seconds per interpreted forward.
        bert = {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            # small tables: the embeddings backward runs one interpreted program per table row
            "vocab_size": 64,
            "max_position_embeddings": 32,
        }
        return cls(
            dry_run=True,
            device="cpu",
            bert=bert,
            shapes=((2, 8), "varlen"),
            attention_shapes=((2, 8), "varlen"),
            train_shapes=((2, 8), "varlen"),
            varlen=(3, 2, 8),
            grad_lengths=(6, 3),
            roles={"32x128": (2, 8), "32x512": (2, 8), "varlen": "varlen"},
            # The interpreter does no bf16 arithmetic (tests/test_triton_kernels.py): float16 stands in for it.
            check_dtypes=(torch.float32, torch.float16),
            attention_dtypes=(torch.float16,),
            forward_dtypes=(torch.float16,),
            train_dtype=torch.float16,
            grad_dtypes=(torch.float32, torch.float16),
            peak_n=128,
            warmup=0,
            train_warmup=0,
            # inductor's CPU code generation is not what the GPU runs and takes minutes on 2 cores: dynamo only
            compile_backend="eager",
        )

    # -- sizes --
    @property
    def hidden(self) -> int:
        return self.bert.get("hidden_size", 768)

    @property
    def layers(self) -> int:
        return self.bert.get("num_hidden_layers", 12)

    @property
    def heads(self) -> int:
        return self.bert.get("num_attention_heads", 12)

    @property
    def intermediate(self) -> int:
        return self.bert.get("intermediate_size", 3072)

    @property
    def vocab(self) -> int:
        return self.bert.get("vocab_size", 30522)

    def lengths(self, shape) -> list[int]:
        if shape == "varlen":
            batch, lo, hi = self.varlen
            g = torch.Generator().manual_seed(0)
            return torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
        batch, seqlen = shape
        return [seqlen] * batch

    def name(self, shape) -> str:
        if shape == "varlen":
            batch, lo, hi = self.varlen
            return f"varlen({batch}, {lo}..{hi})"
        return f"({shape[0]},{shape[1]})"

    def flops(self, lengths: list[int]) -> float:
        h = self.hidden
        return float(sum(self.layers * n * (24 * h * h + 4 * n * h) for n in lengths))

    # -- timing and memory --
    def time_ms(self, fn, warmup: int | None = None) -> float:
        """Milliseconds per call: CUDA events, median of 5 repeats of ~200 ms, on the GPU; one host-timed call in a
        dry run (a number that only shows the path ran)."""
        if self.dry_run:
            return measure.timed(fn, calls=1) * 1e3
        for _ in range(self.warmup if warmup is None else warmup):  # before calls_for: its one call must be warm
            fn()
        iters = measure.calls_for(fn, 0.2, device=torch.device("cuda"), least=3, most=200)
        return measure.cuda_event_ms(fn, warmup=0, iters=iters)

    def reset_peak_memory(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        """torch.cuda.max_memory_allocated since the last reset; None on the CPU (CUDA-only statistic)."""
        return torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # -- the cells, by name, in the order they run --
    def cells(self, sections, dtypes) -> list[str]:
        out = []
        if "peak" in sections:
            out += [peak_cell(dt) for dt in (torch.bfloat16, torch.float16)]
        if "checks" in sections:
            out += [check_cell(case, dt) for dt in self.check_dtypes for case in KERNEL_CASES]
        if "attention" in sections:
            out += [attention_cell(dt, self.name(s)) for dt in self.attention_dtypes for s in self.attention_shapes]
        if "forward" in sections:
            for dt in dtypes:
                out.append(build_cell(dt))
                out += [model_check_cell(dt, self.name(s)) for s in self.shapes]
                out += [forward_cell(sys_, dt, self.name(s)) for s in self.shapes for sys_ in FORWARD_SYSTEMS]
        if "train" in sections:
            out += [
                train_cell(sys_, self.train_dtype, self.name(s)) for s in self.train_shapes for sys_ in TRAIN_SYSTEMS
            ]
        if "grad" in sections:
            out.append("grad check reference float64")
            out += [grad_cell(dt) for dt in self.grad_dtypes]
        if "compile" in sections:
            out += [compile_cell(dt, self.name(s)) for dt in dtypes for s in self.shapes]
        return out


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def peak_cell(dtype) -> str:
    return f"peak {_dt(dtype)}"


def check_cell(case: str, dtype) -> str:
    return f"check {case} {_dt(dtype)}"


def attention_cell(dtype, shape_name: str) -> str:
    return f"attention {_dt(dtype)} {shape_name}"


def build_cell(dtype) -> str:
    return f"build forward models {_dt(dtype)}"


def model_check_cell(dtype, shape_name: str) -> str:
    return f"model check {_dt(dtype)} {shape_name}"


def forward_cell(system: str, dtype, shape_name: str) -> str:
    return f"forward {system} {_dt(dtype)} {shape_name}"


def train_cell(system: str, dtype, shape_name: str) -> str:
    return f"train {system} {_dt(dtype)} {shape_name}"


def grad_cell(dtype) -> str:
    return f"grad check {_dt(dtype)}"


def compile_cell(dtype, shape_name: str) -> str:
    return f"compile hf-sdpa {_dt(dtype)} {shape_name}"


# ------------------------------------------------------------------------------------------------------------
# plumbing


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


class Report:
    """Collects rows and cells and rewrites the JSON and markdown after every addition."""

    def __init__(self, out_dir: Path, meta: dict, planned: list[str]):
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt_now().strftime("%Y%m%d-%H%M%S")
        dev = meta.get("device", "gpu").replace(" ", "_").replace("/", "_").replace(",", "")
        name = f"dry-run-gpu-cpu-{stamp}" if meta.get("dry_run") else f"gpu-{dev}-{stamp}"
        self.json_path = out_dir / f"{name}.json"
        self.md_path = out_dir / f"{name}.md"
        self.data = {
            "meta": meta,
            "planned_cells": planned,
            "cells": [],
            "peak": {},
            "correctness": [],
            "attention": [],
            "model": [],
            "train": [],
            "grad": [],
            "errors": [],
        }

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

    @contextlib.contextmanager
    def cell(self, name: str):
        """Run one cell: an exception is recorded as the cell's error (``Report.error``) and the run goes on."""
        record = {"cell": name, "status": "ok", "message": ""}
        start = time.perf_counter()
        try:
            yield record
        except Exception as exc:
            record["status"] = "error"
            record["message"] = f"{type(exc).__name__}: {exc}"
            self.error(name, exc)
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.add("cells", record)

    def skip(self, name: str, reason: str) -> None:
        print(f"SKIP {name}: {reason}")
        self.add("cells", {"cell": name, "status": "skipped", "message": reason, "seconds": 0.0})

    def fail(self, name: str, reason: str) -> None:
        """A cell that could not start because something it depends on failed."""
        print(f"ERROR {name}: {reason}", file=sys.stderr)
        self.add("cells", {"cell": name, "status": "error", "message": reason, "seconds": 0.0})

    def note(self, text: str) -> None:
        """A CPU-form or skipped part of a cell, printed and kept in the report (never silent)."""
        notes = self.data["meta"].setdefault("notes", [])
        if text not in notes:
            print(f"NOTE {text}")
            notes.append(text)
            self.write()

    def finish(self) -> None:
        """Mark planned cells that never ran (an early exception, a bug) so the report shows them."""
        done = {c["cell"] for c in self.data["cells"]}
        for name in self.data["planned_cells"]:
            if name not in done:
                self.data["cells"].append({"cell": name, "status": "not run", "message": "never reached"})
        planned = set(self.data["planned_cells"])
        for c in self.data["cells"]:
            if c["cell"] not in planned:
                c["unplanned"] = True
        self.write()

    def write(self) -> None:
        self.json_path.write_text(json.dumps(self.data, indent=1, default=str))
        self.md_path.write_text(markdown(self.data))


def _dt_now() -> datetime.datetime:
    return datetime.datetime.now()


def versions() -> dict:
    out = {"python": env.host()["python"], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers"):
        out[name] = env.version(name) or "unavailable (not installed)"
    out["git_sha"] = env.git_sha() or "unknown"
    return out


def padded_batch(lengths: list[int], vocab: int, device: str):
    g = torch.Generator().manual_seed(1)
    seqlen = max(lengths)
    ids = torch.randint(min(1000, vocab // 2), vocab, (len(lengths), seqlen), generator=g)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def class_labels(batch: int, device: str) -> torch.Tensor:
    return torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(2)).to(device)


def cu_seqlens(lengths: list[int], device: str) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


# ------------------------------------------------------------------------------------------------------------
# 1-3: peak, kernel checks, attention


def measure_peak(report: Report, plan: Plan) -> None:
    n = plan.peak_n
    if plan.dry_run:
        report.note(f"peak: a {n}^3 CPU matmul timed once with the host clock (CUDA events need a GPU)")
    for dtype in (torch.bfloat16, torch.float16):
        with report.cell(peak_cell(dtype)):
            a = torch.randn(n, n, device=plan.device, dtype=dtype)
            b = torch.randn(n, n, device=plan.device, dtype=dtype)
            ms = plan.time_ms(lambda a=a, b=b: a @ b, warmup=5)
            tflops = 2 * n**3 / (ms * 1e-3) / 1e12
            print(f"peak {dtype}: {tflops:.1f} TFLOP/s ({n}^3 matmul, {ms:.3f} ms)")
            report.add("peak", {_dt(dtype): {"tflops": tflops, "n": n, "ms": ms}})
            del a, b


def check_kernels(report: Report, plan: Plan, K, R) -> None:
    """Each kernel at BERT-base size (tiny in a dry run) vs the reference (fp16/bf16/fp32 storage)."""
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    g = torch.Generator(device=plan.device).manual_seed(0)
    lengths = plan.lengths("varlen")
    cu = cu_seqlens(lengths, plan.device)
    total, hidden = sum(lengths), plan.hidden
    for dtype in plan.check_dtypes:

        def r(*shape, scale=1.0, dtype=dtype):
            return (torch.randn(*shape, device=plan.device, generator=g) * scale).to(dtype)

        x, res, bias = r(total, hidden), r(total, hidden), r(hidden)
        w, b = r(hidden), r(hidden)
        qkv = r(total, 3 * hidden, scale=2.0)
        up = r(total, plan.intermediate, scale=2.0)
        cases = _kernel_cases(R, plan, x, res, bias, w, b, qkv, up, cu, max(lengths))
        for name, (run, exact_fn) in cases.items():
            with report.cell(check_cell(name, dtype)):
                exact = exact_fn()
                err = (run(K).double() - exact).abs().max().item()
                base = (run(R).double() - exact).abs().max().item()
                ok = err <= 2 * base + tol[dtype]
                row = {"what": name, "dtype": str(dtype), "err": err, "torch_err": base, "ok": ok}
                print(f"check {name} {dtype}: err {err:.3g} (torch {base:.3g}) {'ok' if ok else 'FAIL'}")
                report.add("correctness", row)
        plan.free()


def _kernel_cases(R, plan: Plan, x, res, bias, w, b, qkv, up, cu, max_len) -> dict:
    """name -> (run(backend module), float64 reference)."""
    t64 = [t.double() for t in (x, bias, res, w, b)]
    up_bias = bias.repeat(plan.intermediate // plan.hidden)
    heads, scale = plan.heads, (plan.hidden // plan.heads) ** -0.5
    return {
        "bias_residual_layernorm": (
            lambda m: m.bias_residual_layernorm(x, bias, res, w, b, 1e-12),
            lambda: R.bias_residual_layernorm(*t64, 1e-12),
        ),
        "bias_activation(gelu)": (
            lambda m: m.bias_activation(up, up_bias, "gelu"),
            lambda: R.bias_activation(up.double(), up_bias.double(), "gelu"),
        ),
        "attention": (
            lambda m: m.attention(qkv, cu, max_len, heads, scale),
            lambda: R.attention(qkv.float(), cu, max_len, heads, scale).double(),
        ),
    }


def measure_attention(report: Report, plan: Plan, K, budget: Budget) -> None:
    import torch.nn.functional as F

    heads, d = plan.heads, plan.hidden // plan.heads
    for dtype in plan.attention_dtypes:
        for shape in plan.attention_shapes:
            name = attention_cell(dtype, plan.name(shape))
            if budget.left() < 60:
                report.skip(name, "time budget")
                continue
            with report.cell(name):
                lengths = plan.lengths(shape)
                cu = cu_seqlens(lengths, plan.device)
                total = sum(lengths)
                qkv = torch.randn(total, 3 * heads * d, device=plan.device, dtype=dtype)
                flops = sum(4 * n * n * heads * d for n in lengths)
                fn = functools.partial(K.attention, qkv, cu, max(lengths), heads, d**-0.5)
                ms = plan.time_ms(fn)
                row = {"dtype": str(dtype), "shape": plan.name(shape), "head_dim": d, "fastbert_ms": ms}
                row["fastbert_tflops"] = flops / (ms * 1e-3) / 1e12
                if shape != "varlen":  # dense sdpa (flash backend when available) on the same problem
                    b, s = shape
                    q, k, v = (torch.randn(b, heads, s, d, device=plan.device, dtype=dtype) for _ in range(3))
                    sd = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    row["sdpa_ms"] = plan.time_ms(sd)
                    row["sdpa_tflops"] = flops / (row["sdpa_ms"] * 1e-3) / 1e12
                print("attention", row)
                report.add("attention", row)


# ------------------------------------------------------------------------------------------------------------
# 4: forward


def build_models(plan: Plan, path: str, dtype, fastbert, backend: str) -> dict:
    import transformers

    models = {}
    models["fastbert"] = fastbert.AutoModel.from_pretrained(path, device=plan.device, dtype=dtype, backend=backend)
    assert models["fastbert"].backend.name == backend, models["fastbert"].backend
    for impl in ("eager", "sdpa"):
        m = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, dtype=dtype)
        models[f"hf-{impl}"] = m.to(plan.device).eval()
    return models


def check_model(report: Report, plan: Plan, models: dict, hf32, dtype, shape) -> None:
    lengths = plan.lengths(shape)
    ids, mask = padded_batch(lengths, plan.vocab, plan.device)
    valid = mask.bool()
    with torch.inference_mode():
        ref = hf32(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        base = models["hf-eager"](input_ids=ids, attention_mask=mask).last_hidden_state.float()
        got = models["fastbert"](input_ids=ids, attention_mask=mask).last_hidden_state.float()
    err = (got[valid] - ref[valid]).abs().max().item()
    base_err = (base[valid] - ref[valid]).abs().max().item()
    ok = bool(err < 3 * base_err) and math.isfinite(err)
    row = {"what": f"model {plan.name(shape)}", "dtype": str(dtype), "err": err, "torch_err": base_err, "ok": ok}
    print(f"model check {plan.name(shape)} {dtype}: fastbert err {err:.3g}, HF {dtype} err {base_err:.3g}")
    report.add("correctness", row)


def time_system(plan: Plan, name: str, model, shape, warmup: int | None = None) -> float:
    lengths = plan.lengths(shape)
    ids, mask = padded_batch(lengths, plan.vocab, plan.device)
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

    return plan.time_ms(fn, warmup)


def measure_forward(report: Report, plan: Plan, path: str, dtypes, budget: Budget, fastbert, backend: str) -> None:
    import transformers

    hf32 = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").to(plan.device).eval()
    for dtype in dtypes:
        names = [model_check_cell(dtype, plan.name(s)) for s in plan.shapes]
        names += [forward_cell(sys_, dtype, plan.name(s)) for s in plan.shapes for sys_ in FORWARD_SYSTEMS]
        if budget.left() < 60:
            for name in [build_cell(dtype), *names]:
                report.skip(name, "time budget")
            continue
        models = None
        with report.cell(build_cell(dtype)):
            models = build_models(plan, path, dtype, fastbert, backend)
        if models is None:
            for name in names:
                report.fail(name, f"not run: {build_cell(dtype)} failed")
            continue
        for shape in plan.shapes:
            with report.cell(model_check_cell(dtype, plan.name(shape))):
                check_model(report, plan, models, hf32, dtype, shape)
        for shape in plan.shapes:
            lengths = plan.lengths(shape)
            row = {"dtype": str(dtype), "shape": plan.name(shape), "tokens": sum(lengths)}
            row["gflop"] = plan.flops(lengths) / 1e9
            for system in FORWARD_SYSTEMS:
                name = forward_cell(system, dtype, plan.name(shape))
                if budget.left() < 30:
                    row[f"{system}_ms"] = "skipped: time budget"
                    report.skip(name, "time budget")
                    continue
                model = models["fastbert" if system.startswith("fastbert") else system]
                with report.cell(name):
                    row[f"{system}_ms"] = time_system(plan, system, model, shape)
            print("model", row)
            report.add("model", row)
        del models
        plan.free()
    del hf32
    plan.free()


def measure_compile(report: Report, plan: Plan, path: str, dtypes, budget: Budget) -> None:
    """torch.compile of the transformers sdpa model, timed on each forward shape (setup time included apart)."""
    import transformers

    if plan.dry_run:
        report.note(
            f"compile: torch.compile(backend={plan.compile_backend!r}) in a dry run (dynamo traces the model; "
            "inductor's CPU code generation is not the GPU path and takes minutes on 2 cores)"
        )
    dynamo = importlib.import_module("torch._dynamo")
    dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    for dtype in dtypes:
        compiled = None
        try:
            m = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
            compiled = torch.compile(m.to(plan.device).eval(), backend=plan.compile_backend)
        except Exception as exc:
            report.error(f"torch.compile setup {dtype}", exc)
        for shape in plan.shapes:
            name = compile_cell(dtype, plan.name(shape))
            if compiled is None:
                report.fail(name, f"not run: torch.compile setup {_dt(dtype)} failed")
                continue
            if budget.left() < 90:
                report.skip(name, "time budget")
                continue
            row = next(
                (r for r in report.data["model"] if r["dtype"] == str(dtype) and r["shape"] == plan.name(shape)), None
            )
            if row is None:  # the forward section did not run (--sections): a row of its own
                row = {"dtype": str(dtype), "shape": plan.name(shape), "tokens": sum(plan.lengths(shape))}
                row["gflop"] = plan.flops(plan.lengths(shape)) / 1e9
                report.data["model"].append(row)
            with report.cell(name):
                timing = functools.partial(time_system, plan, "compile", compiled, shape, 3)
                row["hf-sdpa-compile_ms"], seconds = measure.timed_call(timing)  # seconds: compile included
                row["compile_setup_s"] = round(seconds, 1)
                print("compile", row["shape"], dtype, row["hf-sdpa-compile_ms"])
        del compiled
        plan.free()


# ------------------------------------------------------------------------------------------------------------
# 5-6: training steps and the gradient check


def save_classifier(plan: Plan, folder: str) -> str:
    """A randomly initialised BertForSequenceClassification (2 labels) saved as a transformers checkpoint."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2, **plan.bert))
    hf.save_pretrained(folder)
    return folder


def trainable(system: str, plan: Plan, path: str, dtype, fastbert, backend: str, **config):
    """The model of ``system`` in training mode (dropout on unless ``config`` turns it off), on the plan's device."""
    import transformers

    if system == "fastbert":
        model = fastbert.AutoModelForSequenceClassification.from_pretrained(
            path, device=plan.device, dtype=dtype, backend=backend, **config
        )
        assert model.backend.name == backend, model.backend
    else:
        impl = system.removeprefix("hf-")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation=impl, dtype=dtype, **config
        ).to(plan.device)
    return model.train()  # fastbert: NotImplementedError while the backend's ops have no gradients


def train_step_stats(plan: Plan, model, ids, mask, labels) -> dict:
    """ms per step (forward + backward + AdamW step), the last loss and the peak memory of steady-state steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    for _ in range(plan.train_warmup):  # compiles kernels and allocates AdamW's states outside the peak window
        step()
    plan.reset_peak_memory()
    ms = plan.time_ms(step, warmup=0)
    peak = plan.peak_memory_gib()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"backward reached no gradient for {len(missing)} parameters: {missing[:5]}")
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise RuntimeError(f"training loss is {loss}")
    return {"ms": ms, "loss": loss, "peak_gib": peak, "steps": len(losses)}


def measure_training(report: Report, plan: Plan, path: str, budget: Budget, fastbert, backend: str) -> None:
    if plan.device != "cuda":
        report.note("train: peak memory not measured on the CPU (torch.cuda.max_memory_allocated is CUDA-only)")
    for shape in plan.train_shapes:
        lengths = plan.lengths(shape)
        ids, mask = padded_batch(lengths, plan.vocab, plan.device)
        labels = class_labels(len(lengths), plan.device)
        row = {"dtype": str(plan.train_dtype), "shape": plan.name(shape), "tokens": sum(lengths)}
        row["padded_tokens"] = ids.numel()
        row["gflop_step"] = 3 * plan.flops(lengths) / 1e9
        for system in TRAIN_SYSTEMS:
            name = train_cell(system, plan.train_dtype, plan.name(shape))
            if budget.left() < 45:
                row[f"{system}_ms"] = "skipped: time budget"
                report.skip(name, "time budget")
                continue
            model = None
            with report.cell(name):
                model = trainable(system, plan, path, plan.train_dtype, fastbert, backend)
                stats = train_step_stats(plan, model, ids, mask, labels)
                row[f"{system}_ms"] = stats["ms"]
                row[f"{system}_tokens_per_s"] = row["tokens"] / (stats["ms"] * 1e-3)
                row[f"{system}_tflops"] = row["gflop_step"] / stats["ms"]
                row[f"{system}_peak_gib"] = stats["peak_gib"]
                row[f"{system}_loss"] = stats["loss"]
                print(f"train {system} {plan.name(shape)}: {stats}")
            del model
            plan.free()
        fb, sd = _num(row.get("fastbert_ms")), _num(row.get("hf-sdpa_ms"))
        row["x_vs_hf-sdpa"] = sd / fb if fb and sd else None
        ea = _num(row.get("hf-eager_ms"))
        row["x_vs_hf-eager"] = ea / fb if fb and ea else None
        for role in ("32x128", "varlen"):
            if plan.roles.get(role) == shape:
                key, x = f"train_speedup_vs_sdpa_{role}", row["x_vs_hf-sdpa"]
                met = None if x is None else x >= TARGETS[key]
                dry = " (dry run: not a measurement)" if plan.dry_run else ""
                print(f"target {key}: wanted >= {TARGETS[key]}, measured {_f(x, '.2f')}: {met_word(met)}{dry}")
        report.add("train", row)


def gradients(model, fastbert) -> dict:
    """Every parameter's gradient under transformers' names (fastbert's fused Q/K/V split; NaN where none)."""
    if isinstance(model, fastbert.AutoModel):
        from fastbert import loading

        grads = {n: p.grad if p.grad is not None else torch.full_like(p, math.nan) for n, p in model.named_parameters()}
        return loading.fastbert_to_hf(grads, model.cfg, model.task, with_prefix=True)
    return {n: p.grad if p.grad is not None else torch.full_like(p, math.nan) for n, p in model.named_parameters()}


def loss_and_grads(model, fastbert, ids, mask, labels) -> tuple[float, dict]:
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return float(loss), {n: g.detach().double().cpu() for n, g in gradients(model, fastbert).items()}


def relative_errors(grads: dict, ref: dict) -> dict:
    """name -> max |g - ref| / max |ref| (NaN if missing or non-finite).

    A gradient that is zero in exact arithmetic (the key bias: softmax ignores a constant added to every score
    of a query) is float64 rounding noise in ``ref``; it is normalised by the largest max-abs of all gradients.
    """
    largest = max(r.abs().max().item() for r in ref.values())
    out = {}
    for n, r in ref.items():
        g = grads.get(n)
        if g is None or g.shape != r.shape:
            out[n] = math.nan
            continue
        scale = r.abs().max().item()
        scale = scale if scale > ZERO_GRAD * largest else largest
        out[n] = (g - r).abs().max().item() / (scale if scale > 0 else 1.0)
    return out


def _worst(values) -> float:
    """The largest value, NaN counting as the worst."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=math.nan)


def check_gradients(report: Report, plan: Plan, path: str, fastbert, backend: str, budget: Budget) -> None:
    """fastbert's and transformers' loss and gradients at each dtype vs transformers in float64, dropout 0."""
    if budget.left() < 60:
        for name in ["grad check reference float64", *(grad_cell(dt) for dt in plan.grad_dtypes)]:
            report.skip(name, "time budget")
        return
    lengths = list(plan.grad_lengths)
    ids, mask = padded_batch(lengths, plan.vocab, plan.device)
    labels = class_labels(len(lengths), plan.device)
    ref = None
    with report.cell("grad check reference float64"):
        model = trainable("hf-eager", plan, path, torch.float64, fastbert, backend, **NO_DROPOUT)
        ref = loss_and_grads(model, fastbert, ids, mask, labels)
        del model
    for dtype in plan.grad_dtypes:
        name = grad_cell(dtype)
        if ref is None:
            report.fail(name, "not run: the float64 reference failed")
            continue
        with report.cell(name):
            ref_loss, ref_grads = ref
            hf = trainable("hf-sdpa", plan, path, dtype, fastbert, backend, **NO_DROPOUT)
            hf_loss, hf_grads = loss_and_grads(hf, fastbert, ids, mask, labels)
            del hf
            fb = trainable("fastbert", plan, path, dtype, fastbert, backend, **NO_DROPOUT)
            fb_loss, fb_grads = loss_and_grads(fb, fastbert, ids, mask, labels)
            del fb
            fb_err, hf_err = relative_errors(fb_grads, ref_grads), relative_errors(hf_grads, ref_grads)
            floor = GRAD_FLOOR[dtype]
            params = [
                {"param": n, "fastbert": fb_err[n], "hf": hf_err[n], "ok": bool(fb_err[n] <= 3 * hf_err[n] + floor)}
                for n in ref_grads
            ]
            extra = sorted(set(fb_grads) - set(ref_grads))
            worst = max(params, key=lambda p: p["fastbert"] if math.isfinite(p["fastbert"]) else math.inf)
            row = {
                "dtype": str(dtype),
                "lengths": lengths,
                "loss_ref": ref_loss,
                "loss_fastbert": fb_loss,
                "loss_hf": hf_loss,
                "loss_rel_err_fastbert": abs(fb_loss - ref_loss) / abs(ref_loss),
                "loss_rel_err_hf": abs(hf_loss - ref_loss) / abs(ref_loss),
                "max_rel_err_fastbert": worst["fastbert"],
                "worst_param": worst["param"],
                "max_rel_err_hf": _worst(p["hf"] for p in params),
                "params": len(params),
                "params_ok": sum(p["ok"] for p in params),
                "fastbert_only_params": extra,
                "per_param": params,
            }
            row["ok"] = row["params_ok"] == row["params"] and not extra
            print(
                f"grad check {_dt(dtype)}: fastbert max rel err {row['max_rel_err_fastbert']:.3g} ({worst['param']}), "
                f"transformers {row['max_rel_err_hf']:.3g}; {row['params_ok']}/{row['params']} within 3x + {floor}"
            )
            report.add("grad", row)
        plan.free()


# ------------------------------------------------------------------------------------------------------------
# report


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def derived(data: dict) -> dict:
    """%-of-peak, speedups and the targets, computed from the rows."""
    peak = data["peak"].get("bfloat16", {}).get("tflops")
    roles = data["meta"].get("roles", {})
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

    def find(rows, dtype, shape):
        return next((r for r in rows if r["dtype"] == dtype and r["shape"] == shape), {})

    def best(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    t = out["targets"]
    for role in ("32x128", "32x512"):
        key = f"pct_peak_{role}"
        shape = roles.get(role)
        vals = [find(out["rows"], dt, shape).get("pct_of_bf16_peak") for dt in ("torch.bfloat16", "torch.float16")]
        t[key] = {"target": TARGETS[key], "measured": best(vals), "shape": shape}
    t["speedup_vs_sdpa_fp16_32x128"] = {
        "target": TARGETS["speedup_vs_sdpa_fp16_32x128"],
        "measured": find(out["rows"], "torch.float16", roles.get("32x128")).get("x_vs_hf-sdpa"),
        "shape": roles.get("32x128"),
    }
    vals = [
        find(out["rows"], dt, roles.get("varlen")).get("x_vs_hf-sdpa") for dt in ("torch.float16", "torch.bfloat16")
    ]
    t["speedup_vs_sdpa_varlen"] = {
        "target": TARGETS["speedup_vs_sdpa_varlen"],
        "measured": best(vals),
        "shape": roles.get("varlen"),
    }
    att = [r["fastbert_tflops"] for r in data["attention"] if r["shape"] == roles.get("32x512")]
    t["attention_tflops_d64_s512"] = {
        "target": TARGETS["attention_tflops_d64_s512"],
        "measured": best(att),
        "shape": roles.get("32x512"),
    }
    for role in ("32x128", "varlen"):
        key = f"train_speedup_vs_sdpa_{role}"
        row = next((r for r in data["train"] if r["shape"] == roles.get(role)), {})
        measured = row.get("x_vs_hf-sdpa")
        t[key] = {"target": TARGETS[key], "measured": measured, "shape": roles.get(role)}
    for v in t.values():
        v["met"] = None if v["measured"] is None else v["measured"] >= v["target"]
    return out


def met_word(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "not met")


def _f(x, fmt=".3f") -> str:
    return format(x, fmt) if _num(x) is not None else ("-" if x is None else str(x))


def markdown(data: dict) -> str:
    m = data["meta"]
    d = derived(data)
    dry = bool(m.get("dry_run"))
    lines = [f"# fastbert GPU benchmark: {m.get('device')}", ""]
    if dry:
        lines += [
            "**DRY RUN: not a measurement.** The cells of `benchmarks/gpu.py` on the CPU under TRITON_INTERPRET=1 at",
            f"tiny shapes ({json.dumps(m.get('bert'))}), one call each: every number below only shows that the",
            "code path ran. Real figures come from the same command on a CUDA GPU, without `--dry-run`.",
            "",
        ]
    lines += [
        f"- command: `{m.get('command')}`",
        f"- versions: {json.dumps(m.get('versions'))}",
        f"- fastbert backend: {m.get('backend')}; fastbert.kernels: {m.get('kernels_from')}; started {m.get('started')}",
        "- peak (measured matmul): "
        + ", ".join(f"{k} {_f(v.get('tflops'), '.1f')} TFLOP/s" for k, v in data["peak"].items()),
    ]
    lines += [f"- note: {n}" for n in m.get("notes", [])]
    lines += ["", "## Targets" + (" (dry run: the tiny shapes stand in, nothing is met or missed)" if dry else "")]
    lines += ["", "| target | shape | wanted | measured | result |", "|---|---|---|---|---|"]
    for k, v in d["targets"].items():
        lines.append(
            f"| {k} | {v.get('shape') or '-'} | >= {v['target']} | {_f(v['measured'], '.2f')} | {met_word(v['met'])} |"
        )
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
    lines += [
        "",
        f"## Training step, {m.get('train_dtype')}, sequence classification (forward + backward + AdamW; dropout on)",
        "",
        "transformers runs the padded batch; tokens/s counts real tokens for every system; TFLOP/s counts a step as",
        "3x the forward FLOPs; peak memory is torch.cuda.max_memory_allocated over the timed steps (weights,",
        "gradients, AdamW states and activations), reset per cell.",
        "",
        "| shape | tokens (padded) | system | ms/step | tokens/s | TFLOP/s | peak GiB | loss | x vs sdpa |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["train"]:
        for system in TRAIN_SYSTEMS:
            ms, sdpa = _num(row.get(f"{system}_ms")), _num(row.get("hf-sdpa_ms"))
            x = sdpa / ms if ms and sdpa else None
            lines.append(
                f"| {row['shape']} | {row['tokens']} ({row['padded_tokens']}) | {system} | {_f(row.get(f'{system}_ms'))} "
                f"| {_f(row.get(f'{system}_tokens_per_s'), '.0f')} | {_f(row.get(f'{system}_tflops'), '.1f')} "
                f"| {_f(row.get(f'{system}_peak_gib'), '.2f')} | {_f(row.get(f'{system}_loss'), '.4f')} "
                f"| {_f(x, '.2f')} |"
            )
    lines += [
        "",
        "## Gradient check (dropout 0; each gradient's error relative to its max-abs, vs transformers float64)",
        "",
        "| dtype | loss rel err fastbert / HF | max grad rel err fastbert (param) | max grad rel err HF "
        "| params within 3x HF + floor |",
        "|---|---|---|---|---|",
    ]
    for r in data["grad"]:
        lines.append(
            f"| {r['dtype'].replace('torch.', '')} | {_f(r['loss_rel_err_fastbert'], '.2e')} / "
            f"{_f(r['loss_rel_err_hf'], '.2e')} | {_f(r['max_rel_err_fastbert'], '.2e')} ({r['worst_param']}) "
            f"| {_f(r['max_rel_err_hf'], '.2e')} | {r['params_ok']}/{r['params']} |"
        )
    lines += ["", "## Attention kernel alone", ""]
    lines += ["| dtype | shape | fastbert ms | TFLOP/s | sdpa ms | sdpa TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in data["attention"]:
        lines.append(
            f"| {r['dtype'].replace('torch.', '')} | {r['shape']} | {_f(r['fastbert_ms'])} "
            f"| {_f(r['fastbert_tflops'], '.1f')} | {_f(r.get('sdpa_ms'))} | {_f(r.get('sdpa_tflops'), '.1f')} |"
        )
    lines += [
        "",
        "## Correctness at full size" + (" (dry run: tiny size)" if dry else ""),
        "",
        "| what | dtype | max err | torch err | ok |",
        "|---|---|---|---|---|",
    ]
    for r in data["correctness"]:
        lines.append(
            f"| {r['what']} | {r['dtype']} | {_f(r['err'], '.3g')} | {_f(r['torch_err'], '.3g')} | {r['ok']} |"
        )
    lines += ["", "## Cells", "", "| cell | status | s | message |", "|---|---|---|---|"]
    for c in data["cells"]:
        msg = c.get("message", "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {c['cell']} | {c['status']} | {_f(c.get('seconds'), '.1f')} | {msg} |")
    if data["errors"]:
        lines += ["", "## Errors and skips", ""] + [f"- {e['what']}: {e['error']}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def print_targets(data: dict) -> None:
    dry = " (dry run: not a measurement)" if data["meta"].get("dry_run") else ""
    for k, v in derived(data)["targets"].items():
        print(f"target {k}: wanted >= {v['target']}, measured {_f(v['measured'], '.2f')}: {met_word(v['met'])}{dry}")


# ------------------------------------------------------------------------------------------------------------


def interpreter_refusal() -> str | None:
    """Set TRITON_INTERPRET=1 for a dry run; the reason it cannot be, if triton was imported without it."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if "triton" in sys.modules and not interpreting:
        return (
            "--dry-run needs TRITON_INTERPRET=1 before triton is imported, and triton is imported already without "
            "it: run `python -m benchmarks.gpu --dry-run` in a fresh process (or set TRITON_INTERPRET=1 first)"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastbert triton backend vs transformers on a CUDA GPU")
    parser.add_argument(
        "--out", default=None, help="folder for JSON + markdown (benchmarks/results; a temp dir for --dry-run)"
    )
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; later cells are skipped past it")
    parser.add_argument("--dtypes", default=None, help="forward and compile cells (default float16,bfloat16)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to set up)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every cell on the CPU under TRITON_INTERPRET=1 at tiny shapes, once: checks the command, measures nothing",
    )
    parser.add_argument(
        "--backend", default="triton", help="fastbert's backend (triton; another one only to test this script)"
    )
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if args.no_compile:
        sections = [s for s in sections if s != "compile"]
    if args.dry_run:
        refusal = interpreter_refusal()
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
        plan = Plan.dry()
        out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastbert-gpu-dry-run-"))
        if out_dir.resolve().is_relative_to(RESULTS.resolve()):
            print(f"--dry-run writes no results under {RESULTS}: pass --out to a temp dir", file=sys.stderr)
            return 2
        budget = Budget(math.inf)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: this benchmark needs a GPU (or --dry-run to check it on the CPU)", file=sys.stderr)
            return 2
        plan = Plan.gpu()
        out_dir = Path(args.out) if args.out else RESULTS
        budget = Budget(args.budget)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
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
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else list(plan.forward_dtypes)
    if plan.dry_run:
        device = f"cpu ({env.cpu_name() or 'unknown CPU'}), dry run, TRITON_INTERPRET=1"
    else:
        device = torch.cuda.get_device_name(0)
    meta = {
        "device": device,
        "dry_run": plan.dry_run,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if plan.device == "cuda" else None,
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu", *(argv or sys.argv[1:])]),
        "backend": args.backend,
        "kernels_from": K.__file__,
        "kernels_differentiable": bool(getattr(K, "DIFFERENTIABLE", False)),
        "started": _dt_now().isoformat(timespec="seconds"),
        "flop_model": f"{plan.layers} x sum_seq L (24 H^2 + 4 L H), H={plan.hidden}, real tokens only",
        "bert": plan.bert or "BertConfig() defaults (bert-base-uncased shapes), random weights",
        "roles": {role: plan.name(shape) for role, shape in plan.roles.items()},
        "sections": sections,
        "train_dtype": _dt(plan.train_dtype),
    }
    report = Report(out_dir, meta, plan.cells(sections, dtypes))
    print(json.dumps(meta, indent=1))
    if plan.dry_run:
        report.note(
            "dtypes: float16 stands in for bfloat16 in the triton cells (the Triton interpreter does no bf16 "
            "arithmetic, tests/test_triton_kernels.py); the GPU run trains in bfloat16"
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    steps = {
        "peak": lambda: measure_peak(report, plan),
        "checks": lambda: check_kernels(report, plan, K, R),
        "attention": lambda: measure_attention(report, plan, K, budget),
    }
    for what in ("peak", "checks", "attention"):
        if what in sections:
            try:
                steps[what]()
            except Exception as exc:
                report.error(what, exc)
    with tempfile.TemporaryDirectory() as tmp:
        base, clf = os.path.join(tmp, "base"), os.path.join(tmp, "classifier")
        try:
            torch.manual_seed(0)
            hf = transformers.BertModel(transformers.BertConfig(**plan.bert))  # random weights
            hf.save_pretrained(base)
            del hf
            save_classifier(plan, clf)
        except Exception as exc:
            report.error("save checkpoints", exc)
        later = {
            "forward": lambda: measure_forward(report, plan, base, dtypes, budget, fastbert, args.backend),
            "train": lambda: measure_training(report, plan, clf, budget, fastbert, args.backend),
            "grad": lambda: check_gradients(report, plan, clf, fastbert, args.backend, budget),
            # torch.compile last: it is the slowest to set up and the least important to finish.
            "compile": lambda: measure_compile(report, plan, base, dtypes, budget),
        }
        for what in ("forward", "train", "grad", "compile"):
            if what in sections:
                try:
                    later[what]()
                except Exception as exc:
                    report.error(what, exc)
    report.finish()
    print(report.md_path.read_text())
    print_targets(report.data)
    counts = {}
    for c in report.data["cells"]:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    print(f"cells: {counts}")
    print(f"wrote {report.json_path} and {report.md_path}" + (" (dry run)" if plan.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
