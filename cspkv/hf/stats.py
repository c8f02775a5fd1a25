"""Pruning statistics: one `LayerStats` per patched layer, summed by `summarize`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..ops.profiling import Timer


@dataclass
class LayerStats:
    """What a patched layer did with the last prompt it saw.

    Attributes
    ----------
    layer : the decoder layer's index.
    pruned : whether the prompt's cache was pruned; if not, `reason` says why.
    prompt_len : the prompt's length L (padded batch: the longest row's).
    kept : stored slots per (row, KV head) after pruning; kept_per_row each row's budget (per KV
        head; under ``layer_allocation="adaptive"`` this layer's); kept_per_head, per row, each KV
        head's kept tokens (its budget; under ``head_allocation="adaptive"`` the real tokens it
        kept, which differ between heads).
    kv_bytes_before, kv_bytes_after : the layer's key + value bytes before and after.
    device : where the cache lives.
    scoring : for policies that score with window attention, "one pass (...)" when the
        prefill attention's log-sum-exp was used, else "two passes: <why not>"; "later chunk
        (chunk|total)" when the last pruning was of a later prompt chunk.
    decode_compressions : how often decode-time compression selected the cache again.
    timing : what `Timer.stop` returned around the pruning, or a list of such (scoring and, at the
        call's end under ``layer_allocation="adaptive"``, selection), summed as prune_ms in `as_dict`.
    """

    layer: int
    pruned: bool = False
    reason: Optional[str] = "no prefill seen yet"
    prompt_len: Optional[int] = None
    kept: Optional[int] = None
    kept_per_row: Optional[List[int]] = None
    kept_per_head: Optional[List[List[int]]] = None
    kv_bytes_before: Optional[int] = None
    kv_bytes_after: Optional[int] = None
    device: Optional[str] = None
    scoring: Optional[str] = None
    decode_compressions: Optional[int] = None
    timing: Any = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """The fields that apply (``reason`` always), with prune_ms in milliseconds when pruned:
        wall time on a CPU; on a GPU the time between CUDA events around the pruning (this waits
        for them)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "timing" and (v is not None or k == "reason")}
        if self.timing is not None:
            timings = self.timing if isinstance(self.timing, list) else [self.timing]
            out["prune_ms"] = sum(Timer.elapsed_ms(t) for t in timings)
        return out


def summarize(layers: Dict[int, dict], skipped: Dict[int, str]) -> dict:
    """`PatchHandle.stats()`: the per-layer dicts and their totals over the pruned layers."""
    pruned = [s for s in layers.values() if s.get("pruned")]
    return {
        "layers": layers,
        "skipped": dict(skipped),
        "pruned_layers": len(pruned),
        "kv_bytes_before": sum(s["kv_bytes_before"] for s in pruned),
        "kv_bytes_after": sum(s["kv_bytes_after"] for s in pruned),
        "prune_ms": sum(s.get("prune_ms", 0.0) for s in pruned),
    }
