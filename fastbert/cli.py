"""The ``fastbert`` command: ``info``, ``bench``, ``embed``."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastbert

    from . import ops

    print(f"fastbert     {fastbert.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"fastbert._C  {_extension_build()}")
    for name in ("transformers", "triton", "tokenizers", "sentence_transformers"):
        try:
            mod = __import__(name)
            print(f"{name:<12} {getattr(mod, '__version__', '?')}")
        except Exception:
            print(f"{name:<12} not installed")
    print(f"cpu          {platform.processor() or platform.machine()}")
    if torch.cuda.is_available():
        print(f"cuda         {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    else:
        print("cuda         no CUDA device")
    print("backends:")
    for name in ops.BACKENDS:
        reason = ops.unavailable_reason(name)
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"int8         {_int8_kind()}")
    return 0


def _int8_kind() -> str:
    """How quantize='int8' runs its GEMMs here (the cpp backend's run-time probe, fastbert.quantize)."""
    from . import _cpp

    if _cpp.UNAVAILABLE_REASON is not None:
        return "torch backend only (float64 reference GEMMs; slow): the C++ extension is not loadable"
    kind = _cpp.int8_info()
    return {
        "onednn": "oneDNN u8 x s8 GEMMs, 8-bit weights (VNNI / AMX or exact pair sums)",
        "onednn-7bit": "oneDNN u8 x s8 GEMMs, 7-bit weights (this CPU's kernel saturates int16 pair sums: no VNNI)",
        "reference": "no oneDNN int8 GEMM in this torch: float64 reference GEMMs (correct, slow)",
    }.get(kind, kind)


def _extension_build() -> str:
    """Which torch the C++ extension was compiled against, read from the binary (see fastbert._cpp)."""
    from . import _cpp

    built_for = _cpp.build_torch_version()
    loaded = "loaded" if _cpp.UNAVAILABLE_REASON is None else "not loadable, see backends"
    if built_for is None:
        if _cpp.UNAVAILABLE_REASON is None:
            return "built for an unrecorded torch (an older build: rebuild it to record one) (loaded)"
        return "not found or not loadable, see backends (FASTBERT_NO_EXT=1 builds none)"
    return f"built for torch {built_for} ({loaded})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="Fast, faithful BERT-family encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends").set_defaults(func=_info)

    from . import bench

    p = sub.add_parser("bench", help="time fastbert against transformers (and other systems) on this machine")
    bench.add_bench_arguments(p)
    p.set_defaults(func=bench.run_bench)

    try:
        from . import sentence  # noqa: F401
    except ImportError as exc:  # the text extra (tokenizers) is optional
        p = sub.add_parser("embed", help=f"text to vectors (unavailable: {exc})")
        p.set_defaults(func=lambda a, exc=exc: _missing("embed", exc))
    else:
        p = sub.add_parser("embed", help="encode texts to sentence embeddings")
        add_embed_arguments(p)
        p.set_defaults(func=run_embed)
    return parser


def _missing(command: str, exc: Exception) -> int:
    print(f"fastbert {command}: unavailable: {exc}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------------------
# `fastbert embed`
# ----------------------------------------------------------------------------------------------------------


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastbert embed``."""
    parser.add_argument("--model", required=True, help="sentence-transformers / transformers folder, or a hub id")
    parser.add_argument("--in", dest="input", default="-", help="UTF-8 text file, one text per line ('-' = stdin)")
    parser.add_argument(
        "--out",
        default="-",
        help='output: vectors.npy, or rows.jsonl / \'-\' (stdout) for JSON lines {"id", "text", "embedding"}',
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per encoder call (default 32)")
    parser.add_argument(
        "--max-tokens-per-batch", type=int, default=None, help="also cap the tokens per encoder call (default: none)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the model's)")
    parser.add_argument("--backend", default="auto", help="auto | torch | cpp | triton")
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: the encoder's linears run int8 GEMMs (CPU only; SentenceEncoder quantize='int8')",
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the vectors")
    parser.add_argument("--prompt-name", default=None, help="a prompt of the model (e.g. query)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _read_lines(source: str) -> list[str]:
    if source == "-":
        data = sys.stdin.buffer.read()
        name = "<stdin>"
    else:
        name = source
        with open(source, "rb") as fh:
            data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r})") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty text
    return [line.removesuffix("\r") for line in lines]


def run_embed(args: argparse.Namespace) -> int:
    """Run ``fastbert embed``; returns the exit status (2: bad input/output arguments, 1: model errors)."""
    import json

    import numpy as np

    from .sentence import SentenceEncoder

    prog = "fastbert embed"
    out = args.out
    if out != "-" and not (out.endswith(".npy") or out.endswith(".jsonl")):
        print(f"{prog}: --out {out!r} must end in .npy or .jsonl (or be '-' for JSON lines on stdout)", file=sys.stderr)
        return 2
    if args.batch_size <= 0:
        print(f"{prog}: --batch-size must be positive, got {args.batch_size}", file=sys.stderr)
        return 2
    max_tokens = getattr(args, "max_tokens_per_batch", None)
    if max_tokens is not None and max_tokens <= 0:
        print(f"{prog}: --max-tokens-per-batch must be positive, got {max_tokens}", file=sys.stderr)
        return 2
    try:
        texts = _read_lines(args.input)
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot read input {args.input!r}: {exc}", file=sys.stderr)
        return 2
    quantize = getattr(args, "quantize", None)
    extra = {} if quantize is None else {"quantize": quantize}  # only when asked: a build without int8 still embeds
    try:
        encoder = SentenceEncoder.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, backend=args.backend, **extra
        )
    except Exception as exc:
        print(f"{prog}: cannot load model {args.model!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    try:
        vectors = encoder.encode(
            texts,
            prompt_name=args.prompt_name,
            batch_size=args.batch_size,
            max_tokens_per_batch=max_tokens,
            show_progress_bar=not args.no_progress,
            normalize_embeddings=args.normalize,
        )
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        if out.endswith(".npy"):
            np.save(out, vectors)
        else:
            fh = sys.stdout if out == "-" else open(out, "w", encoding="utf-8")
            try:  # one row per input line: its index, the text and its vector
                for i, (text, row) in enumerate(zip(texts, vectors, strict=True)):
                    fh.write(json.dumps({"id": i, "text": text, "embedding": row.tolist()}, ensure_ascii=False) + "\n")
            finally:
                if fh is not sys.stdout:
                    fh.close()
    except OSError as exc:
        print(f"{prog}: cannot write {out!r}: {exc}", file=sys.stderr)
        return 1
    if out != "-":
        print(f"{prog}: wrote {len(texts)} vectors of dimension {vectors.shape[1]} to {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
