"""Per-family guarantees of cspkv.patch for vision-language models (CPU, tiny random-init).

LLaVA 1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and
MoE (3-D mrope positions; Qwen3-VL's interleaved, with deepstack), Gemma 3 and
Gemma 4 (sliding layers skipped; Gemma 4's KV sharing, scale 1.0), Idefics3 /
SmolVLM, InternVL and Mistral 3, each on prompts with images: budget=1.0
reproduces the unpatched model (eager and sdpa); under pruning every pruned
layer stores exactly the budget, skipped layers keep everything and say why,
`handle.stats()` reports it, decode positions are those of the unpruned model
(all three mrope axes where the family has them), and remove() gives back
bitwise the unpatched outputs; a left-padded batch gives each row's tokens
alone; sampling and beam search work; image placeholders get modality 1 and
video placeholders 2 (read by a spy on `cspkv.CSP.score`), so the cross ratio
changes what is kept when images are present and nothing when they are not.

A family whose model classes the installed transformers lacks (Gemma 4 under
4.57.x) is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import cspkv
import cspkv.hf.models
from cspkv.hf.cache import PrunedLayer
from cspkv.pruning.modality import IMAGE, TEXT, VIDEO
from patch_models import CACHE_KW, PAD, cache_bytes, generate, left_pad, returned_cache
from vlm_models import (
    AUDIO_TOKEN,
    END_TOKEN,
    FAMILIES,
    IMAGE_TOKEN,
    RECENT_FAMILIES,
    START_TOKEN,
    VIDEO_TOKEN,
    _gemma3_text,
    _gemma4_text,
    available,
    family_of,
    prompt_inputs,
    prompt_length,
    tiny_vlm,
    type_ids,
    video_inputs,
)

ATTN = ("eager", "sdpa")
TEXT_LEN = 16  # text tokens per chunk: prompts of 80-100 tokens with two images
NEW = 12
ALL_FAMILIES = {**FAMILIES, **RECENT_FAMILIES}
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "gemma4")
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
HAS_GEMMA4 = hasattr(transformers, "Gemma4ForCausalLM")
NO_GEMMA4 = f"transformers {transformers.__version__} has no Gemma 4"


def _param(name, *rest):
    family = family_of(name)
    reason = f"transformers {transformers.__version__} has no {family.model_cls}"
    return pytest.param(name, *rest, marks=pytest.mark.skipif(not available(name), reason=reason), id="-".join((name,) + rest))


NAMES = [_param(name) for name in ALL_FAMILIES]
# SmolVLM runs the same Llama text model as Idefics3: its eager run would repeat Idefics3's.
CASES = [_param(name, attn) for name in ALL_FAMILIES for attn in ATTN if (name, attn) != ("smolvlm", "eager")]


def _split(inputs: dict):
    inputs = dict(inputs)
    return inputs.pop("input_ids"), inputs.pop("attention_mask"), inputs


def _generate(model, inputs, new=NEW, **kwargs):
    ids, mask, vision = _split(inputs)
    return generate(model, ids, mask, new=new, **vision, **kwargs)


def _round(x: float) -> int:
    return int(x + 0.5)  # budgets round half up


class Positions:
    """Records the position ids every rotary embedding of the text model receives."""

    def __init__(self, model) -> None:
        decoder = cspkv.hf.models.adapter_for(model).decoder(model)
        rotaries = [m for name, m in decoder.named_children() if name.startswith("rotary_emb")]
        assert rotaries, f"no rotary embedding under {type(decoder).__name__}"
        self.seen = []
        self.hooks = [m.register_forward_pre_hook(self._record, with_kwargs=True) for m in rotaries]

    def _record(self, module, args, kwargs):
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        self.seen.append(position_ids.clone())

    def __enter__(self) -> "Positions":
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


class ModalitySpy:
    """Collects `inputs.k_mod` of every CSP.score call (one per pruned layer and prefill)."""

    def __init__(self, monkeypatch) -> None:
        self.seen = []
        score = cspkv.CSP.score

        def capture(policy, inputs):
            self.seen.append(inputs.k_mod.clone().cpu())
            return score(policy, inputs)

        monkeypatch.setattr(cspkv.CSP, "score", capture)


def _assert_clean(model) -> None:
    assert not hasattr(model, "_cspkv_handle")
    for name, module in model.named_modules():
        assert "_cspkv_layer" not in module.__dict__, name
    # Only the text attention modules: transformers 4.57 itself sets an instance forward on some
    # vision encoder layers (to record their outputs) during a forward.
    for idx, attn in cspkv.hf.models.adapter_for(model).attention_modules(model):
        assert "forward" not in attn.__dict__, idx


def _expected_modalities(input_ids: torch.Tensor) -> torch.Tensor:
    expected = torch.full_like(input_ids, TEXT)
    expected[input_ids == IMAGE_TOKEN] = IMAGE
    expected[input_ids == VIDEO_TOKEN] = VIDEO
    return expected


def _assert_same_run(out, reference) -> None:
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _batch(name: str, rows) -> dict:
    """Left-padded batch of batch-1 inputs: ids and mask padded, vision tensors concatenated in row order."""
    ids, mask = left_pad([r["input_ids"][0] for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask}
    family = family_of(name)
    for key in rows[0]:
        if key not in batch and key != family.type_ids:
            batch[key] = torch.cat([r[key] for r in rows], dim=0)
    if family.type_ids:
        batch[family.type_ids] = type_ids(ids)
    return batch


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("name, attn", CASES)
def test_budget_one_reproduces_unpatched(name, attn):
    model = tiny_vlm(name, attn=attn)
    inputs = prompt_inputs(name, images=2, text=TEXT_LEN)
    L = inputs["input_ids"].shape[1]
    assert L == prompt_length(name, images=2, text=TEXT_LEN)
    reference = _generate(model, inputs)
    with cspkv.patched(model, budget=1.0, min_prompt=8) as handle:
        out = _generate(model, inputs)
        stats = handle.stats()
    assert stats["pruned_layers"] == 2 - len(family_of(name).skipped)
    assert all(s["kept"] == L for s in stats["layers"].values() if s.get("pruned"))
    _assert_same_run(out, reference)


@pytest.mark.parametrize("name", NAMES)
def test_pruned_generate(name):
    """budget < 1: exact stored lengths, fewer bytes, stats, logical positions; remove() restores bitwise."""
    model = tiny_vlm(name)
    inputs = prompt_inputs(name, images=2, seed=1, text=TEXT_LEN)
    L = inputs["input_ids"].shape[1]
    new = 16
    with Positions(model) as unpatched:
        reference = _generate(model, inputs, new=new)
    full = returned_cache(reference)
    if name in MROPE:
        assert bool((model.model.rope_deltas != 0).all())  # real 3-D positions, not the text-only fallback

    handle = cspkv.patch(model, budget=0.3, window=0.1, min_prompt=8)
    with Positions(model) as patched:
        out = _generate(model, inputs, new=new)
    stats = handle.stats()
    cache = returned_cache(out)
    kept = _round(0.3 * L)
    skipped = family_of(name).skipped
    assert set(handle.skipped) == set(skipped)
    assert all("sliding" in handle.skipped[i] for i in skipped)
    assert stats["skipped"] == handle.skipped
    assert stats["pruned_layers"] == 2 - len(skipped)
    for idx, layer in enumerate(cache.layers):
        if idx in skipped:
            assert not isinstance(layer, PrunedLayer) and layer.keys.shape[-2] == L + new - 1
            assert not stats["layers"].get(idx, {}).get("pruned")
        else:
            assert isinstance(layer, PrunedLayer) and layer.keys.shape[-2] == kept + new - 1, idx
            assert stats["layers"][idx]["pruned"] and stats["layers"][idx]["kept"] == kept
            assert stats["layers"][idx]["prompt_len"] == L
    assert cache.get_seq_length() == L + new - 1
    assert stats["kv_bytes_after"] * L == stats["kv_bytes_before"] * kept
    assert cache_bytes(cache) < cache_bytes(full)
    # The cache reports the logical length, so every decode step sits where it would unpruned
    # (for Qwen3-VL: cache length + rope_deltas on all three mrope axes).
    assert len(patched.seen) == len(unpatched.seen)
    for got, want in zip(patched.seen, unpatched.seen):
        assert torch.equal(got, want)
    if name in MROPE:
        prompt_positions = unpatched.seen[0]
        assert prompt_positions.shape == (3, 1, L)  # temporal, height, width
        assert not torch.equal(prompt_positions[1], prompt_positions[2])  # images spread over height and width
        step = unpatched.seen[1]
        assert torch.equal(step, torch.full_like(step, L + int(model.model.rope_deltas)))

    handle.remove()
    _assert_clean(model)
    again = _generate(model, inputs, new=new)
    assert torch.equal(again.sequences, reference.sequences)
    for x, y in zip(again.logits, reference.logits):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_only_the_language_model_is_patched(name):
    model = tiny_vlm(name)
    adapter = cspkv.hf.models.adapter_for(model)
    assert adapter.tested and adapter.name != "generic decoder layout"
    assert model.config.model_type in adapter.model_types
    decoder = adapter.decoder(model)
    text_layers = cspkv.hf.models.text_config(model).num_hidden_layers
    modules = adapter.attention_modules(model)
    assert [idx for idx, _ in modules] == list(range(text_layers))
    owned = {id(m) for m in decoder.modules()}
    assert all(id(attn) in owned for _, attn in modules)
    # The bare *Model (no LM head) has its own layout path.
    bare = model.model
    assert [attn for _, attn in cspkv.hf.models.adapter_for(bare).attention_modules(bare)] == [attn for _, attn in modules]
    with cspkv.patched(model, budget=0.3) as handle:
        patched = {n for n, m in model.named_modules() if "_cspkv_layer" in m.__dict__}
        assert len(patched) == len(handle.layers) == text_layers - len(family_of(name).skipped)
        assert not any("vision" in n or "visual" in n for n in patched), patched
    _assert_clean(model)


@pytest.mark.parametrize("name", NAMES)
def test_image_tokens_are_modality_one(name, monkeypatch):
    model = tiny_vlm(name)
    inputs = prompt_inputs(name, images=2, text=TEXT_LEN)
    ids = inputs["input_ids"]
    expected = _expected_modalities(ids)
    assert int((expected == IMAGE).sum()) == 2 * family_of(name).tokens_per_image
    markers = torch.isin(ids, torch.tensor([START_TOKEN, END_TOKEN]))
    assert bool((expected[markers] == TEXT).all())

    adapter = cspkv.hf.models.adapter_for(model)
    assert torch.equal(adapter.modality_ids(model, ids, tuple(ids.shape), torch.device("cpu")), expected)

    spy = ModalitySpy(monkeypatch)
    with torch.no_grad(), cspkv.patched(model, budget=0.3, min_prompt=8) as handle:
        model(**inputs, use_cache=True)
    assert len(spy.seen) == len(handle.layers) > 0
    for k_mod in spy.seen:
        assert torch.equal(k_mod, expected)


@pytest.mark.parametrize("name", [p for p in NAMES if p.values[0] in VIDEO_FAMILIES])
def test_video_tokens_are_modality_two(name, monkeypatch):
    """An image and a video: three modalities; budget=1.0 still reproduces the unpatched model."""
    model = tiny_vlm(name)
    inputs = video_inputs(name, seed=3, text=TEXT_LEN)
    expected = _expected_modalities(inputs["input_ids"])
    assert sorted(expected.unique().tolist()) == [TEXT, IMAGE, VIDEO]
    reference = _generate(model, inputs, new=8)
    if name in MROPE:
        assert bool((model.model.rope_deltas != 0).all())
    spy = ModalitySpy(monkeypatch)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        out = _generate(model, inputs, new=8)
    assert spy.seen and all(torch.equal(k_mod, expected) for k_mod in spy.seen)
    _assert_same_run(out, reference)
    with cspkv.patched(model, budget=0.3, min_prompt=8) as handle:
        out = _generate(model, inputs, new=8)
        assert handle.stats()["pruned_layers"] == 2 - len(family_of(name).skipped)
    assert out.sequences.shape == reference.sequences.shape


@pytest.mark.parametrize("name", NAMES)
def test_cross_ratio_changes_kept_tokens_only_with_images(name):
    model = tiny_vlm(name)

    def stored_keys(inputs, cross_ratio):
        with torch.no_grad(), cspkv.patched(model, budget=0.3, cross_ratio=cross_ratio, min_prompt=8):
            cache = returned_cache(model(**inputs, use_cache=True))
            return [layer.keys for layer in cache.layers if isinstance(layer, PrunedLayer)]

    with_images = prompt_inputs(name, images=2, seed=2, text=TEXT_LEN)
    only_cross, only_self = stored_keys(with_images, 1.0), stored_keys(with_images, 0.0)
    assert only_cross and len(only_cross) == len(only_self)
    assert any(not torch.equal(a, b) for a, b in zip(only_cross, only_self))

    # One modality: no cross attention to rank, so the ratio is ignored.
    text_only = prompt_inputs(name, images=0, seed=2, text=3 * TEXT_LEN)
    for a, b in zip(stored_keys(text_only, 1.0), stored_keys(text_only, 0.0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_each_prompt_alone(name, monkeypatch):
    model = tiny_vlm(name)
    rows = [
        prompt_inputs(name, images=2, seed=10, text=TEXT_LEN),
        prompt_inputs(name, images=2, seed=11, text=10),  # Idefics3 batches pixel_values per row: same image count
        prompt_inputs(name, images=2, seed=12, text=TEXT_LEN + 4),
    ]
    lengths = [r["input_ids"].shape[1] for r in rows]
    batch = _batch(name, rows)
    spy = ModalitySpy(monkeypatch)
    config = cspkv.CSPConfig(budget=0.3, window=0.15, min_prompt=8)
    with cspkv.patched(model, config) as handle:
        out = _generate(model, batch, new=10)
        stats = handle.stats()
        pruned = [i for i, s in stats["layers"].items() if s.get("pruned")]
        assert pruned and all(stats["layers"][i]["kept_per_row"] == [_round(0.3 * n) for n in lengths] for i in pruned)
        cache = returned_cache(out)
        for i in pruned:
            assert cache.layers[i].stored_len == max(_round(0.3 * n) for n in lengths) + 9  # the longest row (packed)
        expected = _expected_modalities(batch["input_ids"]).masked_fill(batch["attention_mask"] == 0, -1)
        assert spy.seen and torch.equal(spy.seen[0], expected)
        width = batch["input_ids"].shape[1]
        for b, row in enumerate(rows):
            alone = _generate(model, row, new=10)
            assert out.sequences[b, width:].tolist() == alone.sequences[0, lengths[b]:].tolist(), f"row {b}"


@pytest.mark.parametrize("name", NAMES)
def test_sampling_and_beam_search(name):
    model = tiny_vlm(name)
    inputs = prompt_inputs(name, images=1, seed=5, text=TEXT_LEN)
    L = inputs["input_ids"].shape[1]
    sample = dict(do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(123)
    reference = _generate(model, inputs, new=8, **sample)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        torch.manual_seed(123)
        assert torch.equal(_generate(model, inputs, new=8, **sample).sequences, reference.sequences)
    with cspkv.patched(model, budget=0.3, min_prompt=8):
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(_generate(model, inputs, new=8, **sample).sequences)
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, L + 8)

    beams = dict(num_beams=3, num_return_sequences=2)
    reference = _generate(model, inputs, new=6, **beams)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        assert torch.equal(_generate(model, inputs, new=6, **beams).sequences, reference.sequences)
    with cspkv.patched(model, budget=0.4, min_prompt=8) as handle:
        out = _generate(model, inputs, new=6, **beams)
        assert handle.stats()["pruned_layers"] == 2 - len(family_of(name).skipped)
    assert out.sequences.shape == (2, L + 6)


# ----------------------------------------------------------------------------- Gemma 3 specifics


def test_gemma3_text_only_model(monkeypatch):
    """Gemma3ForCausalLM (`gemma3_text`): same adapter, sliding layer skipped, global layer pruned,
    scored with the module's query_pre_attn_scalar ** -0.5 scale."""
    config = _gemma3_text()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    ids = torch.randint(3, 400, (1, 64), generator=torch.Generator().manual_seed(5))
    reference = generate(model, ids, new=8)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        assert torch.equal(generate(model, ids, new=8).sequences, reference.sequences)
    scales = []
    score = cspkv.CSP.score
    monkeypatch.setattr(cspkv.CSP, "score", lambda self, inputs: scales.append(inputs.scale) or score(self, inputs))
    with torch.no_grad(), cspkv.patched(model, budget=0.25, min_prompt=8) as handle:
        assert cspkv.hf.models.adapter_for(model).name == "Gemma 3"
        assert list(handle.skipped) == [0] and list(handle.layers) == [1]
        out = model(ids, use_cache=True)
        cache = returned_cache(out)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [64, 16]
        model(out.logits[:, -1:].argmax(-1), **{CACHE_KW: cache}, use_cache=True)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [65, 17]
        assert cache.get_seq_length() == 65
    assert scales == [24 ** -0.5] and model.model.layers[1].self_attn.scaling == 24 ** -0.5


