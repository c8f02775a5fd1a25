"""Where a pruned prefill spends the time a full-cache prefill does not: one
prefill of each under the torch profiler, side by side.

bench_e2e.py measures that pruning adds to the time to first token; this says
what adds it. One warm-up prefill, then one profiled prefill per policy (full
cache, CSP at `--budget`) on the same prompt; per kernel name (CUDA: device
time of the kernels; CPU: self time of the aten ops and cspkv ops) the calls
and milliseconds of each, sorted by how much more time CSP spent on it. The
header gives each prefill's wall time and the sum over the table's events, so
that time no event accounts for (a GPU waiting for its host) shows too.

    python benchmarks/profile_prefill.py [--device cuda] [--prompt 4096] [--budget 0.2] [--top 25]

On CUDA the model is bench_e2e's random-init LLaVA-1.5-7B language model
(bf16); on CPU bench_host's tiny 32-layer Llama (float32), to run anywhere.
Writes benchmarks/results/prefill-profile-<device>.md/.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_e2e import llava_lm, prefill  # noqa: E402
from bench_host import tiny_llama  # noqa: E402

import cspkv  # noqa: E402


def timed_prefill(model, ids, seg, budget, device: torch.device, prof=None) -> float:
    """Seconds of one prefill (bench_e2e's), CSP when `budget`, under `prof` if given."""
    from transformers import DynamicCache

    handle = cspkv.patch(model, budget=budget) if budget else None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with prof if prof is not None else contextlib.nullcontext():
            prefill(model, ids, seg, DynamicCache(), pruned=handle is not None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        if handle:
            handle.remove()


def event_times(prof, device: torch.device) -> dict:
    """{name: (calls, ms)}: CUDA kernels' device time, or on CPU the ops' self time (top-level
    Python and profiler bookkeeping left out)."""
    out = defaultdict(lambda: [0, 0.0])
    for evt in prof.key_averages():
        if device.type == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            if not (evt.key.startswith("aten::") or evt.key.startswith("cspkv::")):
                continue
            us = evt.self_cpu_time_total
        out[evt.key][0] += evt.count
        out[evt.key][1] += us / 1e3
    return {name: tuple(v) for name, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--budget", type=float, default=0.2, help="CSP budget (default 0.2)")
    parser.add_argument("--top", type=int, default=25, help="rows of the table (default 25)")
    parser.add_argument("--out", default=common.RESULTS, help="folder of the result files (default benchmarks/results)")
    args = parser.parse_args()
    if not 0 < args.budget < 1:
        raise SystemExit(f"profile_prefill: --budget must be in (0, 1), got {args.budget}")
    device = torch.device(args.device)
    model = llava_lm(device) if device.type == "cuda" else tiny_llama(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen).to(device)
    seg = (torch.rand(1, args.prompt, generator=gen) < 0.5).long().to(device)  # stand-in image/text mix
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    walls, times = {}, {}
    for policy, budget in (("full", None), ("csp", args.budget)):
        timed_prefill(model, ids, seg, budget, device)  # warm-up (allocator, kernels' first launch, cuDNN plans)
        prof = profile(activities=activities)
        walls[policy] = timed_prefill(model, ids, seg, budget, device, prof)
        times[policy] = event_times(prof, device)

    rows = []
    for name in set(times["full"]) | set(times["csp"]):
        (fc, fm), (cc, cm) = times["full"].get(name, (0, 0.0)), times["csp"].get(name, (0, 0.0))
        rows.append({"event": name[:90], "full_calls": fc, "full_ms": fm, "csp_calls": cc, "csp_ms": cm,
                     "extra_ms": cm - fm})
    rows.sort(key=lambda r: -abs(r["extra_ms"]))
    what = "CUDA kernels, device time" if device.type == "cuda" else "aten and cspkv ops, CPU self time"
    totals = {p: sum(ms for _, ms in times[p].values()) for p in times}
    calls = {p: sum(c for c, _ in times[p].values()) for p in times}
    model_name = "random-init LLaVA-1.5-7B language model, bf16" if device.type == "cuda" else \
        f"random-init {model.config.num_hidden_layers}-layer Llama (hidden {model.config.hidden_size}), float32"
    header = (f"# cspkv prefill profile on {common.device_description(device)}\n\n"
              f"{model_name}, sdpa, {args.prompt} random tokens with a random 50/50 two-modality split; one "
              f"profiled prefill per policy after a warm-up one; CSP at budget {args.budget:g} (defaults otherwise). "
              f"Events: {what}, summed per name; the {args.top} names whose time differs most.\n\n"
              f"- full cache: prefill {1e3 * walls['full']:.1f} ms wall (under the profiler), events "
              f"{totals['full']:.1f} ms in {calls['full']} calls\n"
              f"- CSP: prefill {1e3 * walls['csp']:.1f} ms wall (under the profiler), events "
              f"{totals['csp']:.1f} ms in {calls['csp']} calls")
    columns = ["event", "full_calls", "full_ms", "csp_calls", "csp_ms", "extra_ms"]
    table = common.write_results(f"prefill-profile-{common.device_label(device)}", header, rows[:args.top], columns,
                                 folder=args.out)
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
