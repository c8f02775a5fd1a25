"""Adaptive budget allocation (`CSPConfig.head_allocation`, `layer_allocation`): the
allocation maths of `cspkv.pruning.allocation` on hand-made scores, per-head selection,
and patched tiny models (CPU) against the unpatched model and against each row alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import cspkv
from cspkv import CSPConfig
from cspkv.hf.cache import padded_layout
from cspkv.pruning import allocation, head_allocation, select_and_compact
from cspkv.pruning.budget import RowPlan, plan_batch
from cspkv.pruning.policies import Policy, Scores
from patch_models import CACHE_KW, generate, left_pad, prompt, returned_cache, tiny_model, twin

ADAPTIVE = [
    pytest.param(dict(head_allocation="adaptive"), id="heads"),
    pytest.param(dict(layer_allocation="adaptive"), id="layers"),
    pytest.param(dict(head_allocation="adaptive", layer_allocation="adaptive"), id="both"),
]


def _text(B: int, L: int) -> torch.Tensor:
    return torch.zeros(B, L, dtype=torch.long)


def _random_case(seed: int, B: int = 3, Hkv: int = 4, L: int = 60):
    """Peaked random scores (a few heavy keys per head, different per head), left padding, a row
    too short to prune; plans from a config as the patch makes them."""
    g = torch.Generator().manual_seed(seed)
    primary = torch.rand(B, Hkv, L, generator=g) ** 6 * torch.rand(B, Hkv, 1, generator=g) * 4
    cross = torch.rand(B, Hkv, L, generator=g) ** 6 * torch.rand(B, Hkv, 1, generator=g)
    k_mod = torch.randint(0, 2, (B, L), generator=g)
    k_mod[1, :17] = -1
    k_mod[2, :L - 10] = -1  # 10 real tokens: shorter than min_prompt
    plans = plan_batch(CSPConfig(budget=0.3, window=0.1, min_prompt=16, cross_ratio=0.5), k_mod)
    return Scores(primary, cross), k_mod, plans


# ----------------------------------------------------------------- config
def test_config_fields_are_validated_and_named():
    config = CSPConfig(head_allocation="adaptive", layer_allocation="adaptive", allocation_floor=0)
    assert config.allocation_floor == 0.0 and isinstance(config.allocation_floor, float)
    assert CSPConfig().head_allocation == CSPConfig().layer_allocation == "uniform"
    with pytest.raises(ValueError, match="CSPConfig.head_allocation"):
        CSPConfig(head_allocation="ada")
    with pytest.raises(ValueError, match="CSPConfig.layer_allocation"):
        CSPConfig(layer_allocation="pyramid")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="CSPConfig.allocation_floor"):
            CSPConfig(allocation_floor=bad)
    with pytest.raises(TypeError, match="CSPConfig.allocation_floor"):
        CSPConfig(allocation_floor="0.2")


@pytest.mark.parametrize("field", ["head_allocation", "layer_allocation"])
def test_adaptive_needs_scores_that_are_attention_mass(field):
    for policy in ("csp", "snapkv", "h2o"):
        assert getattr(CSPConfig(policy=policy, **{field: "adaptive"}), field) == "adaptive"
    for policy in ("streaming", "random"):
        with pytest.raises(ValueError, match=f"CSPConfig.{field}"):
            CSPConfig(policy=policy, **{field: "adaptive"})

    @dataclass(frozen=True)
    class Ranks(Policy):
        name = "ranks_for_test"
        allocates = False

        def score(self, inputs):
            return Scores(torch.zeros(inputs.keys.shape[:3]))

    with pytest.raises(ValueError, match=f"CSPConfig.{field}"):
        CSPConfig(policy=Ranks(), **{field: "adaptive"})
    assert CSPConfig(policy=Ranks()).policy.allocates is False  # uniform is fine


# ----------------------------------------------------------------- head budgets
def test_equal_scores_or_one_head_give_the_uniform_budgets():
    plan = RowPlan(50, 12, 5, 5, 0.5, True)
    for Hkv in (1, 4):
        flat = Scores(torch.full((1, Hkv, 50), 0.3), torch.full((1, Hkv, 50), 0.1))
        budgets, ratios = allocation.head_budgets(flat, _text(1, 50), [plan], 0.2, split_cross=True)
        assert budgets.tolist() == [[12] * Hkv] and ratios.tolist() == [[0.5] * Hkv]
    one_head = Scores(torch.rand(2, 1, 50), torch.rand(2, 1, 50))
    budgets, ratios = allocation.head_budgets(one_head, _text(2, 50), [plan, plan], 0.2, split_cross=True)
    assert budgets.tolist() == [[12], [12]] and ratios.tolist() == [[0.5], [0.5]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("floor", [0.0, 0.2, 0.6, 1.0])
def test_head_budgets_spend_the_row_budget_exactly_above_the_floor(seed, floor):
    scores, k_mod, plans = _random_case(seed)
    Hkv = scores.primary.shape[1]
    budgets, ratios = allocation.head_budgets(scores, k_mod, plans, floor, split_cross=True)
    assert budgets.dtype == torch.int64 and budgets.shape == (3, Hkv) and ratios.shape == (3, Hkv)
    for b, plan in enumerate(plans):
        assert int(budgets[b].sum()) == Hkv * plan.budget
        assert int(budgets[b].min()) >= max(plan.recent, allocation.floor_tokens(plan, floor))
        assert int(budgets[b].max()) <= plan.length
        assert bool(((ratios[b] >= 0) & (ratios[b] <= 1)).all())
    assert not plans[2].pruned and budgets[2].tolist() == [plans[2].budget] * Hkv
    if floor == 1.0:
        assert budgets.tolist() == [[p.budget] * Hkv for p in plans]


def test_a_concentrated_head_gets_fewer_slots_than_a_flat_one():
    """What a uniform split (or a ranking per head) would get wrong: head 0 puts its mass on 3 keys,
    head 1 spreads it; the shared budget goes where the dropped mass would be largest."""
    L, plan = 80, RowPlan(80, 20, 8, 8, 0.0, True)
    peaked = torch.zeros(L)
    peaked[[5, 30, 50]] = 5.0
    flat = torch.full((L,), 15.0 / L)
    scores = Scores(torch.stack([peaked, flat])[None])
    budgets, _ = allocation.head_budgets(scores, _text(1, L), [plan], 0.2)
    assert budgets.tolist() == [[8 + 3, 40 - 11]]
    # The kept mass is at least the uniform split's, and the floor holds.
    kept = select_and_compact(scores, torch.randn(1, 2, L, 4), torch.randn(1, 2, L, 4), _text(1, L), [plan], budgets=budgets)
    assert kept.keep_valid.sum(-1).tolist() == [[11, 29]]
    assert set([5, 30, 50]) <= set(kept.keep_idx[0, 0][kept.keep_valid[0, 0]].tolist())


def test_each_head_splits_cross_and_self_by_its_own_mass():
    """CSP: the row's cross ratio, scaled per head by its share of cross mass over the heads' mean."""
    L, plan = 60, RowPlan(60, 20, 6, 6, 0.5, True)
    primary = torch.tensor([1.0, 1.0, 1.0])[:, None].expand(3, L)
    cross = torch.tensor([1.0, 0.25, 0.0])[:, None].expand(3, L)
    scores = Scores(primary[None].clone(), cross[None].clone())
    _, ratios = allocation.head_budgets(scores, _text(1, L), [plan], 0.2, split_cross=True)
    shares = torch.tensor([1 / 2, 0.25 / 1.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ratios[0], (0.5 * shares / shares.mean()).clamp(0, 1))
    assert ratios[0, 0] > 0.5 > ratios[0, 1] > ratios[0, 2] == 0.0
    # Without the split, or for a row with one modality (cross ratio 0), every head keeps the row's ratio.
    assert allocation.head_budgets(scores, _text(1, L), [plan], 0.2)[1].tolist() == [[0.5] * 3]
    single = dataclasses.replace(plan, cross_ratio=0.0)
    assert allocation.head_budgets(scores, _text(1, L), [single], 0.2, split_cross=True)[1].tolist() == [[0.0] * 3]


def test_per_head_selection_is_select_keep_on_each_head():
    scores, k_mod, plans = _random_case(7)
    B, Hkv, L = scores.primary.shape
    budgets, ratios = allocation.head_budgets(scores, k_mod, plans, 0.2, split_cross=True)
    keys, values = torch.randn(B, Hkv, L, 8), torch.randn(B, Hkv, L, 8)
    kept = select_and_compact(scores, keys, values, k_mod, plans, budgets=budgets, cross_ratios=ratios)
    assert kept.keys.shape == (B, Hkv, int(budgets.max()), 8)
    for b, plan in enumerate(plans):
        for h in range(Hkv):
            idx = kept.keep_idx[b, h]
            assert bool((idx[1:] > idx[:-1]).all())
            alone, valid = cspkv.ops.select_keep(scores.primary[b:b + 1, h:h + 1], scores.cross[b:b + 1, h:h + 1],
                                                 k_mod[b:b + 1], budget=int(budgets[b, h]), recent=plan.recent,
                                                 cross_ratio=float(ratios[b, h]))
            assert idx[kept.keep_valid[b, h]].tolist() == alone[0, 0][valid[0, 0]].tolist()
            dead = ~kept.keep_valid[b, h]
            assert bool((kept.keys[b, h][dead] == 0).all())
            torch.testing.assert_close(kept.keys[b, h][~dead], keys[b, h][idx[~dead]], rtol=0, atol=0)


def test_uniform_scores_select_exactly_the_uniform_tokens():
    g = torch.Generator().manual_seed(3)
    B, Hkv, L = 2, 4, 50
    base = torch.rand(B, 1, L, generator=g)
    scores = Scores(base.expand(B, Hkv, L).contiguous(), torch.rand(B, 1, L, generator=g).expand(B, Hkv, L).contiguous())
    k_mod = torch.randint(0, 2, (B, L), generator=g)
    plans = plan_batch(CSPConfig(budget=0.3, min_prompt=8), k_mod)
    keys = torch.randn(B, Hkv, L, 4)
    uniform = select_and_compact(scores, keys, keys, k_mod, plans)
    config = CSPConfig(budget=0.3, min_prompt=8, head_allocation="adaptive")
    budgets, ratios = head_allocation(config, scores, k_mod, plans)
    adaptive = select_and_compact(scores, keys, keys, k_mod, plans, budgets=budgets, cross_ratios=ratios)
    assert torch.equal(adaptive.keep_idx, uniform.keep_idx) and torch.equal(adaptive.keys, uniform.keys)


# ----------------------------------------------------------------- layer budgets
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5, 1.0])
def test_layer_budgets_sum_to_the_model_wide_budget(seed, floor):
    layers = [_random_case(seed * 10 + i)[0] for i in range(5)]
    _, k_mod, plans = _random_case(seed * 10)
    budgets = allocation.layer_budgets(layers, k_mod, plans, floor)
    assert budgets.dtype == torch.int64 and budgets.shape == (5, 3)
    for b, plan in enumerate(plans):
        assert int(budgets[:, b].sum()) == 5 * plan.budget
        assert int(budgets[:, b].min()) >= allocation.floor_tokens(plan, floor)
        assert int(budgets[:, b].max()) <= plan.length
    assert budgets[:, 2].tolist() == [plans[2].budget] * 5  # not pruned
    for layer, column in zip(layers, budgets):
        for plan, layer_plan in zip(plans, allocation.layer_plans(plans, column)):
            assert layer_plan.recent <= layer_plan.budget and layer_plan.length == plan.length


def test_a_concentrated_layer_gets_fewer_slots_and_equal_layers_the_same():
    L, plan = 80, RowPlan(80, 20, 8, 8, 0.0, True)
    peaked = torch.zeros(1, 2, L)
    peaked[..., [5, 30, 50]] = 5.0
    flat = torch.full((1, 2, L), 15.0 / L)
    budgets = allocation.layer_budgets([Scores(peaked), Scores(flat), Scores(flat)], _text(1, L), [plan], 0.2)
    assert budgets[:, 0].tolist() == [8 + 3, 49 // 2 + 1, 49 // 2]  # ties: the lower layer first
    same = allocation.layer_budgets([Scores(flat)] * 4, _text(1, L), [plan], 0.2)
    assert same[:, 0].tolist() == [20] * 4


# ----------------------------------------------------------------- patched models
def _kept_per_head(handle):
    return {idx: layer["kept_per_head"] for idx, layer in handle.stats()["layers"].items()}


@pytest.mark.parametrize("policy", ["csp", "snapkv", "h2o"])
@pytest.mark.parametrize("adaptive", ADAPTIVE)
def test_budget_one_reproduces_the_unpatched_model(policy, adaptive):
    model = tiny_model("llama", layers=3)
    ids = prompt(70, seed=21)
    reference = generate(twin(model), ids, new=8)
    with cspkv.patched(model, budget=1.0, min_prompt=8, policy=policy, **adaptive):
        out = generate(model, ids, new=8)
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["csp", "snapkv"])
@pytest.mark.parametrize("adaptive", ADAPTIVE)
def test_adaptive_budgets_in_a_patched_model(policy, adaptive):
    """Logical positions stay; the model-wide budget is spent exactly; heads and layers differ."""
    model = tiny_model("qwen2", layers=4)
    ids = prompt(90, seed=22)
    with cspkv.patched(model, budget=0.25, min_prompt=8, policy=policy, **adaptive) as handle:
        out = generate(model, ids, new=6)
        stats = handle.stats()
    cache = returned_cache(out)
    assert cache.get_seq_length() == 90 + 6 - 1
    layers = stats["layers"]
    K, recent = 23, 9  # round(0.25 * 90), round(0.1 * 90)
    per_layer = [layer["kept_per_row"][0] for layer in layers.values()]
    assert sum(per_layer) == 4 * K
    for layer in layers.values():
        heads = layer["kept_per_head"][0]
        assert len(heads) == 2 and sum(heads) == 2 * layer["kept_per_row"][0] and min(heads) >= recent
        assert layer["kept"] == max(heads)
    if "layer_allocation" in adaptive:
        assert len(set(per_layer)) > 1 and min(per_layer) >= recent
    else:
        assert per_layer == [K] * 4
    if "head_allocation" in adaptive:
        assert any(len(set(layer["kept_per_head"][0])) > 1 for layer in layers.values())


@pytest.mark.parametrize("adaptive", ADAPTIVE)
def test_left_padded_batch_row_keeps_what_it_keeps_alone(adaptive):
    model = tiny_model("llama", layers=3)
    prompts = [prompt(80, seed=31)[0], prompt(55, seed=32)[0], prompt(20, seed=33)[0]]
    ids, mask = left_pad(prompts)
    with cspkv.patched(model, budget=0.3, min_prompt=24, **adaptive) as handle:
        batch = generate(model, ids, mask, new=8)
        in_batch = _kept_per_head(handle)
        for b, p in enumerate(prompts):
            alone = generate(model, p[None], new=8)
            assert batch.sequences[b, ids.shape[1]:].tolist() == alone.sequences[0, p.numel():].tolist(), f"row {b}"
            if b < 2:  # the short row is not pruned alone, and its stats then say why
                assert {i: heads[b] for i, heads in in_batch.items()} == {
                    i: heads[0] for i, heads in _kept_per_head(handle).items()}, f"row {b}"


def test_a_second_turn_continues_an_adaptive_cache():
    """Heads of different budgets store dead slots; a later chunk (pruned uniformly) and decoding
    attend around them."""
    model = tiny_model("llama", layers=2)
    first_ids, follow_up = prompt(80, seed=41), prompt(40, seed=42)
    with cspkv.patched(model, budget=0.3, min_prompt=8, head_allocation="adaptive", layer_allocation="adaptive") as h:
        first = generate(model, first_ids, new=6)
        ids = torch.cat([first.sequences, follow_up], dim=1)
        second = generate(model, ids, new=6, **{CACHE_KW: returned_cache(first)})
        stats = h.stats()
    assert returned_cache(second).get_seq_length() == 80 + 6 + 40 + 6 - 1
    assert all(stats["layers"][i]["scoring"] == "later chunk (chunk)" for i in (0, 1))


def test_outside_a_forward_call_a_layer_prunes_alone():
    """An attention module called outside its model has no call end to wait for: it prunes with its own budget."""
    from transformers.cache_utils import DynamicCache

    model = tiny_model("llama", layers=2)
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(1, 60, 64)
    position_ids = torch.arange(60)[None]
    embeddings = model.model.rotary_emb(hidden, position_ids)
    cache = DynamicCache(config=model.config) if "config" in DynamicCache.__init__.__code__.co_varnames else DynamicCache()
    with torch.no_grad(), cspkv.patched(model, budget=0.25, min_prompt=8, layer_allocation="adaptive") as handle:
        attention(hidden, position_embeddings=embeddings, attention_mask=None, **{CACHE_KW: cache},
                  cache_position=torch.arange(60))
        assert handle.stats()["layers"][0]["kept_per_row"] == [15]


def test_compiled_model_allocates_as_the_eager_one():
    """Under torch.compile the layers' pruning runs after the compiled forward (`LayerPatch._later`), and the
    layer allocation's selection after that, at the same call's end: the eager model's budgets and tokens."""
    import torch._dynamo

    model = tiny_model("llama", layers=3)
    ids, mask = left_pad([prompt(60, seed=51)[0], prompt(44, seed=52)[0]])

    def greedy(m):
        with torch.no_grad():
            out = m(ids, attention_mask=mask, use_cache=True)
            cache, tokens, step_mask = returned_cache(out), [], mask
            for _ in range(4):
                tokens.append(out.logits[:, -1:].argmax(-1))
                step_mask = torch.cat([step_mask, torch.ones_like(tokens[-1])], dim=1)
                out = m(tokens[-1], attention_mask=step_mask, use_cache=True, **{CACHE_KW: cache})
        return torch.cat(tokens, 1), cache

    with cspkv.patched(model, budget=0.3, min_prompt=8, head_allocation="adaptive", layer_allocation="adaptive") as handle:
        with padded_layout():  # the layout compiled code stores (it decodes by concatenation), to compare with
            eager_tokens, eager_cache = greedy(model)
        eager_kept = _kept_per_head(handle)
        torch._dynamo.reset()
        try:
            tokens, cache = greedy(torch.compile(model, backend="eager"))
        finally:
            torch._dynamo.reset()
        assert _kept_per_head(handle) == eager_kept
    assert torch.equal(tokens, eager_tokens)
    for compiled, eager in zip(cache.layers, eager_cache.layers):
        assert torch.equal(compiled.kv_valid, eager.kv_valid)
