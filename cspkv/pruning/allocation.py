"""Adaptive budget allocation: one budget spent unevenly across the KV heads of a layer
(`CSPConfig.head_allocation`) and across layers (`CSPConfig.layer_allocation`).

Both follow Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", arXiv 2407.11550): the attention mass a cache loses
is the score of the keys it drops, so a fixed total of slots loses the least when it goes to
the best scores of all heads (or layers) ranked together, instead of the best `K` of each.
A policy's scores are sums of attention probabilities over its window queries (and the GQA
group), so they compare across heads and layers (`Policy.allocates`); the score ranked is
`primary + cross` where the policy splits the two.

Every head keeps at least a floor, `max(recent, ceil(floor * K), 1)` tokens (at most its row's
real length): its recent window, then its own best keys up to the floor; only the slots above
the floors are ranked jointly (Ada-KV's "floor" variant, which keeps a head whose scores look
flat from losing its whole cache). Joint ranks that tie go to the lower rank within a head,
then the lower head, so equal scores give every head (layer) the same budget.

Pure torch: the patch (`cspkv.hf.layer`) and `benchmarks/quality.py` call the same functions.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch

from .budget import RowPlan
from .policies import Scores

def allocation_scores(scores: Scores) -> torch.Tensor:
    """float32 [B, Hkv, L]: what the joint ranking ranks, the whole attention mass of a key
    (`primary + cross` for a policy that splits them)."""
    return scores.primary if scores.cross is None else scores.primary + scores.cross


def floor_tokens(plan: RowPlan, floor: float) -> int:
    """The tokens every head of a row keeps at least under `plan`: its recent window and
    `ceil(floor * budget)`, at least 1, at most the row's real length.

    >>> floor_tokens(RowPlan(100, 20, 10, 4, 0.0, True), 0.25)
    5
    """
    # The epsilon keeps 0.2 * 20 at 4 (float: 4.000000000000001).
    return min(plan.length, max(plan.recent, math.ceil(floor * plan.budget - 1e-9), 1))


def _allocates(plan: RowPlan) -> bool:
    """Whether a row has slots to spend unevenly: pruned, and keeps fewer than its real tokens."""
    return plan.pruned and plan.budget < plan.length


def _candidates(k_mod: torch.Tensor, plans: Sequence[RowPlan]) -> torch.Tensor:
    """bool [B, L]: the real keys older than each row's recent window (what heavy-hitter slots rank)."""
    real = k_mod >= 0
    from_end = real.flip(-1).long().cumsum(-1).flip(-1) - 1  # 0 = the row's last real token
    recent = torch.tensor([p.recent for p in plans], device=k_mod.device)[:, None]
    return real & (from_end >= recent)


