"""Where a pruned prefill spends the time a full-cache prefill does not: the
time to first token split into the patch's own work, the capture of the
prefill attention's log-sum-exp, and pruning, with one profiled prefill of
each beside the others.

bench_e2e.py measures that pruning adds to the time to first token; this says
what adds it. Four variants of the same prefill on the same prompt:

- full: the unpatched model;
- patched: patched, but nothing pruned (`min_prompt` above the prompt) and no
  log-sum-exp captured (`prefill_lse=False`): the patch's per-call and
  per-layer work alone;
- capture: as patched, with the log-sum-exp captured (the attention backend
  SDPA would run, called with its statistics on);
- csp: CSP at `--budget`, defaults otherwise.

After a warm-up prefill of each, `--rounds` rounds time one prefill of every
variant in turn (rounds alternate the variants, so that a drifting machine
shifts them alike; the header gives each variant's median), then one profiled
prefill per variant: per kernel name (CUDA: device time of the kernels; CPU:
self time of the aten ops and cspkv ops) the calls and milliseconds of each,
sorted by how much more time CSP spent on it than the full cache. The header
also gives each profiled prefill's wall time beside the sum over its events,
so that time no event accounts for (a GPU waiting for its host) shows too.

    python benchmarks/profile_prefill.py [--device cuda] [--prompt 4096] [--budget 0.2] [--rounds 5] [--top 25]

On CUDA the model is bench_e2e's random-init LLaVA-1.5-7B language model
(bf16); on CPU bench_host's tiny 32-layer Llama (float32), to run anywhere.
Writes benchmarks/results/prefill-profile-<device>.md/.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
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


def variants(prompt: int, budget: float) -> dict:
    """{name: (what it is, cspkv.patch keyword arguments or None for the unpatched model)}
    (see the module docstring)."""
    idle = {"budget": budget, "min_prompt": prompt + 1}
    return {"full": ("unpatched", None),
            "patched": ("nothing pruned, no log-sum-exp captured", {**idle, "prefill_lse": False}),
            "capture": ("nothing pruned, log-sum-exp captured", idle),
            "csp": (f"budget {budget:g}, defaults otherwise", {"budget": budget})}


def timed_prefill(model, ids, seg, patch_kwargs, device: torch.device, prof=None) -> float:
    """Seconds of one prefill (bench_e2e's), on the model patched with `patch_kwargs` unless
    None, under `prof` if given."""
    from transformers import DynamicCache

    handle = cspkv.patch(model, **patch_kwargs) if patch_kwargs is not None else None
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
    parser.add_argument("--rounds", type=int, default=5, help="timed prefills per variant, alternated (default 5)")
    parser.add_argument("--top", type=int, default=25, help="rows of the table (default 25)")
    parser.add_argument("--out", default=common.RESULTS, help="folder of the result files (default benchmarks/results)")
    args = parser.parse_args()
    if not 0 < args.budget < 1:
        raise SystemExit(f"profile_prefill: --budget must be in (0, 1), got {args.budget}")
    if args.rounds < 1:
        raise SystemExit(f"profile_prefill: --rounds must be >= 1, got {args.rounds}")
    device = torch.device(args.device)
    model = llava_lm(device) if device.type == "cuda" else tiny_llama(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen).to(device)
    seg = (torch.rand(1, args.prompt, generator=gen) < 0.5).long().to(device)  # stand-in image/text mix
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kinds = variants(args.prompt, args.budget)

    for _, kwargs in kinds.values():  # warm-up (allocator, kernels' first launch, cuDNN plans)
        timed_prefill(model, ids, seg, kwargs, device)
    # Wall time of whole prefills, alternated on every device (common.median_times alternates only on
    # CPU, and on CUDA times device spans one fn after another).
    samples = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, (_, kwargs) in kinds.items():
            samples[name].append(timed_prefill(model, ids, seg, kwargs, device))
    medians = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    walls, times = {}, {}
    for name, (_, kwargs) in kinds.items():
        prof = profile(activities=activities)
        walls[name] = timed_prefill(model, ids, seg, kwargs, device, prof)
        times[name] = event_times(prof, device)

    rows = []
    for event in set().union(*times.values()):
        row = {"event": event[:90]}
        for name in kinds:
            row[f"{name}_calls"], row[f"{name}_ms"] = times[name].get(event, (0, 0.0))
        row["extra_ms"] = row["csp_ms"] - row["full_ms"]
        rows.append(row)
    rows.sort(key=lambda r: -abs(r["extra_ms"]))
    what = "CUDA kernels, device time" if device.type == "cuda" else "aten and cspkv ops, CPU self time"
    totals = {name: sum(ms for _, ms in times[name].values()) for name in kinds}
    calls = {name: sum(c for c, _ in times[name].values()) for name in kinds}
    model_name = "random-init LLaVA-1.5-7B language model, bf16" if device.type == "cuda" else \
        f"random-init {model.config.num_hidden_layers}-layer Llama (hidden {model.config.hidden_size}), float32"
    full = medians["full"]
    ttft = "; ".join(f"{name} {ms:.1f} ms ({100 * (ms - full) / full:+.1f}%)" if name != "full" else f"full {ms:.1f} ms"
                     for name, ms in medians.items())
    profiled = "\n".join(f"- {name}: {1e3 * walls[name]:.1f} ms wall, events {totals[name]:.1f} ms in {calls[name]} calls"
                         for name in kinds)
    header = (f"# cspkv prefill profile on {common.device_description(device)}\n\n"
              f"{model_name}, sdpa, {args.prompt} random tokens with a random 50/50 two-modality split. Variants: "
              f"{', '.join(f'{name} ({what})' for name, (what, _) in kinds.items())}.\n\n"
              f"Time to first token, median of {args.rounds} alternated rounds: {ttft}.\n\n"
              f"One profiled prefill each (events: {what}, summed per name; the table keeps the {args.top} names "
              f"whose time differs most between csp and full):\n{profiled}")
    columns = ["event", "full_calls", "full_ms", "patched_ms", "capture_ms", "csp_calls", "csp_ms", "extra_ms"]
    table = common.write_results(f"prefill-profile-{common.device_label(device)}", header, rows[:args.top], columns,
                                 folder=args.out, extra_json={"ttft_ms": medians})
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
