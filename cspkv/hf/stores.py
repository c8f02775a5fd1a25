"""The two stores of a pruned cache layer's slots (`cspkv.hf.cache.PrunedLayer` picks one).

`PaddedStore`: keys, values and validity [B, Hkv, capacity(, D)], every (row, KV head) as long as
the longest; appends write in place into free slots. `PackedStore`: each (row, KV head) holds its
live slots as one segment of [N, D] rows, never padded to the longest (the layout of uneven
budgets: padded batches, adaptive per-head budgets), read by `ops.packed_attention`. Both grow by
`append_reserve` when full, so appending costs about 16 token copies per new token on average
instead of a concatenation's copy of every stored token.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from .. import ops

if TYPE_CHECKING:
    from .cache import PrunedLayer


def append_reserve(stored: int) -> int:
    """Free slots a pruned layer's store gets when it grows to hold `stored` tokens: about 1/16 of
    them, 16 to 256. A growth copies the store, so appending costs about 16 token copies per new
    token on average instead of `stored` (a concatenation), for at most ~6% more memory."""
    return min(256, max(16, stored // 16))


class PaddedStore:
    """A pruned layer's preallocated keys, values and validity [B, Hkv, capacity(, D)], and the
    views [..., :stored] last handed to the layer; a layer whose tensors are no longer these exact
    objects (offloaded, reassigned from outside) is copied into a new store at its next append, as
    is one made under `torch.inference_mode()` and appended to outside it (torch forbids writing
    into inference tensors there: a prefill under inference mode, then `generate()`'s no_grad)."""

    __slots__ = ("key_slots", "value_slots", "valid_slots", "keys", "values", "kv_valid", "inference")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kv_valid: torch.Tensor, capacity: int) -> None:
        B, H, n = keys.shape[:3]
        self.key_slots = keys.new_empty(B, H, capacity, keys.shape[-1])
        self.value_slots = values.new_empty(B, H, capacity, values.shape[-1])
        self.valid_slots = torch.ones(B, H, capacity, dtype=torch.bool, device=kv_valid.device)  # appended slots are live
        self.key_slots.narrow(2, 0, n).copy_(keys)
        self.value_slots.narrow(2, 0, n).copy_(values)
        self.valid_slots.narrow(2, 0, n).copy_(kv_valid)
        self.keys, self.values, self.kv_valid = keys, values, kv_valid
        self.inference = self.key_slots.is_inference()

    def holds(self, layer: "PrunedLayer") -> bool:
        """Whether `layer` still shows this store's views."""
        return layer.keys is self.keys and layer.values is self.values and layer.kv_valid is self.kv_valid

    def writable_for(self, layer: "PrunedLayer") -> bool:
        """Whether new tokens of `layer` can be written into this store now."""
        return self.holds(layer) and (not self.inference or torch.is_inference_mode_enabled())

    def view(self, layer: "PrunedLayer", n: int) -> None:
        """Hand the first `n` slots to `layer`."""
        ext = ops.extension()
        if ext is not None:
            views = ext.store_views(self.key_slots, self.value_slots, self.valid_slots, n)
        else:
            views = tuple(t.narrow(2, 0, n) for t in (self.key_slots, self.value_slots, self.valid_slots))
        self._hand(layer, views)

    def append(self, layer: "PrunedLayer", n: int, key_states: torch.Tensor, value_states: torch.Tensor,
               live: Optional[torch.Tensor]) -> None:
        """Write `key_states`/`value_states` [B, Hkv, t, D] into slots n..n+t-1, and `live` (bool
        [B, 1, t], or None: all live) into their validity, and hand the first n + t slots to
        `layer`: one call into the extension per layer and token (the host time of a GPU decode
        step is what bounds it), five to seven tensor calls from Python without it."""
        ext = ops.extension()
        if ext is not None:
            self._hand(layer, ext.store_append(self.key_slots, self.value_slots, self.valid_slots, n, key_states, value_states, live))
        else:
            t = key_states.shape[2]
            key_dst, value_dst = self.key_slots.narrow(2, n, t), self.value_slots.narrow(2, n, t)
            if key_dst.shape != key_states.shape or value_dst.shape != value_states.shape:
                raise RuntimeError(f"cspkv store: new keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} "
                                   f"do not match the stored {tuple(key_dst.shape)} and {tuple(value_dst.shape)}")
            key_dst.copy_(key_states)
            value_dst.copy_(value_states)
            if live is not None:
                self.valid_slots.narrow(2, n, t).copy_(live)
            self.view(layer, n + t)

    def _hand(self, layer: "PrunedLayer", views) -> None:
        layer.keys, layer.values, layer.kv_valid = self.keys, self.values, self.kv_valid = views

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_slots, self.value_slots))


