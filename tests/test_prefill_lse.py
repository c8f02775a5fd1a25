"""One-pass window scoring with the prefill attention's log-sum-exp (`cspkv.hf.prefill_lse`).

The capture must not change what the attention returns, its LSE must be the
true one, `window_lse` must refuse every attention whose LSE is not the one the
scores assume, and a patched model must keep exactly the tokens the two-pass
scoring keeps.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cspkv
from cspkv import CSPConfig
from cspkv.hf import prefill_lse
from cspkv.pruning.budget import plan_batch, window_query_ids

from patch_models import generate, left_pad, prompt, returned_cache, tiny_model, twin

ONE_PASS = "one pass (log-sum-exp of the prefill attention)"


def _qkv(B=2, H=4, Hkv=2, L=24, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, L, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))


def _true_lse(q, k, allowed, scale):
    """float64 log-sum-exp of the scaled logits over `allowed` [B or 1, 1, Lq, L]."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    return logits.masked_fill(~allowed, float("-inf")).logsumexp(-1)


def _padded_causal(B, L, pad):
    """bool [B, 1, L, L]: causal, the first pad[b] keys of row b masked out."""
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    for b, p in enumerate(pad):
        allowed[b, :, :, :p] = False
        allowed[b, :, :p, :] = torch.eye(L, dtype=torch.bool)[:p]  # padding queries see themselves: finite rows
    return allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["causal", "causal-gqa", "bool-mask", "float-mask"])
