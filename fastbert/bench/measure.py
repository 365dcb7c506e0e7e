"""The timer: how every benchmark in the project times a call, and what the report derives from the samples.

``timed`` / ``timed_call`` / ``calls_for`` are the host-clock timer (device synchronised at both ends), used by
``fastbert bench``, the pytest-benchmark suite and the scripts in ``benchmarks/``; ``cuda_event_ms`` times with
CUDA events (benchmarks/gpu.py). ``measure_cell`` is the report's interleaved schedule and ``summarize`` turns
its samples into medians, spreads, throughput and paired speed-ups.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .systems import System


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (a no-op on CPU and for None)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any], calls: int = 1, *, device: torch.device | None = None, min_seconds: float = 0.0
) -> float:
    """Seconds per call of ``fn``: at least ``calls`` back-to-back calls, and more until ``min_seconds`` passed.

    The device is synchronised before the first call and whenever the clock is read, so the time is the
    device's, not the launch's.
    """
    synchronize(device)
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n >= calls:
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return elapsed / n


def timed_call(fn: Callable[[], Any], *, device: torch.device | None = None) -> tuple[Any, float]:
    """(what ``fn()`` returned, seconds it took), device synchronised at both ends."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def calls_for(
    fn: Callable[[], Any],
    seconds: float,
    *,
    device: torch.device | None = None,
    least: int = 1,
    most: int | None = None,
) -> int:
    """How many back-to-back calls of ``fn`` take about ``seconds``, from one timed call, within [least, most]."""
    n = int(seconds / max(timed(fn, device=device), 1e-6))
    return max(least, n if most is None else min(most, n))


def cuda_event_ms(fn: Callable[[], Any], warmup: int, iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean milliseconds of ``iters`` back-to-back calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values``, linear between order statistics; NaN when empty."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]``: a speed-up robust to load that drifts."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def max_abs_error(output: Tensor, reference: Tensor, mask: Tensor) -> float:
    """max |output - reference| over valid tokens (mask set); NaN if the output has a NaN or a wrong shape."""
    if output.shape != reference.shape:
        return math.nan
    diff = (output.detach().float().cpu() - reference)[mask.bool()]
    if diff.numel() == 0:
        return 0.0
    if not torch.isfinite(diff).all():
        return math.nan
    return float(diff.abs().max())


@dataclass
class Row:
    """One system at one (model, dtype, size): its timing, throughput and error (filled by measure_cell and
    summarize; the report's JSON rows are these fields)."""

    model: str
    dtype: str
    size: str
    batch: int
    seqlen: int
    tokens: int
    padded_tokens: int
    flops: int
    system: str
    status: str = "ok"
    message: str = ""
    first_call_ms: float = math.nan
    inner: int = 1
    samples_ms: list[float] = field(default_factory=list)
    median_ms: float = math.nan
    q25_ms: float = math.nan
    q75_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    tokens_per_s: float = math.nan
    tflops: float = math.nan
    speedup_vs_eager: float | None = None
    speedup_vs_best_other: float | None = None
    best_other: str | None = None
    max_abs_err: float = math.nan


def measure_cell(
    systems: dict[str, System],
    ids: Tensor,
    mask: Tensor,
    reference: Tensor,
    device: torch.device,
    rows: dict[str, Row],
    rounds: int,
    warmup: int,
    min_sample_s: float,
    tick: Callable[[str, int], None],
) -> None:
    """Check and time every system on one input batch, interleaved; fills ``rows`` in place."""
    live: list[str] = []
    for name, system in systems.items():  # first call: correctness and cold start (compilation, caches)
        tick(name, 1)
        row = rows[name]
        try:
            out, seconds = timed_call(partial(system.run, ids, mask), device=device)
            row.first_call_ms = seconds * 1e3
            row.max_abs_err = max_abs_error(out, reference, mask)
            del out
            live.append(name)
        except Exception as exc:  # one failing system must not sink the report
            row.status, row.message = "error", f"{type(exc).__name__}: {exc}"
            tick(name, warmup + rounds)  # the calls it will not make
    per_call: dict[str, float] = {}
    for r in range(warmup + rounds):
        if r == warmup:  # repeat very short calls inside one sample so the timer's resolution does not matter
            for name in live:
                estimate = per_call.get(name, rows[name].first_call_ms / 1e3)
                rows[name].inner = max(1, min(1000, math.ceil(min_sample_s / max(estimate, 1e-7))))
        shift = r % max(len(live), 1)  # rotate the order: A B C, B C A, C A B, ...
        for name in live[shift:] + live[:shift]:
            row = rows[name]
            tick(name, 1)
            if row.status != "ok":
                continue
            call = partial(systems[name].run, ids, mask)
            try:
                if r < warmup:
                    per_call[name] = timed(call, 1, device=device)
                else:
                    row.samples_ms.append(timed(call, row.inner, device=device) * 1e3)
            except Exception as exc:
                row.status, row.message = "error", f"{type(exc).__name__}: {exc}"
                row.samples_ms.clear()


def summarize(rows: list[Row]) -> None:
    """Fill medians, spread, throughput and paired speed-ups of the rows of one cell."""
    ok = [r for r in rows if r.status == "ok" and r.samples_ms]
    for r in ok:
        r.median_ms = statistics.median(r.samples_ms)
        r.q25_ms, r.q75_ms = quantile(r.samples_ms, 0.25), quantile(r.samples_ms, 0.75)
        r.min_ms, r.max_ms = min(r.samples_ms), max(r.samples_ms)
        r.tokens_per_s = r.tokens / (r.median_ms / 1e3)
        r.tflops = r.flops / (r.median_ms / 1e3) / 1e12

    eager = next((r for r in ok if r.system == "hf-eager"), None)
    for r in ok:
        if eager is not None:
            r.speedup_vs_eager = paired_ratio(eager.samples_ms, r.samples_ms)
        others = [o for o in ok if o is not r]
        if others:
            best = min(others, key=lambda o: o.median_ms)
            r.best_other, r.speedup_vs_best_other = best.system, paired_ratio(best.samples_ms, r.samples_ms)
