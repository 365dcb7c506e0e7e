"""Where a bfloat16 BERT's error comes from: a float64 forward that rounds to bfloat16 at chosen places only.

BERT-base (``transformers.BertConfig()``, random weights, seed 0), one (8,128) batch of random ids. The forward is
written out in float64 (post-LN BERT, erf GELU) and rounds to bfloat16 only where a case says; each row reports the
max and mean abs difference of the last hidden state from the unrounded float64 forward. Places:

- W: the linear weights; A: the GEMM inputs (W + A is what a bfloat16 GEMM with float32 accumulation costs);
- O: the GEMM outputs, attention's context and the GELU output (what a bfloat16 op writes);
- R: the residual stream (every LayerNorm output, which each later layer adds to); LN: every LayerNorm's input;
- P: attention's q, k, v and probabilities as its two GEMMs read them; S: the attention scores.

    python benchmarks/bf16_error_sources.py        # prints the table (markdown)
"""

from __future__ import annotations

import math

import torch
import transformers

CASES = {
    "W (weights)": "W",
    "A (GEMM inputs)": "A",
    "W+A (bf16 GEMMs, float32 elsewhere)": "WA",
    "O (op outputs)": "O",
    "R (residual stream)": "R",
    "LN (LayerNorm inputs)": "L",
    "P (attention q, k, v, probabilities)": "P",
    "S (attention scores)": "S",
    "W+A+P": "WAP",
    "W+A+P+O: bf16 ops, float32 stream (fastbert bf16 inference)": "WAPO",
    "W+A+P+O, last hidden state rounded to bf16": "WAPO+",
    "W+A+P+R": "WAPR",
    "W+A+P+O+R: everything bf16 (fastbert bf16 before, training)": "WAPOR",
}


def forward(sd: dict, ids: torch.Tensor, places: str) -> torch.Tensor:
    def r(x: torch.Tensor, place: str) -> torch.Tensor:
        return x.to(torch.bfloat16).double() if place in places else x

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        x = r(x, "L")
        m = x.mean(-1, keepdim=True)
        v = ((x - m) ** 2).mean(-1, keepdim=True)
        return (x - m) / torch.sqrt(v + 1e-12) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return r(r(x, "A") @ r(sd[p + ".weight"], "W").T + sd[p + ".bias"], "O")

    b, n = ids.shape
    e = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:n]
    x = r(ln(e + sd["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm"), "R")
    heads, hidden = 12, e.shape[-1]
    d = hidden // heads
    for i in range(12):
        p = f"encoder.layer.{i}."

        def split(t: torch.Tensor) -> torch.Tensor:
            return r(t.view(b, n, heads, d).transpose(1, 2), "P")

        q, k, v = (split(lin(x, p + f"attention.self.{w}")) for w in ("query", "key", "value"))
        probs = torch.softmax(r(q @ k.transpose(-1, -2) / math.sqrt(d), "S"), -1)
        ctx = r((r(probs, "P") @ v).transpose(1, 2).reshape(b, n, hidden), "O")
        x = r(ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm"), "R")
        h = lin(x, p + "intermediate.dense")
        h = r(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), "O")
        x = r(ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm"), "R")
    return r(x, "+")


def main() -> None:
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()
    ids = torch.randint(0, hf.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    sd = {k: v.double() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        exact = forward(sd, ids, "")
        print("| bf16 rounding at | max abs err | mean abs err |\n|---|---|---|")
        for name, places in CASES.items():
            err = (forward(sd, ids, places) - exact).abs()
            print(f"| {name} | {err.max().item():.2e} | {err.mean().item():.2e} |", flush=True)


if __name__ == "__main__":
    main()
