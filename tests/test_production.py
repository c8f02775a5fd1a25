"""A patched model in production code: interrupts, threads, copies, speculative decoding,
4-D masks, beam expansion of modality ids, training mode. Each case is compared with what
the unpatched model or a fresh solo run gives (tiny random-init Llama, CPU)."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import threading

import pytest
import torch

import cspkv
from cspkv.hf.cache import _CROP_TAKES_REMOVAL, PrunedLayer
from patch_models import CACHE_KW, generate, left_pad, prompt, returned_cache, tiny_model, twin


def _assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _interrupt_in_layer(model, index: int):
    def raise_interrupt(module, args):
        raise KeyboardInterrupt

    return model.model.layers[index].register_forward_pre_hook(raise_interrupt)


# --------------------------------------------------------------------------- 1. interrupts


@pytest.mark.parametrize("direct", [False, True], ids=["model", "text model"])
def test_the_call_after_an_interrupt_behaves_like_a_fresh_one(direct):
    """KeyboardInterrupt skips torch's always-call hooks; the next call must not reuse the
    interrupted call's ids and mask (another length failed, a same-shape padded batch kept its padding)."""
    model, fresh = tiny_model(), tiny_model()
    handle = cspkv.patch(model, budget=0.3, min_prompt=8)
    fresh_handle = cspkv.patch(fresh, budget=0.3, min_prompt=8)
    ids, mask = left_pad([prompt(40, seed=1)[0], prompt(40, seed=2)[0]])
    hook = _interrupt_in_layer(model, 1)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        (model.model if direct else model)(ids, attention_mask=mask, use_cache=True)
    hook.remove()

    for ids, mask in (left_pad([prompt(40, seed=3)[0], prompt(20, seed=4)[0]]),  # same shape, padding now
                      left_pad([prompt(56, seed=5)[0], prompt(33, seed=6)[0]])):  # another length
        _assert_same_generation(generate(model, ids, mask, new=6), generate(fresh, ids, mask, new=6))
        assert handle.stats()["layers"][0]["kept_per_row"] == fresh_handle.stats()["layers"][0]["kept_per_row"]


# --------------------------------------------------------------------------- 2. threads


