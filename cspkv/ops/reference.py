"""Pure-torch versions of every cspkv op: the test oracle and the fallback.

These follow the contract in DESIGN.md literally and favour clarity over
speed: `window_scores` materialises the full [B, H, W, L] probability matrix,
which the compiled kernels never do. Every function validates its arguments
with the same messages as the C++ ops (see `cspkv.ops.checks`); integer and
real scalar arguments may be numpy scalars.

Conventions shared by all ops
-----------------------------
* Modality ids are integers >= 0; ``-1`` marks padding, which never scores,
  never attends and is never kept as a real token.
* All arithmetic runs in float32 whatever the input dtype.
* n-softmax of a row ``s`` over its allowed entries is
  ``exp(s_j) / (n + sum_j' exp(s_j'))``, computed as ``exp(s_j - lse_n)`` with
  ``lse_n = logaddexp(logsumexp(s), log n)`` (``lse_n = logsumexp(s)`` for n = 0).
  A row with no allowed entry has probability 0 everywhere.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import checks


def _nsoftmax(logits: torch.Tensor, allowed: torch.Tensor, n: float, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n-softmax over the last dim restricted to `allowed`; 0 where not allowed.

    `lse` (broadcastable to logits[..., :1]) replaces the rows' log-sum-exp; a row
    whose given lse is -inf adds nothing.
    """
    masked = logits.masked_fill(~allowed, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    else:
        allowed = allowed & (lse > float("-inf"))
    if n > 0:
        lse = torch.logaddexp(lse, torch.tensor(math.log(n), dtype=lse.dtype, device=lse.device))
    return torch.where(allowed, torch.exp(masked - lse), torch.zeros((), dtype=logits.dtype, device=logits.device))


def window_scores(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    q_mod: torch.Tensor,
    k_mod: torch.Tensor,
    *,
    scale: float,
    n: float = 1.0,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Self- and cross-modality attention mass each key gets from the window.

    Parameters
    ----------
    q_win : [B, H, W, D] float tensor, post-RoPE queries of the last W prompt positions.
    keys : [B, Hkv, L, D] float tensor, post-RoPE keys; H % Hkv == 0.
    q_mod : [B, W] int32/int64 modality ids of the window queries (-1 = padding).
    k_mod : [B, L] int32/int64 modality ids of the keys (-1 = padding).
    scale : logit scale, > 0 (usually 1/sqrt(D)).
    n : n-softmax constant, >= 0 (0 = plain softmax).
    lse : optional float32 [B, H, W], each window query row's log-sum-exp of its
        scaled logits over the keys it may see (as the prefill attention computes
        it). The kernels then skip the pass that computes it; a row whose lse is
        -inf adds nothing. Values inconsistent with the keys give wrong scores.

    Returns
    -------
    (self_scores, cross_scores) : two float32 [B, Hkv, L] tensors. Window query
    ``w`` sits at position ``L - W + w`` and sees keys ``j <=`` that position.
    ``self_scores[b, h, j]`` sums, over the window queries of the same modality
    as key j and over the G = H / Hkv query heads of KV head h, the n-softmax
    probability of key j; ``cross_scores`` does the same over queries of another
    modality. Padding keys score 0; padding queries contribute nothing.

    Example
    -------
    >>> q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8)
    >>> ids = torch.tensor([[0, 0, 1, 1, 0]])
    >>> s, c = window_scores(q, k, ids[:, -2:], ids, scale=8 ** -0.5)
    >>> s.shape, c.shape
    (torch.Size([1, 2, 5]), torch.Size([1, 2, 5]))
    """
    scale, n = checks.as_real(scale), checks.as_real(n)
    checks.window_scores_args(q_win, keys, q_mod, k_mod, scale, n, lse)
    B, H, W, D = q_win.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    G = H // Hkv
    q = q_win.float().reshape(B, Hkv, G, W, D)
    logits = torch.einsum("bhgwd,bhld->bhgwl", q, keys.float()) * scale

    positions = torch.arange(L, device=keys.device)
    causal = positions[None, :] <= (L - W + torch.arange(W, device=keys.device))[:, None]  # [W, L]
    allowed = causal[None] & (k_mod >= 0)[:, None, :] & (q_mod >= 0)[:, :, None]  # [B, W, L]
    row_lse = None if lse is None else lse.reshape(B, Hkv, G, W, 1)
    probs = _nsoftmax(logits, allowed[:, None, None], n, row_lse)  # [B, Hkv, G, W, L]

    same = (q_mod[:, :, None] == k_mod[:, None, :])[:, None, None]  # [B, 1, 1, W, L]
    self_scores = (probs * same).sum(dim=(2, 3))
    cross_scores = (probs * ~same).sum(dim=(2, 3))
    return self_scores, cross_scores


def _ranked(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Indices of eligible entries, best score first, lower index first on ties, NaN last."""
    idx = eligible.nonzero().squeeze(1)
    values = scores[idx]
    nan = torch.isnan(values)
    # "+ 0.0" folds -0.0 into +0.0 so that the two compare equal in every backend.
    order = torch.sort(values.masked_fill(nan, float("-inf")) + 0.0, descending=True, stable=True).indices
    # NaN ranks below every number (-inf included); stable, so ties keep index order.
    order = order[torch.sort(nan[order].to(torch.uint8), stable=True).indices]
    return idx[order]


def select_keep(
    self_scores: torch.Tensor,
    cross_scores: torch.Tensor,
    k_mod: torch.Tensor,
    *,
    budget: int,
    recent: int,
    cross_ratio: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose which keys survive pruning, per batch row and KV head.

    Parameters
    ----------
    self_scores, cross_scores : float32 [B, Hkv, L] (from `window_scores`).
    k_mod : [B, L] int32/int64 modality ids, -1 = padding.
    budget : int in [1, L], tokens kept per row and KV head (recent included).
    recent : int in [0, budget], the last `recent` real tokens of a row, always kept.
    cross_ratio : float in [0, 1]; ``k_cross = floor(cross_ratio * (budget - recent))``
        slots go to the best cross scores, ``k_self = budget - recent - k_cross`` to
        the best self scores.

    Returns
    -------
    (keep_idx, keep_valid) : int64 [B, Hkv, budget] strictly ascending key indices
    and bool [B, Hkv, budget], True where the kept slot holds a real token.

    Selection, for a row with more than `budget` real tokens: the recent tokens;
    then the `k_cross` candidates (real, not recent) with the highest cross
    score; then the `k_self` remaining candidates with the highest self score.
    Picking self from what cross left means a token wanted by both rankings is
    stored once and its second slot goes to the next best, so exactly `budget`
    distinct real tokens are kept. Ties go to the lower index; a NaN score
    ranks below every number.

    A row with at most `budget` real tokens keeps all of them and fills the
    remaining slots with its padding positions, lowest first, marked False in
    `keep_valid` (they hold whatever K/V the padding had and must stay masked).

    Example
    -------
    >>> s = torch.tensor([[[0.1, 0.9, 0.2, 0.0, 0.5]]]); c = torch.tensor([[[0.8, 0.0, 0.1, 0.3, 0.0]]])
    >>> idx, ok = select_keep(s, c, torch.zeros(1, 5, dtype=torch.long), budget=3, recent=1, cross_ratio=0.5)
    >>> idx.tolist(), ok.all().item()
    ([[[0, 1, 4]]], True)
    """
    budget, recent, cross_ratio = checks.as_int(budget), checks.as_int(recent), checks.as_real(cross_ratio)
    checks.select_keep_args(self_scores, cross_scores, k_mod, budget, recent, cross_ratio)
    B, Hkv, L = self_scores.shape
    real = k_mod >= 0
    rank_from_end = real.flip(-1).long().cumsum(-1).flip(-1) - 1  # 0 = last real token
    is_recent = real & (rank_from_end < recent)
    candidate = real & ~is_recent
    heavy = budget - recent
    k_cross = int(math.floor(cross_ratio * heavy))
    k_self = heavy - k_cross

    keep = torch.zeros(B, Hkv, L, dtype=torch.bool, device=self_scores.device)
    for b in range(B):
        n_real = int(real[b].sum())
        if n_real <= budget:
            pad_rank = (~real[b]).long().cumsum(-1)  # 1 = first padding position
            keep[b] = real[b] | (~real[b] & (pad_rank <= budget - n_real))
            continue
        for h in range(Hkv):
            picked = is_recent[b].clone()
            cross_pick = _ranked(cross_scores[b, h], candidate[b])[:k_cross]
            picked[cross_pick] = True
            self_pick = _ranked(self_scores[b, h], candidate[b] & ~picked)[:k_self]
            picked[self_pick] = True
            keep[b, h] = picked
    keep_idx = keep.nonzero()[:, 2].reshape(B, Hkv, budget)
    keep_valid = real[:, None, :].expand(B, Hkv, L).gather(2, keep_idx)
    return keep_idx, keep_valid


def compact_kv(
    keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, *, check_indices: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept tokens into a new, smaller cache.

    Parameters
    ----------
    keys : [B, Hkv, L, D] float tensor.
    values : [B, Hkv, L, Dv] float tensor, dtype of keys.
    keep_idx : int64 [B, Hkv, K], strictly ascending, values in [0, L).
    check_indices : validate the values of keep_idx (range, order) and raise
        on a bad one: IndexError for a value outside [0, L), ValueError for a
        row that is not strictly ascending. Checking needs the data: on a GPU
        it waits for it (a device sync). False vouches for keep_idx, as the
        pruning path does for `select_keep`'s output; what a bad keep_idx then
        does depends on the backend:

        * CPU kernel (`cspkv.ops` on CPU tensors): checks anyway (no sync to
          save, and an unchecked index would read out of bounds), raising as
          with True.
        * CUDA kernel: nothing is checked or raised; an output row k whose
          index lies outside [0, L) or is not greater than the index before it
          (``keep_idx[..., k - 1]`` as given: duplicates and out-of-order
          entries) is written as zeros in both outputs; the other rows are
          copied.
        * this reference (the fallback without the extension): the value
          checks are skipped and ``torch.gather`` runs: duplicates and any
          order are copied as given; a value outside [0, L), negative ones
          included, raises torch's RuntimeError ("index ... is out of bounds")
          on a CPU and trips a device-side assert on a GPU.

        The gradient (`cspkv.ops.compact_kv` is differentiable in keys and
        values) assumes a valid keep_idx.

    Returns
    -------
    (keys_out, values_out) : contiguous [B, Hkv, K, D] and [B, Hkv, K, Dv],
    ``keys_out[b, h, k] = keys[b, h, keep_idx[b, h, k]]`` (an exact copy).

    Example
    -------
    >>> k, v = torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    >>> ko, vo = compact_kv(k, v, torch.tensor([[[1, 3]]]))
    >>> torch.equal(ko[0, 0], k[0, 0, [1, 3]])
    True
    """
    checks.compact_kv_args(keys, values, keep_idx, check_indices)
    idx = keep_idx[..., None]
    keys_out = keys.gather(2, idx.expand(-1, -1, -1, keys.shape[3]))
    values_out = values.gather(2, idx.expand(-1, -1, -1, values.shape[3]))
    return keys_out.contiguous(), values_out.contiguous()


def nsoftmax_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    scale: float,
    n: float = 0.0,
    kv_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of Q new queries over a (pruned) cache, with an n-softmax.

    Parameters
    ----------
    q : [B, H, Q, D] float tensor; the Q queries are the last Q cache positions.
    keys : [B, Hkv, Lc, D] float tensor, dtype of q; H % Hkv == 0 (GQA).
    values : [B, Hkv, Lc, Dv] float tensor, dtype of q.
    scale : logit scale, > 0.
    n : n-softmax constant, >= 0; 0 is plain softmax.
    kv_valid : optional bool [B, Lc] or [B, Hkv, Lc]; False marks dead slots.

    Returns
    -------
    [B, H, Q, Dv] tensor of q's dtype. Query ``i`` attends to cache slots
    ``j <= Lc - Q + i`` that are valid; a query with no such slot returns zeros.

    Example
    -------
    >>> q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    >>> nsoftmax_attention(q, k, v, scale=8 ** -0.5).shape
    torch.Size([2, 4, 1, 8])
    """
    scale, n = checks.as_real(scale), checks.as_real(n)
    checks.nsoftmax_attention_args(q, keys, values, scale, n, kv_valid)
    B, H, Q, D = q.shape
    Hkv, Lc = keys.shape[1], keys.shape[2]
    G = H // Hkv
    logits = torch.einsum("bhgqd,bhld->bhgql", q.float().reshape(B, Hkv, G, Q, D), keys.float()) * scale
    positions = torch.arange(Lc, device=q.device)
    allowed = positions[None, :] <= (Lc - Q + torch.arange(Q, device=q.device))[:, None]  # [Q, Lc]
    allowed = allowed[None, None, None]  # [1, 1, 1, Q, Lc]
    if kv_valid is not None:
        valid = kv_valid[:, None] if kv_valid.dim() == 2 else kv_valid  # [B, 1 or Hkv, Lc]
        allowed = allowed & valid[:, :, None, None, :]
    probs = _nsoftmax(logits, allowed, n)
    values = values.float()
    if kv_valid is not None:  # dead slots may hold anything (NaN included): 0 * NaN would leak
        values = values.masked_fill(~valid[..., None], 0.0)
    out = torch.einsum("bhgql,bhle->bhgqe", probs, values)
    return out.reshape(B, H, Q, values.shape[3]).to(q.dtype)


def packed_attention(
    q: torch.Tensor,
    key_data: torch.Tensor,
    value_data: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    n: float = 0.0,
) -> torch.Tensor:
    """Attention of T new queries over a packed cache: one segment of rows per (batch row, KV head).

    Parameters
    ----------
    q : [B, H, T, D] float tensor; the T queries are the last T slots of every segment.
    key_data : [N, D] float tensor, dtype of q: the segments' keys, one row per slot.
    value_data : [N, Dv] float tensor, dtype of q.
    offsets : int64 [B * Hkv], the first row of segment ``b * Hkv + h`` (KV head h of batch row b);
        H % Hkv == 0 (GQA: query head h reads KV head h // (H / Hkv)).
    lengths : int64 [B * Hkv], the segment's live slots; segments lie in [0, N) and may differ in
        length (0 included); rows outside every segment (free room) are never read.
    scale : logit scale, > 0.
    n : n-softmax constant, >= 0; 0 is plain softmax.

    Returns
    -------
    [B, H, T, Dv] tensor of q's dtype. Query ``t`` of segment s attends to its slots
    ``j <= lengths[s] - T + t`` (causal among the chunk's own T tokens, which are the segment's
    last T slots); a query with no such slot returns zeros. Equal to `nsoftmax_attention` over the
    segments padded to one length with dead slots.

    Example
    -------
    >>> q, kd, vd = torch.randn(2, 4, 1, 8), torch.randn(10, 8), torch.randn(10, 8)
    >>> offsets, lengths = torch.tensor([0, 3, 5, 9]), torch.tensor([3, 2, 4, 1])
    >>> packed_attention(q, kd, vd, offsets, lengths, scale=8 ** -0.5).shape
    torch.Size([2, 4, 1, 8])
    """
    scale, n = checks.as_real(scale), checks.as_real(n)
    checks.packed_attention_args(q, key_data, value_data, offsets, lengths, scale, n)
    checks.packed_segment_values(offsets, lengths, key_data.shape[0])
    B, H, T, D = q.shape
    segments = offsets.shape[0]
    Hkv = segments // B
    G = H // Hkv
    Dv = value_data.shape[1]
    longest = int(lengths.max())
    if longest == 0:
        return q.new_zeros(B, H, T, Dv)
    slot = torch.arange(longest, device=q.device)
    inside = slot[None, :] < lengths[:, None]  # [S, Lmax]
    rows = torch.where(inside, offsets[:, None] + slot[None, :], torch.zeros((), dtype=torch.int64, device=q.device))
    keys = key_data.float()[rows]  # [S, Lmax, D]
    values = value_data.float()[rows].masked_fill(~inside[..., None], 0.0)
    logits = torch.einsum("sgtd,sld->sgtl", q.float().reshape(segments, G, T, D), keys) * scale
    limit = lengths[:, None] - T + torch.arange(T, device=q.device)[None, :]  # [S, T]: last slot query t sees
    allowed = inside[:, None, :] & (slot[None, None, :] <= limit[:, :, None])  # [S, T, Lmax]
    probs = _nsoftmax(logits, allowed[:, None], n)
    out = torch.einsum("sgtl,sle->sgte", probs, values)
    return out.reshape(B, H, T, Dv).to(q.dtype)
