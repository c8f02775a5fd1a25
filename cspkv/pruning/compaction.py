"""Compaction: the kept keys and values gathered into a smaller cache."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import ops


def compact(
    keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, keep_valid: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept slots [B, Hkv, K, D], the dead ones (False in `keep_valid`) zeroed.

    Dead slots may hold the K/V of padding positions, which can be NaN after a
    fully-masked padding row; attention gives them probability 0, but 0 * NaN
    would still poison the output. `keep_valid` None means the caller knows
    there are none (`budget.has_dead_slots`): asking the tensor would wait for
    a GPU, and zeroing unconditionally costs three launches and two passes over
    the kept cache per layer.

    keep_idx comes from `select_keep`, so its values go unchecked.
    """
    keys_c, values_c = ops.compact_kv(keys, values, keep_idx, check_indices=False)
    if keep_valid is not None:
        dead = ~keep_valid[..., None]
        keys_c.masked_fill_(dead, 0)
        values_c.masked_fill_(dead, 0)
    return keys_c, values_c
