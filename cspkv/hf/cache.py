"""The pruned cache layer: logical length vs stored length, and dead slots.

After CSP prunes a layer at prefill, `cache.layers[i]` of the transformers
`DynamicCache` becomes a `PrunedLayer` (a `DynamicLayer` subclass, so the
cache's own methods keep working). It stores the compacted keys/values
[B, Hkv, C, D], `kv_valid` [B, Hkv, C] (False marks a dead slot: padding or the
filler of a row that kept fewer tokens than the batch's largest budget) and the
`logical_len` L. `get_seq_length()` and the mask sizes report logical lengths,
so the next token's position id and cache position are L, L+1, ...; new tokens
are appended after the kept prefix as valid slots.

Appending does not copy the cache: the first append moves the kept slots into
a store with room for `append_reserve(C)` more tokens (about 1/16 of the
stored length, 16 to 256 tokens), and later tokens are written into it in place;
only a full store is copied into a larger one. `transformers`' `DynamicLayer`
concatenates instead, copying every stored token at every step.

Rows of a padded batch keep different numbers of real tokens (and adaptive budgets give KV heads
different ones): padded to the longest, the dead slots would cost as much memory as live ones. A
layer whose kept slots include dead ones therefore stores them packed (`PackedStore`): each
(row, KV head) holds its live tokens as one segment of `key_data` / `value_data` [N, D], with
`offsets`, `lengths` and a capacity per segment; decode appends write at offsets + lengths of every
segment and attention runs `ops.packed_attention`. A layer without dead slots keeps the padded
[B, Hkv, C, D] store, whose attention and append are cheaper to launch.

Supports transformers 4.57 (`get_mask_sizes(cache_position)`, `crop(max_length)`)
and 5.x (`get_mask_sizes(query_length)`, `crop(-tokens_to_remove)`).
"""

from __future__ import annotations

import inspect
import threading
from typing import Optional, Tuple

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .stores import PackedStore, PaddedStore, all_live, left_aligned, append_reserve

# transformers 5.x: crop(tokens_to_remove <= 0); 4.57: crop(max_length), an absolute length or a negative count.
_CROP_TAKES_REMOVAL = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


class Liveness:
    """What a pruned cache learns from the patch that pruned it (one object per patch, shared by
    its layers): `active`, False once the patch has been removed, and `chunk_live`, set while a
    forward call is in flight in the current thread: (t, total, device) -> bool [B, 1, t], which
    of the call's last t of `total` positions its attention mask marks real, or None (no mask).
    New tokens it marks as padding (a padded follow-up turn) are stored dead.

    A copy of a pruned cache (``copy.deepcopy``, transformers' prefix-caching recipe) keeps the
    link to the patch: this object is shared, not copied.

    `compiled_mask` is the call's 2-D attention mask (or None) for code compiled by torch.compile,
    which cannot trace a threading.local nor call `chunk_live` without graph breaks: a plain
    attribute, so compiled code of one patched model must not run in two threads at once.
    """

    __slots__ = ("active", "_local", "compiled_mask")

    def __init__(self) -> None:
        self.active = True
        self._local = threading.local()
        self.compiled_mask: Optional[torch.Tensor] = None

    @property
    def chunk_live(self):
        return getattr(self._local, "chunk_live", None)

    @chunk_live.setter
    def chunk_live(self, value) -> None:
        self._local.chunk_live = value

    def __deepcopy__(self, memo) -> "Liveness":
        return self


# Store a layer with dead slots packed (`PackedStore`). False keeps the padded layout for every
# layer: the layout packing replaces, for comparisons (tests, benchmarks).
PACK_DEAD_SLOTS = True

_layout = threading.local()


class padded_layout:
    """Within it, layers pruned in this thread keep the padded layout: pruning deferred from code
    compiled by torch.compile (whose decode steps append by concatenation), comparisons."""

    def __enter__(self) -> None:
        self.before = getattr(_layout, "padded", False)
        _layout.padded = True

    def __exit__(self, *exc) -> None:
        _layout.padded = self.before


