"""Budget arithmetic per batch row: what each row of a (padded) batch keeps.

A padded batch holds prompts of different real lengths. Every size in a
`CSPConfig` is resolved against each row's own real length, so a row keeps
the same tokens alone and inside a batch: `plan_batch` gives one `RowPlan` per
row (the policy may adjust it: CSP sets its cross share, StreamingLLM its
recent window), and `window_query_ids` marks the window queries a shorter row
does not own as padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, List, Sequence

import torch

if TYPE_CHECKING:
    from .config import CSPConfig

#: `CSPConfig.window=None`: this fraction of the prompt, at most this many tokens.
DEFAULT_WINDOW = (0.1, 64)


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


def window_count(spec, length: int) -> int:
    """Observation-window tokens meant by `CSPConfig.window` (`spec`) for a prompt of `length`
    real tokens: `token_count`, and for None the default, 10% of the prompt but at most 64 tokens.

    >>> window_count(None, 300), window_count(None, 2000), window_count(0.1, 2000)
    (30, 64, 200)
    """
    if spec is None:
        fraction, cap = DEFAULT_WINDOW
        return min(token_count(fraction, length), cap)
    return token_count(spec, length)


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


def plan_row(config: "CSPConfig", row_mod: torch.Tensor) -> RowPlan:
    """The `RowPlan` of one row from its modality ids `row_mod` [L] (CPU, -1 = padding).

    The window is the row's last real tokens (rows are left-padded). The common plan ranks
    with one score (cross_ratio 0); `config.policy.plan` adjusts it.
    """
    real = row_mod[row_mod >= 0]
    length = real.numel()
    if length == 0:
        return RowPlan(0, 1, 0, 0, 0.0, False)
    if length < config.min_prompt:
        return RowPlan(length, length, 0, length, 0.0, False)
    window_tokens = window_count(config.window, length)
    window = max(1, window_tokens)
    budget = max(1, token_count(config.budget, length))
    recent = min(window_tokens if config.recent is None else token_count(config.recent, length), budget)
    return config.policy.plan(RowPlan(length, budget, window, recent, 0.0, True), real)


def plan_batch(config: "CSPConfig", k_mod: torch.Tensor) -> List[RowPlan]:
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


def has_dead_slots(plans: Sequence[RowPlan]) -> bool:
    """Whether `select` marks some slot dead for these plans: a row keeps fewer real tokens than
    the batch's largest budget (a smaller budget, or fewer real tokens than its budget).
    Known on the host, so a GPU need not be asked.

    >>> has_dead_slots([RowPlan(100, 20, 10, 10, 0.5, True)] * 2), has_dead_slots([RowPlan(0, 1, 0, 0, 0.0, False)])
    (False, True)
    """
    K = max(p.budget for p in plans)
    return any(p.budget < K or p.length < p.budget for p in plans)


def whole_cache_plan(config: "CSPConfig", chunk: RowPlan, total: int, slots: int) -> RowPlan:
    """`CSPConfig.later_prefill="total"`: the plan of a row whose whole stored cache (`slots` per
    KV head) is selected again after a later chunk planned as `chunk`, down to `budget` of the row's
    `total` real tokens; the window and recent tokens stay the chunk's."""
    if not chunk.pruned:
        return replace(chunk, budget=min(chunk.budget, slots), recent=min(chunk.recent, slots))
    kept = min(slots, max(1, token_count(config.budget, total)))
    return replace(chunk, length=total, budget=kept, recent=min(chunk.recent, kept))


def decode_plan(config: "CSPConfig", slot_ids: torch.Tensor) -> RowPlan:
    """`CSPConfig.decode_budget`: the plan of a row whose stored cache is selected again during
    generation; `slot_ids` [S] are one KV head's slot modality ids (-1 dead), read on the host."""
    real = slot_ids[slot_ids >= 0].cpu()
    plan = RowPlan(real.numel(), config.decode_budget, config.decode_window, config.decode_window, 0.0, True)
    return config.policy.plan(plan, real)
