"""Cross-Self Pruning (Pei, Huang, Xu, "Cross-Self KV Cache Pruning for Efficient
Vision-Language Inference", arXiv 2412.04652): keys ranked twice, by the window
attention they get from their own modality and from the others, each ranking with
its own share of the budget; the attention is an n-softmax. docs/method.md
restates the method and what cspkv decides where paper and code disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Union

import torch
import torch.nn.functional as F

from ... import ops
from ...ops.checks import as_real
from ..budget import RowPlan
from .base import Policy, ScoreInputs, Scores, check_pool, register_policy


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


def max_pool(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Each score [B, Hkv, L] replaced by the maximum over the `width` keys centred on it."""
    if width == 1:
        return scores
    return F.max_pool1d(scores, width, stride=1, padding=width // 2)


@register_policy
@dataclass(frozen=True)
class CSP(Policy):
    """Cross-Self Pruning.

    Parameters
    ----------
    cross_ratio : float in [0, 1] or "auto", default 0.9
        Share of the heavy-hitter slots (budget - recent) chosen by cross-modality
        score; the rest go to the self-modality score. ``"auto"`` uses the share
        of cross-modal (query, key) pairs in the window. A row whose prompt holds
        a single modality has no cross attention to rank and uses 0. The default
        ranked best over the grid of benchmarks/results/quality.md (the paper's
        default is 0.5).
    n : float >= 0, default 1.0
        n-softmax constant of the scoring pass (0 = plain softmax), as in the paper.
    pool : odd int >= 1, default 15
        Both scores max-pooled along the keys over `pool` keys (stride 1; 1 = off),
        so the neighbours of a strongly attended token rank with it: a multi-token
        fact otherwise keeps only its first token. Not part of CSP as published;
        the effect is in benchmarks/results/quality.md.
    """

    cross_ratio: Union[float, str] = 0.9
    n: float = 1.0
    pool: int = 15

    name = "csp"
    uses_prefill_lse = True
    splits_cross_self = True

    def __post_init__(self) -> None:
        ratio = self.cross_ratio if isinstance(self.cross_ratio, str) else as_real(self.cross_ratio)
        expected = f"CSP.cross_ratio must be a number in [0, 1] or 'auto', got {ratio!r}"
        if isinstance(ratio, str):
            if ratio != "auto":
                raise ValueError(expected)
        elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(expected)
        elif not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
            raise ValueError(expected)
        n = as_real(self.n)
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise TypeError(f"CSP.n must be a number >= 0, got {n!r}")
        if not (math.isfinite(n) and n >= 0):
            raise ValueError(f"CSP.n must be a finite number >= 0, got {n!r}")
        # Frozen: numpy scalars are stored as the plain numbers they stand for.
        object.__setattr__(self, "cross_ratio", ratio)
        object.__setattr__(self, "n", n)
        check_pool(self)

    def plan(self, plan: RowPlan, real_ids: torch.Tensor) -> RowPlan:
        if torch.unique(real_ids).numel() < 2:
            # One modality: every cross score is 0, so a cross share would only keep the oldest tokens.
            return plan
        if self.cross_ratio == "auto":
            return replace(plan, cross_ratio=auto_cross_ratio(real_ids[-plan.window:], real_ids))
        return replace(plan, cross_ratio=float(self.cross_ratio))

    def score(self, inputs: ScoreInputs) -> Scores:
        self_scores, cross_scores = ops.window_scores(
            inputs.window_queries, inputs.keys, inputs.q_mod, inputs.k_mod, scale=inputs.scale, n=self.n, lse=inputs.lse
        )
        return Scores(max_pool(self_scores, self.pool), max_pool(cross_scores, self.pool))
