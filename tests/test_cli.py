"""The fastbert command."""

from __future__ import annotations

import subprocess
import sys


def test_info_lists_backends():
    out = subprocess.run(
        [sys.executable, "-m", "fastbert.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" in out and "backends:" in out
    assert "available" in out


def test_unknown_command_fails():
    res = subprocess.run([sys.executable, "-m", "fastbert.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "invalid choice" in res.stderr


def test_bench_help_from_both_entry_points():
    for module in ("fastbert.cli", "fastbert.bench"):
        args = [sys.executable, "-m", module] + (["bench"] if module == "fastbert.cli" else []) + ["--help"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        assert "--systems" in out and "--sizes" in out, out
