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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbert", description="Fast, faithful BERT-family encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends").set_defaults(func=_info)

    from . import bench

    p = sub.add_parser("bench", help="time fastbert against transformers (and other systems) on this machine")
    bench.add_bench_arguments(p)
    p.set_defaults(func=bench.run_bench)

    try:
        from . import sentence
    except ImportError as exc:  # the text extra (tokenizers) is optional
        p = sub.add_parser("embed", help=f"text to vectors (unavailable: {exc})")
        p.set_defaults(func=lambda a, exc=exc: _missing("embed", exc))
    else:
        p = sub.add_parser("embed", help="encode texts to sentence embeddings")
        sentence.add_embed_arguments(p)
        p.set_defaults(func=sentence.run_embed)
    return parser


def _missing(command: str, exc: Exception) -> int:
    print(f"fastbert {command}: unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
