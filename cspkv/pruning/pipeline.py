"""One layer's pruning, written once: score -> select -> compact.

The patched attention (`cspkv.hf.layer`) calls `prune_layer` after a layer's
prefill; `benchmarks/quality.py` calls the two halves, `score_layer` and
`select_and_compact`, to reuse one layer's scores across budgets. Adaptive
budgets (`CSPConfig.head_allocation`, `layer_allocation`) come from
`cspkv.pruning.allocation`: `head_allocation` gives `select_and_compact` its
per-(row, head) budgets and cross shares, `layer_budgets` + `layer_plans` give
each layer its plans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..ops.profiling import NvtxRange
from .allocation import head_budgets
from .budget import RowPlan, has_dead_slots
from .compaction import compact
from .config import CSPConfig
from .policies import ScoreInputs, Scores
from .selection import select


@dataclass
class PrunedKV:
    """A layer's kept cache: keys and values [B, Hkv, K, D], ascending by position within each
    (row, KV head); `keep_valid` bool [B, Hkv, K] False at dead slots (padding, or the filler of
    a row that keeps fewer tokens than the batch's largest budget, zeroed); `keep_idx` int64
    [B, Hkv, K] the slot each came from."""

    keys: torch.Tensor
    values: torch.Tensor
    keep_valid: torch.Tensor
    keep_idx: torch.Tensor


def score_layer(config: CSPConfig, inputs: ScoreInputs, *, nvtx: bool = False) -> Scores:
    """`config.policy`'s scores of the layer's keys; the prefill's log-sum-exp reaches only a
    policy that uses it."""
    policy = config.policy
    if inputs.lse is not None and not policy.uses_prefill_lse:
        inputs = dataclasses.replace(inputs, lse=None)
    with NvtxRange("cspkv::score", nvtx):
        return policy.score(inputs)


def head_allocation(config: CSPConfig, scores: Scores, k_mod: torch.Tensor, plans: Sequence[RowPlan]
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(budgets int64 [B, Hkv], cross_ratios float64 [B, Hkv]) on the CPU under
    ``config.head_allocation == "adaptive"`` (`allocation.head_budgets`), else (None, None): every
    head keeps its row's plan."""
    if config.head_allocation != "adaptive":
        return None, None
    return head_budgets(scores, k_mod, plans, config.allocation_floor, split_cross=config.policy.splits_cross_self)


def select_and_compact(scores: Scores, keys: torch.Tensor, values: torch.Tensor, k_mod: torch.Tensor,
                       plans: Sequence[RowPlan], *, budgets: Optional[torch.Tensor] = None,
                       cross_ratios: Optional[torch.Tensor] = None, nvtx: bool = False) -> PrunedKV:
    """Select per row under `plans` (a single ranking selects with cross_ratio 0) and gather.

    `budgets` int64 [B, Hkv] and `cross_ratios` float [B, Hkv] (CPU; `head_allocation`) replace
    the plans' budget and cross ratio per (row, KV head); heads below the largest budget get
    dead slots (`keep_valid` False)."""
    cross = scores.cross if scores.cross is not None else torch.zeros_like(scores.primary)
    with NvtxRange("cspkv::select", nvtx):
        per_head = () if budgets is None and cross_ratios is None else (budgets, cross_ratios)  # plain: a plan per row
        keep_idx, keep_valid = select(scores.primary, cross, k_mod, plans, *per_head)
    uneven = budgets is not None and bool((budgets != budgets.max()).any())
    with NvtxRange("cspkv::compact", nvtx):
        keys_c, values_c = compact(keys, values, keep_idx, keep_valid if uneven or has_dead_slots(plans) else None)
    return PrunedKV(keys_c, values_c, keep_valid, keep_idx)


def prune_layer(config: CSPConfig, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                k_mod: torch.Tensor, q_mod: torch.Tensor, plans: Sequence[RowPlan], *, scale: float, layer: int = 0,
                lse: Optional[torch.Tensor] = None, nvtx: bool = False) -> PrunedKV:
    """Prune one layer's prompt cache (its heads' budgets spread by `config.head_allocation`).

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
    budgets, cross_ratios = head_allocation(config, scores, k_mod, plans)
    return select_and_compact(scores, keys, values, k_mod, plans, budgets=budgets, cross_ratios=cross_ratios, nvtx=nvtx)


def prune_stored(config: CSPConfig, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slot_mod: torch.Tensor, q_mod: torch.Tensor, plans: Sequence[RowPlan], *, scale: float, layer: int = 0,
                 keep_before: int = 0) -> PrunedKV:
    """Prune an already pruned cache again: a later prompt chunk, or a cache grown by decoding.

    The slots hold tokens in position order but, after an earlier pruning, not the same tokens in
    every KV head, so each (row, KV head) is scored as a batch row of its own (the KV head's G query
    heads with it). The queries are the tokens of the last Q slots (a chunk's, or the latest
    decoded ones'), so the window-query / key causality of `ops.window_scores` holds.
    Scores cost one gather of the keys more than at the first prefill (see the comment inside).

    Parameters
    ----------
    query : [B, H, Q, D] the queries of the last Q slots; keys, values [B, Hkv, S, D].
    slot_mod : int [B, Hkv, S] each slot's modality id, -1 at dead slots.
    q_mod : int [B, W] the window queries' ids (`budget.window_query_ids` of the last Q tokens).
    plans : one `RowPlan` per batch row (budget, recent, cross ratio of the selection).
    keep_before : slots before it are kept as they are and not selectable (a later chunk pruned on
        its own budget); 0 re-selects among all slots.

    Returns
    -------
    PrunedKV of the whole new cache (kept earlier slots first), its `keep_idx` indexing `keys`.
    """
    B, H, Q, D = query.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    rows = B * Hkv
    # Dead slots (padding, fillers) can sit between live ones; scored with the live slots in their
    # order and the dead ones first, as in a left-padded prompt, a policy that pools along the keys
    # pools a row's neighbours alone or in a batch alike. A slot's own score does not depend on
    # the order, only pooling does.
    order = torch.sort((slot_mod >= 0).to(torch.int8), dim=-1, stable=True).indices.reshape(rows, S)
    keys_in_order = keys.reshape(rows, S, keys.shape[3]).gather(1, order[..., None].expand(-1, -1, keys.shape[3]))
    inputs = ScoreInputs(query.reshape(rows, H // Hkv, Q, D), keys_in_order[:, None],
                         q_mod.repeat_interleave(Hkv, dim=0), slot_mod.reshape(rows, S).gather(1, order), scale, layer)
    scores = Scores(*(None if t is None else torch.empty_like(t).scatter_(2, order[:, None, :], t)
                      for t in score_layer(config, inputs)))
    # Only the slots from keep_before on are selectable: select among them, then put the earlier ones first.
    eligible = slot_mod.reshape(rows, S)[:, keep_before:]
    primary = scores.primary[..., keep_before:]
    cross = scores.cross[..., keep_before:] if scores.cross is not None else torch.zeros_like(primary)
    keep_idx, keep_valid = select(primary, cross, eligible, [plan for plan in plans for _ in range(Hkv)])
    keep_idx, keep_valid = keep_idx.reshape(B, Hkv, -1) + keep_before, keep_valid.reshape(B, Hkv, -1)
    if keep_before:
        earlier = torch.arange(keep_before, device=keep_idx.device).expand(B, Hkv, keep_before)
        keep_idx = torch.cat([earlier, keep_idx], dim=-1)
        keep_valid = torch.cat([slot_mod[..., :keep_before] >= 0, keep_valid], dim=-1)
    keys_c, values_c = compact(keys, values, keep_idx, keep_valid)
    return PrunedKV(keys_c, values_c, keep_valid, keep_idx)