def _mixed_requests(count: int):
    """(input_ids, attention_mask, modality ids or None) of mixed lengths, some padded, some with ids."""
    requests = []
    for i in range(count):
        lengths = [24 + 8 * (i % 6)] + ([17 + 5 * (i % 4)] if i % 3 == 0 else [])
        ids, mask = left_pad([prompt(n, seed=100 + i + j)[0] for j, n in enumerate(lengths)])
        segments = (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand(ids.shape[0], -1)
        requests.append((ids, mask, segments if i % 2 else None))
    return requests


def _run(model, request, new=5):
    ids, mask, segments = request
    with cspkv.modalities(model, segments) if segments is not None else torch.no_grad():
        return generate(model, ids, mask, new=new)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("threads,calls", [(4, 3), (8, 25)], ids=["race", "soak 8x25"])
def test_threads_on_one_patched_model_each_get_their_solo_answer(threads, calls):
    model = tiny_model()
    handle = cspkv.patch(model, budget=0.3, min_prompt=8)
    requests = _mixed_requests(12)
    solo = [_run(model, r) for r in requests]
    failures, done = [], []

    def worker(t: int):
        try:
            for c in range(calls):
                k = (t * 7 + c) % len(requests)
                out = _run(model, requests[k])
                if not torch.equal(out.sequences, solo[k].sequences) or any(
                        not torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(out.logits, solo[k].logits)):
                    failures.append(f"thread {t} call {c}: request {k} differs from its solo run")
                done.append(k)
        except Exception as exc:  # noqa: BLE001 (reported below with the thread)
            failures.append(f"thread {t}: {type(exc).__name__}: {exc}")

    def round_():
        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for p in pool:
            p.start()
        for p in pool:
            p.join()

    round_()  # warm-up: allocator pools and caches settle
    gc.collect()
    before = _rss_bytes()
    round_()
    gc.collect()
    grown = _rss_bytes() - before
    assert not failures, "\n".join(failures[:10])
    assert len(done) == 2 * threads * calls
    assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over {threads * calls} calls"
    assert handle._call is None  # this thread has no call left open


# --------------------------------------------------------------------------- 3. copies of a patched model


def _zero_attention_outputs(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own():
    model = tiny_model()
    handle = cspkv.patch(model, budget=0.3, min_prompt=8)
    clone = copy.deepcopy(model)
    ids = prompt(40, seed=7)
    _assert_same_generation(generate(clone, ids, new=6), generate(model, ids, new=6))

    clone_handle = clone._cspkv_handle
    assert clone_handle is not handle and clone_handle.model is clone
    _zero_attention_outputs(clone)
    expected = tiny_model()
    _zero_attention_outputs(expected)
    with cspkv.patched(expected, budget=0.3, min_prompt=8):
        _assert_same_generation(generate(clone, prompt(48, seed=8), new=6), generate(expected, prompt(48, seed=8), new=6))
    assert clone_handle.stats()["layers"][0]["prompt_len"] == 48 and handle.stats()["layers"][0]["prompt_len"] == 40

    cspkv.unpatch(model)
    out = generate(clone, ids, new=6)
    assert clone_handle.stats()["pruned_layers"] == 2 and isinstance(returned_cache(out).layers[0], PrunedLayer)
    assert cspkv.unpatch(clone)
    _assert_same_generation(generate(clone, ids, new=6), generate(expected, ids, new=6))


def test_pickling_a_patched_model_names_cspkv_and_unpatch():
    model = tiny_model()
    with cspkv.patched(model, budget=0.3):
        with pytest.raises(TypeError, match="cspkv: a patched LlamaForCausalLM cannot be pickled.*cspkv.unpatch"):
            pickle.dumps(model)
        with pytest.raises(TypeError, match="cspkv.unpatch"):
            torch.save(model, io.BytesIO())
        torch.save(model.state_dict(), io.BytesIO())
    pickle.loads(pickle.dumps(model))  # unpatched again: an ordinary module


# --------------------------------------------------------------------------- 4. speculative decoding


def _lookup_prompt(length: int, seed: int) -> torch.Tensor:
    """A prompt that ends with an n-gram seen earlier, so that prompt lookup proposes drafts at once."""
    ids = prompt(length, seed=seed)
    ids[:, -6:] = ids[:, 10:16]
    return ids


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup_num_tokens"])
def test_speculative_decoding_at_full_budget_is_the_unpatched_model(mode):
    model = tiny_model()
    reference = twin(model)
    ids = _lookup_prompt(48, seed=9)
    extra = {"assistant_model": tiny_model(layers=1, seed=3)} if mode == "assistant_model" else {"prompt_lookup_num_tokens": 4, "eos_token_id": 2}  # 4.57: lookup needs an eos id
    ref = generate(reference, ids, new=10, **extra)
    with cspkv.patched(model, budget=1.0):
        out = generate(model, ids, new=10, **extra)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup_num_tokens"])
def test_speculative_decoding_prunes_the_prompt_and_crops_rejected_drafts(mode):
    model = tiny_model()
    ids = _lookup_prompt(96, seed=10)
    extra = {"assistant_model": tiny_model(layers=1, seed=3)} if mode == "assistant_model" else {"prompt_lookup_num_tokens": 4, "eos_token_id": 2}  # 4.57: lookup needs an eos id
    with cspkv.patched(model, budget=0.5, window=24) as handle:  # min_prompt 32: a draft chunk (<= 21) is never pruned
        out = generate(model, ids, new=12, **extra)
    assert out.sequences.shape[1] == 96 + 12
    assert handle.stats()["pruned_layers"] == 2
    for layer in returned_cache(out).layers:
        assert isinstance(layer, PrunedLayer) and layer.get_seq_length() == 96 + 12 - 1


def _crop(cache, remove: int) -> None:
    """Remove the last `remove` tokens: transformers 5.x takes -remove, 4.57 the length to keep."""
    cache.crop(-remove if _CROP_TAKES_REMOVAL else cache.get_seq_length() - remove)


def test_crop_reaches_into_the_recent_window_and_no_further():
    model = tiny_model()
    with torch.no_grad(), cspkv.patched(model, budget=16, window=6, min_prompt=8):
        cache = returned_cache(model(prompt(40, seed=11), use_cache=True))
        model(prompt(3, seed=12), **{CACHE_KW: cache}, use_cache=True)
        layer = cache.layers[0]
        assert (layer.keys.shape[-2], layer.croppable) == (19, 6)
        _crop(cache, 8)  # the 3 appended tokens and 5 of the recent window
        assert (layer.keys.shape[-2], layer.get_seq_length(), layer.croppable) == (11, 35, 1)
        with pytest.raises(NotImplementedError, match="only the 0 tokens appended after pruning and the prompt's last 1"):
            _crop(cache, 2)


# --------------------------------------------------------------------------- 5. copies of a pruned cache


def test_a_deep_copied_pruned_cache_continues_like_the_original():
    model = tiny_model()
    ids, mask = left_pad([prompt(40, seed=13)[0], prompt(30, seed=14)[0]])
    turn = prompt(5, seed=15).repeat(2, 1)
    turn_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    turn_mask[1, 40:42] = 0  # the follow-up turn is left-padded in row 1
    with torch.no_grad(), cspkv.patched(model, budget=0.3, min_prompt=8):
        cache = returned_cache(model(ids, attention_mask=mask, use_cache=True))
        copied = copy.deepcopy(cache)
        original = model(turn, attention_mask=turn_mask, **{CACHE_KW: cache}, use_cache=True).logits
        again = model(turn, attention_mask=turn_mask, **{CACHE_KW: copied}, use_cache=True).logits
    torch.testing.assert_close(again, original, rtol=0, atol=0)
    for a, b in zip(cache.layers, copied.layers):
        assert torch.equal(a.kv_valid, b.kv_valid) and not bool(b.kv_valid[1, :, -5:-3].any())
    with pytest.raises(RuntimeError, match="cspkv: this cache was pruned by a patched model that has since been unpatched"):
        with torch.no_grad():
            model(turn, attention_mask=turn_mask, **{CACHE_KW: copied}, use_cache=True)


# --------------------------------------------------------------------------- 6. 4-D masks


def _mask_4d(mask_2d: torch.Tensor, queries: int) -> torch.Tensor:
    """Float additive mask [B, 1, Q, K]: causal over the last Q of K positions, padding masked."""
    B, K = mask_2d.shape
    causal = torch.ones(queries, K, dtype=torch.bool).tril(K - queries)
    allowed = causal[None, None] & mask_2d.bool()[:, None, None, :]
    return torch.zeros(B, 1, queries, K).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_padding_given_by_a_4d_mask_is_never_kept_nor_attended(budget):
    model, reference = tiny_model(), tiny_model()
    ids, mask = left_pad([prompt(40, seed=16)[0], prompt(24, seed=17)[0]])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    step = prompt(1, seed=18).repeat(2, 1)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    with torch.no_grad(), cspkv.patched(model, budget=budget, min_prompt=8) as handle:
        cache = returned_cache(model(ids, attention_mask=_mask_4d(mask, 40), position_ids=positions, use_cache=True))
        logits = model(step, attention_mask=_mask_4d(step_mask, 1), position_ids=positions[:, -1:] + 1,
                       **{CACHE_KW: cache}, use_cache=True).logits
        by_2d = returned_cache(model(ids, attention_mask=mask, use_cache=True))
    assert handle.stats()["layers"][0]["kept_per_row"] == ([40, 24] if budget == 1.0 else [20, 12])
    for layer, layer_2d in zip(cache.layers, by_2d.layers):
        # Padding is not kept as a live slot, as with a 2-D mask (rows of different lengths store packed,
        # without dead slots); the 4-D cache also holds the decoded token.
        live, live_2d = layer.stored_slots()[2].sum(-1), layer_2d.stored_slots()[2].sum(-1)
        assert torch.equal(live, live_2d + 1) and live_2d[:, 0].tolist() == ([40, 24] if budget == 1.0 else [20, 12])
    if budget == 1.0:
        with torch.no_grad():
            full = returned_cache(reference(ids, attention_mask=mask, use_cache=True))
            expected = reference(step, attention_mask=step_mask, **{CACHE_KW: full}, use_cache=True).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 7. training mode


def test_a_patched_model_in_training_says_what_it_does():
    model, reference = tiny_model(), tiny_model()
    model.train(), reference.train()
    ids = prompt(40, seed=19)
    with cspkv.patched(model, budget=0.3, min_prompt=8):
        with pytest.raises(NotImplementedError, match="pruning a cache is not differentiable.*use_cache=False"):
            model(ids, use_cache=True)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
    expected = reference(ids, labels=ids, use_cache=False).loss
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# --------------------------------------------------------------------------- 8. modality ids and beam expansion


@pytest.mark.parametrize("expansion", [{"num_beams": 3}, {"num_return_sequences": 2, "do_sample": True}])
def test_modality_ids_of_the_prompt_broadcast_over_generate_expansion(expansion):
    model = tiny_model()
    ids, mask = left_pad([prompt(40, seed=20)[0], prompt(32, seed=21)[0]])
    segments = (torch.arange(40) >= 24).long().expand(2, -1)
    k = expansion.get("num_beams", expansion.get("num_return_sequences"))
    runs = []
    with cspkv.patched(model, budget=0.3, min_prompt=8):
        for given in (segments, segments.repeat_interleave(k, dim=0)):
            torch.manual_seed(0)
            with cspkv.modalities(model, given):
                runs.append(generate(model, ids, mask, new=6, **expansion))
        with pytest.raises(ValueError, match=r"\[6, 40\], got \[2, 39\] \(or \[6 / k, 40\] when generate\(\) expands"):
            with cspkv.modalities(model, segments[:, :39]):
                generate(model, ids, mask, new=2, num_beams=3)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
