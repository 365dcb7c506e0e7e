"""Random-initialised transformers checkpoints of every family, saved with save_pretrained (no network).

``make_checkpoint(tmp_path, "roberta", task="sequence-classification", hidden=48, heads=3)`` returns the folder.
Used by the model-level tests of every backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra")
TASKS = (None, "sequence-classification", "token-classification", "question-answering", "masked-lm")

_AUTO = {
    None: transformers.AutoModel,
    "sequence-classification": transformers.AutoModelForSequenceClassification,
    "token-classification": transformers.AutoModelForTokenClassification,
    "question-answering": transformers.AutoModelForQuestionAnswering,
    "masked-lm": transformers.AutoModelForMaskedLM,
}


def hf_config(
    family: str,
    hidden: int = 64,
    heads: int = 4,
    layers: int = 2,
    intermediate: int | None = None,
    vocab: int = 99,
    max_positions: int = 80,
    act: str = "gelu",
    eps: float | None = None,
    num_labels: int = 3,
    embedding_size: int | None = None,
    type_vocab: int = 2,
) -> transformers.PretrainedConfig:
    inter = intermediate or 2 * hidden
    common = dict(vocab_size=vocab, num_labels=num_labels)
    if family == "distilbert":
        return transformers.DistilBertConfig(
            dim=hidden,
            n_heads=heads,
            n_layers=layers,
            hidden_dim=inter,
            activation=act,
            max_position_embeddings=max_positions,
            **common,
        )
    kw = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=inter,
        hidden_act=act,
        max_position_embeddings=max_positions,
        type_vocab_size=type_vocab,
        **common,
    )
    if eps is not None:
        kw["layer_norm_eps"] = eps
    if family == "bert":
        return transformers.BertConfig(**kw)
    if family in ("roberta", "xlm-roberta"):
        kw.setdefault("layer_norm_eps", 1e-5)
        kw["max_position_embeddings"] = max_positions + 2  # RoBERTa reserves pad_token_id + 1 rows
        cls = transformers.RobertaConfig if family == "roberta" else transformers.XLMRobertaConfig
        return cls(pad_token_id=1, bos_token_id=0, eos_token_id=2, **kw)
    if family == "electra":
        return transformers.ElectraConfig(embedding_size=embedding_size or hidden, **kw)
    raise ValueError(family)


def make_hf_model(family: str, task: str | None = None, seed: int = 0, **config_kw) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    if task == "question-answering":
        config_kw.setdefault("num_labels", 2)  # start and end logits
    model = _AUTO[task].from_config(hf_config(family, **config_kw), attn_implementation="eager")
    with torch.no_grad():  # LayerNorm weights/biases away from 1/0 so that a swapped or skipped one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


def make_checkpoint(tmp_path: Path, family: str, task: str | None = None, seed: int = 0, **config_kw) -> Path:
    """Save a random model of ``family`` (and ``task`` head) to a fresh folder under tmp_path."""
    model = make_hf_model(family, task, seed, **config_kw)
    folder = Path(tmp_path) / f"{family}-{task or 'base'}-{seed}-{abs(hash(tuple(sorted(config_kw.items())))) % 10**8}"
    model.save_pretrained(folder)
    return folder


def random_batch(family: str, lengths: list[int], vocab: int = 99, seed: int = 0, pad_id: int | None = None):
    """(input_ids, attention_mask) right-padded to max(lengths); ids avoid the special ids 0..3."""
    g = torch.Generator().manual_seed(seed)
    seqlen = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), seqlen), generator=g)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    pad = pad_id if pad_id is not None else (1 if family in ("roberta", "xlm-roberta") else 0)
    ids[mask == 0] = pad
    return ids, mask


def edit_config(folder: Path, **fields) -> Path:
    """Overwrite fields of ``folder/config.json`` (values as JSON writes them: NaN and Infinity included)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.update(fields)
    (Path(folder) / "config.json").write_text(json.dumps(cfg))
    return Path(folder)


_COMPUTED = object()


def write_shards(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map=_COMPUTED) -> Path:
    """Write ``{file name: tensors}`` as shards plus their index (``weight_map``, any JSON value, replaces the
    computed {tensor: file} map).

    Shards ending in .safetensors get ``model.safetensors.index.json``, others ``pytorch_model.bin.index.json``;
    the single-file weights already in ``folder`` are removed so that the index is what loads.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    for single in ("model.safetensors", "pytorch_model.bin"):
        (folder / single).unlink(missing_ok=True)
    computed = {}
    for name, tensors in shards.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)
        computed.update(dict.fromkeys(tensors, name))
    kind = "model.safetensors" if all(n.endswith(".safetensors") for n in shards) else "pytorch_model.bin"
    index = {"metadata": {}, "weight_map": computed if weight_map is _COMPUTED else weight_map}
    (folder / f"{kind}.index.json").write_text(json.dumps(index))
    return folder
