"""Budget arithmetic (cspkv.pruning.budget), CSP's scoring (cspkv.pruning.policies.csp),
per-row selection (cspkv.pruning.selection) and compaction (cspkv.pruning.compaction), and
the pruned cache layer's bookkeeping (cspkv.hf.cache.PrunedLayer), without a model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache, DynamicLayer

import cspkv
from cspkv import CSPConfig, ScoreInputs, ops
from cspkv.hf.cache import Liveness, PrunedLayer, _CROP_TAKES_REMOVAL, append_reserve, check_cache, padded_layout, stored_bytes
from cspkv.pruning import score_layer, selection
from cspkv.pruning.budget import RowPlan, has_dead_slots, plan_batch, plan_row, token_count, window_query_ids
from cspkv.pruning.compaction import compact
from cspkv.pruning.policies.csp import auto_cross_ratio


# --------------------------------------------------------------------------- budget


def test_token_count_rounds_half_up_and_clamps():
    assert token_count(0.2, 100) == 20
    assert token_count(0.25, 10) == 3  # 2.5 -> 3
    assert token_count(0.1, 4) == 0
    assert token_count(50, 20) == 20
    assert token_count(1.0, 37) == 37


def test_plan_row():
    text = torch.zeros(100, dtype=torch.long)
    plan = plan_row(CSPConfig(), text)
    assert plan == RowPlan(length=100, budget=20, window=10, recent=10, cross_ratio=0.0, pruned=True)
    # the default window: 10% of the prompt, at most 64 tokens; a given fraction has no cap
    long_text = torch.zeros(2000, dtype=torch.long)
    assert (plan_row(CSPConfig(), long_text).window, plan_row(CSPConfig(), long_text).recent) == (64, 64)
    assert (plan_row(CSPConfig(window=0.1), long_text).window, plan_row(CSPConfig(window=0.1), long_text).recent) == (200, 200)
    assert plan_row(CSPConfig(recent=5), long_text).recent == 5
    mixed = torch.cat([torch.full((10,), -1), torch.zeros(30), torch.ones(60)]).long()
    plan = plan_row(CSPConfig(budget=0.5, window=0.2, recent=4, cross_ratio=0.9, min_prompt=8), mixed)
    assert (plan.length, plan.budget, plan.window, plan.recent, plan.cross_ratio) == (90, 45, 18, 4, 0.9)
    # window of 18 image (1) queries vs 30 text keys: auto = 18 * 30 / (18 * 90)
    auto = plan_row(CSPConfig(cross_ratio="auto", min_prompt=8), mixed)
    assert auto.cross_ratio == pytest.approx(30 / 90)
    assert plan_row(CSPConfig(budget=5, window=12), text).recent == 5  # recent capped at the budget
    short = plan_row(CSPConfig(min_prompt=200), text)
    assert not short.pruned and short.budget == 100 and short.window == 0
    assert plan_row(CSPConfig(), torch.full((5,), -1)).length == 0


def test_auto_cross_ratio_formula():
    # two modalities: (Wt * Li + Wi * Lt) / (W * L)
    window = torch.tensor([0, 0, 1])
    keys = torch.tensor([0] * 6 + [1] * 4)
    assert auto_cross_ratio(window, keys) == pytest.approx((2 * 4 + 1 * 6) / (3 * 10))


def test_window_query_ids_mark_foreign_queries():
    k_mod = torch.tensor([[-1, -1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    plans = [RowPlan(4, 2, 1, 1, 0.0, True), RowPlan(6, 3, 3, 1, 0.5, True)]
    assert window_query_ids(k_mod, plans).tolist() == [[-1, -1, 0], [1, 1, 1]]


def test_score_pooling_spreads_a_peak_to_its_neighbours():
    torch.manual_seed(0)
    q, keys = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 20, 8)
    k_mod = torch.zeros(1, 20, dtype=torch.long)
    k_mod[0, :5] = -1
    q_mod = k_mod[:, -3:]
    inputs = ScoreInputs(q, keys, q_mod, k_mod, 0.35)
    plain = cspkv.CSP(n=1.0, pool=1).score(inputs)
    pooled = cspkv.CSP(n=1.0, pool=5).score(inputs)
    for a, b in zip(plain, pooled):
        expected = torch.stack([a[..., max(0, j - 2): j + 3].amax(-1) for j in range(20)], dim=-1)
        assert torch.equal(b, expected)
    # CSP.pool: CSP's default width 15, 1 = off.
    by_default = score_layer(CSPConfig(), inputs)
    for a, b in zip(by_default, cspkv.CSP(n=1.0, pool=15).score(inputs)):
        assert torch.equal(a, b)
    for a, b in zip(score_layer(CSPConfig(pool=1), inputs), plain):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=4),
    budget=st.floats(min_value=0.05, max_value=1.0),
    ratio=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
    min_prompt=st.sampled_from([1, 20]),
)
def test_batch_selection_equals_each_row_alone(lengths, budget, ratio, seed, min_prompt):
    """selection.select() on a left-padded batch keeps, per row, the tokens the row keeps alone; the plans
    tell on the host whether it marked any slot dead (the compaction then skips zeroing)."""
    g = torch.Generator().manual_seed(seed)
    B, L, Hkv = len(lengths), max(lengths), 2
    k_mod = torch.full((B, L), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        k_mod[b, L - n:] = torch.randint(0, 2, (n,), generator=g)
    self_s = torch.rand(B, Hkv, L, generator=g)
    cross_s = torch.rand(B, Hkv, L, generator=g)
    config = CSPConfig(budget=budget, cross_ratio=ratio, min_prompt=min_prompt)
    plans = plan_batch(config, k_mod)
    keep_idx, keep_valid = selection.select(self_s, cross_s, k_mod, plans)
    assert has_dead_slots(plans) == (not bool(keep_valid.all()))
    assert keep_idx.shape == (B, Hkv, max(p.budget for p in plans))
    assert bool((keep_idx[..., 1:] > keep_idx[..., :-1]).all())
    for b, n in enumerate(lengths):
        pad = L - n
        plan = plan_row(config, k_mod[b, pad:])
        alone_idx, alone_valid = ops.select_keep(
            self_s[b:b + 1, :, pad:], cross_s[b:b + 1, :, pad:], k_mod[b:b + 1, pad:],
            budget=plan.budget, recent=plan.recent, cross_ratio=plan.cross_ratio,
        )
        for h in range(Hkv):
            in_batch = keep_idx[b, h][keep_valid[b, h]] - pad
            assert in_batch.tolist() == alone_idx[0, h][alone_valid[0, h]].tolist()


# --------------------------------------------------------------------------- PrunedLayer (cspkv.hf.cache)


def _layer(B=2, Hkv=2, C=5, D=4, L=12):
    keys = torch.randn(B, Hkv, C, D)
    valid = torch.ones(B, Hkv, C, dtype=torch.bool)
    valid[1, :, 0] = False
    with padded_layout():  # these tests are of the padded store; a dead slot would make it packed (tests/test_packed.py)
        return PrunedLayer(keys, keys.clone(), valid, L, Liveness())


def test_pruned_layer_reports_logical_sizes():
    layer = _layer()
    assert layer.get_seq_length() == 12
    assert layer.get_mask_sizes(1) == (13, 0)
    assert layer.get_mask_sizes(torch.arange(12, 15)) == (15, 0)
    keys, values = layer.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    assert keys.shape[-2] == 8 and layer.get_seq_length() == 15
    assert layer.kv_valid.shape == (2, 2, 8) and bool(layer.kv_valid[..., 5:].all())
    assert not bool(layer.kv_valid[1, :, 0].any())


def test_pruned_layer_batch_ops_move_kv_valid_too():
    layer = _layer()
    layer.reorder_cache(torch.tensor([1, 0]))
    assert not bool(layer.kv_valid[0, :, 0].any()) and bool(layer.kv_valid[1].all())
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4 and layer.kv_valid.shape[0] == 4
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert layer.kv_valid.shape[0] == 2 and bool(layer.kv_valid[1].all())


def test_pruned_layer_crop_only_removes_appended_tokens():
    layer = _layer()
    layer.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    layer.crop(-2 if _CROP_TAKES_REMOVAL else 13)
    assert layer.keys.shape[-2] == 6 and layer.get_seq_length() == 13 and layer.kv_valid.shape[-1] == 6
    with pytest.raises(NotImplementedError, match="pruned cache"):
        layer.crop(-3)


@pytest.fixture(params=["extension", "python"])
def store_calls(request, monkeypatch):
    """The store's appends through cspkv._C.store_append, or the Python path of a build without the extension."""
    if request.param == "python":
        monkeypatch.setattr(ops, "extension", lambda: None)
    elif ops.extension() is None:
        pytest.skip("cspkv._C is not built")
    return request.param


