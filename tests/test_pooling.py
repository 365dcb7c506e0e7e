"""fastbert.pooling against sentence-transformers' Pooling module: config forms and every pooling mode.

Pure tensors (no checkpoint): packed hidden states pooled over cu_seqlens against the same states in a padded
grid with a mask, as sentence-transformers pools them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastbert.pooling import PoolingConfig, pool

pytest.importorskip("sentence_transformers")


@pytest.mark.parametrize(
    "config, modes",
    [
        ({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True}, ("mean",)),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, ("cls",)),
        ({"pooling_mode_max_tokens": True, "pooling_mode_cls_token": True}, ("cls", "max")),  # ST's concat order
        ({"pooling_mode_lasttoken": True}, ("lasttoken",)),
        ({"pooling_mode_mean_sqrt_len_tokens": True}, ("mean_sqrt_len_tokens",)),
        ({"embedding_dimension": 8, "pooling_mode": "cls"}, ("cls",)),
        ({"pooling_mode": ["mean", "max"]}, ("mean", "max")),
        ({"pooling_mode": "mean", "pooling_mode_cls_token": True}, ("mean",)),  # the new key wins
        ({}, ("mean",)),
    ],
    ids=[
        "legacy-mean",
        "legacy-cls",
        "legacy-cls+max",
        "legacy-last",
        "legacy-sqrt",
        "new-cls",
        "new-list",
        "new-wins",
        "empty",
    ],
)
def test_pooling_config_forms(config, modes):
    assert PoolingConfig.from_dict(config).modes == modes


def test_pooling_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'median'"):
        PoolingConfig.from_dict({"pooling_mode": "median"})
    assert PoolingConfig(("last_token", "mean_sqrt_len")).modes == ("lasttoken", "mean_sqrt_len_tokens")
    assert PoolingConfig.from_dict({"pooling_mode": "cls", "include_prompt": False}).include_prompt is False


def _padded(hidden: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    batch, width = len(lengths), max(lengths)
    grid = torch.zeros(batch, width, hidden.shape[1], dtype=hidden.dtype)
    mask = torch.zeros(batch, width, dtype=torch.int64)
    start = 0
    for i, n in enumerate(lengths):
        grid[i, :n] = hidden[start : start + n]
        mask[i, :n] = 1
        start += n
    return grid, mask


@pytest.mark.parametrize("prompt_length", [0, 3], ids=["all-tokens", "prompt3"])
@pytest.mark.parametrize(
    "modes",
    [
        ("mean",),
        ("cls",),
        ("max",),
        ("lasttoken",),
        ("mean_sqrt_len_tokens",),
        ("weightedmean",),
        ("cls", "max", "mean"),
    ],
    ids=lambda m: "+".join(m),
)
def test_pool_matches_sentence_transformers_pooling(modes, prompt_length):
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    torch.manual_seed(0)
    lengths = [1, 7, 4, 97, 3, 12]  # includes a 1-token text and texts no longer than the prompt
    hidden = torch.randn(sum(lengths), 16, dtype=torch.float64)
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    ours = pool(hidden, cu, modes, prompt_length)
    grid, mask = _padded(hidden, lengths)
    ref_module = Pooling(16, pooling_mode=modes if len(modes) > 1 else modes[0], include_prompt=prompt_length == 0)
    features = {"token_embeddings": grid, "attention_mask": mask}
    if prompt_length:
        features["prompt_length"] = prompt_length
    ref = ref_module(features)["sentence_embedding"]
    # Texts made only of prompt tokens: sentence-transformers' padded path gives 0/0 means and -inf maxima;
    # compare only rows that keep at least one token (and check ours stay finite or -inf consistently).
    rows = [i for i, n in enumerate(lengths) if n > prompt_length]
    diff = (ours[rows] - ref[rows]).abs().max().item()
    print(f"pool {modes} prompt={prompt_length}: max abs diff {diff:.3e}")
    assert ours.shape == ref.shape
    assert diff <= 1e-12


def test_pool_fp16_accumulates_in_fp32():
    torch.manual_seed(0)
    lengths = [300, 5]
    hidden = (torch.randn(sum(lengths), 8) * 30).half()
    cu = torch.tensor([0, 300, 305], dtype=torch.int32)
    ours = pool(hidden, cu, ("mean",))
    exact = torch.stack([hidden[:300].double().mean(0), hidden[300:].double().mean(0)])
    assert ours.dtype == torch.float16
    assert (ours.double() - exact).abs().max().item() <= 1e-2


def test_pool_rejects_mismatched_cu_seqlens():
    with pytest.raises(ValueError, match="ends at 5 but hidden has 4 tokens"):
        pool(torch.zeros(4, 2), torch.tensor([0, 5], dtype=torch.int32))
