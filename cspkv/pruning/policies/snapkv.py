"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469): one ranking by plain-softmax window attention, average-pooled."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ... import ops
from .base import Policy, ScoreInputs, Scores, check_pool, register_policy


@register_policy
@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV: the last W prompt queries attend to all keys with a plain softmax
    (``ops.window_scores`` with n = 0; self and cross mass summed, so modalities play
    no role); the mass each key gets is summed over the window and the GQA group,
    then average-pooled along the keys (stride 1, zero padding counted, as in the
    reference code) so that the neighbours of a hit survive with it.

    Simplified: pooling runs over the whole row (the reference pools only the keys
    before the window; the recent window is kept anyway, so only the ``pool // 2``
    keys next to it can rank differently); GQA heads are summed per KV head
    instead of repeating the KV heads; average pooling only.

    Parameters
    ----------
    pool : odd int >= 1, default 7 (SnapKV's paper); 1 = no pooling.
    """

    pool: int = 7

    name = "snapkv"
    uses_prefill_lse = True

    def __post_init__(self) -> None:
        check_pool(self)

    def score(self, inputs: ScoreInputs) -> Scores:
        self_scores, cross_scores = ops.window_scores(
            inputs.window_queries, inputs.keys, inputs.q_mod, inputs.k_mod, scale=inputs.scale, n=0.0, lse=inputs.lse
        )
        total = self_scores + cross_scores
        if self.pool == 1:
            return Scores(total)
        B, Hkv, L = total.shape
        pooled = F.avg_pool1d(total.reshape(B * Hkv, 1, L), kernel_size=self.pool, stride=1, padding=self.pool // 2)
        return Scores(pooled.reshape(B, Hkv, L))
