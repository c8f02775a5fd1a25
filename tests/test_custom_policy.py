"""A user's own policy: a `cspkv.Policy` subclass runs on the same plans, selection, cache and
kernels as the built-in ones, by instance or, registered, by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import cspkv
from cspkv import Policy, ScoreInputs, Scores
from cspkv.pruning.policies import base as policy_registry

from patch_models import generate, prompt, returned_cache, tiny_model


@dataclass(frozen=True)
class Oldest(Policy):
    """Keeps the oldest tokens: the ranking falls with the position (the recent window aside)."""

    name = "oldest-test"
    tilt: float = 1.0

    def score(self, inputs: ScoreInputs) -> Scores:
        B, Hkv, L = inputs.keys.shape[0], inputs.keys.shape[1], inputs.keys.shape[2]
        ranking = -self.tilt * torch.arange(L, dtype=torch.float32, device=inputs.keys.device)
        return Scores(ranking.expand(B, Hkv, L).contiguous())


@pytest.fixture
def registered_oldest(monkeypatch):
    monkeypatch.setattr(policy_registry, "_REGISTRY", dict(policy_registry._REGISTRY))
    return cspkv.register_policy(Oldest)


def _prefill_cache(model, ids):
    with torch.no_grad():
        return returned_cache(model(input_ids=ids, use_cache=True))


def test_custom_policy_keeps_what_its_scores_rank_first():
    model, ids = tiny_model(), prompt(64, seed=3)
    full = _prefill_cache(model, ids)
    with cspkv.patched(model, budget=16, recent=0, policy=Oldest()) as handle:
        pruned = _prefill_cache(model, ids)
        stats = handle.stats()
    assert stats["pruned_layers"] == 2 and all("scoring" not in s for s in stats["layers"].values())
    for full_layer, layer in zip(full.layers, pruned.layers):
        assert isinstance(layer, cspkv.hf.cache.PrunedLayer) and layer.get_seq_length() == 64
        torch.testing.assert_close(layer.keys, full_layer.keys[:, :, :16], rtol=0, atol=0)
        torch.testing.assert_close(layer.values, full_layer.values[:, :, :16], rtol=0, atol=0)


def test_registered_policy_by_name_and_its_fields_as_shorthand(registered_oldest):
    assert "oldest-test" in cspkv.registered_policies()
    config = cspkv.CSPConfig(policy="oldest-test", tilt=2.0)
    assert config.policy == Oldest(tilt=2.0)
    model, ids = tiny_model(), prompt(48, seed=4)
    with cspkv.patched(model, budget=12, recent=0, policy=Oldest()):
        by_instance = generate(model, ids, new=6)
    with cspkv.patched(model, budget=12, recent=0, policy="oldest-test"):
        by_name = generate(model, ids, new=6)
    assert torch.equal(by_instance.sequences, by_name.sequences)
    with pytest.raises(TypeError, match="policy Oldest has no field 'pool'"):
        cspkv.CSPConfig(policy="oldest-test", pool=3)


def test_custom_policy_at_full_budget_is_the_unpatched_model():
    model, ids = tiny_model(), prompt(40, seed=5)
    reference = generate(model, ids, new=8)
    with cspkv.patched(model, budget=1.0, policy=Oldest()):
        out = generate(model, ids, new=8)
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_policy_contract_errors_name_what_is_wrong(registered_oldest):
    @dataclass(frozen=True)
    class NoScore(Policy):
        name = "no-score-test"

    model, ids = tiny_model(), prompt(40, seed=6)
    with cspkv.patched(model, budget=8, policy=NoScore()):
        with pytest.raises(NotImplementedError, match="NoScore must implement score"):
            _prefill_cache(model, ids)
    with pytest.raises(ValueError, match="the name 'oldest-test' is taken"):
        cspkv.register_policy(dataclass(frozen=True)(type("Other", (Policy,), {"name": "oldest-test"})))
    with pytest.raises(TypeError, match="expected a subclass of cspkv.Policy"):
        cspkv.register_policy(object)
    with pytest.raises(ValueError, match="CSPConfig.policy must be one of"):
        cspkv.CSPConfig(policy="no-such-policy")
    with pytest.raises(TypeError, match="CSPConfig.policy must be a policy name or a cspkv.Policy instance"):
        cspkv.CSPConfig(policy=3)


def test_a_policy_that_does_not_use_the_prefill_lse_never_gets_it(monkeypatch):
    seen = []

    @dataclass(frozen=True)
    class Spy(Oldest):
        def score(self, inputs):
            seen.append(inputs.lse)
            return super().score(inputs)

    model, ids = tiny_model(), prompt(48, seed=7)
    with cspkv.patched(model, budget=12, policy=Spy()):
        _prefill_cache(model, ids)
    assert seen == [None, None]
