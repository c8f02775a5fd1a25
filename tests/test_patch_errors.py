"""Bad input and faults: config validation, modality ids, short prompts, models
cspkv cannot patch, unsupported caches, exceptions inside a patched forward.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicLayer, StaticCache

import cspkv
from cspkv.hf.cache import PrunedLayer
from patch_models import CACHE_KW, FAMILIES, cache_layer_lengths, generate, prompt, returned_cache, tiny_model, twin


# --------------------------------------------------------------------------- CSPConfig

# Fields of the default policy (cspkv.CSP) given to CSPConfig as shorthand: their errors name the policy class.
OWNER = {"cross_ratio": "CSP", "n": "CSP", "pool": "CSP"}


@pytest.mark.parametrize(
    "field, value",
    [
        ("budget", 0.0), ("budget", 1.5), ("budget", 0), ("budget", -3), ("budget", math.nan),
        ("window", 0.0), ("window", 2.0), ("window", 0),
        ("recent", -1), ("recent", 1.01),
        ("cross_ratio", 1.5), ("cross_ratio", -0.1), ("cross_ratio", "sometimes"),
        ("n", -1.0), ("decode_n", math.inf),
        ("min_prompt", 0),
        ("layers", [-1]), ("layers", [1, 1]),
        ("pool", 0), ("pool", 4), ("pool", -1),
    ],
)
def test_config_out_of_range_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"{OWNER.get(field, 'CSPConfig')}.{field} "):
        cspkv.CSPConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("budget", "20%"), ("budget", True), ("cross_ratio", None), ("min_prompt", 2.5), ("layers", 3),
                                          ("pool", 15.0), ("pool", True), ("pool", None), ("prefill_lse", 1),
                                          ("overlap_pruning", "yes")])
def test_config_wrong_type_names_the_field(field, value):
    with pytest.raises(TypeError, match=f"{OWNER.get(field, 'CSPConfig')}.{field} "):
        cspkv.CSPConfig(**{field: value})


def test_config_defaults_and_overrides():
    config = cspkv.CSPConfig()
    assert (config.budget, config.window, config.recent, config.policy.cross_ratio, config.policy.n, config.decode_n) == (0.2, None, None, 0.9, 1.0, 0.0)
    assert config.policy == cspkv.CSP() and config.policy.pool == 15
    assert config.prefill_lse is True and config.overlap_pruning is False
    assert config.replace(layers=[3, 1]).layers == (1, 3)
    with pytest.raises(TypeError, match="no field 'budjet'"):
        config.replace(budjet=0.3)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="CSPConfig.budget"):
        cspkv.patch(model, budget=2.0)
    with pytest.raises(TypeError, match="no field"):
        cspkv.patch(model, budjet=0.3)
    with pytest.raises(ValueError, match=r"CSPConfig.layers names layers \[5\]"):
        cspkv.patch(model, layers=[5])
    with pytest.raises(TypeError, match="CSPConfig has no field 'pool', and policy StreamingLLM has no field 'pool'"):
        cspkv.patch(model, policy="streaming", pool=15)
    assert not hasattr(model, "_cspkv_handle")


# --------------------------------------------------------------------------- modality ids


def test_modality_ids_validation():
    model = tiny_model("llama")
    ids = prompt(40, seed=1)
    with cspkv.patched(model, budget=0.5, min_prompt=8):
        with pytest.raises(TypeError, match="integer dtype"):
            with cspkv.modalities(model, torch.zeros(1, 40)):
                pass
        with pytest.raises(TypeError, match="torch.Tensor"):
            with cspkv.modalities(model, [[0] * 40]):
                pass
        with pytest.raises(ValueError, match=r"shape \[B, L\] \(rank 2\)"):
            with cspkv.modalities(model, torch.zeros(40, dtype=torch.long)):
                pass
        with pytest.raises(ValueError, match=">= 0"):
            with cspkv.modalities(model, torch.full((1, 40), -2)):
                pass
        # Wrong shape for the prompt: refused before any work, the model stays usable.
        with torch.no_grad():
            with cspkv.modalities(model, torch.zeros(1, 39, dtype=torch.long)):
                cache = transformers.DynamicCache()
                with pytest.raises(ValueError, match=r"\[B, L\] = \[1, 40\], got \[1, 39\]"):
                    model(ids, **{CACHE_KW: cache}, use_cache=True)
                assert cache.get_seq_length() == 0
            cache = returned_cache(model(ids, use_cache=True))
        assert cache_layer_lengths(cache) == [20, 20]
    with pytest.raises(ValueError, match="not patched"):
        with cspkv.modalities(model, torch.zeros(1, 40, dtype=torch.long)):
            pass


def test_short_prompt_is_not_pruned_and_logged(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.DEBUG, logger="cspkv"), torch.no_grad():
        with cspkv.patched(model, budget=0.2, min_prompt=32) as handle:
            cache = returned_cache(model(prompt(31, seed=2), use_cache=True))
            stats = handle.stats()
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, DynamicLayer]
    assert cache_layer_lengths(cache) == [31, 31]
    assert stats["pruned_layers"] == 0 and "min_prompt=32" in stats["layers"][0]["reason"]
    records = [r for r in caplog.records if r.name == "cspkv" and r.levelno == logging.DEBUG]
    assert any("shorter than min_prompt=32" in r.getMessage() for r in records)


# --------------------------------------------------------------------------- models cspkv cannot patch


def test_not_a_model():
    with pytest.raises(TypeError, match="expected a transformers model"):
        cspkv.patch(nn.Linear(4, 4))


def test_model_without_attention_modules():
    model = tiny_model("llama", layers=0)
    with pytest.raises(ValueError, match="no decoder attention modules"):
        cspkv.patch(model)
    assert not hasattr(model, "_cspkv_handle")


def test_unsupported_family_lists_the_supported_ones():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'") as info:
        cspkv.patch(model)
    for family in FAMILIES:
        assert family in str(info.value)
    assert not hasattr(model, "_cspkv_handle")


def test_generic_layout_works_with_an_untested_warning():
    config = transformers.OlmoConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=512, initializer_range=0.2, pad_token_id=0, eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.OlmoForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    never = twin(model)
    ids = prompt(50, seed=3)
    with pytest.warns(UserWarning, match="'olmo'.*untested"):
        handle = cspkv.patch(model, budget=1.0, min_prompt=8)
    assert not handle.adapter.tested
    assert torch.equal(generate(model, ids, new=8).sequences, generate(never, ids, new=8).sequences)
    handle.remove()


def test_unsupported_attention_kwargs_raise_clearly():
    """Gemma2 (untested, generic layout) soft-caps its attention logits: the CSP ops cannot, so it says so."""
    config = transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, max_position_embeddings=512, sliding_window=16, pad_token_id=0,
        attn_logit_softcapping=50.0,
    )
    config._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="untested"):
        handle = cspkv.patch(model, min_prompt=8)
    assert set(handle.layers) == {1} and "sliding" in handle.skipped[0]
    with torch.no_grad(), pytest.raises(NotImplementedError, match="softcap"):
        model(prompt(40, seed=4), use_cache=True)
    handle.remove()


# --------------------------------------------------------------------------- caches


def test_static_cache_is_refused_before_any_work():
    model = tiny_model("llama")
    ids = prompt(40, seed=5)
    with cspkv.patched(model, min_prompt=8), torch.no_grad():
        static = StaticCache(config=model.config, max_cache_len=64)
        with pytest.raises(TypeError, match="unsupported cache type StaticCache"):
            model(ids, **{CACHE_KW: static}, use_cache=True)
        assert static.get_seq_length() == 0
        with pytest.raises(TypeError, match="StaticCache"):
            generate(model, ids, new=4, cache_implementation="static")
        with pytest.raises(TypeError, match="unsupported cache type tuple"):
            model(ids, **{CACHE_KW: ((torch.zeros(1), torch.zeros(1)),)}, use_cache=True)
        assert cache_layer_lengths(returned_cache(model(ids, use_cache=True))) == [8, 8]


def test_pruned_cache_cannot_be_continued_after_unpatch():
    model = tiny_model("llama")
    ids = prompt(40, seed=6)
    with torch.no_grad():
        with cspkv.patched(model, budget=0.5, min_prompt=8):
            cache = returned_cache(model(ids, use_cache=True))
        assert isinstance(cache.layers[0], PrunedLayer)
        with pytest.raises(RuntimeError, match="unpatched"):
            model(ids[:, :1], **{CACHE_KW: cache}, use_cache=True)


# --------------------------------------------------------------------------- faults and patch state


def test_exception_inside_patched_forward_leaves_model_usable(monkeypatch):
    model = tiny_model("llama")
    never = twin(model)
    ids = prompt(50, seed=7)
    handle = cspkv.patch(model, budget=0.4, min_prompt=8)
    with torch.no_grad():
        expected = returned_cache(model(ids, use_cache=True))

        def boom(self, inputs):
            raise RuntimeError("injected scoring failure")

        monkeypatch.setattr(cspkv.CSP, "score", boom)
        with pytest.raises(RuntimeError, match="injected"):
            model(ids, use_cache=True)
        assert handle._call is None
        assert all(p.cache is None for p in handle.layers.values())
        monkeypatch.undo()
        again = returned_cache(model(ids, use_cache=True))
    for a, b in zip(expected.layers, again.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.kv_valid, b.kv_valid)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, never(ids).logits)


def test_patching_twice():
    model = tiny_model("llama")
    handle = cspkv.patch(model, budget=0.3)
    assert cspkv.patch(model, cspkv.CSPConfig(budget=0.3)) is handle
    with pytest.raises(RuntimeError, match="already patched"):
        cspkv.patch(model, budget=0.5)
    with cspkv.patched(model, budget=0.3) as inner:
        assert inner is handle
    assert model._cspkv_handle is handle  # the outer patch survives the inner context
    assert cspkv.unpatch(model) is True
    assert cspkv.unpatch(model) is False
    handle.remove()  # idempotent
