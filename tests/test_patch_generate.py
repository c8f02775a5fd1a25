"""generate() on a patched model: sampling, long outputs, beam search, multi-turn
cache continuation, a subset of layers, sliding-window layers, explicit
modalities, accelerate dispatch and the stats API (tiny Llama-layout models, CPU).
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicLayer

import cspkv
from cspkv.hf.cache import PrunedLayer
from patch_models import (
    CACHE_KW,
    cache_layer_lengths,
    generate,
    left_pad,
    prompt,
    returned_cache,
    tiny_model,
    twin,
)


def test_seeded_sampling():
    model = tiny_model("llama")
    ids = prompt(60, seed=5)
    torch.manual_seed(123)
    reference = generate(model, ids, new=12, do_sample=True, top_k=0, temperature=1.0)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        torch.manual_seed(123)
        same = generate(model, ids, new=12, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(same.sequences, reference.sequences)
    with cspkv.patched(model, budget=0.3, min_prompt=8):
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(generate(model, ids, new=12, do_sample=True).sequences)
    assert torch.equal(runs[0], runs[1])


def test_64_new_tokens():
    model = tiny_model("qwen3")
    ids = prompt(100, seed=6)
    never = twin(model)
    reference = generate(never, ids, new=64)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        assert torch.equal(generate(model, ids, new=64).sequences, reference.sequences)
    with cspkv.patched(model, budget=0.2, min_prompt=8):
        out = generate(model, ids, new=64)
    assert out.sequences.shape == (1, 164)
    assert cache_layer_lengths(returned_cache(out)) == [20 + 63, 20 + 63]


def test_beam_search():
    model = tiny_model("llama")
    never = twin(model)
    ids = prompt(50, seed=7)
    kwargs = dict(num_beams=3, num_return_sequences=2, new=8)
    reference = generate(never, ids, **kwargs)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        assert torch.equal(generate(model, ids, **kwargs).sequences, reference.sequences)
    ids2, mask2 = left_pad([prompt(50, seed=7)[0], prompt(33, seed=8)[0]])
    with cspkv.patched(model, budget=0.4, min_prompt=8):
        out = generate(model, ids2, mask2, **kwargs)
    assert out.sequences.shape == (4, ids2.shape[1] + 8)


@pytest.mark.parametrize("budget", [1.0, 0.3])
@pytest.mark.parametrize("later_prefill", ["chunk", "off"])
def test_multi_turn_continues_the_returned_cache(budget, later_prefill):
    """A second generate() continues the returned cache with a follow-up question."""
    model = tiny_model("llama")
    never = twin(model)
    first_ids = prompt(80, seed=9)
    follow_up = prompt(15, seed=10)

    def two_turns(m):
        first = generate(m, first_ids, new=10)
        cache = returned_cache(first)
        ids = torch.cat([first.sequences, follow_up], dim=1)
        second = generate(m, ids, new=10, **{CACHE_KW: cache})
        return first, second, returned_cache(second)

    reference = two_turns(never)
    with cspkv.patched(model, budget=budget, min_prompt=8, later_prefill=later_prefill):
        first, second, cache = two_turns(model)
    assert isinstance(cache.layers[0], PrunedLayer)
    total = 80 + 10 + 15 + 10 - 1
    assert cache.get_seq_length() == total
    turn = 1 + 15  # the first answer's last token and the follow-up, one chunk
    second_turn = turn if later_prefill == "off" else round(budget * turn)  # a chunk of >= min_prompt is pruned too
    assert cache_layer_lengths(cache)[0] == round(budget * 80) + 9 + second_turn + 9
    if budget == 1.0:
        assert torch.equal(first.sequences, reference[0].sequences)
        assert torch.equal(second.sequences, reference[1].sequences)
    else:
        assert second.sequences.shape == (1, total + 1)


def test_chunked_follow_up_matches_manual_decode():
    """A multi-token chunk on a pruned cache attends causally among itself and fully to the kept past."""
    model = tiny_model("qwen2")
    ids = prompt(70, seed=11)
    chunk = prompt(6, seed=12)
    with torch.no_grad(), cspkv.patched(model, budget=0.3, min_prompt=8):
        cache_a = returned_cache(model(ids, use_cache=True))
        as_chunk = model(chunk, **{CACHE_KW: cache_a}, use_cache=True).logits
        cache_b = returned_cache(model(ids, use_cache=True))
        one_by_one = torch.cat([model(chunk[:, i:i + 1], **{CACHE_KW: cache_b}, use_cache=True).logits for i in range(6)], dim=1)
    torch.testing.assert_close(as_chunk, one_by_one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_passed", ["by name", "by position"])
def test_padding_inside_a_follow_up_chunk_stays_dead(mask_passed):
    """A follow-up chunk whose 2-D mask has zeros: those slots are dead in every pruned layer, the rest
    live; the patch finds the mask whether the model is called with it by name or by position."""
    model = tiny_model("llama", layers=2)
    ids = prompt(60, seed=21).repeat(2, 1)
    chunk = prompt(4, seed=22).repeat(2, 1)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 60:62] = 0  # row 1: the chunk's first two tokens are padding
    with torch.no_grad(), cspkv.patched(model, budget=0.25, min_prompt=8):
        cache = returned_cache(model(ids, attention_mask=mask[:, :60], use_cache=True))
        if mask_passed == "by name":
            model(chunk, attention_mask=mask, **{CACHE_KW: cache}, use_cache=True)
        else:
            model(chunk, mask, **{CACHE_KW: cache}, use_cache=True)
    for layer in cache.layers:
        assert isinstance(layer, PrunedLayer)
        live = layer.kv_valid[..., -4:]
        assert bool(live[0].all()) and bool(live[1, :, 2:].all()) and not bool(live[1, :, :2].any()), live


class _TopLevelOps(TorchDispatchMode):
    """The ops dispatched from Python inside the block (not those inside a cspkv op's kernel)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True])
def test_pruning_a_layer_queues_only_the_csp_ops(padded, monkeypatch):
    """Each op a layer's pruning runs is a kernel launch on a GPU. An unpadded batch runs the three
    cspkv ops and the score pooling, nothing else, and hands the ops int32 modality ids (what the
    kernels read: int64 ids would be converted per op and layer); a padded one, whose rows keep
    dead slots, zeroes those slots too."""
    layer_module = importlib.import_module("cspkv.hf.layer")
    model = tiny_model("llama", layers=2)
    recorded = []
    prune_layer = layer_module.prune_layer

    def recording(*args, **kwargs):
        with _TopLevelOps() as mode:
            result = prune_layer(*args, **kwargs)
        recorded.append(mode.calls)
        return result

    monkeypatch.setattr(layer_module, "prune_layer", recording)
    if padded:
        ids, mask = left_pad([prompt(60, seed=41), prompt(50, seed=42)])
    else:
        ids, mask = prompt(60, seed=41).repeat(2, 1), torch.ones(2, 60, dtype=torch.long)
    with torch.no_grad(), cspkv.patched(model, budget=0.25, min_prompt=8):
        model(ids, attention_mask=mask, use_cache=True)
    views = {"aten.slice", "aten.unsqueeze", "aten.squeeze"}  # no kernel
    pool = {"aten.max_pool1d", "aten.max_pool2d_with_indices"}  # max_pool1d, or what it becomes outside inference mode
    assert len(recorded) == 2
    for calls in recorded:
        work = ["pool" if name in pool else name for name, _ in calls if name not in views]
        if padded:  # rows of other lengths: checks of the mask, a selection per row, dead slots zeroed
            assert work.count("aten.masked_fill_") == 2
        else:
            assert work == ["cspkv.window_scores", "pool", "pool", "cspkv.select_keep", "cspkv.compact_kv"]
        for name, args in calls:
            if name in ("cspkv.window_scores", "cspkv.select_keep"):
                ids_args = args[2:4] if name == "cspkv.window_scores" else args[2:3]
                assert all(t.dtype == torch.int32 for t in ids_args), name


def test_cache_prefilled_in_inference_mode_continues_outside_it():
    """A cache pruned and extended under torch.inference_mode(), then decoded under no_grad (generate()'s
    mode): the store of inference tensors is copied, not written into (torch forbids that there)."""
    model = tiny_model("llama", layers=2)
    ids, steps = prompt(40, seed=31), prompt(3, seed=32)

    def decode(modes):
        cache = None
        for mode, chunk in zip(modes, (ids, steps[:, :1], steps[:, 1:2], steps[:, 2:])):
            with mode():
                out = model(chunk, **{CACHE_KW: cache}, use_cache=True)
            cache = returned_cache(out)
        return out.logits, cache

    with cspkv.patched(model, budget=0.25, min_prompt=8):
        expected, _ = decode([torch.no_grad] * 4)
        logits, cache = decode([torch.inference_mode, torch.inference_mode, torch.no_grad, torch.inference_mode])
    assert torch.equal(logits, expected)
    assert all(isinstance(layer, PrunedLayer) and not layer._store.inference for layer in cache.layers)


def test_subset_of_layers():
    model = tiny_model("llama", layers=3)
    never = twin(model)
    ids = prompt(60, seed=13)
    with cspkv.patched(model, budget=1.0, min_prompt=8, layers=[1]) as handle:
        out = generate(model, ids, new=8)
        assert set(handle.layers) == {1} and handle.skipped == {0: "not in CSPConfig.layers", 2: "not in CSPConfig.layers"}
    assert torch.equal(out.sequences, generate(never, ids, new=8).sequences)
    with cspkv.patched(model, budget=0.25, min_prompt=8, layers=[0, 2]):
        cache = returned_cache(generate(model, ids, new=8))
    assert [type(layer) for layer in cache.layers] == [PrunedLayer, DynamicLayer, PrunedLayer]
    assert cache_layer_lengths(cache) == [15 + 7, 60 + 7, 15 + 7]
    assert cache.get_seq_length() == 67


def test_sliding_window_layers_are_skipped():
    model = tiny_model("qwen2", layers=2, layer_types=["full_attention", "sliding_attention"], sliding_window=16, use_sliding_window=True)
    never = twin(model)
    ids = prompt(60, seed=14)
    with cspkv.patched(model, budget=1.0, min_prompt=8) as handle:
        assert set(handle.layers) == {0} and "sliding" in handle.skipped[1]
        out = generate(model, ids, new=8)
    assert torch.equal(out.sequences, generate(never, ids, new=8).sequences)
    with cspkv.patched(model, budget=0.25, min_prompt=8):
        cache = returned_cache(generate(model, ids, new=8))
    assert isinstance(cache.layers[0], PrunedLayer) and not isinstance(cache.layers[1], PrunedLayer)


def test_all_sliding_model_warns_that_nothing_is_pruned():
    model = tiny_model("mistral", sliding_window=32)
    with pytest.warns(UserWarning, match="no layer"):
        handle = cspkv.patch(model)
    assert handle.layers == {} and all("sliding" in r for r in handle.skipped.values())
    handle.remove()


def test_explicit_modalities_change_the_selection():
    model = tiny_model("llama")
    L = 80
    ids = prompt(L, seed=15)
    segments = torch.zeros(1, L, dtype=torch.long)
    segments[:, 20:50] = 1
    with torch.no_grad(), cspkv.patched(model, budget=0.3, cross_ratio=0.9, min_prompt=8) as handle:
        default = returned_cache(model(ids, use_cache=True))
        with cspkv.modalities(model, segments):
            explicit = returned_cache(model(ids, use_cache=True))
        stats = handle.stats()
    assert cache_layer_lengths(explicit) == cache_layer_lengths(default) == [24, 24]
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(default.layers, explicit.layers))
    assert stats["layers"][0]["kept"] == 24


