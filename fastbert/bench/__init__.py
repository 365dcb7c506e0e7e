"""``fastbert bench``: how much faster is fastbert than what you run today, and are the outputs the same?

One report, one method. A *system* is one way of running an encoder (fastbert on one backend, transformers
eager or sdpa, ``torch.compile`` of the sdpa model, ONNX Runtime, OpenVINO). For every model, dtype and input
size the report:

1. builds the inputs once (random token ids; variable-length batches draw lengths uniformly with a fixed seed
   and are padded to their longest sequence, as a tokenizer with ``padding=True`` would);
2. runs every system once and compares its output with transformers eager in fp32 (max abs error over the
   valid tokens, padding excluded);
3. times the systems interleaved (round r runs A B C, round r+1 runs B C A, ...), so that load drift on a
   shared machine hits all of them alike, and reports median and spread of the per-call time;
4. derives tokens/s (real tokens, not padding), TFLOP/s (one FLOP count for every system, see
   ``encoder_flops``) and speed-ups as the median of the per-round paired ratios.

Included in a timed call: the model forward from padded ``input_ids``/``attention_mask`` already on the
device to the padded last hidden state (fastbert unpads and re-pads inside that call; ONNX Runtime and
OpenVINO see the padded batch, and OpenVINO's output is copied out of its reused buffer). Excluded:
tokenisation, host-to-device copies of the inputs, model loading and compilation (the first call is timed
separately as ``first_call_ms``).

The package: ``models`` (shapes, checkpoints, input sizes, the FLOP count), ``systems`` (the ways of running an
encoder), ``measure`` (the timer and the statistics; the one timer of the project), ``env`` (environment
capture: device, versions, git state, load), ``report`` (the run and its writers), ``cli`` (the options).
"""

from . import env, measure
from .cli import PRESETS, add_bench_arguments, main, run_bench
from .measure import Row, max_abs_error, measure_cell, summarize, synchronize
from .models import (
    BUILTIN_MODELS,
    BenchModel,
    ModelShape,
    Size,
    build_random_model,
    encoder_flops,
    load_bench_model,
    parse_size,
)
from .report import (
    METHOD,
    SCHEMA,
    TABLE_HEADER,
    jsonable,
    render_markdown,
    render_plot,
    render_text,
    run_report,
    summary_tables,
    table_rows,
)
from .systems import (
    ALL_SYSTEM_NAMES,
    BASELINES,
    DTYPES,
    FASTBERT_BACKENDS,
    FastbertSystem,
    OnnxRuntimeSystem,
    OpenVinoSystem,
    System,
    TransformersSystem,
    expand_systems,
    export_onnx,
    make_system,
)

__all__ = [
    "ALL_SYSTEM_NAMES",
    "BASELINES",
    "BUILTIN_MODELS",
    "DTYPES",
    "FASTBERT_BACKENDS",
    "METHOD",
    "PRESETS",
    "SCHEMA",
    "TABLE_HEADER",
    "BenchModel",
    "FastbertSystem",
    "ModelShape",
    "OnnxRuntimeSystem",
    "OpenVinoSystem",
    "Row",
    "Size",
    "System",
    "TransformersSystem",
    "add_bench_arguments",
    "build_random_model",
    "encoder_flops",
    "env",
    "expand_systems",
    "export_onnx",
    "jsonable",
    "load_bench_model",
    "main",
    "make_system",
    "max_abs_error",
    "measure",
    "measure_cell",
    "parse_size",
    "render_markdown",
    "render_plot",
    "render_text",
    "run_bench",
    "run_report",
    "summarize",
    "summary_tables",
    "synchronize",
    "table_rows",
]
