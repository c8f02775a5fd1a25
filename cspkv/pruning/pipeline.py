"""One layer's pruning, written once: score -> select -> compact.

The patched attention (`cspkv.hf.layer`) calls `prune_layer` after a layer's
prefill; `benchmarks/quality.py` calls the two halves, `score_layer` and
`select_and_compact`, to reuse one layer's scores across budgets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..ops.profiling import NvtxRange
from .budget import RowPlan, has_dead_slots
from .compaction import compact
from .config import CSPConfig
from .policies import ScoreInputs, Scores
from .selection import select


@dataclass
class PrunedKV:
    """A layer's kept cache: keys and values [B, Hkv, K, D], ascending by position within each
    (row, KV head); `keep_valid` bool [B, Hkv, K] False at dead slots (padding, or the filler of
    a row that keeps fewer tokens than the batch's largest budget, zeroed)."""

    keys: torch.Tensor
    values: torch.Tensor
    keep_valid: torch.Tensor


def score_layer(config: CSPConfig, inputs: ScoreInputs, *, nvtx: bool = False) -> Scores:
    """`config.policy`'s scores of the layer's keys; the prefill's log-sum-exp reaches only a
    policy that uses it."""
    policy = config.policy
    if inputs.lse is not None and not policy.uses_prefill_lse:
        inputs = dataclasses.replace(inputs, lse=None)
    with NvtxRange("cspkv::score", nvtx):
        return policy.score(inputs)


def select_and_compact(scores: Scores, keys: torch.Tensor, values: torch.Tensor, k_mod: torch.Tensor,
                       plans: Sequence[RowPlan], *, nvtx: bool = False) -> PrunedKV:
    """Select per row under `plans` (a single ranking selects with cross_ratio 0) and gather."""
    cross = scores.cross if scores.cross is not None else torch.zeros_like(scores.primary)
    with NvtxRange("cspkv::select", nvtx):
        keep_idx, keep_valid = select(scores.primary, cross, k_mod, plans)
    with NvtxRange("cspkv::compact", nvtx):
        keys_c, values_c = compact(keys, values, keep_idx, keep_valid if has_dead_slots(plans) else None)
    return PrunedKV(keys_c, values_c, keep_valid)


def prune_layer(config: CSPConfig, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                k_mod: torch.Tensor, q_mod: torch.Tensor, plans: Sequence[RowPlan], *, scale: float, layer: int = 0,
                lse: Optional[torch.Tensor] = None, nvtx: bool = False) -> PrunedKV:
    """Prune one layer's prompt cache.

    Parameters
    ----------
    query : [B, H, L, D] the prefill's queries (post-RoPE); keys, values [B, Hkv, L, D].
    k_mod : int [B, L] modality ids (-1 = padding); q_mod int [B, W] those of the window
        queries (`budget.window_query_ids`); plans one `RowPlan` per row (`budget.plan_batch`).
    scale : the attention's softmax scale; layer the decoder layer's index.
    lse : float32 [B, H, W] the window rows' log-sum-exp from the prefill attention, if known.
    nvtx : wrap the three steps in NVTX ranges (CSPKV_NVTX=1 on a GPU).
    """
    scores = score_layer(config, ScoreInputs(query, keys, q_mod, k_mod, scale, layer, lse), nvtx=nvtx)
    return select_and_compact(scores, keys, values, k_mod, plans, nvtx=nvtx)