def _reserve(lengths: torch.Tensor) -> torch.Tensor:
    """`append_reserve` of each entry of an int64 tensor of stored lengths."""
    return (lengths // 16).clamp(16, 256)


# Whether a call's chunk liveness (`Liveness.chunk_live`: one tensor per call, shared by its layers)
# is all live, read once per call and not per layer: on a GPU reading it is a sync. The last one
# asked is remembered (by a weak reference; tensors compare elementwise, so no dictionary).
_last_live: list = [None, False]


def all_live(live: torch.Tensor) -> bool:
    ref, known = _last_live
    if ref is None or ref() is not live:
        known = bool(live.all())
        _last_live[:] = [weakref.ref(live), known]
    return known


class PackedStore:
    """A pruned layer's live slots packed per (row, KV head): segment s = b * Hkv + h holds rows
    [offsets[s], offsets[s] + lengths[s]) of `key_data` / `value_data` [N, D], in position order,
    followed by free rows up to its capacity. No segment is padded to the longest one.

    `offsets`, `lengths` are int64 [B * Hkv] on the layer's device (what `ops.packed_attention`
    reads); `host_offsets`, `host_lengths` and `host_capacity` are their CPU copies, so that
    deciding a growth or a crop never waits for a GPU. `appended` counts the tokens appended after
    the slots it was packed from (the same in every segment): the tail that `crop` may remove.

    A store is packed without free rows (its bytes are the live tokens'); the first append grows
    every segment by `append_reserve` of its length, and so does every append into a full segment.
    A store made under `torch.inference_mode()` is copied before it is written outside it.
    """

    def __init__(self, key_data: torch.Tensor, value_data: torch.Tensor, host_offsets: torch.Tensor,
                 host_lengths: torch.Tensor, host_capacity: torch.Tensor, batch: int, heads: int, appended: int = 0):
        self.key_data, self.value_data = key_data, value_data
        self.host_offsets, self.host_lengths, self.host_capacity = host_offsets, host_lengths, host_capacity
        device = key_data.device
        pinned = device.type == "cuda"
        self.offsets = (host_offsets.pin_memory() if pinned else host_offsets).to(device, non_blocking=pinned)
        self.lengths = (host_lengths.pin_memory() if pinned else host_lengths.clone()).to(device, non_blocking=pinned)
        self.batch, self.heads = batch, heads
        self.appended = appended
        self.inference = key_data.is_inference()
        self.free = int((host_capacity - host_lengths).min())  # free rows of the fullest segment

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, kv_valid: torch.Tensor) -> "PackedStore":
        """Pack the live slots of padded keys/values [B, Hkv, S, D] (kv_valid [B, Hkv, S]), in order."""
        B, Hkv, S = kv_valid.shape
        rows = B * Hkv
        valid = kv_valid.reshape(rows, S)
        counts = valid.sum(-1).to("cpu", torch.int64)
        offsets = torch.cumsum(counts, 0) - counts
        n = max(int(counts.sum()), 1)  # one free row at least: an op argument may not be empty
        flat = valid.reshape(-1).nonzero().squeeze(1)
        dest = (offsets.to(kv_valid.device)[:, None] + valid.long().cumsum(-1) - 1).reshape(-1)[flat]
        key_data = keys.new_empty(n, keys.shape[-1])  # free rows are never read
        value_data = values.new_empty(n, values.shape[-1])
        key_data.index_copy_(0, dest, keys.reshape(rows * S, -1)[flat])
        value_data.index_copy_(0, dest, values.reshape(rows * S, -1)[flat])
        return cls(key_data, value_data, offsets, counts, counts.clone(), B, Hkv)

    def moved(self, segments: torch.Tensor, capacity: torch.Tensor, batch: int) -> "PackedStore":
        """A new store of the given segments (CPU int64 indices, repeats allowed) with these
        capacities (CPU int64, each at least the segment's length)."""
        lengths = self.host_lengths[segments]
        offsets = torch.cumsum(capacity, 0) - capacity
        total = int(lengths.sum())
        segment_of = torch.repeat_interleave(torch.arange(len(segments)), lengths)
        within = torch.arange(total) - (torch.cumsum(lengths, 0) - lengths)[segment_of]
        src = (self.host_offsets[segments][segment_of] + within).to(self.key_data.device)
        dst = (offsets[segment_of] + within).to(self.key_data.device)
        n = max(int(capacity.sum()), 1)
        key_data = self.key_data.new_empty(n, self.key_data.shape[-1])
        value_data = self.value_data.new_empty(n, self.value_data.shape[-1])
        key_data.index_copy_(0, dst, self.key_data.index_select(0, src))
        value_data.index_copy_(0, dst, self.value_data.index_select(0, src))
        return PackedStore(key_data, value_data, offsets, lengths.clone(), capacity, batch, self.heads, self.appended)

    def grown(self, t: int) -> "PackedStore":
        """A copy with room for t tokens and `append_reserve` more in every segment."""
        needed = self.host_lengths + t
        return self.moved(torch.arange(len(self.host_lengths)), needed + _reserve(needed), self.batch)

    def select_rows(self, rows: torch.Tensor) -> "PackedStore":
        """A copy holding batch rows `rows` (CPU int64, repeats allowed), without free rows."""
        segments = (rows[:, None] * self.heads + torch.arange(self.heads)).reshape(-1)
        return self.moved(segments, self.host_lengths[segments].clone(), len(rows))

    def room(self) -> int:
        """Free rows of the fullest segment."""
        return self.free

    def writable(self) -> bool:
        return not self.inference or torch.is_inference_mode_enabled()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write new keys/values [B, Hkv, t, D] after each segment's last slot (the room is there):
        one call into the extension."""
        t = key_states.shape[2]
        ext = ops.extension()
        if ext is not None:
            ext.packed_append(self.key_data, self.value_data, self.offsets, self.lengths, key_states, value_states)
        else:
            rows = ((self.offsets + self.lengths)[:, None] + torch.arange(t, device=self.offsets.device)).reshape(-1)
            self.key_data.index_copy_(0, rows, key_states.reshape(-1, key_states.shape[-1]).to(self.key_data.dtype))
            self.value_data.index_copy_(0, rows, value_states.reshape(-1, value_states.shape[-1]).to(self.value_data.dtype))
            self.lengths.add_(t)
        self.host_lengths += t
        self.appended += t
        self.free -= t

    def crop(self, remove: int) -> None:
        """Drop the last `remove` slots of every segment (each holds that many)."""
        self.lengths.sub_(remove)
        self.host_lengths -= remove
        self.appended = max(0, self.appended - remove)
        self.free += remove

    def longest(self) -> int:
        return int(self.host_lengths.max())

    def unpacked(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, kv_valid) padded to the longest segment, [B, Hkv, S(, D)], right-aligned:
        every segment's last slot is slot S - 1 and its dead slots come first (zeros), so the last
        tokens of every row and head are the last slots, as in the padded layout."""
        S = max(self.longest(), 1)
        rows = len(self.host_lengths)
        j = torch.arange(S, device=self.lengths.device)[None, :] - (S - self.lengths[:, None])  # slot index in segment
        valid = j >= 0
        # a dead slot reads any row (masked below); an empty last segment may start at N
        index = (self.offsets[:, None] + j.clamp(min=0)).reshape(-1).clamp_(max=self.key_data.shape[0] - 1)
        keys = self.key_data.index_select(0, index).reshape(rows, S, -1).masked_fill(~valid[..., None], 0)
        values = self.value_data.index_select(0, index).reshape(rows, S, -1).masked_fill(~valid[..., None], 0)
        shape = (self.batch, self.heads, S)
        return keys.reshape(*shape, -1), values.reshape(*shape, -1), valid.reshape(shape)

    def right_aligned(self, left: torch.Tensor, counts: torch.Tensor, fill: int) -> torch.Tensor:
        """[B, Hkv, P] per-segment entries stored from column 0 (`counts` [B * Hkv] of them, on the
        device) laid out as `unpacked` lays out slots: column S - len + j holds entry j, `fill` where
        no entry is."""
        S = max(self.longest(), 1)
        rows = len(self.host_lengths)
        left = left.reshape(rows, -1)
        j = torch.arange(S, device=left.device)[None, :] - (S - self.lengths[:, None].to(left.device))
        inside = (j >= 0) & (j < counts[:, None].to(left.device))
        picked = left.gather(1, j.clamp(0, max(left.shape[1] - 1, 0))) if left.shape[1] else torch.zeros_like(j, dtype=left.dtype)
        return picked.masked_fill(~inside, fill).reshape(self.batch, self.heads, S)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_data, self.value_data))


def left_aligned(x: torch.Tensor, valid: torch.Tensor, fill: int) -> torch.Tensor:
    """[B, Hkv, P]: the entries of x [B, Hkv, S] where valid, in order, from column 0 (P the most
    any row and head has), `fill` after them."""
    B, Hkv, S = valid.shape
    width = max(int(valid.sum(-1).max()), 1) if valid.numel() else 1
    out = torch.full((B, Hkv, width + 1), fill, dtype=x.dtype, device=x.device)
    column = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, width, dtype=torch.long))
    out.scatter_(2, column, torch.where(valid, x, torch.full_like(x, fill)))
    return out[..., :width]
