"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90, without a GPU.

Each kernel module lists, in ``aot_specs()``, every (dtype, variant, launch configuration) its launcher can
choose. A subprocess (run without TRITON_INTERPRET, under which ``triton.jit`` gives interpreter objects that
cannot be compiled) compiles each one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
and reads the resources from the cubin with the cuobjdump that ships with Triton. The test checks that all
compile, shared memory fits the device's per-block limit, registers fit the launch and nothing spills.

Training kernels (the backward kernels, and the forward variants that store what a backward needs: specs with
``training=True``) are many; by default a representative subset of them is compiled: head dims 64 and 128 (BERT-base's,
the largest register footprint) and row blocks 1024 and 8192 (a BERT-base row, the widest), in bfloat16 and float32
(float16 is bfloat16's code with another conversion), every variant of those. ``FASTBERT_AOT_FULL=1`` compiles every one (about
2.5x the default's compile count; run it when a kernel or a launch rule changes). Inference specs are always
compiled in full.

Run the compile report by hand: ``python tests/test_triton_compile.py --archs 80,90`` (``--full`` for all).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

MODULES = ("attention", "bias_activation", "embeddings", "layer_norm")
#: Opt-in shared memory per block (bytes): sm_90 227 KB, sm_80 163 KB (CUDA programming guide, table of
#: compute-capability limits). 64 K 32-bit registers per SM, at most 255 per thread.
SMEM_LIMIT = {80: 166912, 90: 232448}
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255


#: The training specs compiled by default, per module: those whose constexprs take these values (see the
#: docstring); bias_activation's backward (one fixed block) is compiled in full.
REPRESENTATIVE = {
    "attention": {"HEAD_DIM": (64, 128)},
    "layer_norm": {"BLOCK_SIZE": (1024, 8192)},
    "embeddings": {"BLOCK_SIZE": (1024, 8192)},
    "bias_activation": {},
}
#: Training specs in float16 are left to the full sweep by default: the same code as bfloat16 (one conversion
#: differs), which the default run compiles; this keeps the suite's compile time near what it was before training.
DEFAULT_SKIPS_DTYPE = "*fp16"


def _full() -> bool:
    return os.environ.get("FASTBERT_AOT_FULL", "0") not in ("", "0")


def _selected(module: str, spec) -> bool:
    """Whether ``spec`` is compiled in this run: every inference spec; training specs in full or representative."""
    if not spec.training or _full():
        return True
    if DEFAULT_SKIPS_DTYPE in spec.signature.values():
        return False
    rule = REPRESENTATIVE[module].items()
    return all(spec.constexprs[key] in values for key, values in rule if key in spec.constexprs)


def _specs(module: str) -> list:
    return [s for s in importlib.import_module(f"fastbert.kernels.{module}").aot_specs() if _selected(module, s)]


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack frame + local memory (where spills go: 0 means no spill) and static shared memory of the
    cubin's kernel, from ``cuobjdump -res-usage``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    return {
        "regs": int(fields["REG"]),
        "spill": int(fields["STACK"]) + int(fields["LOCAL"]),
        "static_shared": int(fields["SHARED"]),
    }


def _compile_one(job: tuple[str, int, int]) -> dict:
    """Compile spec ``index`` of ``module`` for compute capability ``cc``; return its resource report."""
    module, index, cc = job
    import triton
    from triton.backends.compiler import GPUTarget

    spec = _specs(module)[index]
    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
    row = {"label": spec.label, "cc": cc, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    try:
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as exc:  # reported by the test with the kernel's label
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return row
    row.update(_resources(kernel.asm["cubin"]))
    row["shared"] = int(kernel.metadata.shared) + row["static_shared"]
    return row


def compile_all(archs: list[int], processes: int = 2, modules: tuple[str, ...] = MODULES) -> list[dict]:
    """Compile every spec of every kernel module for each arch (in a process pool)."""
    import multiprocessing as mp

    jobs = [(m, i, cc) for cc in archs for m in modules for i in range(len(_specs(m)))]
    with mp.get_context("spawn").Pool(processes) as pool:
        return pool.map(_compile_one, jobs, chunksize=4)


# ------------------------------------------------------------------------------------------------------------
# pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the compiled default
    cmd = [sys.executable, str(Path(__file__).resolve()), "--archs", "80,90", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, f"compile subprocess failed:\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_every_config_compiles(report):
    failed = [f"{r['label']} sm_{r['cc']}: {r['error']}" for r in report if "error" in r]
    assert not failed, "\n".join(failed)
    expected = sum(len(_specs(m)) for m in MODULES) * 2
    assert len(report) == expected


@pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
def test_shared_memory_within_device_limit(report, cc):
    rows = [r for r in report if r["cc"] == cc and "error" not in r]
    worst = max(rows, key=lambda r: r["shared"])
    print(f"sm_{cc}: largest shared memory {worst['shared']} B ({worst['label']}), limit {SMEM_LIMIT[cc]} B")
    over = [f"{r['label']}: {r['shared']} B" for r in rows if r["shared"] > SMEM_LIMIT[cc]]
    assert not over, over


@pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
def test_registers_fit_and_nothing_spills(report, cc):
    rows = [r for r in report if r["cc"] == cc and "error" not in r]
    worst = max(rows, key=lambda r: r["regs"])
    print(f"sm_{cc}: most registers {worst['regs']} a thread ({worst['label']}, {worst['num_warps']} warps)")
    spills = [f"{r['label']}: {r['spill']} B stack/local" for r in rows if r["spill"] > 0]
    too_many = [
        f"{r['label']}: {r['regs']} regs x {32 * r['num_warps']} threads"
        for r in rows
        if r["regs"] > MAX_REGISTERS_PER_THREAD or r["regs"] * 32 * r["num_warps"] > REGISTERS_PER_SM
    ]
    assert not spills, spills
    assert not too_many, too_many


def _table(rows: list[dict]) -> str:
    lines = [
        "| kernel config | arch | warps | stages | regs | spill (stack+local B) | shared B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | sm_{r['cc']} | {r['num_warps']} | {r['num_stages']} | ERROR | | |")
        else:
            lines.append(
                f"| {r['label']} | sm_{r['cc']} | {r['num_warps']} | {r['num_stages']} | {r['regs']} | "
                f"{r['spill']} | {r['shared']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--json", help="write the per-config report here")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--modules", default=",".join(MODULES), help="kernel modules to compile")
    parser.add_argument("--full", action="store_true", help="every training spec (as FASTBERT_AOT_FULL=1)")
    args = parser.parse_args()
    if args.full:
        os.environ["FASTBERT_AOT_FULL"] = "1"  # read again by the spawned compile processes
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter's triton.jit objects cannot be compiled")
    archs = [int(a) for a in args.archs.split(",")]
    result = compile_all(archs, args.processes, tuple(args.modules.split(",")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(_table(result))
