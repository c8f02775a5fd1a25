"""The command line: `python -m cspkv generate` on the real SmolLM2 gguf, its error messages, and the
demo's timing (`cspkv.demo.timed_generate`) on a tiny random model."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from patch_models import tiny_model

import cspkv
from cspkv.cli import main
from cspkv.demo import timed_generate
from cspkv.hf.smollm2 import smollm2_gguf


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cspkv", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_generate_runs_a_gguf_model_with_csp():
    out = _cli("generate", "--model", smollm2_gguf(), "--prompt", "What is the capital of France?",
               "--max-new-tokens", "6", "--budget", "0.5")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout
    assert "prompt tokens, kept" in out.stderr


def test_generate_rejects_a_missing_model_path(tmp_path):
    with pytest.raises(SystemExit, match="--model path does not exist"):
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])


def test_generate_rejects_an_image_for_a_text_only_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--image given but the model has no image processor"):
        main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--image", "x.png"])


def test_generate_reads_the_prompt_from_a_file(tmp_path):
    # The prompt file is read before the model: a missing model still fails on the model path.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    with pytest.raises(SystemExit, match="--model path does not exist"):
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", f"@{prompt}"])
    with pytest.raises(SystemExit, match="--prompt file does not exist"):
        main(["generate", "--model", str(tmp_path), "--prompt", f"@{tmp_path / 'missing.txt'}"])


@pytest.mark.parametrize("pruned", [False, True])
def test_timed_generate_times_each_forward_call_of_one_generate(pruned):
    # The first forward call is the prefill, each later one a decode step; the timing hooks are gone after.
    model = tiny_model("llama")
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0))
    calls = []
    counter = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with cspkv.patched(model, budget=0.5) if pruned else contextlib.nullcontext():
        result = timed_generate(model, ids, 6, segment_ids=torch.zeros_like(ids) if pruned else None)
    counter.remove()
    assert len(result["tokens"]) == 6
    assert result["decode_steps"] == 5
    assert len(calls) == 2 + 6  # the warm-up generate's 2 calls, then the timed one's prefill and 5 steps
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0
    assert not model._forward_pre_hooks and not model._forward_hooks
    # K and V, 2 layers, 2 KV heads, head dim 16, float32; 64 + 5 positions (the last new token is never fed back)
    full_bytes = 2 * 2 * 2 * 69 * 16 * 4
    assert (result["kv_bytes"] < full_bytes) if pruned else (result["kv_bytes"] == full_bytes)
