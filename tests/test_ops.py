"""Every op against `cspkv.reference` on CPU and CUDA.

The axes (dtype, batch, (H, Hkv), D, L, W, n, memory layout, padding, id
dtype) are far too many for a cartesian product on a 2-core CI box, so CASES
is a covering design: every value of every axis appears, and every pair
(dtype, heads), (dtype, D), (heads, L) appears (`test_cases_cover_the_axes`
keeps it that way). Each op derives its own arguments from a case: the
window is the query count Q of `nsoftmax_attention`, the reference scores of
the case feed `select_keep`, whose keep_idx feeds `compact_kv`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from cspkv import reference as ref

from conftest import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    LAYOUTS,
    assert_matches_oracle,
    assert_no_nan,
    attention_row_scale,
    generator,
    modality_ids,
    oracle,
    place,
    randn,
    random_padding,
    ranking_scores,
    same_precision,
    scores_row_scale,
)

HEADS = ((1, 1), (4, 1), (8, 2), (9, 3), (32, 32))
HEAD_DIMS = (64, 80, 128)
LENGTHS = (1, 7, 97, 1025)
NS = (0.0, 1.0, 4.0)
PADDINGS = ("none", "left", "left_full")


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    B: int
    H: int
    Hkv: int
    D: int
    L: int
    W: int
    n: float
    layout: str
    padding: str
    id_dtype: torch.dtype
    seed: int

    @property
    def id(self) -> str:
        pad = {"none": "nopad", "left": "leftpad", "left_full": "fullpadrow"}[self.padding]
        ids = "i32" if self.id_dtype == torch.int32 else "i64"
        return (
            f"{DTYPE_NAMES[self.dtype]}-B{self.B}-H{self.H}kv{self.Hkv}-D{self.D}-L{self.L}-W{self.W}"
            f"-n{self.n:g}-{self.layout}-{pad}-{ids}"
        )


def _covering_cases():
    cases = []
    for (hi, (H, Hkv)), (li, L) in itertools.product(enumerate(HEADS), enumerate(LENGTHS)):
        if L == 1:
            W = 1
        elif L == 1025:  # W = L only where the reference's [B, H, W, L] matrix stays small
            W = L if H == 1 else (1, 16)[hi % 2]
        else:
            W = ((L, 1, 3), (1, L, L // 3))[li % 2][hi % 3]
        cases.append(
            Case(
                dtype=FLOAT_DTYPES[(hi + li) % 3],
                B=(1, 3)[(hi + li) % 2],
                H=H,
                Hkv=Hkv,
                D=HEAD_DIMS[(2 * hi + li) % 3],
                L=L,
                W=W,
                n=NS[(hi + 2 * li) % 3],
                layout=LAYOUTS[(3 * hi + li) % 4],
                padding=PADDINGS[(2 * hi + li) % 3],
                id_dtype=(torch.int64, torch.int32)[(hi + li // 2) % 2],
                seed=10 * hi + li,
            )
        )
    return cases


CASES = _covering_cases()
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def test_cases_cover_the_axes():
    for axis, values in (
        ("dtype", FLOAT_DTYPES),
        ("B", (1, 3)),
        ("D", HEAD_DIMS),
        ("L", LENGTHS),
        ("n", NS),
        ("layout", LAYOUTS),
        ("padding", PADDINGS),
        ("id_dtype", (torch.int32, torch.int64)),
    ):
        assert {getattr(c, axis) for c in CASES} >= set(values), axis
    assert {(c.H, c.Hkv) for c in CASES} == set(HEADS)
    assert any(c.W == 1 and c.L > 1 for c in CASES) and any(c.W == c.L > 1 for c in CASES)
    pairs = {
        "dtype x heads": ({(c.dtype, (c.H, c.Hkv)) for c in CASES}, set(itertools.product(FLOAT_DTYPES, HEADS))),
        "dtype x D": ({(c.dtype, c.D) for c in CASES}, set(itertools.product(FLOAT_DTYPES, HEAD_DIMS))),
        "heads x L": ({((c.H, c.Hkv), c.L) for c in CASES}, set(itertools.product(HEADS, LENGTHS))),
    }
    for name, (have, want) in pairs.items():
        assert have == want, f"{name}: missing {want - have}"
    assert sum(c.L == 1025 for c in CASES) <= len(HEADS)


# ------------------------------------------------------------ case inputs
def window_inputs(case: Case):
    """CPU tensors (q_win, keys, q_mod, k_mod): the window queries are the last W positions."""
    gen = generator(case.seed)
    q_win = randn((case.B, case.H, case.W, case.D), case.dtype, gen)
    keys = randn((case.B, case.Hkv, case.L, case.D), case.dtype, gen)
    k_mod = modality_ids(case.B, case.L, case.padding, gen, dtype=case.id_dtype)
    return q_win, keys, k_mod[:, case.L - case.W :].clone(), k_mod


def selection_args(case: Case) -> dict:
    """budget / recent / cross_ratio of a case: full, half, one, a third, three quarters."""
    L = case.L
    options = (
        dict(budget=L, recent=0, cross_ratio=0.5),
        dict(budget=max(1, L // 2), recent=min(2, L // 2), cross_ratio=0.5),
        dict(budget=1, recent=0, cross_ratio=1.0),
        dict(budget=max(1, L // 3), recent=min(1, L // 3), cross_ratio=0.0),
        dict(budget=max(1, 3 * L // 4), recent=L // 8, cross_ratio=0.3),
    )
    return options[(case.seed // 10 + case.seed) % len(options)]  # seed = 10 * heads index + length index


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_window_scores(case, kernels, device):
    q_win, keys, q_mod, k_mod = window_inputs(case)
    kw = dict(scale=case.D**-0.5, n=case.n)
    got = kernels.window_scores(
        place(q_win, case.layout, device), place(keys, case.layout, device),
        place(q_mod, case.layout, device), place(k_mod, case.layout, device), **kw,
    )
    want = oracle(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    lowp = None if case.dtype == torch.float32 else same_precision(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    row_scale = scores_row_scale(*want)
    for i, name in enumerate(("self_scores", "cross_scores")):
        assert got[i].dtype == torch.float32 and got[i].device.type == device.type, name
        assert_matches_oracle(got[i], want[i], None if lowp is None else lowp[i], row_scale=row_scale, what=name)


def window_row_lse(q_win, keys, q_mod, k_mod, scale) -> torch.Tensor:
    """float32 [B, H, L] as the prefill attention gives it: the last W columns hold each window
    row's log-sum-exp over the keys it may see (float64 math); NaN elsewhere and at padding
    query rows, which window_scores must never read."""
    B, H, W, D = q_win.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    logits = torch.einsum("bhwd,bhld->bhwl", q_win.double(), keys.double().repeat_interleave(H // Hkv, dim=1)) * scale
    positions = torch.arange(L)
    causal = positions[None, :] <= (L - W + torch.arange(W))[:, None]
    allowed = causal[None] & (k_mod >= 0)[:, None, :]  # [B, W, L]
    lse = logits.masked_fill(~allowed[:, None], float("-inf")).logsumexp(-1).float()
    full = torch.full((B, H, L), float("nan"))
    full[..., L - W :] = lse.masked_fill((q_mod < 0)[:, None, :], float("nan"))
    return full


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_window_scores_given_lse(case, kernels, device):
    """One pass with the rows' log-sum-exp given = the two-pass scores (reference and kernel)."""
    q_win, keys, q_mod, k_mod = window_inputs(case)
    kw = dict(scale=case.D**-0.5, n=case.n)
    lse = window_row_lse(q_win, keys, q_mod, k_mod, kw["scale"])[..., -case.W :]  # a strided slice
    got = kernels.window_scores(
        place(q_win, case.layout, device), place(keys, case.layout, device),
        place(q_mod, case.layout, device), place(k_mod, case.layout, device), lse=lse.to(device), **kw,
    )
    want = oracle(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    from_lse = oracle(ref.window_scores, q_win, keys, q_mod, k_mod, lse=lse, **kw)
    lowp = None if case.dtype == torch.float32 else same_precision(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    row_scale = scores_row_scale(*want)
    for i, name in enumerate(("self_scores", "cross_scores")):
        assert_matches_oracle(from_lse[i], want[i], None, row_scale=row_scale, what=f"reference {name}")
        assert_matches_oracle(got[i], want[i], None if lowp is None else lowp[i], row_scale=row_scale, what=name)


def test_window_scores_lse_is_what_normalises(kernels, device):
    """The given lse is used, not recomputed: adding c to a row's lse scales its mass by exp(-c)
    (n = 0); a row whose lse is -inf adds nothing."""
    gen = generator(5)
    B, H, Hkv, W, L, D = 1, 4, 2, 3, 40, 16
    q_win, keys = randn((B, H, W, D), torch.float32, gen), randn((B, Hkv, L, D), torch.float32, gen)
    k_mod = torch.zeros(B, L, dtype=torch.long)
    q_mod = k_mod[:, -W:].clone()
    lse = window_row_lse(q_win, keys, q_mod, k_mod, 0.25)[..., -W:].contiguous()
    shifted = lse.clone()
    shifted[0, 2, 1] += 1.0  # query head 2 (KV head 1), window row 1
    shifted[0, 0, :] = float("-inf")  # query head 0 (KV head 0) adds nothing
    args = [t.to(device) for t in (q_win, keys, q_mod, k_mod)]
    base = kernels.window_scores(*args, scale=0.25, n=0.0, lse=lse.to(device))[0].cpu()
    got = kernels.window_scores(*args, scale=0.25, n=0.0, lse=shifted.to(device))[0].cpu()

    def per_row(h, w):  # the mass one query row alone gives, as [L]
        end = L - W + w + 1  # the row sees keys j < end
        one = ref.window_scores(q_win[:, h : h + 1, w : w + 1], keys[:, h // 2 : h // 2 + 1, :end], q_mod[:, w : w + 1],
                                k_mod[:, :end], scale=0.25, n=0.0)[0][0, 0]
        return torch.nn.functional.pad(one, (0, L - end))

    want = base.clone()
    want[0, 1] -= per_row(2, 1) * (1 - math.exp(-1.0))
    want[0, 0] -= sum(per_row(0, w) for w in range(W))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # With n > 0 too, a row whose lse is -inf adds nothing (log(n + 0) would be finite).
    silent = lse.clone()
    silent[0, 0, :] = float("-inf")
    base = kernels.window_scores(*args, scale=0.25, n=1.0, lse=lse.to(device))[0].cpu()
    got = kernels.window_scores(*args, scale=0.25, n=1.0, lse=silent.to(device))[0].cpu()
    want = base.clone()
    want[0, 0] -= ref.window_scores(q_win[:, :1], keys[:, :1], q_mod, k_mod, scale=0.25, n=1.0)[0][0, 0]  # query head 0's mass
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize(
    "shape",
    [
        # 8 KV heads of 2 x 40 rows, 3001 keys: one tile per head, its keys streamed panel by panel.
        pytest.param(dict(B=2, H=8, Hkv=4, W=40, L=3001, D=80, streamed=True), id="streamed-keys"),
        # One KV head of 4 x 100 rows split between the 2 threads: tiles over keys packed once.
        pytest.param(dict(B=1, H=4, Hkv=1, W=100, L=3001, D=64, streamed=False), id="packed-keys"),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_window_scores_cpu_key_paths(shape, layout, kernels):
    """The CPU kernel (window_scores.cpp) packs a part's keys panel by panel as it reaches
    them when the part has few query rows (logits of at most 2**18 floats), and all at once
    otherwise; both give the reference's scores, a partial last panel and strided keys included."""
    B, H, Hkv, W, L, D = (shape[k] for k in ("B", "H", "Hkv", "W", "L", "D"))
    parts = 1 if B * Hkv % 2 == 0 else 2  # cpu::parts_per_item on 2 threads
    part_rows = -(-(H // Hkv * W) // parts // 4) * 4
    assert (part_rows * -(-L // 16) * 16 <= 2**18) == shape["streamed"]
    gen = generator(11)
    q_win = randn((B, H, W, D), torch.float32, gen)
    keys = randn((B, Hkv, L, D), torch.float32, gen)
    k_mod = modality_ids(B, L, "left", gen)
    q_mod = k_mod[:, L - W :].clone()
    kw = dict(scale=D**-0.5, n=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = kernels.window_scores(q_win, place(keys, layout, "cpu"), q_mod, k_mod, **kw)
    finally:
        torch.set_num_threads(threads)
    want = oracle(ref.window_scores, q_win, keys, q_mod, k_mod, **kw)
    row_scale = scores_row_scale(*want)
    for i, name in enumerate(("self_scores", "cross_scores")):
        assert_matches_oracle(got[i], want[i], None, row_scale=row_scale, what=name)


@pytest.mark.parametrize("scores", ["window", "ties", "special"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_select_keep(case, scores, kernels, device):
    q_win, keys, q_mod, k_mod = window_inputs(case)
    if scores == "window":
        self_s, cross_s = oracle(ref.window_scores, q_win, keys, q_mod, k_mod, scale=case.D**-0.5, n=case.n)
    else:
        gen = generator(case.seed + 1000)
        self_s, cross_s = (ranking_scores((case.B, case.Hkv, case.L), gen, scores) for _ in range(2))
    kw = selection_args(case)
    got_idx, got_valid = kernels.select_keep(
        place(self_s, case.layout, device), place(cross_s, case.layout, device), place(k_mod, case.layout, device), **kw
    )
    want_idx, want_valid = ref.select_keep(self_s, cross_s, k_mod, **kw)
    assert got_idx.dtype == torch.int64 and got_valid.dtype == torch.bool
    assert torch.equal(got_idx.cpu(), want_idx), f"keep_idx differs in rows {_rows_differing(got_idx.cpu(), want_idx)}"
    assert torch.equal(got_valid.cpu(), want_valid), f"keep_valid differs in rows {_rows_differing(got_valid.cpu(), want_valid)}"


@pytest.mark.parametrize("L, pad", [(5000, 0.0), (40000, 0.3)])
def test_select_keep_long_rows(L, pad, kernels, device):
    """Many positions per thread, and (40000 > 32768) the CUDA kernel's flags in global memory."""
    gen = generator(L)
    self_s, cross_s = (ranking_scores((2, 3, L), gen, kind) for kind in ("ties", "continuous"))
    k_mod = random_padding(2, L, gen, pad)
    k_mod[1, : L - L // 10] = -1  # row 1: fewer real tokens than the budget, kept with padding slots
    kw = dict(budget=L // 5, recent=L // 20, cross_ratio=0.5)
    got_idx, got_valid = kernels.select_keep(self_s.to(device), cross_s.to(device), k_mod.to(device), **kw)
    want_idx, want_valid = ref.select_keep(self_s, cross_s, k_mod, **kw)
    assert torch.equal(got_idx.cpu(), want_idx), f"keep_idx differs in rows {_rows_differing(got_idx.cpu(), want_idx)}"
    assert torch.equal(got_valid.cpu(), want_valid)


def _rows_differing(a: torch.Tensor, b: torch.Tensor):
    return (a != b).any(-1).nonzero().tolist()[:8]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_compact_kv(case, kernels, device):
    q_win, keys, q_mod, k_mod = window_inputs(case)
    gen = generator(case.seed + 1000)
    self_s, cross_s = (ranking_scores((case.B, case.Hkv, case.L), gen, "ties") for _ in range(2))
    keep_idx, _ = ref.select_keep(self_s, cross_s, k_mod, **selection_args(case))
    Dv = case.D if case.seed % 2 else case.D // 2 + 3  # values may have their own head dim
    values = randn((case.B, case.Hkv, case.L, Dv), case.dtype, generator(case.seed + 2000))
    got = kernels.compact_kv(
        place(keys, case.layout, device), place(values, case.layout, device), place(keep_idx, case.layout, device)
    )
    want = ref.compact_kv(keys, values, keep_idx)
    for g, w, name in zip(got, want, ("keys_out", "values_out")):
        assert g.dtype == case.dtype and g.is_contiguous(), name
        assert torch.equal(g.cpu(), w), f"{name} is not an exact copy: {int((g.cpu() != w).sum())} elements differ"


def test_compact_kv_unchecked_indices(kernels, device):
    """check_indices=False gathers the same rows; a bad index then goes unreported on
    CUDA (its row is zero-filled, nothing out of bounds is read), still raises on CPU."""
    gen = generator(41)
    keys = randn((2, 3, 50, 64), torch.bfloat16, gen)
    values = randn((2, 3, 50, 40), torch.bfloat16, gen)
    idx = torch.sort(torch.randperm(50, generator=gen)[:17]).values.expand(2, 3, 17).contiguous()
    want = ref.compact_kv(keys, values, idx)
    assert all(torch.equal(g, w) for g, w in zip(ref.compact_kv(keys, values, idx, check_indices=False), want))
    on = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    got = kernels.compact_kv(*on(keys, values, idx), check_indices=False)
    for g, w, name in zip(got, want, ("keys_out", "values_out")):
        assert torch.equal(g.cpu(), w), name
    bad = idx.clone()
    bad[1, 2, -1] = 50
    if device.type == "cpu":
        with pytest.raises(IndexError, match="keep_idx"):
            kernels.compact_kv(*on(keys, values, bad), check_indices=False)
        return
    for g, w in zip(kernels.compact_kv(*on(keys, values, bad), check_indices=False), want):
        g = g.cpu()
        assert not g[1, 2, -1].any(), "the row of the bad index must be zero-filled"
        g[1, 2, -1] = w[1, 2, -1]
        assert torch.equal(g, w), "rows with valid indices must be gathered as usual"


def kernels_launched(fn):
    """(names of the CUDA kernels fn launched, fn's result), from the torch profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}, result


def assert_launched(kernel: str, launched) -> None:
    if not launched:  # CUPTI records nothing under compute-sanitizer: the results were still checked
        pytest.skip(f"the CUDA profiler recorded no kernels, so {kernel} could not be confirmed")
    assert any(kernel in name for name in launched), f"{kernel} not among the launched kernels {sorted(launched)}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(dict(B=2, H=28, Hkv=4, W=300, L=2100, D=128, n=1.0), id="gqa7-W300-L2100-D128"),
        pytest.param(dict(B=2, H=32, Hkv=16, W=260, L=2100, D=128, n=1.0), id="gqa2-W260-L2100-D128-two-tiles"),
        pytest.param(dict(B=1, H=8, Hkv=8, W=130, L=700, D=64, n=0.0), id="mha-W130-L700-D64"),
        pytest.param(dict(B=2, H=6, Hkv=2, W=70, L=333, D=80, n=4.0), id="gqa3-W70-L333-D80"),
        pytest.param(dict(B=1, H=2, Hkv=1, W=40, L=260, D=256, n=1.0), id="gqa2-W40-L260-D256"),
    ],
)
def test_window_scores_tensor_cores_match_float32(shape, dtype, kernels):
    """Half-precision inputs run the tensor-core kernels (window_scores_mma.cuh), the same
    values in float32 the CUDA-core ones: both accumulate in float and must agree, over
    several row and key tiles, GQA, padded head dims and left padding, with the pass-2
    variant (one or two key tiles per warp) that window_scores.cu's rule picks."""
    B, H, Hkv, W, L, D, n = (shape[k] for k in ("B", "H", "Hkv", "W", "L", "D", "n"))
    gen = generator(7)
    q = randn((B, H, W, D), dtype, gen).cuda()
    keys = randn((B, Hkv, L, D), dtype, gen).cuda()
    k_mod = modality_ids(B, L, "left", gen).cuda()
    q_mod = k_mod[:, L - W :].contiguous()
    kw = dict(scale=D**-0.5, n=n)
    launched, got = kernels_launched(lambda: kernels.window_scores(q, keys, q_mod, k_mod, **kw))
    want = kernels.window_scores(q.float(), keys.float(), q_mod, k_mod, **kw)
    for g, w, name in zip(got, want, ("self_scores", "cross_scores")):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    padded_d = 64 if D <= 64 else (128 if D <= 128 else 256)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    two_tiles = padded_d == 128 and H // Hkv * W >= 256 and -(-L // 256) * B * Hkv >= sms
    bf16 = "true" if dtype == torch.bfloat16 else "false"
    assert_launched(f"window_scores_mma_kernel<{bf16}, {padded_d}, {2 if two_tiles else 1}>", launched)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_nsoftmax_attention(case, kernels, device):
    """Q = W new queries at the end of a cache of Lc = L slots; dead slots from the padding."""
    q, keys, _, k_mod = window_inputs(case)
    gen = generator(case.seed + 3000)
    Dv = case.D if case.seed % 2 == 0 else case.D // 2 + 5
    values = randn((case.B, case.Hkv, case.L, Dv), case.dtype, gen)
    if case.padding == "none":
        kv_valid = None
    elif case.seed % 2:  # [B, Lc]
        kv_valid = k_mod >= 0
    else:  # [B, Hkv, Lc] with extra dead slots per head
        kv_valid = (k_mod >= 0)[:, None] & (torch.rand(case.B, case.Hkv, case.L, generator=gen) > 0.2)
    kw = dict(scale=case.D**-0.5, n=case.n)
    got = kernels.nsoftmax_attention(
        place(q, case.layout, device), place(keys, case.layout, device), place(values, case.layout, device),
        kv_valid=None if kv_valid is None else place(kv_valid, case.layout, device), **kw,
    )
    args = (q, keys, values)
    want = oracle(ref.nsoftmax_attention, *args, kv_valid=kv_valid, **kw)
    lowp = None if case.dtype == torch.float32 else same_precision(ref.nsoftmax_attention, *args, kv_valid=kv_valid, **kw)
    assert got.dtype == case.dtype and got.device.type == device.type
    assert_matches_oracle(got, want, lowp, row_scale=attention_row_scale(values), what="nsoftmax_attention")


# --------------------------------------------------- NaN beyond the inputs
# Small odd shapes; every input is a slice of a NaN-filled bigger tensor
# (batch, heads, length and head-dim directions), so a read past the valid
# region shows up as NaN in an output.
NAN_SHAPES = [
    pytest.param(dict(B=2, H=6, Hkv=2, W=5, L=13, D=24), id="B2-H6kv2-W5-L13-D24"),
    pytest.param(dict(B=3, H=9, Hkv=3, W=31, L=31, D=80), id="B3-H9kv3-W31-L31-D80"),
    pytest.param(dict(B=1, H=4, Hkv=4, W=1, L=1, D=7), id="B1-H4kv4-W1-L1-D7"),
]


def _nan_inputs(B, H, Hkv, W, L, D, dtype):
    gen = generator(B * 1000 + L)
    q = randn((B, H, W, D), dtype, gen)
    keys = randn((B, Hkv, L, D), dtype, gen)
    values = randn((B, Hkv, L, D + 1), dtype, gen)
    k_mod = modality_ids(B, L, "left", gen)
    return q, keys, values, k_mod


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", NAN_SHAPES)
def test_nan_beyond_valid_region_never_reaches_outputs(shape, dtype, kernels, device):
    q, keys, values, k_mod = _nan_inputs(**shape, dtype=dtype)
    W, L = shape["W"], shape["L"]
    q_mod = k_mod[:, L - W :].clone()
    nan = lambda t: place(t, "nan_margin", device)  # noqa: E731
    scores = kernels.window_scores(nan(q), nan(keys), nan(q_mod), nan(k_mod), scale=0.2, n=1.0)
    assert_no_nan(scores, "window_scores")
    budget = max(1, L // 2)
    keep = kernels.select_keep(nan(scores[0].contiguous()), nan(scores[1].contiguous()), nan(k_mod),
                               budget=budget, recent=min(1, budget), cross_ratio=0.5)
    assert torch.equal(keep[0].cpu(), ref.select_keep(scores[0].cpu(), scores[1].cpu(), k_mod, budget=budget,
                                                     recent=min(1, budget), cross_ratio=0.5)[0])
    keep_idx = keep[0].cpu()
    assert_no_nan(kernels.compact_kv(nan(keys), nan(values), nan(keep_idx)), "compact_kv")
    for kv_valid in (None, k_mod >= 0):
        out = kernels.nsoftmax_attention(nan(q), nan(keys), nan(values), scale=0.2, n=0.0,
                                         kv_valid=None if kv_valid is None else nan(kv_valid))
        assert_no_nan(out, "nsoftmax_attention")


# ------------------------------------------------------- NaN in padding
def _padded_with_nan(dtype):
    """Inputs whose padding keys / padding window queries / dead slots are NaN."""
    gen = generator(77)
    B, H, Hkv, W, L, D = 3, 6, 3, 9, 21, 40
    q = randn((B, H, W, D), dtype, gen)
    keys = randn((B, Hkv, L, D), dtype, gen)
    values = randn((B, Hkv, L, D), dtype, gen)
    k_mod = modality_ids(B, L, "left", gen)  # row 0 pads 7, row 2 pads 20: the window covers padding
    q_mod = k_mod[:, L - W :].clone()
    clean = (q.clone(), keys.clone(), values.clone())
    q.masked_fill_((q_mod < 0)[:, None, :, None], float("nan"))
    keys.masked_fill_((k_mod < 0)[:, None, :, None], float("nan"))
    values.masked_fill_((k_mod < 0)[:, None, :, None], float("nan"))
    return q, keys, values, q_mod, k_mod, clean


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_NAMES.get)
def test_nan_in_padding_keys_and_queries_never_scores(dtype, kernels, device):
    q, keys, _, q_mod, k_mod, (q_clean, keys_clean, _) = _padded_with_nan(dtype)
    kw = dict(scale=40**-0.5, n=1.0)
    want = oracle(ref.window_scores, q_clean, keys_clean, q_mod, k_mod, **kw)
    assert_no_nan(oracle(ref.window_scores, q, keys, q_mod, k_mod, **kw), "reference window_scores")
    got = kernels.window_scores(q.to(device), keys.to(device), q_mod.to(device), k_mod.to(device), **kw)
    assert_no_nan(got, "window_scores")
    lowp = None if dtype == torch.float32 else same_precision(ref.window_scores, q_clean, keys_clean, q_mod, k_mod, **kw)
    for i in range(2):
        assert_matches_oracle(got[i], want[i], None if lowp is None else lowp[i], row_scale=scores_row_scale(*want),
                              what=f"window_scores[{i}]")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_NAMES.get)
def test_nan_in_dead_slots_never_attended(dtype, kernels, device):
    q, keys, values, _, k_mod, _ = _padded_with_nan(dtype)
    q = torch.nan_to_num(q[:, :, -2:])  # two new queries, all real
    out = kernels.nsoftmax_attention(q.to(device), keys.to(device), values.to(device), scale=0.15, n=1.0,
                                     kv_valid=(k_mod >= 0).to(device))
    assert_no_nan(out, "nsoftmax_attention")


def test_reference_never_attends_nan_dead_slots():
    q, keys, values, _, k_mod, _ = _padded_with_nan(torch.float32)
    out = ref.nsoftmax_attention(torch.nan_to_num(q[:, :, -2:]), keys, values, scale=0.15, n=1.0, kv_valid=k_mod >= 0)
    assert_no_nan(out, "reference nsoftmax_attention")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(dict(B=2, H=32, Hkv=32, Q=1, Lc=3000, D=128, n=0.0, valid="shared"), id="mha-Lc3000-D128"),
        pytest.param(dict(B=1, H=8, Hkv=2, Q=2, Lc=777, D=64, n=1.0, valid=None), id="gqa4-Q2-Lc777-D64"),
        pytest.param(dict(B=3, H=4, Hkv=2, Q=1, Lc=300, D=256, n=4.0, valid="per_head"), id="gqa2-Lc300-D256"),
        pytest.param(dict(B=1, H=12, Hkv=4, Q=1, Lc=50, D=80, n=1.0, valid="per_head"), id="gqa3-Lc50-D80"),
    ],
)
def test_nsoftmax_attention_decode_kernel_matches_float32(shape, dtype, kernels):
    """At most 8 query rows per KV head in half precision run the decode kernel
    (attention_decode.cuh), float32 runs the tiled one: they must agree, with many key
    splits, Q > 1 (causal), dead slots holding NaN, head dims of one and two chunks."""
    B, H, Hkv, Q, Lc, D, n = (shape[k] for k in ("B", "H", "Hkv", "Q", "Lc", "D", "n"))
    gen = generator(11)
    q = randn((B, H, Q, D), dtype, gen).cuda()
    keys = randn((B, Hkv, Lc, D), dtype, gen)
    values = randn((B, Hkv, Lc, D), dtype, gen)
    kv_valid = None
    if shape["valid"] is not None:
        valid_shape = (B, Lc) if shape["valid"] == "shared" else (B, Hkv, Lc)
        kv_valid = torch.rand(valid_shape, generator=gen) > 0.1
        kv_valid[..., -Q:] = True
        dead = ~(kv_valid if kv_valid.dim() == 3 else kv_valid[:, None])
        keys, values = keys.masked_fill(dead[..., None], float("nan")), values.masked_fill(dead[..., None], float("nan"))
        kv_valid = kv_valid.cuda()
    keys, values = keys.cuda(), values.cuda()
    kw = dict(scale=D**-0.5, n=n, kv_valid=kv_valid)
    launched, got = kernels_launched(lambda: kernels.nsoftmax_attention(q, keys, values, **kw))
    want = kernels.nsoftmax_attention(q.float(), keys.float(), values.float(), **kw)
    assert_no_nan(got, "nsoftmax_attention")
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the output is rounded to dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert_launched("attention_decode_kernel", launched)


# ------------------------------------------------------------ determinism
def test_cpu_ops_are_deterministic(kernels):
    """Two runs give bitwise-identical results (threads split the work on CPU)."""
    case = Case(torch.bfloat16, 3, 8, 2, 80, 513, 64, 1.0, "transposed", "left", torch.int64, 5)
    q_win, keys, q_mod, k_mod = window_inputs(case)
    values = randn(keys.shape, case.dtype, generator(9))
    runs = []
    for _ in range(2):
        s, c = kernels.window_scores(q_win, keys, q_mod, k_mod, scale=0.1, n=1.0)
        idx, valid = kernels.select_keep(s, c, k_mod, budget=200, recent=16, cross_ratio=0.4)
        k_out, v_out = kernels.compact_kv(keys, values, idx)
        attn = kernels.nsoftmax_attention(q_win, keys, values, scale=0.1, n=4.0, kv_valid=k_mod >= 0)
        runs.append((s, c, idx, valid, k_out, v_out, attn))
    for name, a, b in zip(("self_scores", "cross_scores", "keep_idx", "keep_valid", "keys_out", "values_out", "attention"), *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ---------------------------------------------------------------- opcheck
def _opcheck_args(name, dtype):
    gen = generator(3)
    B, H, Hkv, W, L, D = 2, 4, 2, 3, 9, 16
    q = randn((B, H, W, D), dtype, gen)
    keys = randn((B, Hkv, L, D), dtype, gen)
    values = randn((B, Hkv, L, D), dtype, gen)
    k_mod = modality_ids(B, L, "left", gen)
    if name == "window_scores":
        return (q, keys, k_mod[:, -W:].clone(), k_mod), dict(scale=0.25, n=1.0)
    if name == "window_scores_lse":
        return (q, keys, k_mod[:, -W:].clone(), k_mod), dict(scale=0.25, n=1.0, lse=torch.randn(B, H, W, generator=gen))
    if name == "select_keep":
        s, c = ref.window_scores(q, keys, k_mod[:, -W:], k_mod, scale=0.25)
        return (s, c, k_mod), dict(budget=5, recent=1, cross_ratio=0.4)
    if name == "compact_kv":
        return (keys, values, torch.tensor([0, 2, 3, 7, 8]).expand(B, Hkv, 5).contiguous()), {}
    return (q, keys, values), dict(scale=0.25, n=1.0, kv_valid=k_mod >= 0)


OPCHECK_CASES = [
    pytest.param(name, dtype, id=f"{name}-{DTYPE_NAMES[dtype]}")
    for name in ("window_scores", "compact_kv", "nsoftmax_attention")
    for dtype in FLOAT_DTYPES
] + [
    pytest.param("select_keep", torch.float32, id="select_keep-f32"),  # scores are float32 only
    pytest.param("window_scores_lse", torch.bfloat16, id="window_scores-lse-bf16"),
]


@pytest.mark.parametrize("name, dtype", OPCHECK_CASES)
def test_opcheck(name, dtype, kernels):
    args, kwargs = _opcheck_args(name, dtype)
    torch.library.opcheck(getattr(torch.ops.cspkv, name.removesuffix("_lse")).default, args, kwargs)
