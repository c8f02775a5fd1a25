"""The packed cache layout: a pruned layer whose rows (or KV heads) keep different numbers of
tokens stores each (row, KV head) as its own segment, never padded to the longest one
(`cspkv.hf.cache.PackedStore`), and decodes with `ops.packed_attention`. It must generate what
the padded layout did, and what each row generates alone (tiny random-init models, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import cspkv
from cspkv.hf import cache as cache_mod
from cspkv.hf.cache import PackedStore, PrunedLayer, append_reserve, stored_bytes
from patch_models import CACHE_KW, generate, left_pad, prompt, returned_cache, tiny_model, twin

ROWS = (60, 41, 23)  # a left-padded batch: rows of different real lengths


@pytest.fixture
def padded_layout(monkeypatch):
    """Inside `with padded_layout():` layers keep the padded layout (the one packing replaces)."""

    def switch():
        class _Padded:
            def __enter__(self):
                monkeypatch.setattr(cache_mod, "PACK_DEAD_SLOTS", False)

            def __exit__(self, *exc):
                monkeypatch.setattr(cache_mod, "PACK_DEAD_SLOTS", True)

        return _Padded()

    return switch


def _batch(seed=1):
    prompts = [prompt(n, seed=seed + i)[0] for i, n in enumerate(ROWS)]
    return prompts, *left_pad(prompts)


def _live_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        packed = layer.packed
        total += int(packed.host_lengths.sum()) * (packed.key_data.shape[1] + packed.value_data.shape[1]) * packed.key_data.element_size()
    return total


def test_left_padded_batch_stores_packed_and_generates_each_rows_solo_tokens(padded_layout):
    model = tiny_model("llama")
    prompts, ids, mask = _batch()
    config = dict(budget=0.3, min_prompt=8)
    with cspkv.patched(model, **config) as handle:
        with torch.no_grad():
            cache = returned_cache(model(ids, attention_mask=mask, use_cache=True))
        for layer in cache.layers:
            assert isinstance(layer, PrunedLayer) and layer.packed is not None and layer.kv_valid is None
            budgets = [round(0.3 * n) for n in ROWS]
            assert layer.packed.host_lengths.reshape(3, 2).tolist() == [[b, b] for b in budgets]
        # Packed without free rows: the stored bytes are the live tokens' (kv_bytes_after says the same).
        D = model.config.hidden_size // model.config.num_attention_heads
        element = next(model.parameters()).element_size()
        assert sum(stored_bytes(layer) for layer in cache.layers) == sum(budgets) * 2 * D * 2 * element * len(cache.layers)
        assert handle.stats()["kv_bytes_after"] == sum(stored_bytes(layer) for layer in cache.layers)

        out = generate(model, ids, mask, new=12)
        for layer in returned_cache(out).layers:
            assert layer.packed is not None
            packed = layer.packed
            lengths = torch.tensor(budgets).repeat_interleave(2) + 11
            assert torch.equal(packed.host_lengths, lengths) and torch.equal(packed.lengths, lengths)
            capacity = torch.tensor([n + 1 + append_reserve(n + 1) for n in torch.tensor(budgets).repeat_interleave(2).tolist()])
            assert torch.equal(packed.host_capacity, capacity)  # grown once, at the first append
            assert stored_bytes(layer) == int(capacity.sum()) * 2 * D * element  # live tokens + room, keys and values
        solo = [generate(model, p[None], new=12).sequences[0, p.numel():] for p in prompts]
        with padded_layout():
            padded = generate(model, ids, mask, new=12)
        assert returned_cache(padded).layers[0].packed is None
    assert torch.equal(out.sequences, padded.sequences)
    for b, tokens in enumerate(solo):
        assert torch.equal(out.sequences[b, ids.shape[1]:], tokens), f"row {b}"


def test_full_budget_with_padding_is_the_unpatched_model():
    model = tiny_model("qwen3")
    never = twin(model)
    _, ids, mask = _batch(seed=4)
    reference = generate(never, ids, mask, new=10)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        out = generate(model, ids, mask, new=10)
        assert all(layer.packed is not None for layer in returned_cache(out).layers)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_long_generation_crosses_a_repack(monkeypatch, padded_layout):
    model = tiny_model("llama")
    _, ids, mask = _batch(seed=7)
    grown = []
    original = PackedStore.grown
    monkeypatch.setattr(PackedStore, "grown", lambda self, t: grown.append(self.room()) or original(self, t))
    with cspkv.patched(model, budget=0.25, min_prompt=8):
        out = generate(model, ids, mask, new=48)
        with padded_layout():
            padded = generate(model, ids, mask, new=48)
    layers = len(model.model.layers)
    # The first append gives every segment >= 16 free rows; 47 appends fill them at least twice more.
    assert len(grown) >= 3 * layers, grown
    assert torch.equal(out.sequences, padded.sequences)
    for got, want in zip(out.logits, padded.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_beam_search_equals_the_padded_layout(padded_layout):
    model = tiny_model("llama")
    _, ids, mask = _batch(seed=11)
    kwargs = dict(num_beams=3, num_return_sequences=2, new=8)
    with cspkv.patched(model, budget=0.4, min_prompt=8):
        out = generate(model, ids, mask, **kwargs)
        assert returned_cache(out).layers[0].packed is not None
        with padded_layout():
            padded = generate(model, ids, mask, **kwargs)
    assert torch.equal(out.sequences, padded.sequences)


def _crop(cache, remove: int) -> None:
    cache.crop(-remove if cache_mod._CROP_TAKES_REMOVAL else cache.get_seq_length() - remove)


def _decode(model, cache, token, steps):
    """Greedy continuation by hand: (tokens, logits) of `steps` steps after `token` [B, 1]."""
    tokens, logits = [], []
    for _ in range(steps):
        step = model(token, **{CACHE_KW: cache}, use_cache=True).logits[:, -1]
        token = step.argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(step)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def _pruned_then_drafted(model, ids, mask):
    """Prefill, append a 4-token draft (rejected: cropped with 2 tokens of the recent window), decode on."""
    cache = returned_cache(model(ids, attention_mask=mask, use_cache=True))
    draft = prompt(4, seed=31).repeat(ids.shape[0], 1)
    full = torch.cat([mask, torch.ones_like(draft)], 1)
    model(draft, attention_mask=full, **{CACHE_KW: cache}, use_cache=True)
    _crop(cache, 6)
    return cache, _decode(model, cache, ids[:, -2:-1], 6)


def test_crop_of_drafts_and_recent_window_equals_the_padded_layout(padded_layout):
    """What assisted decoding does to the cache (crop the rejected drafts, here 2 tokens of the
    prompt's recent window too), on a packed layer: the same as on the padded one."""
    model = tiny_model("llama")
    _, ids, mask = _batch(seed=13)
    with torch.no_grad(), cspkv.patched(model, budget=0.3, window=6, min_prompt=8):
        cache, (tokens, logits) = _pruned_then_drafted(model, ids, mask)
        assert cache.layers[0].packed is not None and cache.layers[0].croppable == 4
        with padded_layout():
            padded_cache, (padded_tokens, padded_logits) = _pruned_then_drafted(model, ids, mask)
        assert padded_cache.layers[0].packed is None
    assert torch.equal(tokens, padded_tokens)
    torch.testing.assert_close(logits, padded_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("what", ["later chunk", "decode budget"])
def test_pruning_a_packed_layer_again_equals_the_padded_layout(what, padded_layout):
    model = tiny_model("llama")
    _, ids, mask = _batch(seed=17)
    follow = prompt(20, seed=18).repeat(3, 1)
    config = dict(budget=0.3, min_prompt=8)
    config.update(later_prefill="chunk" if what == "later chunk" else "off")
    if what == "decode budget":
        config.update(decode_budget=12, decode_interval=4, decode_window=2)

    def run():
        with torch.no_grad():
            cache = returned_cache(model(ids, attention_mask=mask, use_cache=True))
            full = torch.cat([mask, torch.ones_like(follow)], 1)
            model(follow, attention_mask=full, **{CACHE_KW: cache}, use_cache=True)
            return cache, _decode(model, cache, follow[:, -1:], 10)

    with cspkv.patched(model, **config):
        cache, (tokens, logits) = run()
        with padded_layout():
            padded_cache, (padded_tokens, padded_logits) = run()
    # A later chunk keeps each row's budget of it: rows still differ. Decode-time compression keeps
    # decode_budget in every row and head: the layer is even again, and padded.
    assert (cache.layers[0].packed is not None) == (what == "later chunk") and padded_cache.layers[0].packed is None
    assert torch.equal(tokens, padded_tokens)
    torch.testing.assert_close(logits, padded_logits, rtol=1e-4, atol=1e-4)
    for layer, padded in zip(cache.layers, padded_cache.layers):
        keys, values, valid = layer.stored_slots()
        live = padded.kv_valid
        assert torch.equal(valid.sum(-1), live.sum(-1))
        for b in range(valid.shape[0]):
            for h in range(valid.shape[1]):
                torch.testing.assert_close(keys[b, h][valid[b, h]], padded.keys[b, h][live[b, h]])


def test_swapped_segment_offsets_change_the_tokens():
    """The test a wrong implementation fails: rows 0 and 1 reading each other's segments."""
    model = tiny_model("llama")
    _, ids, mask = _batch(seed=19)
    with torch.no_grad(), cspkv.patched(model, budget=0.3, min_prompt=8):
        right = returned_cache(model(ids, attention_mask=mask, use_cache=True))
        wrong = copy.deepcopy(right)
        for layer in wrong.layers:
            packed = layer.packed
            tensors = {id(t): t for t in (packed.offsets, packed.lengths, packed.host_offsets, packed.host_lengths)}
            for t in tensors.values():  # (on a CPU the device offsets may be the host ones)
                t[[0, 1, 2, 3]] = t[[2, 3, 0, 1]].clone()
        token = ids[:, -1:]
        good, good_logits = _decode(model, right, token, 8)
        bad, bad_logits = _decode(model, wrong, token, 8)
    assert not torch.allclose(good_logits[:2], bad_logits[:2])
    assert not torch.equal(good[:2], bad[:2])
    torch.testing.assert_close(good_logits[2], bad_logits[2])  # row 2 is untouched


def test_layer_operations_keep_the_packed_rows():
    """reorder_cache / batch_repeat_interleave / batch_select_indices, deepcopy and reset on a
    packed layer: the live slots of each row and head follow their row."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, C, D = 3, 2, 7, 4
    keys, values = torch.randn(B, Hkv, C, D, generator=gen), torch.randn(B, Hkv, C, D, generator=gen)
    valid = torch.rand(B, Hkv, C, generator=gen) > 0.4
    valid[0, 0] = True
    valid[2, 1] = False  # an empty segment, the last one: it starts at N
    slot_mod = torch.randint(0, 2, (B, Hkv, C), generator=gen, dtype=torch.int32).masked_fill(~valid, -1)
    layer = PrunedLayer(keys, values, valid, 50, cache_mod.Liveness(), 0, slot_mod)
    assert layer.packed is not None and stored_bytes(layer) == int(valid.sum()) * D * 2 * 4

    def live_rows(lay):
        k, v, ok = lay.stored_slots()
        return [[k[b, h][ok[b, h]] for h in range(Hkv)] for b in range(k.shape[0])]

    def expected(rows):
        return [[keys[b, h][valid[b, h]] for h in range(Hkv)] for b in rows]

    def same(lay, rows):
        for got_row, want_row in zip(live_rows(lay), expected(rows), strict=True):
            for got, want in zip(got_row, want_row):
                assert torch.equal(got, want)

    same(layer, range(B))
    ids = layer.slot_modalities()
    assert torch.equal((ids >= 0).sum(-1), valid.sum(-1))
    clone = copy.deepcopy(layer)
    clone.reorder_cache(torch.tensor([2, 0, 0]))
    same(clone, [2, 0, 0])
    same(layer, range(B))  # the copy is independent
    clone.batch_repeat_interleave(2)
    same(clone, [2, 2, 0, 0, 0, 0])
    clone.batch_select_indices(torch.tensor([1, 4]))
    same(clone, [2, 0])
    assert clone.slot_mod.shape[0] == 2
    # Appending goes after each segment's last live slot.
    new_k, new_v = torch.randn(2, Hkv, 1, D, generator=gen), torch.randn(2, Hkv, 1, D, generator=gen)
    clone.update(new_k, new_v)
    for b, row in enumerate(live_rows(clone)):
        for h, got in enumerate(row):
            assert torch.equal(got[-1], new_k[b, h, 0])
    clone.reset()
    assert not clone.is_pruned and clone.packed is None and stored_bytes(clone) == 0


def test_adaptive_head_budgets_store_packed_and_assisted_decoding_equals_padded(padded_layout):
    """One row whose KV heads keep different numbers of tokens (head_allocation="adaptive") is
    packed too; assisted decoding (drafts verified, rejected ones cropped) matches the padded layout,
    and the stats count the tokens each head kept."""
    model = tiny_model("llama")
    ids = prompt(96, seed=10)
    extra = {"assistant_model": tiny_model(layers=1, seed=3)}
    config = dict(budget=0.5, window=24, head_allocation="adaptive")  # min_prompt 32: drafts are never pruned
    with cspkv.patched(model, **config) as handle:
        out = generate(model, ids, new=12, **extra)
        stats = handle.stats()["layers"]
        with padded_layout():
            padded = generate(model, ids, new=12, **extra)
    layers = returned_cache(out).layers
    assert all(layer.packed is not None for layer in layers)
    assert all(layer.get_seq_length() == 96 + 12 - 1 for layer in layers)
    assert torch.equal(out.sequences, padded.sequences)
    D = model.config.hidden_size // model.config.num_attention_heads
    element = next(model.parameters()).element_size()
    for entry in stats.values():
        heads = entry["kept_per_head"][0]
        assert len(set(heads)) > 1, heads  # the heads differ: dead slots padded in PrunedKV, none stored
        assert entry["kv_bytes_after"] == sum(heads) * 2 * D * element
