"""What adaptive allocation costs: stored KV bytes and decode time, uniform vs adaptive budgets.

SmolLM2-135M-Instruct (real weights, CPU, sdpa) on the demo's pass-key prompt
(about 2k tokens, batch 1), at budgets 0.1 / 0.2 / 0.3 / 0.5, four lines:

* `uniform`: every KV head and layer keeps `budget` of the prompt (the padded store);
* `head adaptive`: `head_allocation="adaptive"` (packed store: each KV head its own length);
* `head+layer adaptive`: both allocations (packed);
* `head adaptive, padded`: the same selection as `head adaptive` stored in the padded layout
  (`cspkv.hf.cache.padded_layout()`), every KV head as long as the longest: what packing saves.

Per line: time to first token, decode ms/token over 32 greedy tokens, the stored KV
bytes right after the prefill and at the end (free store slots included), and how
uneven the heads came out. One process, a warm-up round, then three rounds that take
the configurations in turn (a slow spell of the machine hits all of them); medians.
Quality of the same allocations is in `quality.py`'s results.

Targets (printed, HOLDS / MISSED): stored bytes after the prefill with adaptive
allocation at most the uniform line's (= budget x the full cache, per layer); at the end
at most the uniform line's plus 5% (each KV head's growth room is sized from its own
length); decode ms/token of the packed layout at most 1.1x the uniform layout's.

    python benchmarks/bench_allocation.py [--quick] [--prompt 2048] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cspkv  # noqa: E402
from cspkv.hf.cache import padded_layout  # noqa: E402
from cspkv.hf.smollm2 import kv_nbytes, load_causal_lm, smollm2_gguf  # noqa: E402

LINES = {  # name: (CSPConfig fields, padded layout forced)
    "uniform": ({}, False),
    "head adaptive": ({"head_allocation": "adaptive"}, False),
    "head+layer adaptive": ({"head_allocation": "adaptive", "layer_allocation": "adaptive"}, False),
    "head adaptive, padded": ({"head_allocation": "adaptive"}, True),
}


def run_once(model, case, budget, fields: dict, padded: bool, decode_tokens: int) -> dict:
    from transformers import DynamicCache

    layout = padded_layout() if padded else contextlib.nullcontext()
    handle = None if budget is None else cspkv.patch(model, budget=budget, **fields)
    try:
        cache = DynamicCache()
        with torch.inference_mode(), layout, \
                (cspkv.modalities(model, case.segment_ids) if handle else contextlib.nullcontext()):
            start = time.perf_counter()
            token = model(case.input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            ttft = time.perf_counter() - start
        after_prefill = kv_nbytes(cache)
        heads = None
        if handle:
            per_head = [s["kept_per_head"][0] for s in handle.stats()["layers"].values()
                        if s.get("pruned") and s.get("kept_per_head")]
            if per_head:
                heads = (min(min(h) for h in per_head), max(max(h) for h in per_head))
        token = token.argmax(-1, keepdim=True)
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(decode_tokens):
                token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        decode = (time.perf_counter() - start) / decode_tokens
        return {"ttft_ms": 1e3 * ttft, "decode_ms_per_token": 1e3 * decode, "kv_prefill_MiB": after_prefill / 2**20,
                "kv_end_MiB": kv_nbytes(cache) / 2**20, "head_range": heads}
    finally:
        if handle:
            handle.remove()


def measure(prompt_tokens: int, budgets, decode_tokens: int, rounds: int) -> list:
    from cspkv.demo import passkey_case

    torch.manual_seed(0)
    tokenizer, model = load_causal_lm(smollm2_gguf(), attn_implementation="sdpa")
    case = passkey_case(tokenizer, seed=0, target_tokens=prompt_tokens)
    configs = [("full", None, {}, False)] + [(name, b, f, p) for b in budgets for name, (f, p) in LINES.items()]
    runs = {i: [] for i in range(len(configs))}
    for r in range(1 + rounds):
        for i, (name, budget, fields, padded) in enumerate(configs):
            print(f"round {r}: {name} @ {budget}", file=sys.stderr, flush=True)
            row = run_once(model, case, budget, fields, padded, decode_tokens)
            if r:
                runs[i].append(row)
    rows = []
    for i, (name, budget, _, _) in enumerate(configs):
        last = runs[i][-1]
        row = {"line": name, "budget": budget or 1.0, "prompt": case.input_ids.shape[1],
               "kv_prefill_MiB": last["kv_prefill_MiB"], "kv_end_MiB": last["kv_end_MiB"],
               "ttft_ms": statistics.median(run["ttft_ms"] for run in runs[i]),
               "decode_ms_per_token": statistics.median(run["decode_ms_per_token"] for run in runs[i]),
               "decode_ms_spread": f"{min(run['decode_ms_per_token'] for run in runs[i]):.2f}-"
                                   f"{max(run['decode_ms_per_token'] for run in runs[i]):.2f}"}
        if last["head_range"]:
            row["kept_per_head_min_max"] = f"{last['head_range'][0]}-{last['head_range'][1]}"
        rows.append(row)
    return rows


def targets(rows, budgets) -> list:
    def get(line, budget):
        return next(r for r in rows if r["line"] == line and r["budget"] == budget)

    out = []
    for b in budgets:
        uniform = get("uniform", b)
        for line in ("head adaptive", "head+layer adaptive"):
            row = get(line, b)
            out.append((f"budget {b}, {line}: KV after the prefill <= uniform's",
                        row["kv_prefill_MiB"] <= uniform["kv_prefill_MiB"] + 1e-9,
                        f"{row['kv_prefill_MiB']:.2f} vs {uniform['kv_prefill_MiB']:.2f} MiB"))
            out.append((f"budget {b}, {line}: KV at the end <= 1.05x uniform's",
                        row["kv_end_MiB"] <= 1.05 * uniform["kv_end_MiB"],
                        f"{row['kv_end_MiB']:.2f} vs {uniform['kv_end_MiB']:.2f} MiB"))
        packed = get("head adaptive", b)
        out.append((f"budget {b}: decode ms/token, packed (head adaptive) <= 1.1x uniform",
                    packed["decode_ms_per_token"] <= 1.1 * uniform["decode_ms_per_token"],
                    f"{packed['decode_ms_per_token']:.2f} vs {uniform['decode_ms_per_token']:.2f} ms"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="budget 0.2 only, 8 decode tokens, one round")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens (about)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=common.RESULTS, help="folder of the result files (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [0.2] if args.quick else [0.1, 0.2, 0.3, 0.5]
    decode_tokens, rounds = (8, 1) if args.quick else (32, 3)
    started = time.time()
    rows = measure(args.prompt, budgets, decode_tokens, rounds)
    checks = targets(rows, budgets)
    device = torch.device("cpu")
    stem = "allocation-" + common.device_label(device) + ("-quick" if args.quick else "")
    header = (
        "# Adaptive allocation: stored KV and decode time, SmolLM2-135M-Instruct\n\n"
        f"{common.device_description(device)}. The demo's pass-key prompt "
        f"({rows[0]['prompt']} tokens, batch 1), sdpa. Per line: one prefill and {decode_tokens} greedy tokens, "
        f"a warm-up round then {rounds} round(s) taking the configurations in turn; medians (decode spread = "
        "min-max over rounds). kv_prefill / kv_end: stored key+value bytes after the prefill and after decoding "
        "(free store slots included). kept_per_head_min_max: fewest and most tokens one KV head keeps in a layer. "
        f"Wall time {(time.time() - started) / 60:.1f} min."
    )
    columns = ["line", "budget", "prompt", "kv_prefill_MiB", "kv_end_MiB", "ttft_ms", "decode_ms_per_token",
               "decode_ms_spread", "kept_per_head_min_max"]
    lines = ["", "## Targets", ""] + [f"- {'HOLDS' if ok else 'MISSED'}: {what} ({detail})" for what, ok, detail in checks]
    table = common.write_results(stem, header, rows, columns, "\n".join(lines) + "\n", folder=args.out,
                                 extra_json={"targets": [{"target": w, "holds": ok, "measured": d} for w, ok, d in checks]})
    print(table)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
