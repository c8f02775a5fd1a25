"""Baseline selection policies, on the same ops and cache machinery as CSP.

Each baseline is one function that ranks the prompt's keys with a single
score, float32 ``[B, Hkv, L]`` (higher = keep first). `cspkv.policy.scores`
hands it to `ops.select_keep` as the self score with ``cross_ratio = 0``, so
the budget, the recent window, the de-duplication and "padding is never kept"
are exactly those of CSP, and the kept tokens are compacted and attended by
the same kernels. `CSPConfig(policy=...)` picks one:

* ``"snapkv"``: `snapkv_ranking` (Li et al. 2024)
* ``"h2o"``: `h2o_ranking` (Zhang et al. 2023), prefill-only
* ``"streaming"``: `streaming_ranking` (Xiao et al. 2023)
* ``"random"``: `random_ranking`, the floor any policy must beat
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import ops
from .config import CSPConfig


def snapkv_ranking(q: torch.Tensor, keys: torch.Tensor, q_mod: torch.Tensor, k_mod: torch.Tensor, *,
                   scale: float, pool: int = 7, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SnapKV: plain-softmax window attention, pooled along the keys.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation"
    (2024, arXiv 2404.14469). The last W prompt queries attend to all keys with
    a plain softmax (``ops.window_scores`` with n = 0; self and cross mass summed,
    so modalities play no role), the mass each key gets is summed over the
    window and the GQA group, then average-pooled along the key axis (width
    `pool`, from `CSPConfig.pool_width`; stride 1, zero padding counted, as in
    the reference code) so that neighbours of a hit survive with it.

    Simplified: pooling runs over the whole row (the reference pools only the
    keys before the window; the recent window is kept anyway, so only the
    ``pool // 2`` keys next to it can rank differently); GQA heads are
    summed per KV head instead of repeating the KV heads; avg pooling only.

    Parameters
    ----------
    q : [B, H, Lq, D] queries of the prefill (post-RoPE); the last W are used.
    keys : [B, Hkv, L, D]; q_mod [B, W], k_mod [B, L] modality ids (-1 = padding).
    lse : [B, H, W] log-sum-exp of the window rows, if known (see `ops.window_scores`).

    Returns
    -------
    float32 [B, Hkv, L] ranking.
    """
    W = q_mod.shape[1]
    self_scores, cross_scores = ops.window_scores(q[:, :, -W:, :], keys, q_mod, k_mod, scale=scale, n=0.0, lse=lse)
    total = self_scores + cross_scores
    if pool == 1:
        return total
    B, Hkv, L = total.shape
    pooled = F.avg_pool1d(total.reshape(B * Hkv, 1, L), kernel_size=pool, stride=1, padding=pool // 2)
    return pooled.reshape(B, Hkv, L)


def h2o_ranking(q: torch.Tensor, keys: torch.Tensor, k_mod: torch.Tensor, *, scale: float,
                chunk: int = 1024) -> torch.Tensor:
    """H2O: attention accumulated over every prompt query ("heavy hitters").

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
    of Large Language Models" (2023, arXiv 2306.14048). Each key's score is the
    plain-softmax (causal) attention it receives, summed over all L prompt
    queries and the GQA group.

    Simplified, prefill-only: the scores of all prompt queries are taken at
    once and the prompt is pruned once; H2O's per-step greedy eviction during
    decoding is not done (decoded tokens are all kept, as for every policy
    here). The L x L scores run as ``ops.window_scores`` calls over blocks of
    `chunk` queries (exact: block queries sit at their own positions), so
    memory stays O(chunk x L) even on the reference path.

    Parameters
    ----------
    q : [B, H, L, D] queries of every prompt position (post-RoPE).
    keys : [B, Hkv, L, D]; k_mod [B, L] modality ids (-1 = padding).
    """
    B, Hkv, L = keys.shape[0], keys.shape[1], keys.shape[2]
    if q.shape[2] != L:
        raise ValueError(f"cspkv: policy 'h2o' needs the queries of every prompt position, got {q.shape[2]} of {L}")
    total = torch.zeros(B, Hkv, L, dtype=torch.float32, device=keys.device)
    for start in range(0, L, chunk):
        end = min(L, start + chunk)
        self_scores, cross_scores = ops.window_scores(
            q[:, :, start:end, :], keys[:, :, :end, :], k_mod[:, start:end], k_mod[:, :end], scale=scale, n=0.0
        )
        total[..., :end] += self_scores + cross_scores
    return total


def streaming_ranking(k_mod: torch.Tensor, heads: int, *, sinks: int = 4) -> torch.Tensor:
    """StreamingLLM: the attention sinks (first tokens), then the most recent ones.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks"
    (2023, arXiv 2309.17453). The first `sinks` real tokens of each row rank
    highest, then the others by position, latest first; `cspkv.policy.plan_row`
    sets the recent window to ``budget - sinks`` so that exactly the sinks and
    the last tokens are kept.

    Simplified: the cache is cut once at prefill (no rolling eviction while
    decoding) and, as in the paper's implementation for RoPE models, positions
    are not re-assigned (cspkv never shifts positions).

    Returns
    -------
    float32 [B, heads, L] ranking, the same for every head.
    """
    real = k_mod >= 0
    rank = real.long().cumsum(-1) - 1  # position among the row's real tokens
    L = k_mod.shape[1]
    ranking = torch.where(rank < sinks, 2.0, (rank + 1).float() / (L + 1)).masked_fill(~real, 0.0)
    return ranking[:, None, :].expand(-1, heads, -1).contiguous()


def random_ranking(k_mod: torch.Tensor, heads: int, *, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """Uniform random choice among the candidates; with the recent window, a floor.

    Reproducible: drawn on the CPU from a generator seeded with (`seed`,
    `layer`), so every layer draws its own choice and a rerun keeps the same.

    Returns
    -------
    float32 [B, heads, L] ranking.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + layer)
    ranking = torch.rand(k_mod.shape[0], heads, k_mod.shape[1], generator=generator)
    return ranking.to(k_mod.device)


def ranking(config: CSPConfig, q: torch.Tensor, keys: torch.Tensor, q_mod: torch.Tensor, k_mod: torch.Tensor, *,
            scale: float, layer: int = 0, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ranking float32 [B, Hkv, L] of the baseline `config.policy` (not "csp"); `lse` as in
    `snapkv_ranking` (the other baselines do not use it)."""
    heads = keys.shape[1]
    if config.policy == "snapkv":
        return snapkv_ranking(q, keys, q_mod, k_mod, scale=scale, pool=config.pool_width, lse=lse)
    if config.policy == "h2o":
        return h2o_ranking(q, keys, k_mod, scale=scale)
    if config.policy == "streaming":
        return streaming_ranking(k_mod, heads, sinks=config.sinks)
    if config.policy == "random":
        return random_ranking(k_mod, heads, seed=config.seed, layer=layer)
    raise ValueError(f"cspkv: no baseline named {config.policy!r}")
