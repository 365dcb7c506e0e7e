"""The fastbert command."""

from __future__ import annotations

import os
import subprocess
import sys


def test_info_lists_backends():
    out = subprocess.run(
        [sys.executable, "-m", "fastbert.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" in out and "backends:" in out
    assert "available" in out


def test_info_says_which_torch_the_extension_was_built_for():
    import torch

    from fastbert import _cpp

    out = subprocess.run(
        [sys.executable, "-m", "fastbert.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("fastbert._C")]
    built_for = _cpp.build_torch_version()
    if built_for is not None:
        assert f"built for torch {built_for}" in line, line
        if _cpp.UNAVAILABLE_REASON is None:
            assert built_for.split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    else:
        # CI builds the extension fresh (FASTBERT_REQUIRE_CPP=1), so it must carry its torch version there.
        assert os.environ.get("FASTBERT_REQUIRE_CPP") != "1", line
        assert "unrecorded" in line or "not found" in line, line


def test_unknown_command_fails():
    res = subprocess.run([sys.executable, "-m", "fastbert.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "invalid choice" in res.stderr


def test_bench_help_from_both_entry_points():
    for module in ("fastbert.cli", "fastbert.bench"):
        args = [sys.executable, "-m", module] + (["bench"] if module == "fastbert.cli" else []) + ["--help"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        assert "--systems" in out and "--sizes" in out, out
