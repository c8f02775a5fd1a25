"""Host time of a decode step: the Python and dispatch work the patch adds to each token.

A GPU decode at the batch sizes that fit is bound by its host: the time per token
is the time the host takes to queue the step's kernels (bench_e2e's max-batch rows:
about 21 ms per token on the H200 for full and pruned caches alike), so a pruned
cache's tokens/s at 4x the batch reach 4x the full cache's only if its step costs
the host no more. This times decode steps of a random-init 32-layer Llama whose
tensors are tiny (hidden 64, 2 heads, a 48-token prompt, batch 1): their arithmetic
is a small part of the step on a CPU and none of it on a GPU, so the step time is
mostly host time.

Rows: the full cache; CSP 20% (the pruned path: in-place append, n-softmax
decode attention); the patched model with nothing pruned (a prompt shorter than
`min_prompt`: the patch's wrappers alone); each without and with a 2-D attention
mask (`generate()` passes one; the pruned path then marks masked new tokens dead).
Each row decodes from its own prefilled cache, which grows by one token per step
(a few hundred in all). On a CPU the rows' samples are interleaved round by round
(this VM's speed drifts); medians.

Writes benchmarks/results/host-<device>.md/.json.

    python benchmarks/bench_host.py [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cspkv  # noqa: E402
from cspkv.hf.cache import PrunedLayer, returned_cache  # noqa: E402

LAYERS, PROMPT = 32, 48
ROWS = [("full", False), ("csp", False), ("patched, not pruned", False),
        ("full", True), ("csp", True), ("patched, not pruned", True)]


def tiny_llama(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().to(device)


def decode_step(model, policy: str, masked: bool, device: torch.device):
    """A prefilled cache under `policy` and a function that runs one greedy decode step on it."""
    ids = torch.randint(0, 1000, (1, PROMPT), device=device)
    segments = (torch.arange(PROMPT, device=device) >= PROMPT // 2).long()[None]  # two stand-in modalities
    with torch.inference_mode(), cspkv.modalities(model, segments) if policy != "full" else contextlib.nullcontext():
        out = model(ids, use_cache=True)
    cache = returned_cache(out)
    pruned = isinstance(cache.layers[0], PrunedLayer)
    if pruned != (policy == cspkv.CSP.name):
        raise RuntimeError(f"bench_host: the {policy!r} row's prefill {'pruned' if pruned else 'did not prune'} its cache")
    state = {"token": out.logits[:, -1:].argmax(-1)}

    def step():
        kwargs = {"attention_mask": torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=device)} if masked else {}
        with torch.inference_mode():
            logits = model(state["token"], past_key_values=cache, use_cache=True, **kwargs).logits
        state["token"] = logits[:, -1:].argmax(-1)

    return step, cache


def run(device: torch.device, quick: bool) -> list:
    models = {"full": tiny_llama(device), "csp": tiny_llama(device), "patched, not pruned": tiny_llama(device)}
    handles = [cspkv.patch(models["csp"], budget=0.2, min_prompt=PROMPT // 2),
               cspkv.patch(models["patched, not pruned"], budget=0.2, min_prompt=PROMPT + 1)]
    try:
        steps, caches = zip(*(decode_step(models[policy], policy, masked, device) for policy, masked in ROWS))
        for step in steps:  # the pruned rows' first appends move their kept slots into stores
            step()
        times = common.median_times(steps, device, repeats=10 if quick else 200, max_seconds=2.0 if quick else 10.0)
    finally:
        for handle in handles:
            handle.remove()
    full = {masked: t for (policy, masked), t in zip(ROWS, times) if policy == "full"}
    rows = []
    for (policy, masked), t, cache in zip(ROWS, times, caches):
        rows.append({"policy": policy, "mask": "2-D mask" if masked else "none", "step_ms": 1e3 * t,
                     "vs_full": t / full[masked], "per_layer_us": 1e6 * (t - full[masked]) / LAYERS,
                     "stored_tokens": cache.layers[0].keys.shape[-2], "seq_length": cache.get_seq_length()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="10 rounds (a smoke run)")
    parser.add_argument("--out", default=common.RESULTS, help="folder of the result files (default benchmarks/results)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = run(device, args.quick)
    header = (f"# cspkv decode-step host time on {common.device_description(device)}\n\n"
              f"random-init Llama, {LAYERS} layers, hidden 64, 2 heads, {PROMPT}-token prompt, batch 1, sdpa; "
              "one greedy decode step per call, medians; per_layer_us = (step - full step) / layers; stored_tokens / "
              "seq_length: layer 0's stored slots / logical length after the timed steps; "
              f"cspkv {cspkv.__version__}.")
    stem = f"host-{common.device_label(device)}" + ("-quick" if args.quick else "")
    table = common.write_results(stem, header, rows, ["policy", "mask", "step_ms", "vs_full", "per_layer_us", "stored_tokens",
                                                      "seq_length"], folder=args.out)
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
