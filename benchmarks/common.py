"""Shared pieces of the benchmark scripts: timing, device names, result files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Seconds of back-to-back calls that make one CPU timing sample (see _cpu_rounds).
CPU_SAMPLE_SECONDS = 0.002


def device_label(device: torch.device) -> str:
    """A file-name friendly name of the device results were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-").lower()
    return f"cpu-{os.cpu_count()}core"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The widest vector ISA torch's CPU kernels use (AVX2, AVX512, ...): cspkv's kernels pick
    # their AVX2 or AVX-512 clone on the same hosts, and their speed depends on which.
    threads = torch.get_num_threads()
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}), {threads} torch thread{'s' if threads > 1 else ''}"


@contextmanager
def nvtx_range(name: str, device: torch.device):
    """An NVTX range (visible to nsys / ncu --nvtx) on CUDA; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.nvtx.range_pop()


_l2_flush = {}


def _flush_l2(device: torch.device) -> None:
    if device not in _l2_flush:
        size = torch.cuda.get_device_properties(device).L2_cache_size or 64 << 20
        _l2_flush[device] = torch.empty(2 * size, dtype=torch.uint8, device=device)
    _l2_flush[device].zero_()


def median_time(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 7,
                max_seconds: float = 20.0, min_batch_seconds: float = 1e-3) -> float:
    """Median seconds per call of `fn()`.

    CPU: perf_counter around single calls. CUDA: events around a batch of
    back-to-back calls with L2 flushed before each batch; the batch is as many
    calls as take `min_batch_seconds` (at most 100), so the host's launch cost of
    a short op overlaps the previous call's GPU work, as it does inside a model.
    """
    if device.type != "cuda":
        return _cpu_rounds([fn], warmup, repeats, max_seconds)[0]
    for _ in range(warmup):
        fn()
    single = _cuda_batch(fn, device, 1)
    calls = max(1, min(100, math.ceil(min_batch_seconds / max(single, 1e-7))))
    times: List[float] = []
    budget_end = time.perf_counter() + max_seconds
    for _ in range(repeats):
        times.append(_cuda_batch(fn, device, calls) / calls)
        if time.perf_counter() > budget_end and len(times) >= 3:
            break
    return statistics.median(times)


def median_times(fns: Sequence[Optional[Callable[[], object]]], device: torch.device, *, repeats: int = 7,
                 max_seconds: float = 20.0) -> List[Optional[float]]:
    """`median_time` of each fn (None for a None fn), for comparing them.

    On CPU the calls are interleaved, one call of each fn per round, so that a
    slow spell of a shared machine (this VM's speed drifts by tens of percent
    over minutes) hits them alike. On CUDA each fn is timed on its own.
    """
    live = [fn for fn in fns if fn is not None]
    if device.type == "cuda":
        medians = [median_time(fn, device, repeats=repeats, max_seconds=max_seconds) for fn in live]
    else:
        medians = _cpu_rounds(live, 2, repeats, max_seconds)
    it = iter(medians)
    return [next(it) if fn is not None else None for fn in fns]


def _cpu_rounds(fns: Sequence[Callable[[], object]], warmup: int, repeats: int, max_seconds: float) -> List[float]:
    """Median seconds per call of each fn, timed with perf_counter, each fn once per round:
    at least 3 rounds, then until `repeats` rounds or `max_seconds` per fn. A sample is
    the mean of as many back-to-back calls as take about CPU_SAMPLE_SECONDS (at most 100),
    so that calls of tens of microseconds are not lost in the timer's and the machine's noise."""
    calls = []
    for fn in fns:
        for _ in range(max(1, warmup)):  # the last warm-up call sizes the samples
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
        calls.append(min(100, max(1, math.ceil(CPU_SAMPLE_SECONDS / max(elapsed, 1e-9)))))
    times: List[List[float]] = [[] for _ in fns]
    budget_end = time.perf_counter() + max_seconds * max(1, len(fns))
    for round_ in range(repeats):
        for fn, n_calls, samples in zip(fns, calls, times):
            start = time.perf_counter()
            for _ in range(n_calls):
                fn()
            samples.append((time.perf_counter() - start) / n_calls)
        if time.perf_counter() > budget_end and round_ >= 2:
            break
    return [statistics.median(samples) for samples in times]


def device_time(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 15) -> float:
    """Median seconds of one call of `fn()` on the GPU alone (CUDA only).

    Before each call L2 is flushed and the GPU is held busy for about 0.5 ms
    (torch.cuda._sleep) while the host enqueues the call between two events, so
    the interval holds the call's GPU work and none of its host work: what the
    op costs inside a model whose GPU runs behind its host.
    """
    for _ in range(warmup):
        fn()
    return statistics.median([_cuda_batch(fn, device, 1, hold_gpu=True) for _ in range(repeats)])


def _cuda_batch(fn: Callable[[], object], device: torch.device, calls: int, *, hold_gpu: bool = False) -> float:
    """Seconds between events around `calls` calls of `fn()`, L2 flushed before; with `hold_gpu` a
    sleep kernel keeps the GPU busy while the host enqueues them, so their host work is hidden."""
    _flush_l2(device)
    if hold_gpu:
        torch.cuda._sleep(1_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def write_results(stem: str, header: str, rows: List[dict], columns: List[str], extra_md: str = "",
                  *, folder: str = RESULTS, extra_json: Optional[dict] = None) -> str:
    """Writes <folder>/<stem>.json (header, rows, then `extra_json`'s keys) and .md; returns the markdown table."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, stem + ".json"), "w") as f:
        json.dump({"header": header, "rows": rows, **(extra_json or {})}, f, indent=1)
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    table = "\n".join(lines)
    with open(os.path.join(folder, stem + ".md"), "w") as f:
        f.write(f"{header}\n\n{table}\n{extra_md}")
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# ----------------------------------------------------------------------------- statistics
def wilson(successes: int, n: int, z: float = 1.959964) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def bootstrap_mean(values: Sequence[float], *, resamples: int = 10000, seed: int = 0) -> Tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (one value per passage)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    if x.numel() < 2:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi
