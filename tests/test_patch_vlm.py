"""Per-family guarantees of cspkv.patch for vision-language models (CPU, tiny random-init).

LLaVA 1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL (3-D mrope positions), Gemma 3
(sliding layers skipped, query_pre_attn_scalar scaling) and Idefics3/SmolVLM,
each on a prompt with two images: budget=1.0 reproduces the unpatched model
(eager and sdpa); under pruning every pruned layer stores exactly the budget,
skipped layers keep everything and say why, decode positions are those of
the unpruned model, and remove() gives back bitwise the unpatched outputs;
image placeholders get modality 1 (Qwen2-VL video: 2), so the cross ratio
changes what is kept when images are present and nothing when they are not.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import cspkv
import cspkv.hf.models
from cspkv.hf.cache import PrunedLayer
from cspkv.pruning.modality import IMAGE, TEXT, VIDEO
from patch_models import CACHE_KW, cache_bytes, generate, returned_cache
from vlm_models import (
    END_TOKEN,
    FAMILIES,
    IMAGE_TOKEN,
    START_TOKEN,
    VIDEO_TOKEN,
    _gemma3_text,
    prompt_inputs,
    prompt_length,
    tiny_vlm,
    type_ids,
)

NAMES = tuple(FAMILIES)
ATTN = ("eager", "sdpa")
# SmolVLM runs the same Llama text model as Idefics3: its eager run would repeat Idefics3's.
CASES = [(name, attn) for name in NAMES for attn in ATTN if (name, attn) != ("smolvlm", "eager")]
TEXT_LEN = 16  # text tokens per chunk: prompts of 80-96 tokens with two images
NEW = 12


def _split(inputs: dict):
    inputs = dict(inputs)
    return inputs.pop("input_ids"), inputs.pop("attention_mask"), inputs


def _generate(model, inputs, new=NEW):
    ids, mask, vision = _split(inputs)
    return generate(model, ids, mask, new=new, **vision)


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


def _assert_clean(model) -> None:
    assert not hasattr(model, "_cspkv_handle")
    for name, module in model.named_modules():
        assert "_cspkv_layer" not in module.__dict__ and "forward" not in module.__dict__, name


def _expected_modalities(input_ids: torch.Tensor) -> torch.Tensor:
    expected = torch.full_like(input_ids, TEXT)
    expected[input_ids == IMAGE_TOKEN] = IMAGE
    expected[input_ids == VIDEO_TOKEN] = VIDEO
    return expected


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
    pruned = 2 - len(FAMILIES[name].skipped)
    assert stats["pruned_layers"] == pruned
    assert all(s["kept"] == L for s in stats["layers"].values())
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, attn", CASES)
def test_pruned_generate(name, attn):
    """budget < 1: exact stored lengths, fewer bytes, logical positions; remove() restores bitwise."""
    model = tiny_vlm(name, attn=attn)
    inputs = prompt_inputs(name, images=2, seed=1, text=TEXT_LEN)
    L = inputs["input_ids"].shape[1]
    new = 16
    with Positions(model) as unpatched:
        reference = _generate(model, inputs, new=new)
    full = returned_cache(reference)
    if name.startswith("qwen"):
        assert bool((model.model.rope_deltas != 0).all())  # real 3-D positions, not the text-only fallback

    handle = cspkv.patch(model, budget=0.3, window=0.1, min_prompt=8)
    with Positions(model) as patched:
        out = _generate(model, inputs, new=new)
    stats = handle.stats()
    cache = returned_cache(out)
    kept = round(0.3 * L)
    skipped = FAMILIES[name].skipped
    assert set(handle.skipped) == set(skipped)
    assert all("sliding" in handle.skipped[i] for i in skipped)
    assert stats["skipped"] == handle.skipped
    for idx, layer in enumerate(cache.layers):
        if idx in skipped:
            assert not isinstance(layer, PrunedLayer) and layer.keys.shape[-2] == L + new - 1
            assert not stats["layers"].get(idx, {}).get("pruned")
        else:
            assert isinstance(layer, PrunedLayer) and layer.keys.shape[-2] == kept + new - 1, idx
            assert stats["layers"][idx]["kept"] == kept
    assert cache.get_seq_length() == L + new - 1
    assert stats["kv_bytes_after"] * L == stats["kv_bytes_before"] * kept
    assert cache_bytes(cache) < cache_bytes(full)
    # The cache reports the logical length, so every decode step sits where it would unpruned
    # (for Qwen2-VL: cache length + rope_deltas on all three mrope axes).
    assert len(patched.seen) == len(unpatched.seen)
    for got, want in zip(patched.seen, unpatched.seen):
        assert torch.equal(got, want)

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
        patched = {name for name, m in model.named_modules() if "_cspkv_layer" in m.__dict__}
        assert len(patched) == len(handle.layers) == text_layers - len(FAMILIES[name].skipped)
        assert not any("vision" in n or "visual" in n for n in patched), patched
    _assert_clean(model)


@pytest.mark.parametrize("name", NAMES)
def test_image_tokens_are_modality_one(name, monkeypatch):
    model = tiny_vlm(name)
    inputs = prompt_inputs(name, images=2, text=TEXT_LEN)
    ids = inputs["input_ids"]
    expected = _expected_modalities(ids)
    assert int((expected == IMAGE).sum()) == 2 * FAMILIES[name].tokens_per_image
    markers = torch.isin(ids, torch.tensor([START_TOKEN, END_TOKEN]))
    assert bool((expected[markers] == TEXT).all())

    adapter = cspkv.hf.models.adapter_for(model)
    assert torch.equal(adapter.modality_ids(model, ids, tuple(ids.shape), torch.device("cpu")), expected)

    seen = []
    score = cspkv.CSP.score

    def capture(self, inputs):
        seen.append(inputs.k_mod.clone())
        return score(self, inputs)

    monkeypatch.setattr(cspkv.CSP, "score", capture)
    with torch.no_grad(), cspkv.patched(model, budget=0.3, min_prompt=8) as handle:
        model(**inputs, use_cache=True)
    assert len(seen) == len(handle.layers)
    for k_mod in seen:
        assert torch.equal(k_mod.cpu(), expected)


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


@pytest.mark.parametrize("name", ("qwen2_vl", "qwen2_5_vl"))
def test_qwen_video_tokens_are_modality_two(name, monkeypatch):
    """An image and a 2-frame video: three modalities; budget=1.0 still reproduces the unpatched model."""
    model = tiny_vlm(name)
    image = prompt_inputs(name, images=1, seed=3, text=TEXT_LEN)
    g = torch.Generator().manual_seed(4)
    # grid (t, h, w) = (2, 8, 8) patches, merged 2x2 in space: 32 video tokens.
    video = [START_TOKEN] + [VIDEO_TOKEN] * 32 + [END_TOKEN] + torch.randint(3, 400, (TEXT_LEN,), generator=g).tolist()
    ids = torch.cat([image["input_ids"], torch.tensor([video])], dim=1)
    inputs = dict(
        image,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=torch.randn(2 * 64, 3 * 2 * 4 * 4, generator=g),
        video_grid_thw=torch.tensor([[2, 8, 8]]),
    )
    if FAMILIES[name].type_ids:
        inputs[FAMILIES[name].type_ids] = type_ids(ids)
    expected = _expected_modalities(ids)
    assert sorted(expected.unique().tolist()) == [TEXT, IMAGE, VIDEO]

    seen = []
    score = cspkv.CSP.score
    monkeypatch.setattr(cspkv.CSP, "score", lambda self, inputs: seen.append(inputs.k_mod.clone()) or score(self, inputs))
    reference = _generate(model, inputs, new=8)
    assert bool((model.model.rope_deltas != 0).all())  # real 3-D positions, not the text-only fallback
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        out = _generate(model, inputs, new=8)
    assert seen and all(torch.equal(k_mod.cpu(), expected) for k_mod in seen)
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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