def test_pruned_layer_appends_in_place_into_a_reserve(store_calls):
    layer = _layer()  # 5 stored slots, row 1's first one dead
    expected_k, expected_v = layer.keys.clone(), layer.values.clone()
    capacity = 6 + append_reserve(6)
    pointers = set()
    for step in range(capacity - 5 + 1):  # fills the store, then one more append grows it
        k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
        keys, values = layer.update(k, v)
        expected_k, expected_v = torch.cat([expected_k, k], dim=-2), torch.cat([expected_v, v], dim=-2)
        assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
        assert keys is layer.keys and layer.kv_valid.shape == (2, 2, 6 + step)
        pointers.add(keys.data_ptr())
        if step == capacity - 6:  # the store is full: the keys have not moved since the first append
            assert len(pointers) == 1 and stored_bytes(layer) == 2 * keys.numel() * keys.element_size()
    assert len(pointers) == 2  # one growth past the first store
    assert stored_bytes(layer) > 2 * keys.numel() * keys.element_size()  # the free slots are counted
    assert not bool(layer.kv_valid[1, :, 0].any()) and bool(layer.kv_valid[..., 5:].all())
    assert layer.get_seq_length() == 12 + capacity - 4


def test_pruned_layer_rejects_new_tokens_of_another_shape(store_calls):
    layer = _layer()
    layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))  # the store exists from here on
    with pytest.raises(RuntimeError, match="do not match the stored"):
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))  # one row: copy_ would broadcast it


