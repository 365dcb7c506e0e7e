"""Embedding a corpus on many machines with Ray Data: ``read_*`` -> ``map_batches(Embedder)`` -> ``write_*``.

Ray is an optional extra (``pip install 'fastbert[ray]'``); ``import fastbert`` never imports it, and this
module imports it only inside ``embed_dataset``. ``Embedder`` itself needs no Ray at all: it is the callable
class Ray Data runs in each actor, and it can be called by hand on a dict of numpy arrays or a pandas frame.

    import ray
    from fastbert.ray import embed_dataset

    ds = ray.data.read_parquet("s3://bucket/corpus/")                 # one row per document, a "text" column
    embed_dataset(ds, "sentence-transformers/all-MiniLM-L6-v2", concurrency=8).write_parquet("s3://bucket/vectors/")

Each actor loads the encoder once (``Embedder.__init__``) and then embeds every batch Ray hands it; the output
rows are the input rows with one more column, ``embedding``: a float32 vector per row (a 2-D numpy array per
batch, which Ray stores as a fixed-shape tensor column). Ray Data does not keep row order across blocks unless
``DataContext.get_current().execution_options.preserve_order = True``; carry an id column to join on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ray.data

__all__ = ["Embedder", "embed_dataset"]


class Embedder:
    """A callable class for ``Dataset.map_batches``: one ``SentenceEncoder`` per actor, loaded once.

    model_path: a sentence-transformers folder or hub id, as ``SentenceEncoder.from_pretrained`` takes it (on a
        cluster, a path every node can read, or a hub id each node can fetch).
    text_column: the column holding the texts (str). embedding_column: the column added, (rows, dim) float32.
    batch_size, normalize_embeddings, prompt_name, prompt: passed to every ``encode`` call.
    threads: ``torch.set_num_threads`` in the actor (default: leave it; Ray sets ``OMP_NUM_THREADS`` to the
        actor's ``num_cpus``, which torch follows).
    encoder_kwargs: the rest of ``SentenceEncoder.from_pretrained`` (``device``, ``dtype``, ``backend``,
        ``max_seq_length``).
    """

    def __init__(
        self,
        model_path: str,
        text_column: str = "text",
        embedding_column: str = "embedding",
        batch_size: int = 32,
        normalize_embeddings: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        threads: int | None = None,
        **encoder_kwargs: Any,
    ):
        import torch

        from .sentence import SentenceEncoder

        if threads is not None:
            torch.set_num_threads(threads)
        self.encoder = SentenceEncoder.from_pretrained(model_path, **encoder_kwargs)
        self.text_column = text_column
        self.embedding_column = embedding_column
        self.encode_kwargs: dict[str, Any] = {
            "batch_size": batch_size,
            "normalize_embeddings": normalize_embeddings,
            "prompt_name": prompt_name,
            "prompt": prompt,
            "show_progress_bar": False,
        }

    def embed(self, texts: Any) -> np.ndarray:
        """(n, dim) float32 vectors of ``texts`` (a sequence or 1-D array of str), in their order."""
        return self.encoder.encode(list(texts), **self.encode_kwargs)

    def __call__(self, batch: Any) -> Any:
        """``batch`` with the embedding column added: a dict of numpy arrays (Ray's ``"numpy"`` batch format)
        gets a (rows, dim) array; a pandas DataFrame (``"pandas"``) gets one 1-D array per row."""
        if self.text_column not in batch:
            raise KeyError(f"fastbert.ray.Embedder: the batch has no column {self.text_column!r}")
        vectors = self.embed(batch[self.text_column])  # (rows, dim)
        if isinstance(batch, dict):
            return {**batch, self.embedding_column: vectors}
        batch = batch.copy()
        batch[self.embedding_column] = list(vectors)
        return batch


def embed_dataset(
    ds: ray.data.Dataset,
    model_path: str,
    text_column: str = "text",
    embedding_column: str = "embedding",
    *,
    concurrency: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    rows_per_batch: int = 1024,
    batch_size: int = 32,
    normalize_embeddings: bool | None = None,
    **encoder_kwargs: Any,
) -> ray.data.Dataset:
    """``ds`` with an ``embedding_column`` of float32 vectors of its ``text_column`` (lazy, as Ray Data is).

    concurrency: the number of actors, each holding one encoder; num_cpus / num_gpus: what each actor reserves
    (its torch thread count follows num_cpus). Leave CPUs for Ray Data's own read and write tasks: actors that
    reserve every CPU of the cluster (concurrency * num_cpus == its CPUs) stall the pipeline on Ray Data 2.60.
    rows_per_batch: rows Ray hands an actor per call;
    batch_size: the encoder's own batch size (texts per forward, as in sentence-transformers).
    encoder_kwargs: ``Embedder``'s remaining arguments (``prompt_name``, ``threads``, ``dtype``, ``backend``...).
    """
    if num_gpus and "device" not in encoder_kwargs:
        encoder_kwargs["device"] = "cuda"
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model_path": model_path,
            "text_column": text_column,
            "embedding_column": embedding_column,
            "batch_size": batch_size,
            "normalize_embeddings": normalize_embeddings,
            **encoder_kwargs,
        },
        batch_size=rows_per_batch,
        batch_format="numpy",
        concurrency=concurrency,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
