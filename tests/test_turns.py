"""Every turn pruned (`CSPConfig.later_prefill`) and compression during generation
(`CSPConfig.decode_budget`), against the unpatched model and solo runs (tiny random-init
models, CPU)."""

from __future__ import annotations

import pytest
import torch

import cspkv
from cspkv.hf.cache import PrunedLayer
from cspkv.pruning.modality import IMAGE
from patch_models import CACHE_KW, cache_layer_lengths, generate, left_pad, prompt, returned_cache, tiny_model, twin
from vlm_models import IMAGE_TOKEN, prompt_inputs, tiny_vlm


def _prefill(model, ids, mask=None):
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return returned_cache(model(ids, attention_mask=mask, position_ids=positions, use_cache=True))


def _continue(model, cache, chunk, mask=None):
    """Logits of `chunk` [B, T] after `cache`; with a mask [B, past + T], positions count real tokens
    (as generate() sets them; a plain forward would count the padding)."""
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)[:, -chunk.shape[1]:]
    with torch.no_grad():
        return model(chunk, attention_mask=mask, position_ids=positions, **{CACHE_KW: cache}, use_cache=True).logits


# --------------------------------------------------------------------------- later prompt chunks


def test_a_later_chunk_keeps_its_own_budget_and_leaves_the_earlier_cache():
    model = tiny_model()
    first, chunk = prompt(64, seed=1), prompt(40, seed=2)
    full_chunk = _prefill(twin(model), torch.cat([first, chunk], 1))  # unpruned keys
    with cspkv.patched(model, budget=0.25, window=8, min_prompt=8) as handle:
        cache = _prefill(model, first)
        earlier = [layer.keys.clone() for layer in cache.layers]
        _continue(model, cache, chunk)
        stats = handle.stats()["layers"][0]
    assert cache_layer_lengths(cache) == [16 + 10] * 2 and cache.get_seq_length() == 104
    assert stats["scoring"] == "later chunk (chunk)" and stats["prompt_len"] == 40 and stats["kept_per_row"] == [10]
    for layer, before in zip(cache.layers, earlier):
        assert isinstance(layer, PrunedLayer) and layer.croppable == 8
        assert torch.equal(layer.keys[..., :16, :], before)  # the first turn's kept slots, untouched
    # The chunk's recent window is stored last (layer 0's keys depend on the tokens alone).
    torch.testing.assert_close(cache.layers[0].keys[..., -8:, :], full_chunk.layers[0].keys[..., -8:, :])


def test_total_mode_selects_the_whole_cache_down_to_the_budget_of_its_length():
    model = tiny_model()
    with cspkv.patched(model, budget=0.25, window=8, min_prompt=8, later_prefill="total") as handle:
        cache = _prefill(model, prompt(64, seed=1))
        _continue(model, cache, prompt(40, seed=2))
        assert handle.stats()["layers"][1]["scoring"] == "later chunk (total)"
    assert cache_layer_lengths(cache) == [26] * 2 and cache.get_seq_length() == 104


@pytest.mark.parametrize("later_prefill", ["chunk", "total"])
def test_padded_follow_up_turns_equal_their_solo_runs(later_prefill):
    model = tiny_model()
    firsts = [prompt(56, seed=3)[0], prompt(40, seed=4)[0]]
    chunks = [prompt(36, seed=5)[0], prompt(24, seed=6)[0]]
    step = prompt(1, seed=7)
    settings = dict(budget=0.3, window=6, min_prompt=8, later_prefill=later_prefill)
    with cspkv.patched(model, **settings):
        ids, mask = left_pad(firsts)
        cache = _prefill(model, ids, mask)
        chunk_ids, chunk_mask = left_pad(chunks)
        mask = torch.cat([mask, chunk_mask], dim=1)
        _continue(model, cache, chunk_ids, mask)
        batched = _continue(model, cache, step.repeat(2, 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1))
        for row, (first, chunk) in enumerate(zip(firsts, chunks)):
            solo = _prefill(model, first[None])
            _continue(model, solo, chunk[None])
            alone = _continue(model, solo, step)
            torch.testing.assert_close(batched[row], alone[0], rtol=1e-4, atol=1e-4)