def test_pruned_layer_stores_the_calls_padding_dead(store_calls):
    """New tokens that the forward call's 2-D mask marks as padding (Liveness.chunk_live) are
    appended as dead slots; without a call, or with no such mask, as live ones."""
    layer = _layer()  # 5 stored slots, logical length 12
    asked = []

    def chunk_live(t, total, device):
        asked.append((t, total))
        return torch.tensor([[[True, False, True]], [[False, True, True]]])

    layer._liveness.chunk_live = chunk_live
    layer.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    assert asked == [(3, 15)]
    assert layer.kv_valid[..., 5:].tolist() == [[[True, False, True]] * 2, [[False, True, True]] * 2]
    layer._liveness.chunk_live = None
    layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    assert bool(layer.kv_valid[..., 8].all()) and layer.kv_valid[..., 5:8].tolist()[1][0] == [False, True, True]
    layer._liveness.chunk_live = lambda t, total, device: torch.ones(2, 1, t + 1, dtype=torch.bool)
    with pytest.raises(RuntimeError):  # a liveness of the wrong length is an error, not a broadcast
        layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("live_heads", [None, 1, 3])
def test_store_append_writes_strided_tokens_and_their_liveness(device, dtype, live_heads):
    """cspkv._C.store_append (one loop / one kernel for keys, values and liveness) against plain
    indexing: keys given as a transposed view (as attention modules make them), values with a strided
    last dim and another head dim, a liveness of one head (for all) or of each; every slot outside
    [n, n + t) keeps what it held, and the returned views are the first n + t slots."""
    g = torch.Generator().manual_seed(7)
    B, H, C, D, Dv, n, t = 2, 3, 12, 8, 6, 4, 5
    key_slots = torch.randn(B, H, C, D, generator=g).to(device, dtype)
    value_slots = torch.randn(B, H, C, Dv, generator=g).to(device, dtype)
    valid_slots = (torch.rand(B, H, C, generator=g) > 0.5).to(device)
    keys = torch.randn(B, t, H, D, generator=g).to(device, dtype).transpose(1, 2)
    values = torch.randn(B, H, t, 2 * Dv, generator=g).to(device, dtype)[..., ::2]
    live = None if live_heads is None else (torch.rand(B, live_heads, t, generator=g) > 0.5).to(device)
    want = [key_slots.clone(), value_slots.clone(), valid_slots.clone()]
    want[0][:, :, n:n + t], want[1][:, :, n:n + t] = keys, values
    if live is not None:
        want[2][:, :, n:n + t] = live.expand(B, H, t)
    views = ops.extension().store_append(key_slots, value_slots, valid_slots, n, keys, values, live)
    for got, slots, expected in zip(views, (key_slots, value_slots, valid_slots), want):
        assert torch.equal(slots, expected)
        assert got.shape[2] == n + t and got.data_ptr() == slots.data_ptr() and torch.equal(got, expected[:, :, :n + t])


