"""Budget arithmetic and the CSP selection policy, per batch row.

A padded batch holds prompts of different real lengths. Every size in a
`CSPConfig` is resolved against each row's own real length, so a row keeps
the same tokens alone and inside a batch: `plan_batch` gives one `RowPlan` per
row, `window_query_ids` marks the window queries a shorter row does not own as
padding, and `select` runs `ops.select_keep` per group of rows with equal
settings, then pads every row to the batch's largest budget with dead slots
(``keep_valid`` False).

`scores` dispatches on `CSPConfig.policy`: CSP's self/cross scores, or the
single ranking of a baseline (`cspkv.baselines`) selected with cross_ratio 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import baselines, ops
from .config import CSPConfig

logger = logging.getLogger("cspkv")


def token_count(spec, length: int) -> int:
    """Tokens meant by a size `spec` for a prompt of `length` real tokens.

    A float is a fraction of `length`, rounded half up; an int is a count.
    The result is clamped to [0, length].

    >>> token_count(0.2, 101), token_count(0.2, 102), token_count(30, 20)
    (20, 20, 20)
    """
    if isinstance(spec, float):
        count = int(math.floor(spec * length + 0.5))
    else:
        count = int(spec)
    return max(0, min(count, length))


@dataclass(frozen=True)
class RowPlan:
    """What one batch row keeps.

    Attributes
    ----------
    length : real (non-padding) prompt tokens of the row.
    budget : tokens kept per KV head (>= 1; all of them when not `pruned`).
    window : observation-window queries of the row (<= length; 0 when not `pruned`).
    recent : last tokens always kept (<= budget).
    cross_ratio : effective cross share of the heavy-hitter slots.
    pruned : False when the row is shorter than `min_prompt` and keeps everything.
    """

    length: int
    budget: int
    window: int
    recent: int
    cross_ratio: float
    pruned: bool


def auto_cross_ratio(window_mod: torch.Tensor, key_mod: torch.Tensor) -> float:
    """Share of cross-modal (query, key) pairs: sum_m w_m (n - l_m) / (W n).

    `window_mod` holds the modality ids of the row's real window queries and
    `key_mod` those of its real keys (1-D CPU tensors, no padding).

    >>> auto_cross_ratio(torch.tensor([0, 0]), torch.tensor([1, 1, 0, 0]))
    0.5
    """
    W, n = window_mod.numel(), key_mod.numel()
    if W == 0 or n == 0:
        return 0.0
    ids, key_counts = torch.unique(key_mod, return_counts=True)
    per_mod = dict(zip(ids.tolist(), key_counts.tolist()))
    cross_pairs = sum(n - per_mod.get(m, 0) for m in window_mod.tolist())
    return float(cross_pairs) / float(W * n)


def plan_row(config: CSPConfig, row_mod: torch.Tensor) -> RowPlan:
    """The `RowPlan` of one row from its modality ids `row_mod` [L] (CPU, -1 = padding).

    The window is the row's last real tokens (rows are left-padded).
    """
    real = row_mod[row_mod >= 0]
    length = real.numel()
    if length == 0:
        return RowPlan(0, 1, 0, 0, 0.0, False)
    if length < config.min_prompt:
        return RowPlan(length, length, 0, length, 0.0, False)
    window = max(1, token_count(config.window, length))
    budget = max(1, token_count(config.budget, length))
    recent_spec = config.window if config.recent is None else config.recent
    recent = min(token_count(recent_spec, length), budget)
    if torch.unique(real).numel() < 2:
        # One modality: every cross score is 0, so a cross share would only keep the oldest tokens.
        cross_ratio = 0.0
    elif config.cross_ratio == "auto":
        cross_ratio = auto_cross_ratio(real[-window:], real)
    else:
        cross_ratio = float(config.cross_ratio)
    if config.policy != "csp":
        cross_ratio = 0.0  # baselines rank with one score, passed as the self score
    if config.policy == "streaming":
        recent = budget - min(config.sinks, budget)  # sinks + the rest of the budget as recent window
    return RowPlan(length, budget, window, recent, cross_ratio, True)


def plan_batch(config: CSPConfig, k_mod: torch.Tensor) -> List[RowPlan]:
    """One `RowPlan` per row of `k_mod` [B, L] (any device; copied to CPU once)."""
    ids = k_mod.detach().to("cpu")
    return [plan_row(config, ids[b]) for b in range(ids.shape[0])]


def window_query_ids(k_mod: torch.Tensor, plans: Sequence[RowPlan]) -> torch.Tensor:
    """q_mod [B, W] for the batch window W = max row window (>= 1).

    The window covers the last W positions; the queries of a row beyond its own
    window are marked -1 so that they score nothing.
    """
    W = max(1, max(p.window for p in plans))
    W = min(W, k_mod.shape[1])
    q_mod = k_mod[:, -W:].clone()
    for b, plan in enumerate(plans):
        if plan.window < W:
            q_mod[b, : W - plan.window] = -1
    return q_mod


def score(
    q: torch.Tensor, keys: torch.Tensor, q_mod: torch.Tensor, k_mod: torch.Tensor, *, scale: float, n: float, pool: int = 1,
    lse: Optional[torch.Tensor] = None,
):
    """(self_scores, cross_scores) float32 [B, Hkv, L] of the last q_mod.shape[1] queries of `q` [B, H, Lq, D].

    `lse` [B, H, W]: the window rows' log-sum-exp, if known (see `ops.window_scores`).

    With `pool` > 1 (odd) each score becomes the maximum over the `pool` keys
    centred on it, so the neighbours of a strongly attended token rank with it.
    Padding keys may then carry a score, but `select_keep` never keeps padding.
    """
    W = q_mod.shape[1]
    self_scores, cross_scores = ops.window_scores(q[:, :, -W:, :], keys, q_mod, k_mod, scale=scale, n=n, lse=lse)
    if pool > 1:
        self_scores = F.max_pool1d(self_scores, pool, stride=1, padding=pool // 2)
        cross_scores = F.max_pool1d(cross_scores, pool, stride=1, padding=pool // 2)
    return self_scores, cross_scores


def scores(config: CSPConfig, q: torch.Tensor, keys: torch.Tensor, q_mod: torch.Tensor, k_mod: torch.Tensor, *,
           scale: float, layer: int = 0, lse: Optional[torch.Tensor] = None):
    """(self_scores, cross_scores) float32 [B, Hkv, L] for `select` under `config.policy`.

    CSP: `score` with n-softmax constant `config.n` and max-pool width
    `config.pool_width`. A baseline: its ranking as
    the self score and zeros as the cross score (its plans have cross_ratio 0).
    `q` [B, H, Lq, D] holds the prefill's queries (all of them for "h2o"); `lse` [B, H, W] the
    window rows' log-sum-exp, if known ("csp" and "snapkv" use it).
    """
    if config.policy == "csp":
        return score(q, keys, q_mod, k_mod, scale=scale, n=config.n, pool=config.pool_width, lse=lse)
    ranking = baselines.ranking(config, q, keys, q_mod, k_mod, scale=scale, layer=layer, lse=lse)
    return ranking, torch.zeros_like(ranking)


def _fill_to_budget(keep_idx: torch.Tensor, keep_valid: torch.Tensor, L: int) -> Tuple[torch.Tensor, torch.Tensor]:
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


def has_dead_slots(plans: Sequence[RowPlan]) -> bool:
    """Whether `select` marks some slot dead for these plans: a row keeps fewer real tokens than
    the batch's largest budget (a smaller budget, or fewer real tokens than its budget).
    Known on the host, so a GPU need not be asked.

    >>> has_dead_slots([RowPlan(100, 20, 10, 10, 0.5, True)] * 2), has_dead_slots([RowPlan(0, 1, 0, 0, 0.0, False)])
    (False, True)
    """
    K = max(p.budget for p in plans)
    return any(p.budget < K or p.length < p.budget for p in plans)


def select(
    self_scores: torch.Tensor, cross_scores: torch.Tensor, k_mod: torch.Tensor, plans: Sequence[RowPlan]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """keep_idx int64 [B, Hkv, K] (ascending) and keep_valid bool [B, Hkv, K], K = max row budget.

    One `ops.select_keep` call when every row has the same (budget, recent, cross_ratio);
    otherwise one per row, on a slice of the batch (no index tensor to send to the device), and
    the rows of smaller budgets are filled up to K with dead slots in one pass for the batch.
    """
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
    return _fill_to_budget(keep_idx, keep_valid, L)
