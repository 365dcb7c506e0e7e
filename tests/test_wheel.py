"""The built wheel pins the torch release its fastbert._C was compiled against, and loads it in a fresh venv.

Builds the wheel from this checkout (``pip wheel --no-build-isolation``, in the tree, so a build/ folder left by
an in-place build makes it incremental), installs it into a new virtual environment with no torch, letting pip
pull torch through the configured indexes, and checks there that the cpp backend loads. A build without the
extension (FASTBERT_NO_EXT=1) keeps the loose requirement. Slow: a cold build of fastbert._C takes minutes.
Also: an extension built for another torch is reported as such, from the version it carries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from email.parser import Parser
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ".".join(torch.__version__.split("+", 1)[0].split(".")[:2])  # "2.13.0+cpu" -> "2.13"


def _run(args: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail with the tail of its output."""
    start = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, **kwargs)
    print(f"{what}: {time.perf_counter() - start:.0f} s")
    if res.returncode != 0:
        pytest.fail(f"{what} failed ({res.returncode}): {' '.join(args)}\n{(res.stdout + res.stderr)[-4000:]}")
    return res


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTBERT_NO_EXT", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(overrides)
    return env


def _requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode()).get_all("Requires-Dist") or []


def _build_wheel(source: Path, dist: Path, **env: str) -> Path:
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(source)],
        f"pip wheel {source.name} {env or ''}".strip(),
        cwd=source,
        env=_env(**env),
    )
    (wheel,) = dist.glob("fastbert-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        if os.environ.get("FASTBERT_REQUIRE_CPP") == "1":
            pytest.fail(f"FASTBERT_REQUIRE_CPP=1 but no C++ compiler ({compiler!r}) is on PATH")
        pytest.skip(f"no C++ compiler ({compiler!r} not on PATH): a wheel built here would have no fastbert._C")
    return _build_wheel(ROOT, tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
def test_wheel_pins_the_torch_release_it_was_built_against(wheel):
    assert "-none-any" not in wheel.name, f"{wheel.name}: no compiled extension in the wheel"
    with zipfile.ZipFile(wheel) as zf:
        assert any(n.startswith("fastbert/_C") and n.endswith(".so") for n in zf.namelist()), zf.namelist()
    torch_reqs = [r for r in _requires_dist(wheel) if r.split()[0].startswith("torch") and "extra" not in r]
    assert torch_reqs == [f"torch=={RELEASE}.*"], torch_reqs


@pytest.mark.slow
def test_wheel_loads_its_cpp_backend_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    start = time.perf_counter()
    venv.EnvBuilder(with_pip=True).create(env_dir)
    print(f"venv: {time.perf_counter() - start:.0f} s")
    python = str(env_dir / "bin" / "python")
    # Nothing preinstalled: pip must resolve torch==<release>.* itself, through the indexes configured here.
    check = [python, "-c", "import importlib.util; print(importlib.util.find_spec('torch'))"]
    assert _run(check, "torch absent", cwd=tmp_path, env=_env()).stdout.strip() == "None"
    _run([python, "-m", "pip", "install", str(wheel)], "pip install wheel", cwd=tmp_path, env=_env())
    # cwd outside the checkout, so `import fastbert` is the installed wheel, not the source tree.
    code = (
        "import torch, fastbert, fastbert._cpp as c; "
        "print(torch.__version__); print(fastbert.available_backends()); print(c.build_torch_version()); "
        "print(c.UNAVAILABLE_REASON); print(fastbert.__file__)"
    )
    out = _run([python, "-c", code], "import in venv", cwd=tmp_path, env=_env()).stdout.splitlines()
    venv_torch, backends, built_for, reason, where = out[-5:]
    assert venv_torch.startswith(f"{RELEASE}."), venv_torch
    assert "'cpp'" in backends, f"backends {backends}; cpp unavailable: {reason}"
    assert built_for == torch.__version__, built_for
    assert str(env_dir) in where, where
    info = _run([python, "-m", "fastbert.cli", "info"], "fastbert info in venv", cwd=tmp_path, env=_env()).stdout
    assert f"built for torch {torch.__version__} (loaded)" in info, info


@pytest.mark.slow
def test_wheel_without_extension_keeps_the_loose_torch_requirement(tmp_path):
    # From a copy of the tracked files, so build/lib of the tree (which holds a built _C) cannot leak in.
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    if not files:
        pytest.skip("not a git checkout: cannot list the tracked files to copy")
    source = tmp_path / "src"
    for rel in files.decode().split("\0"):
        if rel and (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    wheel = _build_wheel(source, tmp_path / "dist", FASTBERT_NO_EXT="1")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    torch_reqs = [r for r in _requires_dist(wheel) if r.split()[0].startswith("torch") and "extra" not in r]
    assert torch_reqs == ["torch>=2.6"], torch_reqs


def test_an_extension_built_for_another_torch_names_the_mismatch(tmp_path):
    # A copy of the package whose _C cannot load but carries another release's marker, as a wheel built for
    # torch 9.9 would when installed next to this torch (undefined symbols at load).
    shutil.copytree(ROOT / "fastbert", tmp_path / "fastbert", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (tmp_path / "fastbert" / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(b"not ELF\0fastbert-build-torch=9.9.0+cu999\0")
    code = (
        "import fastbert, fastbert._cpp as c; "
        "print(fastbert.__file__); print(c.build_torch_version()); print(c.UNAVAILABLE_REASON)"
    )
    out = _run([sys.executable, "-c", code], "import", cwd=tmp_path, env=_env(PYTHONPATH=str(tmp_path))).stdout
    where, built_for, reason = out.splitlines()[-3:]
    assert where.startswith(str(tmp_path)), where
    assert built_for == "9.9.0+cu999"
    assert f"built for torch 9.9.0+cu999 but torch {torch.__version__} is installed" in reason, reason
    assert "torch==9.9.*" in reason, reason