def test_store_append_converts_tokens_of_another_dtype(device):
    """New tokens of another dtype than the store are converted (the copy_ path), not reinterpreted."""
    key_slots, value_slots = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16, device=device), torch.zeros(1, 2, 4, 8, device=device)
    valid_slots = torch.ones(1, 2, 4, dtype=torch.bool, device=device)
    keys = torch.randn(1, 2, 1, 8, device=device)
    values = torch.randn(1, 2, 1, 8, dtype=torch.float16, device=device)
    ops.extension().store_append(key_slots, value_slots, valid_slots, 2, keys, values, None)
    assert torch.equal(key_slots[:, :, 2:3], keys.to(torch.bfloat16)) and torch.equal(value_slots[:, :, 2:3], values.float())


def test_pruned_layer_reserve_survives_crop_and_outside_reassignment(store_calls):
    layer = _layer()
    layer.update(torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4))
    layer.kv_valid[0, :, -1] = False  # a dead slot appended (padding inside a chunk) ...
    layer.crop(-1 if _CROP_TAKES_REMOVAL else 13)
    k = torch.randn(2, 2, 1, 4)
    layer.update(k, k)
    assert bool(layer.kv_valid[..., -1].all())  # ... cropped: the slot appended in its place is live
    assert torch.equal(layer.keys[..., -1:, :], k)
    # A layer whose tensors were replaced from outside (transformers' offloading) is copied, not overwritten.
    moved = layer.keys.clone()
    layer.keys = moved
    layer.update(k, k)
    assert layer.keys.shape[-2] == 8 and torch.equal(layer.keys[..., :7, :], moved) and torch.equal(moved, layer.keys[..., :7, :])


def test_pruned_layer_reset_and_liveness():
    layer = _layer()
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_pruned
    layer.update(torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4))
    assert layer.get_seq_length() == 4 and layer.kv_valid is None
    layer._liveness.active = False
    with pytest.raises(RuntimeError, match="unpatched"):
        layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))


def test_compact_zeroes_dead_slots():
    keys = torch.randn(1, 1, 4, 2)
    keys[0, 0, 0] = float("nan")
    idx = torch.tensor([[[0, 2]]])
    valid = torch.tensor([[[False, True]]])
    k, v = compact(keys, keys.clone(), idx, valid)
    assert torch.equal(k[0, 0, 0], torch.zeros(2)) and torch.equal(k[0, 0, 1], keys[0, 0, 2])
    k, v = compact(keys, keys.clone(), idx, None)  # no dead slots: nothing is zeroed
    assert bool(k[0, 0, 0].isnan().all()) and torch.equal(k[0, 0, 1], keys[0, 0, 2])


def test_check_cache():
    check_cache(None)
    check_cache(DynamicCache())
    with pytest.raises(TypeError, match="unsupported cache type dict"):
        check_cache({})

    class Odd(DynamicLayer):
        pass

    cache = DynamicCache()
    cache.layers.append(Odd())
    with pytest.raises(TypeError, match="unsupported cache layer Odd at index 0"):
        check_cache(cache)
