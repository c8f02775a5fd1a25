"""One rank of the tensor-parallel test (tests/test_distributed.py), and the cases both run.

Launched once per rank with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE):

    python tests/distributed_worker.py MODEL_DIR OUT_DIR [--store FILE]

It joins a gloo process group (through a file store when --store is given,
else from MASTER_ADDR / MASTER_PORT as under torchrun), loads MODEL_DIR with
transformers' own tensor-parallel plan over all ranks (`DistributedConfig(tp_size=N)`
on transformers 5.x, `tp_plan="auto"` on 4.57), runs `run_cases` and saves
its result to OUT_DIR/rank<R>.pt. The test runs the same `run_cases` on the
model loaded in one process and compares.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Dict

import torch

# The batch every case generates from: two left-padded rows, prompts of 48 and 40 tokens.
PROMPT_LENGTHS = (48, 40)
NEW_TOKENS = 6
BUDGET = 0.3


def batch():
    """(input_ids, attention_mask, modality ids) of the cases' batch; the ids mark the first
    half of each row's prompt segment 0, the rest segment 1 (-1 at padding)."""
    from patch_models import left_pad, prompt

    ids, mask = left_pad([prompt(n, seed=30 + i)[0] for i, n in enumerate(PROMPT_LENGTHS)])
    segments = torch.full(ids.shape, -1, dtype=torch.long)
    for row, n in enumerate(PROMPT_LENGTHS):
        start = ids.shape[1] - n
        segments[row, start:] = 0
        segments[row, start + n // 2:] = 1
    return ids, mask, segments


def _stats(handle) -> dict:
    stats = handle.stats()
    return {
        "pruned_layers": stats["pruned_layers"],
        "kv_bytes_before": stats["kv_bytes_before"],
        "kv_bytes_after": stats["kv_bytes_after"],
        "layers": {i: {k: layer.get(k) for k in ("prompt_len", "kept", "kept_per_row", "device")}
                   for i, layer in stats["layers"].items()},
    }


def _cache(out) -> list:
    """Per cache layer: (type of the stored keys, keys, values, kv_valid or None), on the CPU; a
    pruned layer's slots as `stored_slots()` lays them out [B, Hkv, S(, D)], in either store."""
    from patch_models import returned_cache

    layers = []
    for layer in returned_cache(out).layers:
        slots = layer.stored_slots() if hasattr(layer, "stored_slots") else (layer.keys, layer.values, None)
        layers.append((type(layer.keys).__name__,) + tuple(None if t is None else t.detach().cpu().clone() for t in slots))
    return layers


def run_cases(model) -> Dict[str, dict]:
    """Greedy generate() on the cases' batch: unpatched ("full"), patched at budget 1.0 ("budget1"),
    and pruned to BUDGET with explicit modality ids ("pruned_ids") and with the default ids
    ("pruned_default"). Each case: the new tokens; the pruned ones also the cache and the stats."""
    import cspkv
    from patch_models import generate

    ids, mask, segments = batch()
    results: Dict[str, dict] = {}
    out = generate(model, ids, mask, new=NEW_TOKENS)
    results["full"] = {"tokens": out.sequences[:, ids.shape[1]:].cpu()}
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        out = generate(model, ids, mask, new=NEW_TOKENS)
    results["budget1"] = {"tokens": out.sequences[:, ids.shape[1]:].cpu()}
    for name, given in (("pruned_ids", segments), ("pruned_default", None)):
        with cspkv.patched(model, budget=BUDGET, min_prompt=8) as handle:
            with cspkv.modalities(model, given) if given is not None else _nothing():
                out = generate(model, ids, mask, new=NEW_TOKENS)
            results[name] = {"tokens": out.sequences[:, ids.shape[1]:].cpu(), "cache": _cache(out), "stats": _stats(handle)}
    return results


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_tensor_parallel(path: str, world_size: int):
    """`path` loaded with the model's own tensor-parallel plan over `world_size` ranks."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers import DistributedConfig  # transformers >= 5: tp_plan= is deprecated there
    except ImportError:
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=world_size)).eval()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--store", help="file of a torch.distributed FileStore (default: torchrun's env://)")
    args = parser.parse_args()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch.distributed as dist

    init = "file://" + os.path.abspath(args.store) if args.store else "env://"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        model = load_tensor_parallel(args.model, world_size)
        results = run_cases(model)
        results["meta"] = {
            "rank": rank,
            "world_size": world_size,
            "tp_size": getattr(model, "tp_size", None),
            "k_proj": type(model.model.layers[0].self_attn.k_proj.weight).__name__,
        }
        torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # without waiting on the other rank's collectives
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