def test_modalities_for_generate_with_padding():
    model = tiny_model("llama")
    prompts = [prompt(50, seed=16)[0], prompt(30, seed=17)[0]]
    ids, mask = left_pad(prompts)
    mods = torch.ones_like(ids)  # values at padding are ignored (forced to -1)
    mods[:, -10:] = 0
    with cspkv.patched(model, budget=0.3, min_prompt=8, cross_ratio="auto"):
        with cspkv.modalities(model, mods):
            out = generate(model, ids, mask, new=6)
    assert out.sequences.shape == (2, 56)


def test_accelerate_dispatch_prunes_each_layer_on_its_device():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llama", layers=3)
    never = twin(model)
    ids = prompt(60, seed=18)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(3)})
    model = accelerate.dispatch_model(model, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook")
    # An accelerate hook on an attention module itself: cspkv wraps its instance forward and gives it back.
    attn = model.model.layers[1].self_attn
    accelerate.hooks.add_hook_to_module(attn, accelerate.hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    hooked_forward = attn.__dict__["forward"]
    reference = generate(never, ids, new=8)
    with cspkv.patched(model, budget=1.0, min_prompt=8):
        assert torch.equal(generate(model, ids, new=8).sequences, reference.sequences)
    with cspkv.patched(model, budget=0.3, min_prompt=8) as handle:
        out = generate(model, ids, new=8)
        stats = handle.stats()
    assert [stats["layers"][i]["device"] for i in range(3)] == ["cpu"] * 3
    assert cache_layer_lengths(returned_cache(out)) == [18 + 7] * 3
    assert attn.__dict__.get("forward") is hooked_forward  # accelerate's own wrapper (if any) is back
    assert torch.equal(generate(model, ids, new=8).sequences, reference.sequences)


def test_stats_api():
    model = tiny_model("phi3")
    ids = prompt(100, seed=19)
    handle = cspkv.patch(model, budget=0.2, min_prompt=8)
    with torch.no_grad():
        model(ids, use_cache=True)
    stats = cspkv.stats(model)
    assert stats["layers"] == handle.stats()["layers"]
    assert stats["pruned_layers"] == 2
    assert stats["kv_bytes_after"] * 5 == stats["kv_bytes_before"]
    for layer in stats["layers"].values():
        assert layer["prompt_len"] == 100 and layer["kept"] == 20 and layer["prune_ms"] >= 0
    handle.remove()
    with pytest.raises(ValueError, match="not patched"):
        cspkv.stats(model)


def test_unpruned_layers_after_reset_prune_again():
    model = tiny_model("llama")
    ids = prompt(60, seed=20)
    with torch.no_grad(), cspkv.patched(model, budget=0.5, min_prompt=8):
        cache = returned_cache(model(ids, use_cache=True))
        assert cache_layer_lengths(cache) == [30, 30]
        cache.reset()
        model(ids[:, :40], **{CACHE_KW: cache}, use_cache=True)
        assert cache_layer_lengths(cache) == [20, 20] and cache.get_seq_length() == 40


def test_unpruned_layers_run_the_attention_the_config_names_now():
    """A patched layer that does not prune runs the attention function the model's config names at
    the time of the call (changed after patching too), and a config class's own `_attn_implementation`
    property wins over the field transformers' property returns."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama", attn="sdpa")
    eager = importlib.import_module(type(model.model.layers[0].self_attn).__module__).eager_attention_forward
    with cspkv.patched(model, min_prompt=1000) as handle:
        layer = handle.layers[0]
        assert layer.original_attention() is ALL_ATTENTION_FUNCTIONS["sdpa"]
        model.config._attn_implementation = "eager"
        assert layer.original_attention() is eager
        model.config._attn_implementation = "sdpa"
        assert layer.original_attention() is ALL_ATTENTION_FUNCTIONS["sdpa"]

    class AlwaysEager(type(model.config)):
        _attn_implementation = property(lambda self: "eager")

    model.config.__class__ = AlwaysEager
    with cspkv.patched(model, min_prompt=1000) as handle:
        assert model.config.__dict__["_attn_implementation_internal"] == "sdpa"
        assert handle.layers[0].original_attention() is eager


def test_decode_n_softmax_is_applied_after_pruning():
    model = tiny_model("llama")
    ids = prompt(60, seed=21)
    with torch.no_grad():
        reference = generate(model, ids, new=4).logits
        with cspkv.patched(model, budget=1.0, min_prompt=8, decode_n=0.0):
            softmax = generate(model, ids, new=4).logits
        with cspkv.patched(model, budget=1.0, min_prompt=8, decode_n=1.0):
            nsoftmax = generate(model, ids, new=4).logits
    # The first logits come from the prefill (original attention); decode steps use the pruned-cache attention.
    torch.testing.assert_close(softmax[1], reference[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(nsoftmax[0], softmax[0])
    assert not torch.allclose(nsoftmax[1], softmax[1], rtol=1e-3, atol=1e-3)


def test_nvtx_ranges_are_a_no_op_on_cpu(monkeypatch):
    monkeypatch.setenv("CSPKV_NVTX", "1")
    model = tiny_model("llama")
    with torch.no_grad(), cspkv.patched(model, budget=0.5, min_prompt=8) as handle:
        assert handle.nvtx
        cache = returned_cache(model(prompt(40, seed=22), use_cache=True))
    assert cache_layer_lengths(cache) == [20, 20]


def test_overlapped_pruning_orders_the_streams(monkeypatch):
    """The overlap_pruning branch, run on CPU with stand-in streams: each pruned layer's side
    stream first waits for the layer's stream and holds on to the tensors it reads (query, key,
    value, the prefill's log-sum-exp); the model's forward call ends with the layer's stream
    waiting for the side one, once, after all of them. The CUDA test compares the results."""
    layer_module = importlib.import_module("cspkv.hf.layer")

    order = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            order.append(f"{self.name} waits for {other.name}")

    main = Stream("main")
    monkeypatch.setattr(layer_module, "_has_streams", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, priority=0: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: order.append(f"on {stream.name}") or contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: order.append(f"{stream.name} holds {list(t.shape)}"), raising=False)
    model = tiny_model("llama", layers=3)
    ids = prompt(40, seed=23)
    with torch.no_grad(), cspkv.patched(model, budget=0.5, min_prompt=8, overlap_pruning=True) as handle:
        cache = returned_cache(model(ids, use_cache=True))
        assert len(handle._side_streams) == 1
    assert cache_layer_lengths(cache) == [20, 20, 20]
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    layer = ["side waits for main", f"side holds {[1, heads, 40, dim]}", f"side holds {[1, kv_heads, 40, dim]}",
             f"side holds {[1, kv_heads, 40, dim]}", f"side holds {[1, heads, 40]}", "on side"]
    assert order == 3 * layer + ["main waits for side"]
    order.clear()
    with torch.no_grad(), cspkv.patched(model, budget=0.5, min_prompt=8) as handle:  # the default: in line
        model(ids, use_cache=True)
        assert not handle._side_streams and not order
