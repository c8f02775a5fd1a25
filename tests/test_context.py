"""Compress once, ask many times (`cspkv.compress`): questions on one compressed context are
independent and equal to continuing a fresh compression each (tiny random-init Llama, CPU)."""

from __future__ import annotations

import pytest
import torch

import cspkv
from cspkv.hf.cache import PrunedLayer
from patch_models import CACHE_KW, cache_layer_lengths, generate, left_pad, prompt, tiny_model, twin


def _ask(model, context, question, new=6):
    return generate(model, **context.inputs(question), new=new, **{CACHE_KW: context.cache()})


def test_questions_on_one_context_equal_fresh_compressions():
    model = tiny_model()
    ids, mask = left_pad([prompt(64, seed=1)[0], prompt(50, seed=2)[0]])
    questions = [prompt(7, seed=10 + i).repeat(2, 1) for i in range(3)]
    with cspkv.patched(model, budget=0.3, min_prompt=8):
        shared = cspkv.compress(model, ids, mask)
        stored = cache_layer_lengths(shared._cache)
        answers = [_ask(model, shared, q) for q in questions]
        fresh = [_ask(model, cspkv.compress(model, ids, mask), q) for q in questions]
    assert isinstance(shared._cache.layers[0], PrunedLayer) and shared.length == 64
    assert stored == [round(0.3 * 64)] * 2 and cache_layer_lengths(shared._cache) == stored  # never mutated
    assert shared.stats["pruned_layers"] == 2
    for a, b in zip(answers, fresh):
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_context_kept_whole_answers_like_the_unpatched_model():
    model = tiny_model()
    reference = twin(model)
    ids, question = prompt(48, seed=3), prompt(6, seed=4)
    expected = generate(reference, torch.cat([ids, question], dim=1), new=6)
    with cspkv.patched(model, budget=1.0):
        out = _ask(model, cspkv.compress(model, ids), question)
    assert torch.equal(out.sequences, expected.sequences)


def test_compress_errors_name_what_is_wrong():
    model = tiny_model()
    with pytest.raises(ValueError, match="cspkv.compress: LlamaForCausalLM is not patched"):
        cspkv.compress(model, prompt(40))
    with cspkv.patched(model, budget=0.5):
        context = cspkv.compress(model, prompt(40))
        with pytest.raises(ValueError, match=r"question_ids must be a tensor \[B, T\] with the context's B = 1"):
            context.inputs(prompt(5, batch=2))