# ----------------------------------------------------------------------------- Gemma 4 specifics


def _gemma4_text_model(**overrides):
    config = _gemma4_text(**overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.skipif(not HAS_GEMMA4, reason=NO_GEMMA4)
def test_gemma4_kv_sharing_layers_are_skipped(monkeypatch):
    """Gemma4ForCausalLM (`gemma4_text`) with shared KV: the consumers ("reuse") and the global producer
    ("store") are left alone, the other global layer is pruned and scored with the module's scale 1.0."""
    kinds = ["sliding_attention", "full_attention", "full_attention", "sliding_attention", "full_attention"]
    model = _gemma4_text_model(num_hidden_layers=5, layer_types=kinds, num_kv_shared_layers=2)
    assert model.config.kv_sharing_modes == ["store", None, "store", "reuse", "reuse"]
    ids = torch.randint(3, 400, (1, 64), generator=torch.Generator().manual_seed(5))
    reference = generate(model, ids, new=8)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        _assert_same_run(generate(model, ids, new=8), reference)

    scales = []
    score = cspkv.CSP.score
    monkeypatch.setattr(cspkv.CSP, "score", lambda self, inputs: scales.append(inputs.scale) or score(self, inputs))
    with torch.no_grad(), cspkv.patched(model, budget=0.25, min_prompt=8) as handle:
        assert cspkv.hf.models.adapter_for(model).name == "Gemma 4"
        assert list(handle.layers) == [1]
        assert sorted(handle.skipped) == [0, 2, 3, 4]
        assert all("sliding" in handle.skipped[i] for i in (0, 3))
        assert "shared with later layers" in handle.skipped[2] and "no cache of its own" in handle.skipped[4]
        out = model(ids, use_cache=True)
        cache = returned_cache(out)
        assert cache.layers[1].keys.shape[-2] == 16 and isinstance(cache.layers[1], PrunedLayer)
        assert cache.layers[0].keys.shape[-2] == cache.layers[2].keys.shape[-2] == 64
        model(out.logits[:, -1:].argmax(-1), **{CACHE_KW: cache}, use_cache=True)
        assert cache.layers[1].keys.shape[-2] == 17 and cache.get_seq_length() == 65
        stats = handle.stats()
        assert stats["pruned_layers"] == 1 and stats["layers"][1]["kept"] == 16
    assert scales == [1.0] and model.model.layers[1].self_attn.scaling == 1.0
    with cspkv.patched(model, budget=0.25, min_prompt=8):
        assert generate(model, ids, new=8).sequences.shape == (1, 72)


@pytest.mark.skipif(not HAS_GEMMA4, reason=NO_GEMMA4)
def test_gemma4_without_shared_layers_prunes_the_store_layer():
    """With num_kv_shared_layers=0 the last layer of each kind is still marked "store" (for assistant
    models); nothing reuses it, so the global one is pruned. Here the global layer also has its own
    shape, as in the large Gemma 4 models: head size 32, one KV head, values = keys (attention_k_eq_v)."""
    model = _gemma4_text_model(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True)
    assert model.config.kv_sharing_modes == ["store", "store"]
    assert model.model.layers[1].self_attn.v_proj is None
    ids = torch.randint(3, 400, (1, 64), generator=torch.Generator().manual_seed(6))
    reference = generate(model, ids, new=8)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        _assert_same_run(generate(model, ids, new=8), reference)
    with cspkv.patched(model, budget=0.25, min_prompt=8) as handle:
        assert list(handle.layers) == [1] and list(handle.skipped) == [0]
        cache = returned_cache(generate(model, ids, new=8))
        assert cache.layers[1].keys.shape == (1, 1, 16 + 7, 32) and cache.layers[0].keys.shape == (1, 2, 64 + 7, 16)
        assert cache.get_seq_length() == 64 + 7 and handle.stats()["layers"][1]["kept"] == 16


@pytest.mark.skipif(not HAS_GEMMA4, reason=NO_GEMMA4)
def test_gemma4_bidirectional_all_is_not_pruned():
    model = _gemma4_text_model(use_bidirectional_attention="all")
    with pytest.warns(UserWarning, match="no layer"):
        handle = cspkv.patch(model, budget=0.25)
    assert not handle.layers and all("bidirectional" in why for why in handle.skipped.values())
    handle.remove()


@pytest.mark.skipif(not HAS_GEMMA4, reason=NO_GEMMA4)
def test_gemma4_audio_tokens_are_modality_three():
    model = tiny_vlm("gemma4")
    ids = torch.tensor([[5, IMAGE_TOKEN, 6, VIDEO_TOKEN, AUDIO_TOKEN, AUDIO_TOKEN, 7]])
    adapter = cspkv.hf.models.adapter_for(model)
    got = adapter.modality_ids(model, ids, tuple(ids.shape), torch.device("cpu"))
    assert got.tolist() == [[TEXT, IMAGE, TEXT, VIDEO, 3, 3, TEXT]]
