"""Property tests: random small shapes, padding, budgets and layouts, kernel vs reference.

Hypothesis draws the sizes and options; a drawn seed makes the tensor values
(torch's generator is far faster than drawing every element). 200 examples per
op and run, derandomized so that CI runs are reproducible. Besides agreeing
with the reference, each op is held to invariants that do not depend on it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cspkv import reference as ref

from conftest import (
    FLOAT_DTYPES,
    LAYOUTS,
    assert_matches_oracle,
    attention_row_scale,
    generator,
    oracle,
    place,
    random_padding,
    randn,
    ranking_scores,
    same_precision,
    scores_row_scale,
)

PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

dtypes = st.sampled_from(FLOAT_DTYPES)
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)
n_values = st.one_of(st.sampled_from([0.0, 1.0, 4.0]), st.floats(0.0, 8.0, allow_nan=False))
padding_rates = st.sampled_from([0.0, 0.3, 0.9])


@st.composite
def lengths_and_window(draw, max_len=60):
    L = draw(st.integers(1, max_len))
    return L, draw(st.integers(1, L))


@PROPERTY_SETTINGS
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.integers(1, 4), D=st.integers(1, 40),
    LW=lengths_and_window(), n=n_values, dtype=dtypes, layout=layouts, pad=padding_rates,
    tail_queries=st.booleans(), scale=st.floats(0.05, 1.5), seed=seeds,
)
def test_window_scores_properties(kernels, device, B, Hkv, G, D, LW, n, dtype, layout, pad, tail_queries, scale, seed):
    L, W = LW
    gen = generator(seed)
    q_win = randn((B, Hkv * G, W, D), dtype, gen)
    keys = randn((B, Hkv, L, D), dtype, gen)
    k_mod = random_padding(B, L, gen, pad)
    # The window queries are the last W tokens, or (as the op allows) ids of their own.
    q_mod = k_mod[:, L - W :].clone() if tail_queries else random_padding(B, W, gen, pad)
    kw = dict(scale=scale, n=n)
    got = kernels.window_scores(*(place(t, layout, device) for t in (q_win, keys, q_mod, k_mod)), **kw)
    want = oracle(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    lowp = (None, None) if dtype == torch.float32 else same_precision(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    row_scale = scores_row_scale(*want)
    for g, w, lp, name in zip(got, want, lowp, ("self_scores", "cross_scores")):
        assert_matches_oracle(g, w, lp, row_scale=row_scale, what=name)
        assert (g.cpu() >= 0).all() and (g.cpu()[(k_mod < 0)[:, None].expand_as(g)] == 0).all(), name

    # With a plain softmax each real window query spreads exactly G units of mass
    # (one per query head) over the real keys it sees.
    if n == 0:
        pos = torch.arange(L)
        sees = (pos[None, :] <= (L - W + torch.arange(W))[:, None])[None] & (k_mod >= 0)[:, None, :]  # [B, W, L]
        live = (q_mod >= 0) & sees.any(-1)
        mass = (got[0] + got[1]).cpu().sum(-1)
        expected = G * live.sum(-1, keepdim=True).float().expand(B, Hkv)
        assert ((mass - expected).abs() <= 1e-4 * (1 + expected)).all(), f"mass {mass} != {expected}"


@st.composite
def budgets(draw, L):
    budget = draw(st.integers(1, L))
    recent = draw(st.integers(0, budget))
    cross_ratio = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
    return dict(budget=budget, recent=recent, cross_ratio=cross_ratio)


@PROPERTY_SETTINGS
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), L=st.integers(1, 60), kind=st.sampled_from(["continuous", "ties", "special"]),
    pad=padding_rates, id_dtype=st.sampled_from([torch.int32, torch.int64]), layout=layouts,
    data=st.data(), seed=seeds,
)
def test_select_keep_properties(kernels, device, B, Hkv, L, kind, pad, id_dtype, layout, data, seed):
    kw = data.draw(budgets(L), label="budget, recent, cross_ratio")
    gen = generator(seed)
    self_s, cross_s = ranking_scores((B, Hkv, L), gen, kind), ranking_scores((B, Hkv, L), gen, kind)
    k_mod = random_padding(B, L, gen, pad).to(id_dtype)
    idx, valid = kernels.select_keep(*(place(t, layout, device) for t in (self_s, cross_s, k_mod)), **kw)
    want_idx, want_valid = ref.select_keep(self_s, cross_s, k_mod, **kw)
    idx, valid = idx.cpu(), valid.cpu()
    assert torch.equal(idx, want_idx), f"keep_idx\n{idx}\n!= reference\n{want_idx}"
    assert torch.equal(valid, want_valid), f"keep_valid\n{valid}\n!= reference\n{want_valid}"

    assert idx.shape == (B, Hkv, kw["budget"])
    assert bool((idx[..., 1:] > idx[..., :-1]).all()), "keep_idx must be strictly ascending"
    real = k_mod >= 0
    assert torch.equal(valid, real[:, None].expand(B, Hkv, L).gather(2, idx))
    n_real = real.sum(-1)  # [B]
    kept_real = valid.sum(-1)  # [B, Hkv]
    assert torch.equal(kept_real, torch.minimum(n_real, torch.tensor(kw["budget"]))[:, None].expand(B, Hkv))
    for b in range(B):  # the last `recent` real tokens are always kept
        recent_idx = real[b].nonzero().squeeze(1)[max(0, int(real[b].sum()) - kw["recent"]):]
        assert torch.isin(recent_idx, idx[b]).all(), f"row {b}: recent tokens {recent_idx.tolist()} not all kept"


@PROPERTY_SETTINGS
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), L=st.integers(1, 60), D=st.integers(1, 40),
    Dv=st.integers(1, 40), dtype=dtypes, layout=layouts, data=st.data(), seed=seeds,
)
def test_compact_kv_properties(kernels, device, B, Hkv, L, D, Dv, dtype, layout, data, seed):
    K = data.draw(st.integers(1, L), label="K")
    gen = generator(seed)
    keys, values = randn((B, Hkv, L, D), dtype, gen), randn((B, Hkv, L, Dv), dtype, gen)
    keep_idx = torch.rand(B, Hkv, L, generator=gen).argsort(-1)[..., :K].sort(-1).values  # random subsets
    got = kernels.compact_kv(*(place(t, layout, device) for t in (keys, values, keep_idx)))
    want = ref.compact_kv(keys, values, keep_idx)
    for g, w, name in zip(got, want, ("keys_out", "values_out")):
        assert g.is_contiguous() and g.dtype == dtype, name
        assert torch.equal(g.cpu(), w), name


@PROPERTY_SETTINGS
@given(
    B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.integers(1, 4), D=st.integers(1, 40),
    Dv=st.integers(1, 40), LQ=lengths_and_window(), n=n_values, dtype=dtypes, layout=layouts,
    valid_rank=st.sampled_from([None, 2, 3]), dead_rate=st.sampled_from([0.2, 0.7, 1.0]),
    scale=st.floats(0.05, 1.5), seed=seeds,
)
def test_nsoftmax_attention_properties(kernels, device, B, Hkv, G, D, Dv, LQ, n, dtype, layout, valid_rank, dead_rate, scale, seed):
    Lc, Q = LQ
    gen = generator(seed)
    q = randn((B, Hkv * G, Q, D), dtype, gen)
    keys, values = randn((B, Hkv, Lc, D), dtype, gen), randn((B, Hkv, Lc, Dv), dtype, gen)
    kv_valid = None
    if valid_rank is not None:
        shape = (B, Lc) if valid_rank == 2 else (B, Hkv, Lc)
        kv_valid = torch.rand(shape, generator=gen) >= dead_rate * torch.rand(shape[:-1] + (1,), generator=gen)
    kw = dict(scale=scale, n=n)
    args = (q, keys, values)
    got = kernels.nsoftmax_attention(
        *(place(t, layout, device) for t in args),
        kv_valid=None if kv_valid is None else place(kv_valid, layout, device), **kw,
    )
    want = oracle(ref.nsoftmax_attention, *args, kv_valid=kv_valid, **kw)
    lowp = None if dtype == torch.float32 else same_precision(ref.nsoftmax_attention, *args, kv_valid=kv_valid, **kw)
    assert got.shape == (B, Hkv * G, Q, Dv) and got.dtype == dtype
    assert_matches_oracle(got, want, lowp, row_scale=attention_row_scale(values), what="nsoftmax_attention")