def _sorted_candidates(scores: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """float32 [Hkv, C]: one row's candidate scores [Hkv, L] (at `candidate` [L]) best first per
    head; NaN ranks last (as in `select_keep`)."""
    values = scores[:, candidate].float()
    values = values.masked_fill(torch.isnan(values), float("-inf")) + 0.0  # -0.0 ties +0.0
    return values.sort(dim=-1, descending=True).values


def _joint_counts(curves: torch.Tensor, skip: int, extra: int) -> torch.Tensor:
    """int64 [N]: how many of the `extra` best values of `curves` [N, C] (each row non-increasing),
    past each row's first `skip`, fall in each row; ties go to the lower rank, then the lower row."""
    pool = curves[:, skip:]
    N = pool.shape[0]
    if extra <= 0 or pool.numel() == 0:
        return torch.zeros(N, dtype=torch.int64, device=curves.device)
    flat = pool.transpose(0, 1).reshape(-1)  # rank-major: [rank 0 of every row, rank 1 ..., ...]
    order = torch.sort(flat, descending=True, stable=True).indices[:extra]
    return torch.bincount(order % N, minlength=N)


def head_budgets(scores: Scores, k_mod: torch.Tensor, plans: Sequence[RowPlan], floor: float, *,
                 split_cross: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, KV head) budgets and cross shares spending each row's layer budget `Hkv * K`.

    Parameters
    ----------
    scores : a policy's `Scores` of one layer, float32 [B, Hkv, L].
    k_mod : int [B, L] modality ids (-1 = padding), on the scores' device.
    plans : one `RowPlan` per row (`budget.plan_batch`; K = `plan.budget`).
    floor : `CSPConfig.allocation_floor` in [0, 1]; every head keeps `floor_tokens(plan, floor)`.
    split_cross : the policy splits cross and self scores (`Policy.splits_cross_self`): each
        head's cross share is the row's `cross_ratio` scaled by that head's share of cross mass
        relative to the row's mean over heads, `clamp(rho * s_h / mean_h s_h, 0, 1)` with
        `s_h = cross mass / (cross + self mass)` over the head's candidate keys (real, older
        than the recent window). Heads alike keep the configured ratio; a head that attends
        across modalities more than its neighbours gives cross more of its slots.

    Returns
    -------
    (budgets, cross_ratios) : int64 [B, Hkv] and float64 [B, Hkv], on the CPU (the selection
    reads them as sizes). Per row: ``budgets.sum() == Hkv * K`` exactly, every head in
    [floor_tokens, length]; a row that keeps all its tokens, or is not pruned, keeps its plan
    (budget K and the plan's cross ratio for every head).

    Example
    -------
    >>> flat = torch.full((1, 1, 40), 0.1); peaked = torch.zeros(1, 1, 40); peaked[..., :3] = 1.0
    >>> plan = RowPlan(40, 10, 4, 4, 0.0, True)
    >>> head_budgets(Scores(torch.cat([peaked, flat], 1)), torch.zeros(1, 40, dtype=torch.long), [plan], 0.2)[0]
    tensor([[ 7, 13]])
    """
    B, Hkv, L = scores.primary.shape
    budgets = torch.tensor([[p.budget] * Hkv for p in plans], dtype=torch.int64)
    ratios = torch.tensor([[p.cross_ratio] * Hkv for p in plans], dtype=torch.float64)
    if Hkv == 1:  # one head: its share of the row's cross mass is the mean, so nothing changes
        return budgets, ratios
    mass = allocation_scores(scores)
    candidate = _candidates(k_mod, plans)
    counts: List[Optional[torch.Tensor]] = [None] * B
    shares: List[Optional[torch.Tensor]] = [None] * B
    for b, plan in enumerate(plans):
        if not _allocates(plan):
            continue
        f = floor_tokens(plan, floor)
        curves = _sorted_candidates(mass[b], candidate[b])
        counts[b] = f + _joint_counts(curves, f - plan.recent, Hkv * (plan.budget - f))
        if split_cross and scores.cross is not None and plan.cross_ratio > 0:
            cross = torch.nan_to_num(scores.cross[b][:, candidate[b]].double()).clamp_min(0).sum(-1)
            both = cross + torch.nan_to_num(scores.primary[b][:, candidate[b]].double()).clamp_min(0).sum(-1)
            shares[b] = torch.where(both > 0, cross / both.clamp_min(1e-300), torch.zeros_like(both))
    # One copy to the host for the whole layer.
    moved = [t.cpu() if t is not None else None for t in counts + shares]
    for b, plan in enumerate(plans):
        if moved[b] is not None:
            budgets[b] = moved[b]
        share = moved[B + b]
        if share is not None and float(share.mean()) > 0:
            ratios[b] = (plan.cross_ratio * share / share.mean()).clamp(0.0, 1.0)
    return budgets, ratios


def layer_budgets(scores: Sequence[Scores], k_mod: torch.Tensor, plans: Sequence[RowPlan], floor: float) -> torch.Tensor:
    """Per-(layer, row) budgets spending each row's model-wide `n_layers * K` (per KV head).

    A layer's statistic is its gain curve: the mean over its KV heads of each head's
    candidate scores sorted best first, i.e. the attention mass one more slot per head saves
    at each rank. The slots above every layer's floor go to the best values of all layers'
    curves ranked together, so a layer whose top keys already hold most of its mass (a
    curve that falls fast) gets fewer, and a layer with flat scores more.

    Parameters
    ----------
    scores : one `Scores` per pruned layer, float32 [B, Hkv_l, L] (the head counts and devices
        may differ between layers).
    k_mod : int [B, L] modality ids (-1 = padding), on any device.
    plans : one `RowPlan` per row (`K = plan.budget`, the same for every layer).
    floor : `CSPConfig.allocation_floor`; every layer keeps at least `floor_tokens(plan, floor)`.

    Returns
    -------
    int64 [n_layers, B] on the CPU: per row, the sum over layers is ``n_layers * K`` exactly and
    every layer's budget lies in [floor_tokens, length]; a row that keeps all its tokens, or is
    not pruned, keeps K in every layer. `layer_plans` turns a layer's column into its plans.

    Example
    -------
    >>> flat = Scores(torch.full((1, 2, 40), 0.1)); peaked = torch.zeros(1, 2, 40); peaked[..., :3] = 1.0
    >>> layer_budgets([Scores(peaked), flat], torch.zeros(1, 40, dtype=torch.long), [RowPlan(40, 10, 4, 4, 0.0, True)], 0.2)
    tensor([[ 7],
            [13]])
    """
    n = len(scores)
    budgets = torch.tensor([[p.budget for p in plans]] * n, dtype=torch.int64).reshape(n, len(plans))
    if n <= 1:
        return budgets
    curves_by_layer = []
    for layer_scores in scores:
        mass = allocation_scores(layer_scores)
        candidate = _candidates(k_mod.to(mass.device), plans)
        curves_by_layer.append([_sorted_candidates(mass[b], candidate[b]).mean(0).cpu() if _allocates(p) else None
                                for b, p in enumerate(plans)])
    for b, plan in enumerate(plans):
        if not _allocates(plan):
            continue
        f = floor_tokens(plan, floor)
        curves = torch.stack([layer[b] for layer in curves_by_layer])  # [n_layers, C]
        budgets[:, b] = f + _joint_counts(curves, f - plan.recent, n * (plan.budget - f))
    return budgets


def layer_plans(plans: Sequence[RowPlan], budgets: torch.Tensor) -> List[RowPlan]:
    """One layer's plans under `budgets` int64 [B] (a column of `layer_budgets`): each row's
    budget replaced, its recent window capped by it."""
    out = []
    for plan, budget in zip(plans, budgets.tolist()):
        out.append(plan if budget == plan.budget else replace(plan, budget=budget, recent=min(plan.recent, budget)))
    return out
