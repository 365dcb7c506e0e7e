"""Environment capture: what a reader needs to reproduce or compare a result (device, versions, git state, load).

The one copy for the whole project: ``fastbert bench``, the pytest-benchmark suite and every script in
``benchmarks/`` record their conditions through these functions.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

#: The checkout this package lives in (``fastbert/bench/env.py`` -> the repository root).
ROOT = Path(__file__).resolve().parents[2]

#: The packages ``environment()`` records.
VERSIONED = ("fastbert", "torch", "transformers", "onnxruntime", "onnx", "openvino", "numpy")


def version(name: str) -> str | None:
    """Installed version of the distribution ``name``; None when it is not installed.

    Falls back to ``__version__`` of an already imported module of that name (some torch builds ship triton
    as the distribution ``pytorch-triton``).
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        return getattr(module, "__version__", None) if module is not None else None


def versions(names: Iterable[str] = VERSIONED) -> dict[str, str | None]:
    """name -> installed version (None when not installed)."""
    return {name: version(name) for name in names}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_sha(short: bool = False) -> str | None:
    """The commit checked out in this package's repository (``--short`` form when ``short``); None outside git."""
    return _git("rev-parse", *(["--short"] if short else []), "HEAD")


def git_state() -> tuple[str | None, bool | None]:
    """(full commit sha, whether tracked files have uncommitted changes); (None, None) outside git."""
    sha = git_sha()
    if sha is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return sha, bool(status)


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, otherwise the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() or platform.processor() or platform.machine()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one): the default thread count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_averages() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages; None where the OS keeps none."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def load_average() -> float | None:
    """The 1-minute load average; None where the OS keeps none."""
    loads = load_averages()
    return None if loads is None else loads[0]


def host() -> dict[str, Any]:
    """Python version, platform string and logical CPU count of this machine."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Device, versions and git state: what a reader needs to reproduce or compare a result."""
    sha, dirty = git_state()
    machine = host()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": machine["cpu_count"],
        "threads": threads,
        "python": machine["python"],
        "platform": machine["platform"],
        "versions": versions(),
        "git_sha": sha,
        "git_dirty": dirty,
    }