def test_capture_returns_sdpa_output_and_the_lse(kind, dtype):
    q, k, v = _qkv(dtype=dtype)
    B, L = q.shape[0], q.shape[2]
    kwargs = dict(scale=0.3)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    if kind == "causal":
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        kwargs.update(is_causal=True)
    elif kind == "causal-gqa":
        kwargs.update(is_causal=True, enable_gqa=True)
    else:
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        allowed = _padded_causal(B, L, [5, 0])
        mask = allowed if kind == "bool-mask" else torch.zeros((), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        kwargs.update(attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with prefill_lse.Capture() as capture:
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(got, want), "the capture changed the attention output"
    assert capture.lse is not None, capture.reason
    assert capture.lse.dtype == torch.float32 and capture.scale == 0.3
    assert capture.is_causal == ("causal" in kind)
    assert torch.allclose(capture.lse.double(), _true_lse(q, k, allowed, 0.3), atol=1e-4), kind


def test_capture_without_lse_says_why_and_leaves_sdpa_alone():
    q, k, v = _qkv()
    k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with prefill_lse.Capture() as capture:
            got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, want) and capture.lse is None and "math backend" in capture.reason
    qg = q.clone().requires_grad_()
    with prefill_lse.Capture() as capture:
        F.scaled_dot_product_attention(qg, k, v, is_causal=True)
    assert capture.lse is None and "grad" in capture.reason
    with prefill_lse.Capture() as capture:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert capture.lse is None and "more than once" in capture.reason
    with prefill_lse.Capture() as capture:
        torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    assert capture.lse is None and "no scaled_dot_product_attention call" in capture.reason


def _window_lse(mask, *, is_causal=False, scale=0.25, lengths=(24, 24), window=4):
    """window_lse on a fake capture of a [2, 4, 24] attention with `mask`."""
    B, H, L = 2, 4, 24
    k_mod = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        k_mod[b, : L - n] = -1
    config = CSPConfig(window=window, budget=0.5, min_prompt=1)
    plans = plan_batch(config, k_mod)
    q_mod = window_query_ids(k_mod, plans)
    lse = torch.randn(B, H, L)
    capture = SimpleNamespace(lse=lse, attn_mask=mask, is_causal=is_causal, scale=0.25, reason="")
    got, why = prefill_lse.window_lse(capture, scale=scale, query=torch.empty(B, H, L, 8), k_mod=k_mod, q_mod=q_mod,
                                      plans=plans, checked_masks={})
    if got is not None:
        assert torch.equal(got, lse[..., -q_mod.shape[1]:])
    return got, why


def test_window_lse_takes_only_the_attention_the_scores_assume():
    L = 24
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    assert _window_lse(None, is_causal=True)[0] is not None
    assert _window_lse(causal)[0] is not None
    assert _window_lse(_padded_causal(2, L, [6, 0]), lengths=(18, 24))[0] is not None
    additive = torch.zeros(1, 1, L, L).masked_fill(~causal, float("-inf"))
    assert _window_lse(additive)[0] is not None
    assert _window_lse(torch.zeros(1, 1, L, L).masked_fill(~causal, torch.finfo(torch.float32).min))[0] is not None

    refusals = {
        "scale": _window_lse(None, is_causal=True, scale=0.5),
        "not causal": _window_lse(None, is_causal=False),
        "padding": _window_lse(None, is_causal=True, lengths=(18, 24)),
        "padding keys attended": _window_lse(causal, lengths=(18, 24)),
        "sliding window": _window_lse(causal & ~torch.ones(L, L, dtype=torch.bool).tril(-8)),
        "bidirectional block": _window_lse(causal | (torch.arange(L) >= L - 6)[None, :] & (torch.arange(L) >= L - 6)[:, None]),
        "bias": _window_lse(additive + 0.5 * causal),
    }
    for name, (got, why) in refusals.items():
        assert got is None and why, name
    assert "scale" in refusals["scale"][1]
    assert "padding" in refusals["padding"][1]
    assert "mask" in refusals["sliding window"][1]


def test_window_lse_ignores_rows_outside_the_windows():
    """Rows that score nothing (padding; window queries beyond a shorter row's window) may see
    anything; a row that scores must see exactly its keys."""
    L = 24
    allowed = _padded_causal(2, L, [12, 0])
    allowed[0, :, :12] = True  # what transformers does to fully masked (padding) query rows
    allowed[0, :, 18, 21] = True  # row 0 (window 3 of its 12 tokens) does not own batch window row 18
    assert _window_lse(allowed, lengths=(12, 24), window=0.25)[0] is not None
    allowed[0, :, 22, 23] = True  # but it owns row 22
    assert _window_lse(allowed, lengths=(12, 24), window=0.25)[0] is None


def _pruned_caches(model, ids, mask, **config):
    out = []
    for one_pass in (True, False):
        m = twin(model)
        with cspkv.patch(m, budget=0.3, prefill_lse=one_pass, **config) as handle:
            cache = returned_cache(generate(m, ids, mask, new=3))
            out.append((cache, handle.stats()["layers"]))
    return out


@pytest.mark.parametrize("policy_name", ["csp", "snapkv"])
@pytest.mark.parametrize("batch", ["one", "padded"])
def test_patched_model_scores_in_one_pass_and_keeps_the_same_tokens(batch, policy_name):
    model = tiny_model("llama")
    if batch == "one":
        ids, mask = prompt(180), None
    else:
        ids, mask = left_pad([prompt(140, seed=1)[0], prompt(180, seed=2)[0]])
    (one, one_stats), (two, two_stats) = _pruned_caches(model, ids, mask, policy=policy_name)
    assert all(s["scoring"] == ONE_PASS for s in one_stats.values()), one_stats
    assert all(s["scoring"].startswith("two passes: disabled") for s in two_stats.values()), two_stats
    for i, (a, b) in enumerate(zip(one.layers, two.layers)):
        # stored_slots: the live slots in either layout (a packed store's free rows hold no tokens).
        assert all(torch.equal(x, y) for x, y in zip(a.stored_slots(), b.stored_slots())), f"layer {i} kept other tokens"


def test_eager_attention_scores_in_two_passes_and_says_why():
    model = tiny_model("llama", attn="eager")
    with cspkv.patch(model, budget=0.3) as handle:
        generate(model, prompt(100), new=1)
        reasons = {s["scoring"] for s in handle.stats()["layers"].values()}
    assert reasons == {"two passes: the attention function made no scaled_dot_product_attention call"}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("backend", [None, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION],
                         ids=["sdpa-choice", "flash", "cudnn"])
def test_capture_on_cuda(backend, dtype, gqa):
    q, k, v = (t.cuda() for t in _qkv(B=2, H=8, Hkv=2, L=300, D=64, dtype=dtype))
    if not gqa:
        k, v = (t.repeat_interleave(4, dim=1) for t in (k, v))
    kwargs = dict(is_causal=True, enable_gqa=gqa)
    backends = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    with backends:
        want = F.scaled_dot_product_attention(q, k, v, **kwargs)
        with prefill_lse.Capture() as capture:
            got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(got, want), "the capture changed the attention output"
    assert capture.lse is not None, capture.reason
    allowed = torch.ones(300, 300, dtype=torch.bool).tril()[None, None]
    err = (capture.lse.cpu().double() - _true_lse(q.cpu(), k.cpu(), allowed, 64 ** -0.5)).abs().max()
    assert err < 2e-2, err


@pytest.mark.cuda
@needs_cuda
def test_patched_model_on_cuda_scores_in_one_pass_and_keeps_the_same_tokens(extension):
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    (one, one_stats), (two, _) = _pruned_caches(model, prompt(180).cuda(), None)
    assert all(s["scoring"] == ONE_PASS for s in one_stats.values()), one_stats
    for i, (a, b) in enumerate(zip(one.layers, two.layers)):
        # stored_slots: the live slots in either layout (a packed store's free rows hold no tokens).
        assert all(torch.equal(x, y) for x, y in zip(a.stored_slots(), b.stored_slots())), f"layer {i} kept other tokens"
    ids, mask = left_pad([prompt(140, seed=1)[0], prompt(180, seed=2)[0]])
    (_, padded_stats), _ = _pruned_caches(model, ids.cuda(), mask.cuda())
    for s in padded_stats.values():  # a mask rules out flash and is not taken to cuDNN: two passes, with the reason
        assert s["scoring"].startswith("two passes: SDPA runs its"), s["scoring"]
