"""Tensor parallelism through transformers' own plan, on two CPU processes (gloo).

A tiny GQA Llama (8 query heads over 4 KV heads) is saved, then loaded by two
ranks with the model's tensor-parallel plan (`DistributedConfig(tp_size=2)`
on transformers 5.x, `tp_plan="auto"` on 4.57): each rank computes its own 2
KV heads. Both ranks (tests/distributed_worker.py, launched with torchrun's
variables and a file store) and this process, with the whole model, run the
same greedy generate() cases. Checked:
- every rank generates the tokens of the single process: unpatched, patched at
  budget 1.0 (== unpatched) and pruned to 0.3 (explicit and default modality ids);
- a rank's pruned cache stores only its own KV heads: [B, Hkv / 2, C, D], plain
  tensors, equal to that slice of the single process's pruned cache (same slots,
  since CSP keeps the same count in every KV head and selects per head);
- a rank's stats count its own heads: half the single process's bytes, same kept counts.

The ranks are killed on failure or after TIMEOUT_S, and their logs are shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

import distributed_worker as worker
from patch_models import tiny_model

WORLD = 2
KV_HEADS = 4
TIMEOUT_S = 300  # the ranks' wall time on a loaded 2-core machine is mostly their imports (about 30 s)
TESTS = Path(__file__).resolve().parent


def _skip_reason():
    if not sys.platform.startswith("linux"):
        return "the two-process test runs on Linux"
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _launch(model_dir: Path, out_dir: Path, logs: Path):
    """Start the WORLD ranks: torchrun's variables, one thread each, a file store, loopback only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if os.path.isdir("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    store = out_dir / "store"
    procs = []
    for rank in range(WORLD):
        log = open(logs / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(TESTS / "distributed_worker.py"), str(model_dir), str(out_dir), "--store", str(store)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        log.close()
    return procs


def _wait(procs, logs: Path) -> None:
    """Wait for every rank; on a failure or past TIMEOUT_S, kill the others and fail with the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
        if failed is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    else:
        failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        if failed is None:
            return
    _kill(procs)
    why = f"rank {failed} exited with {procs[failed].returncode}" if failed is not None else f"the ranks ran past {TIMEOUT_S} s"
    tails = "\n".join(f"--- rank {r}:\n{(logs / f'rank{r}.log').read_text()[-3000:]}" for r in range(len(procs)))
    pytest.fail(f"{why}\n{tails}", pytrace=False)


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def test_tensor_parallel_ranks_prune_their_own_kv_heads(tmp_path):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=KV_HEADS, head_dim=16)
    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    out_dir.mkdir()
    model.save_pretrained(model_dir)
    procs = _launch(model_dir, out_dir, tmp_path)
    try:
        from transformers import AutoModelForCausalLM

        single = worker.run_cases(AutoModelForCausalLM.from_pretrained(model_dir).eval())  # meanwhile, the whole model here
        _wait(procs, tmp_path)
    finally:
        _kill(procs)
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    heads = KV_HEADS // WORLD
    assert torch.equal(single["budget1"]["tokens"], single["full"]["tokens"])
    for rank, result in enumerate(ranks):
        assert result["meta"]["rank"] == rank and result["meta"]["k_proj"] == "DTensor", result["meta"]  # really sharded
        for case in ("full", "budget1", "pruned_ids", "pruned_default"):
            assert torch.equal(result[case]["tokens"], single[case]["tokens"]), (rank, case)
        for case in ("pruned_ids", "pruned_default"):
            mine, whole = result[case], single[case]
            assert whole["stats"]["pruned_layers"] == mine["stats"]["pruned_layers"] == 2
            assert mine["stats"]["layers"] == whole["stats"]["layers"]  # same kept counts per layer and row
            assert mine["stats"]["kv_bytes_before"] * WORLD == whole["stats"]["kv_bytes_before"]
            assert mine["stats"]["kv_bytes_after"] * WORLD == whole["stats"]["kv_bytes_after"]
            for layer, ((kind, k, v, valid), (_, wk, wv, wvalid)) in enumerate(zip(mine["cache"], whole["cache"])):
                assert kind == "Tensor", (case, layer, kind)
                assert k.shape[1] == heads and wk.shape[1] == KV_HEADS
                own = slice(rank * heads, (rank + 1) * heads)
                assert k.shape[-2] == wk.shape[-2] < max(worker.PROMPT_LENGTHS)  # pruned, as many slots
                torch.testing.assert_close(k, wk[:, own], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(v, wv[:, own], rtol=1e-4, atol=1e-5)
                assert torch.equal(valid, wvalid[:, own])
