"""Per-family guarantees of cspkv.patch on tiny random-init models (CPU).

For Llama, Mistral, Qwen2, Qwen3 (QK-norm) and Phi3 (fused qkv):
budget=1.0 reproduces the unpatched model; remove() gives back a model whose
outputs are bitwise those of a never-patched twin; with budget < 1 every
pruned layer stores exactly the expected number of tokens and the stored
bytes drop; positions stay logical; a left-padded batch gives, row by row,
the tokens of each prompt run alone.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache

import cspkv
from cspkv.hf.cache import PrunedLayer
from patch_models import (
    CACHE_KW,
    FAMILIES,
    cache_bytes,
    cache_layer_lengths,
    generate,
    left_pad,
    prompt,
    returned_cache,
    tiny_model,
    twin,
)

ATTN = ("eager", "sdpa")


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_one_reproduces_unpatched(family, attn):
    model = tiny_model(family, attn=attn)
    ids = prompt(70, seed=1)
    reference = generate(model, ids, new=16)
    with cspkv.patched(model, budget=1.0, min_prompt=8) as handle:
        out = generate(model, ids, new=16)
        stats = handle.stats()
    assert stats["pruned_layers"] == 2 and all(s["kept"] == 70 for s in stats["layers"].values())
    assert torch.equal(out.sequences, reference.sequences)
    for got, want in zip(out.logits, reference.logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bitwise(family):
    model = tiny_model(family)
    never = twin(model)
    ids = prompt(60, seed=2)
    handle = cspkv.patch(model, budget=0.3, min_prompt=8)
    pruned = generate(model, ids, new=8)
    assert isinstance(returned_cache(pruned).layers[0], PrunedLayer)
    handle.remove()
    assert not hasattr(model, "_cspkv_handle")
    for name, module in model.named_modules():
        assert "_cspkv_layer" not in module.__dict__ and "forward" not in module.__dict__, name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, never(ids).logits)
    a, b = generate(model, ids, new=8), generate(never, ids, new=8)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_cache_has_expected_length_and_fewer_bytes(family):
    model = tiny_model(family)
    never = twin(model)
    L = 120
    ids = prompt(L, seed=3)
    with torch.no_grad():
        full = returned_cache(never(ids, use_cache=True))
        with cspkv.patched(model, budget=0.25, window=0.1, min_prompt=8) as handle:
            out = model(ids, use_cache=True)
            cache = returned_cache(out)
            assert cache_layer_lengths(cache) == [30, 30]  # round(0.25 * 120)
            assert cache.get_seq_length() == L
            assert cache_bytes(cache) * 4 == cache_bytes(full)
            stats = handle.stats()
            assert stats["kv_bytes_before"] == cache_bytes(full)
            assert stats["kv_bytes_after"] == cache_bytes(cache)
            # A decode step appends one stored slot and one logical position.
            nxt = out.logits[:, -1:].argmax(-1)
            model(nxt, **{CACHE_KW: cache}, use_cache=True)
            assert cache_layer_lengths(cache) == [31, 31]
            assert cache.get_seq_length() == L + 1
    # budget as an int count, recent capped at the budget
    with torch.no_grad(), cspkv.patched(model, budget=17, window=40, min_prompt=8):
        cache = returned_cache(model(ids, use_cache=True))
        assert cache_layer_lengths(cache) == [17, 17]


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_stay_logical(family):
    """The first decoded token sits at position L (prompt length), not C (stored length).

    The reference rebuilds a plain DynamicCache from the pruned layers' stored
    keys/values and runs the unpatched model on it with an explicit position
    id: position L must match the patched decode step, position C must not.
    """
    model = tiny_model(family)
    never = twin(model)
    L = 90
    ids = prompt(L, seed=4)
    with torch.no_grad(), cspkv.patched(model, budget=0.3, min_prompt=8):
        out = model(ids, use_cache=True)
        cache = returned_cache(out)
        C = cache.layers[0].keys.shape[-2]
        assert C == 27 and cache.get_seq_length() == L
        stored = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        nxt = out.logits[:, -1:].argmax(-1)
        patched_logits = model(nxt, **{CACHE_KW: cache}, use_cache=True).logits

    def rebuilt_logits(position):
        plain = DynamicCache()
        for i, (k, v) in enumerate(stored):
            plain.update(k, v, i)
        with torch.no_grad():
            return never(nxt, position_ids=torch.tensor([[position]]), **{CACHE_KW: plain}, use_cache=True).logits

    torch.testing.assert_close(patched_logits, rebuilt_logits(L), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(patched_logits, rebuilt_logits(C), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_each_prompt_alone(family, attn):
    model = tiny_model(family, attn=attn)
    prompts = [prompt(n, seed=10 + n)[0] for n in (64, 41, 90)]
    config = cspkv.CSPConfig(budget=0.3, window=0.15, min_prompt=8)
    ids, mask = left_pad(prompts)
    with cspkv.patched(model, config) as handle:
        batch = generate(model, ids, mask, new=10)
        kept = handle.stats()["layers"][0]["kept_per_row"]
        assert kept == [19, 12, 27]
        cache = returned_cache(batch)
        assert cache_layer_lengths(cache)[0] == 27 + 9
        for b, p in enumerate(prompts):
            alone = generate(model, p[None], new=10)
            assert batch.sequences[b, ids.shape[1]:].tolist() == alone.sequences[0, p.numel():].tolist(), f"row {b}"


_GPU_ATTN = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("attn", _GPU_ATTN)
def test_cuda_generate(attn):
    """On GPU: budget=1.0 reproduces the unpatched model; a pruned padded batch matches each row alone.

    flash_attention_2 needs half precision: there, logits agree to half-precision noise.
    """
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    model = tiny_model("qwen3", attn=attn).to("cuda", dtype)
    never = twin(model)
    ids = prompt(120, seed=21).cuda()
    reference = generate(never, ids, new=12)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        out = generate(model, ids, new=12)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.logits[0], reference.logits[0], **tol)
    if dtype == torch.float32:
        assert torch.equal(out.sequences, reference.sequences)
    prompts = [prompt(n, seed=30 + n)[0] for n in (100, 57, 128)]
    batch_ids, mask = left_pad(prompts)
    with cspkv.patched(model, budget=0.25, min_prompt=8) as handle:
        batch = generate(model, batch_ids.cuda(), mask.cuda(), new=8)
        assert handle.stats()["layers"][0]["device"].startswith("cuda")
        assert handle.stats()["layers"][0]["kept_per_row"] == [25, 14, 32]
        if dtype == torch.float32:
            for b, p in enumerate(prompts):
                alone = generate(model, p[None].cuda(), new=8)
                assert batch.sequences[b, batch_ids.shape[1]:].tolist() == alone.sequences[0, p.numel():].tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_overlapped_pruning_matches_pruning_in_line():
    """CSPConfig.overlap_pruning: pruning on a side stream gives the same tokens, logits and pruned
    caches as pruning on the layers' stream, for a padded GQA batch and a follow-up turn; the side
    stream is used only with the option, and the call leaves no pending join behind."""
    model = tiny_model("llama", layers=6).to("cuda")
    prompts = [prompt(n, seed=60 + n)[0] for n in (300, 211, 257)]
    ids, mask = (t.cuda() for t in left_pad(prompts))
    runs = {}
    for overlap in (False, True):
        with cspkv.patched(model, budget=0.3, min_prompt=8, overlap_pruning=overlap) as handle:
            out = generate(model, ids, mask, new=10)
            assert bool(handle._side_streams) == overlap
            cache = returned_cache(out)
            more = torch.cat([out.sequences, prompt(5, seed=9, batch=3).cuda()], dim=1)
            follow = generate(model, more, torch.cat([mask, torch.ones(3, 15, device="cuda", dtype=mask.dtype)], 1),
                              new=4, **{CACHE_KW: cache})
            runs[overlap] = (out, follow, [(l.keys.clone(), l.values.clone(), l.kv_valid.clone()) for l in cache.layers])
    (a, fa, ca), (b, fb, cb) = runs[False], runs[True]
    assert torch.equal(a.sequences, b.sequences) and torch.equal(fa.sequences, fb.sequences)
    for x, y in zip(a.logits + fa.logits, b.logits + fb.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for layer_a, layer_b in zip(ca, cb):
        for x, y in zip(layer_a, layer_b):
            assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_pruning_adds_no_host_sync_per_layer(padded):
    """Host-device synchronisations (counted by torch's CUDA sync debug mode): a decode step on
    a pruned cache makes no more than one on the full cache, and a pruned prefill at most one
    more than a full one (the prompt's ids and mask come to the host once per call), whatever
    the number of layers; also for a left-padded batch whose rows keep different budgets. The
    GPU runs behind the host; a sync per layer would make the host wait for it at every layer,
    adding the host's time to the GPU's."""
    model = tiny_model("llama", layers=4).to("cuda")
    if padded:
        ids, mask = (t.cuda() for t in left_pad([prompt(n, seed=5 + n)[0] for n in (120, 77, 101)]))
    else:
        ids, mask = prompt(120, seed=5).cuda(), None

    def syncs(budget):
        """(prefill syncs, syncs of 3 decode steps) as lists of warning texts."""
        cache = DynamicCache()
        handle = cspkv.patch(model, budget=budget, min_prompt=8) if budget is not None else None
        counted = []

        def counting(fn):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            counted.append([str(w.message) for w in caught if "synchroniz" in str(w.message).lower()])
            return out

        step_mask = [mask]  # the mask of the next step: one column longer per decoded token

        def step(tokens):
            if mask is not None and tokens.shape[1] == 1:
                step_mask[0] = torch.cat([step_mask[0], mask.new_ones(mask.shape[0], 1)], dim=1)
            return model(tokens, attention_mask=step_mask[0], **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)

        try:
            with torch.inference_mode():
                token = counting(lambda: step(ids))
                if handle is not None:
                    assert all(layer["pruned"] for layer in handle.stats()["layers"].values())
                torch.cuda.synchronize()

                def decode():
                    t = token
                    for _ in range(3):
                        t = step(t)
                    return t

                counting(decode)
        finally:
            if handle is not None:
                handle.remove()
        return counted

    syncs(None)  # warm-up: first calls may initialise CUDA libraries
    full_prefill, full_decode = syncs(None)
    pruned_prefill, pruned_decode = syncs(0.25)
    assert len(pruned_decode) <= len(full_decode), f"decode: pruned {pruned_decode}, full {full_decode}"
    assert len(pruned_prefill) <= len(full_prefill) + 1, f"prefill: pruned {pruned_prefill}, full {full_prefill}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_pruning_a_layer_launches_at_most_eight_kernels(monkeypatch):
    """The GPU kernels one layer's pruning launches for an unpadded prompt (torch.profiler, the
    second layer: the first also checks the call's mask once for all): the window scores (pass 2
    and the denominator's three elementwise kernels, or passes 1, 1b and 2), the two poolings, the
    selection and the compaction; no id conversions, no zeroing."""
    from torch.profiler import ProfilerActivity, profile

    layer_module = importlib.import_module("cspkv.hf.layer")
    prune_layer = layer_module.prune_layer
    kernels, calls = [], []

    def profiled(*args, **kwargs):
        calls.append(kwargs["layer"])
        if len(calls) != 2:
            return prune_layer(*args, **kwargs)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = prune_layer(*args, **kwargs)
            torch.cuda.synchronize()
        kernels.extend(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                       and not e.name.startswith(("Memcpy", "Memset")))
        return result

    monkeypatch.setattr(layer_module, "prune_layer", profiled)
    model = tiny_model("llama", layers=3).to("cuda")
    with torch.inference_mode(), cspkv.patched(model, budget=0.25, min_prompt=8):
        model(prompt(300, seed=3).cuda(), use_cache=True)
    assert len(calls) == 3 and 5 <= len(kernels) <= 8, kernels
