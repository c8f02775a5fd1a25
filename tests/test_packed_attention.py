"""`cspkv.ops.packed_attention` (attention over a packed cache: one segment of key/value rows
per batch row and KV head, of its own length) against `cspkv.reference` on CPU and CUDA:
ragged lengths (0 and 1 included), causal chunks (T > 1), GQA, every dtype, free rows full of
NaN that must never be read, and bad inputs that name the argument."""

from __future__ import annotations

import pytest
import torch

import cspkv
from cspkv import reference as ref

from conftest import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    assert_matches_oracle,
    attention_row_scale,
    generator,
    oracle,
    randn,
    same_precision,
)


def packed_inputs(B, H, Hkv, T, D, Dv, lengths, dtype, seed, gap=3):
    """q [B, H, T, D] and a packed store whose segments lie in shuffled order with `gap` free
    rows (NaN) after each: (q, key_data, value_data, offsets, lengths)."""
    gen = generator(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    assert lengths.numel() == B * Hkv
    order = torch.randperm(B * Hkv, generator=gen)  # segment order in memory differs from (b, h) order
    offsets = torch.empty(B * Hkv, dtype=torch.int64)
    start = gap
    for s in order.tolist():
        offsets[s] = start
        start += int(lengths[s]) + gap
    N = start
    key_data = torch.full((N, D), float("nan"), dtype=dtype)
    value_data = torch.full((N, Dv), float("nan"), dtype=dtype)
    for s in range(B * Hkv):
        n = int(lengths[s])
        key_data[offsets[s]: offsets[s] + n] = randn((n, D), dtype, gen)
        value_data[offsets[s]: offsets[s] + n] = randn((n, Dv), dtype, gen)
    q = randn((B, H, T, D), dtype, gen)
    return q, key_data, value_data, offsets, lengths


CASES = [
    # B, H, Hkv, T, D, Dv, lengths
    pytest.param(2, 4, 2, 1, 16, 16, [5, 0, 1, 9], id="decode-gqa2-len0-len1"),
    pytest.param(3, 3, 3, 1, 64, 64, [130, 7, 64, 1, 65, 2, 0, 3, 200], id="decode-mha-long"),
    pytest.param(1, 8, 1, 4, 24, 40, [70], id="chunk4-gqa8-dv40"),
    pytest.param(2, 6, 2, 3, 80, 80, [3, 10, 2, 97], id="chunk3-shorter-than-chunk"),
    pytest.param(2, 4, 4, 5, 8, 8, [5, 6, 0, 1, 129, 64, 65, 7], id="chunk5-mixed"),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("n", [0.0, 1.5])
@pytest.mark.parametrize("B, H, Hkv, T, D, Dv, lengths", CASES)
def test_packed_attention_matches_reference(B, H, Hkv, T, D, Dv, lengths, n, dtype, extension, device):
    q, kd, vd, offsets, lens = packed_inputs(B, H, Hkv, T, D, Dv, lengths, dtype, seed=B * 100 + T + len(lengths))
    kw = dict(scale=D**-0.5, n=n)
    got = cspkv.ops.packed_attention(*(t.to(device) for t in (q, kd, vd, offsets, lens)), **kw)
    args = (q, kd.nan_to_num(), vd.nan_to_num(), offsets, lens)  # the oracle's float math must not see NaN
    want = oracle(ref.packed_attention, *args, **kw)
    lowp = None if dtype == torch.float32 else same_precision(ref.packed_attention, *args, **kw)
    assert got.dtype == dtype and got.device.type == device.type
    assert_matches_oracle(got, want, lowp, row_scale=attention_row_scale(vd.nan_to_num()), what="packed_attention")
    # A query that sees no slot (a segment shorter than the chunk) gives zeros.
    got = got.cpu().float().reshape(B, Hkv, H // Hkv, T, Dv)
    for s, length in enumerate(lengths):
        for t in range(T):
            if length - T + t < 0:
                assert not got[s // Hkv, s % Hkv, :, t].any()


def test_reference_equals_nsoftmax_attention_over_the_padded_layout():
    """The contract: packed_attention is nsoftmax_attention over the segments padded to one length
    (dead slots first), for segments at least as long as the chunk."""
    B, H, Hkv, T, D = 2, 6, 3, 3, 8
    lengths = [4, 9, 3, 12, 5, 3]
    q, kd, vd, offsets, lens = packed_inputs(B, H, Hkv, T, D, D, lengths, torch.float32, seed=5)
    kd, vd = kd.nan_to_num(), vd.nan_to_num()
    S = max(lengths)
    keys = torch.zeros(B, Hkv, S, D)
    values = torch.zeros(B, Hkv, S, D)
    valid = torch.zeros(B, Hkv, S, dtype=torch.bool)
    for s, n in enumerate(lengths):
        b, h = divmod(s, Hkv)
        keys[b, h, S - n:] = kd[offsets[s]: offsets[s] + n]
        values[b, h, S - n:] = vd[offsets[s]: offsets[s] + n]
        valid[b, h, S - n:] = True
    want = ref.nsoftmax_attention(q, keys, values, scale=0.3, n=2.0, kv_valid=valid)
    torch.testing.assert_close(ref.packed_attention(q, kd, vd, offsets, lens, scale=0.3, n=2.0), want)


def test_packed_attention_reads_only_its_segment(extension):
    """Moving a segment's rows elsewhere (and its offset with them) changes nothing; giving two
    segments each other's offsets changes their rows' outputs (the test a wrong indexing fails)."""
    q, kd, vd, offsets, lens = packed_inputs(2, 4, 2, 1, 16, 16, [6, 6, 6, 6], torch.float32, seed=9)
    out = cspkv.ops.packed_attention(q, kd, vd, offsets, lens, scale=0.25)
    swapped = offsets.clone()
    swapped[[0, 1]] = offsets[[1, 0]]
    wrong = cspkv.ops.packed_attention(q, kd, vd, swapped, lens, scale=0.25)
    assert not torch.allclose(wrong[0], out[0])
    assert torch.equal(wrong[1], out[1])
    moved_k = torch.cat([kd, kd[offsets[0]: offsets[0] + 6]])
    moved_v = torch.cat([vd, vd[offsets[0]: offsets[0] + 6]])
    moved = offsets.clone()
    moved[0] = kd.shape[0]
    torch.testing.assert_close(cspkv.ops.packed_attention(q, moved_k, moved_v, moved, lens, scale=0.25), out)


def _bad_base():
    q, kd, vd, offsets, lens = packed_inputs(2, 4, 2, 1, 8, 8, [3, 2, 4, 1], torch.float32, seed=1)
    return dict(q=q, key_data=kd.nan_to_num(), value_data=vd.nan_to_num(), offsets=offsets, lengths=lens)


BAD = [
    ("q-rank3", lambda a: dict(q=a["q"][0]), ValueError, "q must have rank 4"),
    ("key_data-rank3", lambda a: dict(key_data=a["key_data"][None]), ValueError, "key_data must have rank 2"),
    ("value_data-dtype", lambda a: dict(value_data=a["value_data"].half()), TypeError, "value_data must have the dtype of q"),
    ("key_data-D", lambda a: dict(key_data=a["key_data"][:, :7]), ValueError, "head dim D mismatch: q has 8, key_data has 7"),
    ("value_data-N", lambda a: dict(value_data=a["value_data"][:-1]), ValueError, "rows N mismatch"),
    ("offsets-int32", lambda a: dict(offsets=a["offsets"].int()), TypeError, "offsets must be int64"),
    ("lengths-count", lambda a: dict(lengths=a["lengths"][:3]), ValueError, "segments B\\*Hkv mismatch"),
    ("offsets-not-multiple-of-B", lambda a: dict(offsets=a["offsets"][:3], lengths=a["lengths"][:3]), ValueError,
     "offsets must hold B\\*Hkv entries"),
    ("heads", lambda a: dict(q=a["q"][:, :3]), ValueError, "query heads H=3 \\(q\\) must be a multiple of KV heads Hkv=2"),
    ("scale-0", lambda a: dict(scale=0.0), ValueError, "scale must be a finite number > 0"),
    ("n-negative", lambda a: dict(n=-1.0), ValueError, "n must be a finite number >= 0"),
    ("segment-past-N", lambda a: dict(lengths=a["lengths"] + 100), IndexError, "segments \\[offsets, offsets \\+ lengths\\) must lie in"),
    ("negative-length", lambda a: dict(lengths=a["lengths"] - 5), IndexError, "segments .*, lengths >= -4"),
]


@pytest.mark.parametrize("name, change, kind, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, change, kind, message, extension):
    args = _bad_base()
    kw = dict(scale=0.5, n=0.0)
    for k, v in change(args).items():
        (kw if k in ("scale", "n") else args)[k] = v
    call = lambda fn: fn(args["q"], args["key_data"], args["value_data"], args["offsets"], args["lengths"], **kw)  # noqa: E731
    errors = []
    for fn in (torch.ops.cspkv.packed_attention.default, ref.packed_attention):
        with pytest.raises(kind, match="cspkv.packed_attention: " + message) as info:
            call(fn)
        errors.append(str(info.value).splitlines()[0])
    assert errors[0] == errors[1], "the kernel and the reference must say the same"
    if kind is not IndexError:  # the fake kernel has no data to check the segments with
        meta = {k: v.to("meta") for k, v in args.items()}
        with pytest.raises(kind, match="cspkv.packed_attention: " + message):
            torch.ops.cspkv.packed_attention.default(meta["q"], meta["key_data"], meta["value_data"], meta["offsets"],
                                                     meta["lengths"], **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_opcheck(dtype, extension):
    q, kd, vd, offsets, lens = packed_inputs(2, 4, 2, 2, 16, 16, [3, 0, 5, 2], dtype, seed=4)
    torch.library.opcheck(torch.ops.cspkv.packed_attention.default, (q, kd.nan_to_num(), vd.nan_to_num(), offsets, lens),
                          dict(scale=0.25, n=1.0))


def test_no_gradient(extension):
    args = _bad_base()
    args["q"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="cspkv.packed_attention: has no gradient"):
        cspkv.ops.packed_attention(*args.values(), scale=0.5)
