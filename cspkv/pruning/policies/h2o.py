"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models", arXiv 2306.14048): keys ranked by the attention of every
prompt query."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops
from .base import Policy, ScoreInputs, Scores, check_int, register_policy


@register_policy
@dataclass(frozen=True)
class H2O(Policy):
    """H2O, prefill-only: each key's score is the plain-softmax (causal) attention it
    receives, summed over all L prompt queries and the GQA group; the prompt is pruned
    once (H2O's per-step greedy eviction during decoding is not done: decoded tokens
    are all kept, as for every policy here). The L x L scores run as
    ``ops.window_scores`` calls over blocks of `chunk` queries (exact: block queries
    sit at their own positions), so memory stays O(chunk x L) even on the reference
    path. A pruned cache is not scored again (later prompt chunks and decode-time
    compression need every position's query).

    Parameters
    ----------
    chunk : int >= 1, default 1024. Queries scored per call.
    """

    chunk: int = 1024

    name = "h2o"
    prunes_stored = False  # the queries of every position are gone once the prompt is pruned

    def __post_init__(self) -> None:
        check_int(self, "chunk", 1)

    def score(self, inputs: ScoreInputs) -> Scores:
        q, keys, k_mod = inputs.q, inputs.keys, inputs.k_mod
        B, Hkv, L = keys.shape[0], keys.shape[1], keys.shape[2]
        if q.shape[2] != L:
            raise ValueError(f"cspkv: policy 'h2o' needs the queries of every prompt position, got {q.shape[2]} of {L}")
        total = torch.zeros(B, Hkv, L, dtype=torch.float32, device=keys.device)
        for start in range(0, L, self.chunk):
            end = min(L, start + self.chunk)
            self_scores, cross_scores = ops.window_scores(
                q[:, :, start:end, :], keys[:, :, :end, :], k_mod[:, start:end], k_mod[:, :end], scale=inputs.scale, n=0.0
            )
            total[..., :end] += self_scores + cross_scores
        return Scores(total)
