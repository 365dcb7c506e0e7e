"""The public API of ``import fastbert``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastbert


def test_text_api_exported_lazily():
    code = (
        "import sys, fastbert; assert 'fastbert.sentence' not in sys.modules; "
        "from fastbert import SentenceEncoder, CrossEncoder; "
        "assert SentenceEncoder.__name__ == 'SentenceEncoder' and CrossEncoder.__name__ == 'CrossEncoder'; "
        "assert 'SentenceEncoder' in dir(fastbert)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fastbert.Nope  # noqa: B018