def test_a_later_chunk_at_full_budget_is_the_unpatched_model():
    model = tiny_model()
    reference = twin(model)
    first, chunk, step = prompt(48, seed=8), prompt(30, seed=9), prompt(1, seed=10)
    with cspkv.patched(model, budget=1.0, min_prompt=8, later_prefill="total"):
        cache = _prefill(model, first)
        _continue(model, cache, chunk)
        logits = _continue(model, cache, step)
    expected_cache = _prefill(reference, first)
    _continue(reference, expected_cache, chunk)
    torch.testing.assert_close(logits, _continue(reference, expected_cache, step), rtol=1e-4, atol=1e-4)


def test_images_in_a_later_turn_get_their_modality_from_that_turns_ids(monkeypatch):
    model = tiny_vlm("llava")
    first = prompt_inputs("llava", images=0, seed=11, text=40)
    turn = prompt_inputs("llava", images=1, seed=12, text=16)
    seen = []
    score = cspkv.CSP.score

    def capture(self, inputs):
        seen.append(inputs.k_mod.clone())
        return score(self, inputs)

    with cspkv.patched(model, budget=0.5, min_prompt=8) as handle:
        with torch.no_grad():
            cache = returned_cache(model(**first, use_cache=True))
            monkeypatch.setattr(cspkv.CSP, "score", capture)
            mask = torch.cat([first["attention_mask"], turn.pop("attention_mask")], dim=1)
            model(**turn, attention_mask=mask, **{CACHE_KW: cache}, use_cache=True)
        pruned_again = [s for s in handle.stats()["layers"].values() if s.get("scoring") == "later chunk (chunk)"]
    image = turn["input_ids"][0] == IMAGE_TOKEN
    assert seen and len(pruned_again) == len(seen)
    for k_mod in seen:  # [B * Hkv, S]: the turn's slots are the last ones
        chunk_mod = k_mod[:, -image.numel():]
        assert bool((chunk_mod[:, image] == IMAGE).all()) and bool((chunk_mod[:, ~image] == 0).all())


# --------------------------------------------------------------------------- compression during generation


def test_decode_compression_bounds_a_long_generation():
    model = tiny_model(max_position_embeddings=4096)
    with cspkv.patched(model, budget=0.5, min_prompt=8, decode_budget=64, decode_interval=32, decode_window=8) as handle:
        out = generate(model, prompt(80, seed=13), new=2000)
    cache = returned_cache(out)
    assert cache.get_seq_length() == 80 + 2000 - 1
    assert all(40 <= n < 64 + 32 for n in cache_layer_lengths(cache)), cache_layer_lengths(cache)
    assert all(s["decode_compressions"] >= 2000 // 32 - 2 for s in handle.stats()["layers"].values())


def test_a_decode_budget_that_is_never_reached_is_the_unpatched_model():
    model = tiny_model()
    reference = twin(model)
    ids = prompt(48, seed=14)
    expected = generate(reference, ids, new=40)
    with cspkv.patched(model, budget=1.0, decode_budget=200, decode_interval=16, decode_window=4):
        out = generate(model, ids, new=40)
    assert torch.equal(out.sequences, expected.sequences)


def test_decode_settings_are_validated():
    with pytest.raises(ValueError, match="CSPConfig.decode_window must be at most decode_budget=8"):
        cspkv.CSPConfig(decode_budget=8, decode_window=16)
    with pytest.raises(TypeError, match="CSPConfig.decode_budget must be an int >= 1 or None"):
        cspkv.CSPConfig(decode_budget=0.5)
    with pytest.raises(ValueError, match="CSPConfig.later_prefill must be one of 'chunk', 'total', 'off'"):
        cspkv.CSPConfig(later_prefill="every")