class PrunedLayer(DynamicLayer):
    """A `DynamicLayer` whose prompt was compacted by CSP.

    Attributes
    ----------
    keys, values : [B, Hkv, C + t, D] stored tensors (kept prompt tokens, then t appended tokens);
        after an append, views of a store with free slots (see the module docstring). In the
        packed layout, views [1, 1, N, D] of `packed.key_data` / `value_data` (what `update`
        returns; attention reads the packed store).
    kv_valid : bool [B, Hkv, C + t]; False marks dead slots, never attended. None when packed.
    packed : the `PackedStore` when the kept slots had dead ones (rows or KV heads that keep
        different numbers of tokens), else None.
    logical_len : L + t, the length the model sees (positions, masks).
    pruned_len : C, stored prompt slots (packed: the most any row and KV head stores).
    croppable : the last prompt positions that every row and KV head stores, in order, as its
        last prompt slots (the recent window): with the appended tokens, what `crop` can remove.
    slot_mod : int32 [B, Hkv, C], the modality id of each stored prompt slot (-1 dead), for
        pruning the layer again; tokens appended after them are text unless a later chunk is
        pruned (it records its own). Packed: each row and head's prompt slots from column 0.
    decode_queries : [B, H, n, D], the queries of the latest n decoded tokens (the last n slots),
        kept for decode-time compression (`CSPConfig.decode_budget`); None otherwise.
    """

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kv_valid: torch.Tensor, logical_len: int, liveness: Liveness,
                 croppable: int = 0, slot_mod: Optional[torch.Tensor] = None):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._liveness = liveness
        self.logical_len = int(logical_len)
        self.decode_queries: Optional[torch.Tensor] = None
        self.packed: Optional[PackedStore] = None
        self._store: Optional[PaddedStore] = None
        self._set_slots(keys, values, kv_valid, slot_mod, croppable)

    def _set_slots(self, keys: torch.Tensor, values: torch.Tensor, kv_valid: torch.Tensor,
                   slot_mod: Optional[torch.Tensor], croppable: int) -> None:
        """Store kept slots: packed when some are dead (the live counts of rows and KV heads
        differ, or all fall short of the slots), else padded as given. Deciding reads the counts
        (on a GPU, one sync per pruned layer)."""
        self._store = None
        self.pruned_len = keys.shape[-2]
        self.croppable = min(int(croppable), self.pruned_len)
        if PACK_DEAD_SLOTS and not getattr(_layout, "padded", False) and kv_valid is not None and kv_valid.numel() and not bool(kv_valid.all()):
            self.packed = PackedStore.from_padded(keys, values, kv_valid)
            self.slot_mod = None if slot_mod is None else left_aligned(slot_mod, kv_valid, -1)
            self.pruned_len = self.packed.longest()
            self.kv_valid = None
            self._show_packed()
        else:
            self.packed = None
            self.keys, self.values, self.kv_valid = keys, values, kv_valid
            self.slot_mod = slot_mod

    def _show_packed(self) -> None:
        packed = self.packed
        self.keys, self.values = packed.key_data[None, None], packed.value_data[None, None]

    def _unpack(self) -> None:
        """Go back to the padded layout (code compiled by torch.compile; dead new tokens)."""
        packed = self.packed
        keys, values, kv_valid = packed.unpacked()
        ids = self.slot_modalities()
        self.packed = None
        self.keys, self.values, self.kv_valid = keys, values, kv_valid
        # Right-aligned, the appended tokens are the last slots of every row and head, after the prompt's.
        self.pruned_len = keys.shape[-2] - packed.appended
        self.slot_mod = None if self.slot_mod is None else ids[..., : self.pruned_len].contiguous()
        self._store = None

    def __repr__(self) -> str:
        if self.packed is not None:
            return f"PrunedLayer(logical_len={self.logical_len}, packed, longest={self.packed.longest()})"
        stored = 0 if self.keys is None else self.keys.shape[-2]
        return f"PrunedLayer(logical_len={self.logical_len}, stored={stored})"

    @property
    def is_pruned(self) -> bool:
        """False after `reset()`: the layer then behaves as an empty DynamicLayer until pruned again."""
        return self.kv_valid is not None or self.packed is not None

    @property
    def stored_len(self) -> int:
        """Stored slots per row and KV head (packed: of the longest segment)."""
        return self.packed.longest() if self.packed is not None else self.keys.shape[-2]

    def stored_slots(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, kv_valid) [B, Hkv, S(, D)] in the padded layout: the stored tensors, or
        the packed store padded to its longest segment (dead slots first in each row and head)."""
        if self.packed is not None:
            return self.packed.unpacked()
        return self.keys, self.values, self.kv_valid

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens (valid slots) and return the stored keys and values."""
        if not self._liveness.active:
            raise RuntimeError(
                "cspkv: this cache was pruned by a patched model that has since been unpatched; "
                "its stored length no longer matches what the unpatched attention expects. Start a new cache."
            )
        if not self.is_initialized or self.keys is None:
            self.keys, self.values = key_states, value_states
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        elif not self.is_pruned:  # reset and refilled without pruning: an ordinary dynamic layer
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        elif self.packed is not None:
            self._append_packed(key_states, value_states)
        else:
            self._append(key_states, value_states)
        self.logical_len += key_states.shape[-2]
        return self.keys, self.values

    def _append_packed(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        t = key_states.shape[2]
        compiling = torch.compiler.is_compiling()
        live = None
        if not compiling:
            chunk_live = self._liveness.chunk_live
            live = None if chunk_live is None else chunk_live(t, self.logical_len + t, self.packed.lengths.device)
        if compiling or (live is not None and not all_live(live)):
            # Dead new tokens (a padded follow-up turn) need per-slot liveness: the padded layout has it.
            self._unpack()
            self._append(key_states, value_states)
            return
        packed = self.packed
        if packed.room() < t or not packed.writable():
            packed = self.packed = packed.grown(t)
        packed.append(key_states, value_states)
        self._show_packed()

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            self._append_traced(key_states, value_states)
            return
        n, t = self.keys.shape[2], key_states.shape[2]
        store = self._store
        if store is None or not store.writable_for(self) or n + t > store.key_slots.shape[2]:
            store = self._store = PaddedStore(self.keys, self.values, self.kv_valid, n + t + append_reserve(n + t))
        chunk_live = self._liveness.chunk_live
        live = None if chunk_live is None else chunk_live(t, self.logical_len + t, self.kv_valid.device)
        store.append(self, n, key_states, value_states, live)

    def _append_traced(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """`_append` in code compiled by torch.compile: concatenations (the compiler plans the
        memory), no store, no call into the extension and no threading.local, which dynamo
        cannot trace without graph breaks. The padding of the new chunk, as `Liveness.chunk_live`
        tells it, is read from `Liveness.compiled_mask`."""
        t = key_states.shape[2]
        mask = self._liveness.compiled_mask
        B, H = self.kv_valid.shape[:2]
        if mask is not None and mask.dim() == 2 and mask.shape[1] == self.logical_len + t:
            live = mask[:, None, -t:].to(device=self.kv_valid.device, dtype=torch.bool).expand(B, H, t)
        else:
            live = torch.ones(B, H, t, dtype=torch.bool, device=self.kv_valid.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.kv_valid = torch.cat([self.kv_valid, live], dim=-1)
        self._store = None

    def slot_modalities(self, last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """int32 [B, Hkv, S]: each stored slot's modality id, -1 at dead slots; the prompt slots'
        from `slot_mod`, appended ones text (0), the last slots `last` [B, T] if given. Packed:
        in the layout of `stored_slots()`."""
        if self.packed is not None:
            packed = self.packed
            prompt = packed.lengths - packed.appended  # each segment's prompt slots
            if self.slot_mod is None:
                left = torch.zeros(packed.batch, packed.heads, 1, dtype=torch.int32, device=packed.lengths.device)
                prompt = torch.zeros_like(prompt)
            else:
                left = self.slot_mod.to(torch.int32)
            ids = packed.right_aligned(left, prompt, 0)
            dead = packed.right_aligned(torch.zeros_like(left), packed.lengths, -1) < 0
            S = ids.shape[-1]
            if last is not None:
                ids[..., S - last.shape[-1]:] = last[:, None, :].to(ids)
            return ids.masked_fill_(dead, -1)
        B, Hkv, S = self.kv_valid.shape
        ids = torch.zeros(B, Hkv, S, dtype=torch.int32, device=self.kv_valid.device)
        if self.slot_mod is not None:
            ids[..., : self.slot_mod.shape[-1]] = self.slot_mod
        if last is not None:
            ids[..., S - last.shape[-1]:] = last[:, None, :].to(ids)
        return ids.masked_fill_(~self.kv_valid, -1)

    def replace_slots(self, keys: torch.Tensor, values: torch.Tensor, kv_valid: torch.Tensor, slot_mod: torch.Tensor,
                      croppable: int) -> None:
        """After pruning again: the stored slots are these (the logical length does not change)."""
        self._set_slots(keys, values, kv_valid, slot_mod, croppable)

    def get_seq_length(self) -> int:
        """The logical length: prompt tokens before pruning plus appended tokens."""
        return self.logical_len

    def get_mask_sizes(self, query) -> Tuple[int, int]:
        """(kv_length, kv_offset) in logical positions; `query` is a length (5.x) or cache_position (4.57)."""
        q = query if isinstance(query, int) else int(query.shape[0])
        return self.logical_len + q, 0

    def reset(self) -> None:
        self.keys = self.values = self.kv_valid = None
        self._store = None
        self.packed = None
        self.logical_len = 0
        self.pruned_len = self.croppable = 0
        self.slot_mod = self.decode_queries = None
        self.is_initialized = False

    def _select_rows(self, select, rows) -> None:
        """Replace keys, values, kv_valid and the per-row extras by `select(tensor)` of each (new
        tensors, no free slots); `rows()` gives the batch rows selected (CPU int64), for a packed
        store."""
        if self.packed is not None:
            self.packed = self.packed.select_rows(rows())
            self._show_packed()
            for name in ("slot_mod", "decode_queries"):
                if getattr(self, name) is not None:
                    setattr(self, name, select(getattr(self, name)))
            return
        if self.keys is not None and self.keys.numel():
            self.keys, self.values = select(self.keys), select(self.values)
            for name in ("kv_valid", "slot_mod", "decode_queries"):
                if getattr(self, name) is not None:
                    setattr(self, name, select(getattr(self, name)))
            self._store = None

    def _batch(self) -> int:
        return self.packed.batch if self.packed is not None else self.keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows of keys, values and kv_valid alike."""
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)), lambda: beam_idx.to("cpu", torch.int64))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0),
                          lambda: torch.arange(self._batch()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices, ...],
                          lambda: torch.arange(self._batch())[indices.cpu() if isinstance(indices, torch.Tensor) else indices])

    def crop(self, amount: int) -> None:
        """Remove the last tokens (assisted and prompt-lookup decoding drop rejected drafts so).

        Tokens appended after pruning can always be removed, and so can the prompt's last
        `croppable` positions (the recent window, stored whole in every row and head); beyond
        that the prompt was compacted, and NotImplementedError says so. Draft tokens verified in
        the same forward as the prompt are part of its recent window when the window holds them.
        """
        if _CROP_TAKES_REMOVAL:
            if amount > 0:
                raise ValueError(f"Calling `crop` with a positive value (`{amount}`) is not supported; pass -tokens_to_remove")
            remove = -amount
        else:
            remove = -amount if amount < 0 else self.logical_len - amount
        if remove <= 0 or self.keys is None:
            return
        packed = self.packed
        appended = packed.appended if packed is not None else self.keys.shape[-2] - self.pruned_len
        if remove > appended + self.croppable:
            raise NotImplementedError(
                f"cspkv: cannot crop {remove} tokens from a pruned cache layer: only the {appended} tokens appended "
                f"after pruning and the prompt's last {self.croppable} (its recent window) can be removed, the rest "
                "of the prompt was compacted; a larger CSPConfig.recent keeps more of it croppable"
            )
        from_prompt = max(0, remove - appended)
        self.pruned_len -= from_prompt
        self.croppable -= from_prompt
        self.decode_queries = None  # no longer the queries of the last slots
        self.logical_len -= remove
        if packed is not None:
            if not packed.writable():
                packed = self.packed = packed.grown(0)
            if self.slot_mod is not None and from_prompt:
                # each row and head loses its last from_prompt prompt slots (the recent window's tail)
                prompt = (packed.lengths - packed.appended - from_prompt).reshape(self.slot_mod.shape[:2])
                column = torch.arange(self.slot_mod.shape[-1], device=self.slot_mod.device)
                self.slot_mod = self.slot_mod.masked_fill(column >= prompt[..., None].to(self.slot_mod.device), -1)
            packed.crop(remove)
            self._show_packed()
            return
        if self.slot_mod is not None:
            self.slot_mod = self.slot_mod[..., : self.pruned_len]
        n = self.keys.shape[-2] - remove
        store = self._store
        if store is not None and store.writable_for(self):
            store.valid_slots[:, :, n:].fill_(True)  # the freed slots are appended to again, as live ones
            store.view(self, n)
        else:
            self.keys = self.keys[..., :n, :]
            self.values = self.values[..., :n, :]
            if self.kv_valid is not None:
                self.kv_valid = self.kv_valid[..., :n]


try:  # transformers 5.x: the cache layer of a decoder layer with no cache of its own (Gemma 4's KV-sharing consumers)
    from transformers.cache_utils import DummyLayer
except ImportError:  # 4.57
    DummyLayer = None

_LAYER_TYPES = (DynamicLayer, DynamicSlidingWindowLayer, PrunedLayer) + (() if DummyLayer is None else (DummyLayer,))


def check_cache(cache) -> None:
    """Raise a TypeError, before any work, for a cache cspkv cannot prune.

    None (no cache, or one created by the model) and a `DynamicCache` whose
    layers are plain dynamic, sliding-window or pruned layers (and, in 5.x, the empty
    `DummyLayer` of a layer that stores nothing) are accepted.
    """
    if cache is None:
        return
    if not isinstance(cache, Cache):
        raise TypeError(
            f"cspkv: unsupported cache type {type(cache).__name__}; pass a transformers DynamicCache "
            "(the default of generate()) or None"
        )
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"cspkv: unsupported cache type {type(cache).__name__}; cspkv prunes a DynamicCache (the default of "
            "generate()). Static, quantized, offloaded-static and encoder-decoder caches are not supported."
        )
    for idx, layer in enumerate(getattr(cache, "layers", ())):
        if type(layer) not in _LAYER_TYPES:
            raise TypeError(
                f"cspkv: unsupported cache layer {type(layer).__name__} at index {idx}; cspkv handles "
                "DynamicLayer and DynamicSlidingWindowLayer (DynamicCache without quantization)"
            )


def stored_bytes(layer) -> int:
    """Bytes of a cache layer's stored key and value tensors (a pruned layer's free slots included;
    a packed layer's key and value data, every segment's live tokens and free rows)."""
    packed = getattr(layer, "packed", None)
    if isinstance(packed, PackedStore):
        return packed.nbytes()
    store = getattr(layer, "_store", None)
    if isinstance(store, PaddedStore) and store.holds(layer):
        return store.nbytes()
    total = 0
    for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def returned_cache(output):
    """The cache of a model or `generate()` output: `.cache` on transformers 5.x (where
    `.past_key_values` still works, with a deprecation warning), `.past_key_values` on 4.57."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def layer_at(cache, layer_idx: int) -> Optional[object]:
    """`cache.layers[layer_idx]` or None."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    return layers[layer_idx]
