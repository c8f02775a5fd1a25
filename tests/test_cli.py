"""The command line: `python -m cspkv generate` on the real SmolLM2 gguf, and its error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cspkv.cli import main, smollm2_gguf


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
