"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): the first tokens (attention sinks) and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..budget import RowPlan
from .base import Policy, ScoreInputs, Scores, check_int, register_policy


@register_policy
@dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM: the first `sinks` real tokens of each row rank highest, then the
    others by position, latest first; the recent window is ``budget - sinks``, so
    exactly the sinks and the last tokens are kept.

    Simplified: the cache is cut once at prefill (no rolling eviction while decoding)
    and, as in the paper's implementation for RoPE models, positions are not
    re-assigned (cspkv never shifts positions).

    Parameters
    ----------
    sinks : int >= 0, default 4.
    """

    sinks: int = 4

    name = "streaming"
    allocates = False  # its scores are no attention mass: nothing to spend a budget by

    def __post_init__(self) -> None:
        check_int(self, "sinks", 0)

    def plan(self, plan: RowPlan, real_ids: torch.Tensor) -> RowPlan:
        return replace(plan, recent=plan.budget - min(self.sinks, plan.budget))

    def score(self, inputs: ScoreInputs) -> Scores:
        k_mod, heads = inputs.k_mod, inputs.keys.shape[1]
        real = k_mod >= 0
        rank = real.long().cumsum(-1) - 1  # position among the row's real tokens
        L = k_mod.shape[1]
        ranking = torch.where(rank < self.sinks, 2.0, (rank + 1).float() / (L + 1)).masked_fill(~real, 0.0)
        return Scores(ranking[:, None, :].expand(-1, heads, -1).contiguous())
