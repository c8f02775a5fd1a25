"""Selection: the kept key indices per row and KV head, from a policy's scores and the row plans."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence, Tuple

import torch

from .. import ops
from .budget import RowPlan


def fill_to_budget(keep_idx: torch.Tensor, keep_valid: torch.Tensor, L: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every slot of keep_idx [B, Hkv, K] that holds the sentinel L (a row of a smaller budget)
    one of its row's lowest unused positions, marked invalid; every row comes out ascending.

    Exactly K positions per row and head are kept or added, so sorting finds them in order: no
    data-dependent shape, so no wait for the device (as `nonzero` would); one pass for the whole
    batch, whatever its number of rows.
    """
    B, Hkv, K = keep_idx.shape
    device = keep_idx.device
    taken = torch.zeros(B, Hkv, L + 1, dtype=torch.bool, device=device).scatter_(2, keep_idx, True)[..., :L]
    free = ~taken
    extra = free & (free.long().cumsum(-1) <= (keep_idx == L).sum(-1, keepdim=True))
    positions = torch.arange(L, device=device)
    new_idx = torch.where(taken | extra, positions, positions + L).sort(dim=-1).values[..., :K]
    valid_at = torch.zeros(B, Hkv, L + 1, dtype=torch.bool, device=device).scatter_(2, keep_idx, keep_valid)[..., :L]
    return new_idx, valid_at.gather(2, new_idx)


def select(
    self_scores: torch.Tensor, cross_scores: torch.Tensor, k_mod: torch.Tensor, plans: Sequence[RowPlan],
    budgets: Optional[torch.Tensor] = None, cross_ratios: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """keep_idx int64 [B, Hkv, K] (ascending) and keep_valid bool [B, Hkv, K], K = max row budget.

    One `ops.select_keep` call when every row has the same (budget, recent, cross_ratio);
    otherwise one per row, on a slice of the batch (no index tensor to send to the device), and
    the rows of smaller budgets are filled up to K with dead slots in one pass for the batch.

    `budgets` int64 [B, Hkv] and `cross_ratios` float [B, Hkv] (CPU; `allocation.head_budgets`),
    when given, replace the plans' budget and cross ratio per (row, KV head): a row whose heads
    differ selects per head, on a slice, and K is the largest head budget.
    """
    if budgets is None and cross_ratios is None:
        return _select_rows(self_scores, cross_scores, k_mod, plans)
    B, Hkv, L = self_scores.shape
    sizes = budgets.tolist() if budgets is not None else [[p.budget] * Hkv for p in plans]
    ratios = cross_ratios.tolist() if cross_ratios is not None else [[p.cross_ratio] * Hkv for p in plans]
    heads = [list(zip(sizes[b], ratios[b])) for b in range(B)]
    if all(len(set(row)) == 1 for row in heads):  # heads alike within each row: a plan per row
        return _select_rows(self_scores, cross_scores, k_mod,
                            [replace(p, budget=int(row[0][0]), recent=min(p.recent, int(row[0][0])), cross_ratio=float(row[0][1]))
                             for p, row in zip(plans, heads)])

    K = max(max(size) for size in sizes)
    keep_idx = torch.full((B, Hkv, K), L, dtype=torch.int64, device=self_scores.device)  # L: not chosen
    keep_valid = torch.zeros(B, Hkv, K, dtype=torch.bool, device=self_scores.device)
    for b, p in enumerate(plans):
        rows = slice(b, b + 1)
        groups = [(slice(0, Hkv), heads[b][0])] if len(set(heads[b])) == 1 else [
            (slice(h, h + 1), heads[b][h]) for h in range(Hkv)]
        for at, (size, ratio) in groups:
            idx, valid = ops.select_keep(self_scores[rows, at], cross_scores[rows, at], k_mod[rows],
                                         budget=int(size), recent=min(p.recent, int(size)), cross_ratio=float(ratio))
            keep_idx[b, at, :size], keep_valid[b, at, :size] = idx[0], valid[0]
    return fill_to_budget(keep_idx, keep_valid, L)


def _select_rows(
    self_scores: torch.Tensor, cross_scores: torch.Tensor, k_mod: torch.Tensor, plans: Sequence[RowPlan]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`select` with one (budget, recent, cross_ratio) per row, from its plan."""
    B, Hkv, L = self_scores.shape
    if len({(p.budget, p.recent, p.cross_ratio) for p in plans}) == 1:
        p = plans[0]
        return ops.select_keep(self_scores, cross_scores, k_mod, budget=p.budget, recent=p.recent, cross_ratio=p.cross_ratio)

    K = max(p.budget for p in plans)
    keep_idx = torch.full((B, Hkv, K), L, dtype=torch.int64, device=self_scores.device)  # L: not chosen
    keep_valid = torch.zeros(B, Hkv, K, dtype=torch.bool, device=self_scores.device)
    for b, p in enumerate(plans):
        rows = slice(b, b + 1)
        idx, valid = ops.select_keep(self_scores[rows], cross_scores[rows], k_mod[rows],
                                     budget=p.budget, recent=p.recent, cross_ratio=p.cross_ratio)
        keep_idx[b, :, : p.budget], keep_valid[b, :, : p.budget] = idx[0], valid[0]
    return fill_to_budget(keep_idx, keep_valid, L)
