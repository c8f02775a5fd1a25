"""Patch a loaded transformers model in place so that its KV cache is pruned with CSP.

How it hooks in (transformers 4.57 and 5.x alike): every decoder attention
module computes q/k/v, applies RoPE (and QK-norm), updates the cache and calls
the attention function named by ``self.config._attn_implementation``. cspkv
registers its own function under the name ``"cspkv"`` and gives each patched
attention module a shallow copy of its config naming it (the model-level
config keeps eager/sdpa/flash, so masks are built as before). The module's
forward is wrapped on the instance only to capture the cache of the call.
Forward hooks on the top model (and on the text model, for direct calls)
capture input_ids / attention_mask of each call and check the cache type
before any work.

In the cspkv attention function, for a patched layer:

* prefill (the layer's cache was empty): run the original attention function
  for the output (inside `prefill_lse.Capture`, which also keeps the
  log-sum-exp of an SDPA flash call), then score the window
  (`ops.window_scores`, in one pass when that log-sum-exp fits), select
  (`ops.select_keep`), compact (`ops.compact_kv`) and replace the cache layer
  by a `cspkv.cache.PrunedLayer` reporting the logical length;
* decode / later chunks on a pruned layer: `ops.nsoftmax_attention` over the
  stored slots with `kv_valid` (the model's mask is sized in logical positions
  and is ignored there);
* anything else (no cache, a continued unpruned cache): the original function.

`PatchHandle.remove()` (or `unpatch`) restores the original config objects,
forwards and hooks, so the model computes exactly what it did before.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
import sys
import time
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from . import cache as cache_mod
from . import models, ops, policy, prefill_lse
from .config import CSPConfig, resolve
from .modality import check_shape, mask_padding, validate_ids

logger = logging.getLogger("cspkv")

ATTENTION_NAME = "cspkv"
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")
_NAME_PROPERTY = inspect.getattr_static(PretrainedConfig, "_attn_implementation")
_NO_CONTEXT = contextlib.nullcontext()  # reusable: one object for every call that needs no context


# --------------------------------------------------------------------------- NVTX


class _Range:
    """NVTX range around a step when CSPKV_NVTX=1 and the tensors are on CUDA; nothing otherwise."""

    __slots__ = ("name", "on")

    def __init__(self, name: str, on: bool) -> None:
        self.name, self.on = name, on

    def __enter__(self) -> None:
        if self.on:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc) -> None:
        if self.on:
            torch.cuda.nvtx.range_pop()


# --------------------------------------------------------------------------- per-call context


class _HostCopies:
    """CPU copies of `tensors` (None stays None). Those of CUDA tensors are only started here,
    into pinned memory, behind an event; `get()` waits for that event, i.e. for the copies, not
    for whatever the GPU was given after them."""

    def __init__(self, *tensors: Optional[torch.Tensor]) -> None:
        self.tensors: List[Optional[torch.Tensor]] = []
        self.events = []
        for t in tensors:
            if t is not None and t.device.type == "cuda":
                self.tensors.append(t.to("cpu", non_blocking=True))
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(t.device))
                self.events.append(event)
            else:
                self.tensors.append(None if t is None else t.to("cpu"))

    def get(self) -> List[Optional[torch.Tensor]]:
        for event in self.events:
            event.synchronize()
        self.events = []
        return self.tensors


class _Call:
    """What one top-level forward call tells every patched layer: the prompt's ids and mask.

    Modality ids and row plans are computed once per call, on first use.
    """

    def __init__(self, handle: "PatchHandle", input_ids, attention_mask, override) -> None:
        self.handle = handle
        self.input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        self.attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        self.override = override
        self._ids: Optional[torch.Tensor] = None
        self._on_device: Dict[torch.device, tuple] = {}
        self._chunk_live: Dict[tuple, Optional[torch.Tensor]] = {}
        self.checked_masks: Dict[int, tuple] = {}  # prefill_lse.window_lse's memo
        self.plans: Optional[List[policy.RowPlan]] = None
        self.logged_short = False
        self.joins: Dict[torch.device, tuple] = {}  # device: (the layers' stream, the side stream pruning ran on)
        self._host: Optional[_HostCopies] = None

    def start_host_copies(self) -> None:
        """Start copying the prompt's ids (given or `input_ids`) and mask to the host: called before
        a prefill's work is queued, the first pruned layer then waits for these copies only."""
        if self._host is None:
            self._host = _HostCopies(self.override if self.override is not None else self.input_ids, self.attention_mask)

    def modality_ids(self, batch: int, length: int) -> torch.Tensor:
        """k_mod [B, L] (CPU int64), -1 at padding."""
        if self._ids is None:
            if self.override is not None:
                check_shape(self.override, batch, length)
            elif self.input_ids is not None and tuple(self.input_ids.shape[:2]) != (batch, length):
                raise RuntimeError(
                    f"cspkv: the layer prunes a prompt of shape [B, L] = [{batch}, {length}] but the call's "
                    f"input_ids have shape {list(self.input_ids.shape)}; give explicit ids with cspkv.modalities(model, ids)"
                )
            self.start_host_copies()  # already started by the pre-hook of a prefill call
            given, mask = self._host.get()
            if self.override is not None:
                ids = given
            else:
                ids = self.handle.adapter.modality_ids(self.handle.model, given, (batch, length), torch.device("cpu"))
            self._ids = mask_padding(ids.long(), mask)
        return self._ids

    def prepared(self, batch: int, length: int, device: torch.device):
        """(k_mod, q_mod) int32 on `device` and the row plans.

        int32 is what the kernels read: given int64, each op of each layer would convert them
        (a kernel launch apiece on a GPU); here they are built on the host and sent once per call."""
        ids = self.modality_ids(batch, length)
        if self.plans is None:
            self.plans = policy.plan_batch(self.handle.config, ids)
            if ids.shape[0] > 1 and bool(((ids[:, -1] < 0) & (ids >= 0).any(dim=1)).any()):
                logger.warning("cspkv: a batch row ends with padding; cspkv expects left padding (its window then holds fewer queries)")
        if device not in self._on_device:
            k_mod = ids.to(torch.int32)
            q_mod = policy.window_query_ids(k_mod, self.plans)
            pinned = device.type == "cuda"  # from pinned memory a copy to a GPU does not wait for the GPU's queue to drain
            self._on_device[device] = tuple((t.pin_memory() if pinned else t).to(device, non_blocking=pinned) for t in (k_mod, q_mod))
        return self._on_device[device] + (self.plans,)

    def side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        """The handle's side stream on `device`, made to wait for the work queued so far on the
        current stream; the call's end (`PatchHandle._post_hook`) makes that stream wait for it."""
        main = torch.cuda.current_stream(device)
        side = self.handle._side_streams.get(device)
        if side is None:  # high priority: pruning keeps up with the layers, the full K/V it reads are freed soon
            side = self.handle._side_streams[device] = torch.cuda.Stream(device, priority=-1)
        side.wait_stream(main)
        self.joins.setdefault(device, (main, side))
        return side

    def join(self) -> None:
        """Make each device's layer stream wait for the pruning queued on its side stream."""
        for main, side in self.joins.values():
            main.wait_stream(side)
        self.joins.clear()

    def chunk_live(self, chunk: int, total: int, device: torch.device) -> Optional[torch.Tensor]:
        """bool [B, 1, chunk]: which of the last `chunk` of `total` positions the call's 2-D mask
        marks real (a padded follow-up turn), computed once per call for every layer; None without
        a 2-D mask of that length."""
        mask = self.attention_mask
        if mask is None:
            return None
        key = (chunk, total, device)
        if key not in self._chunk_live:
            live = None
            if mask.dim() == 2 and mask.shape[1] == total:
                live = mask[:, None, -chunk:].to(device=device, dtype=torch.bool)
            self._chunk_live[key] = live
        return self._chunk_live[key]


# --------------------------------------------------------------------------- one patched layer


def _positional_index(fn, names) -> Optional[int]:
    """Index (after self) of the first parameter of `fn` named in `names`, for positional calls."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params[1:]):
        if p.name in names and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return i
    return None


class _LayerPatch:
    """The patch of one attention module and the pruning statistics of its layer."""

    def __init__(self, handle: "PatchHandle", layer_idx: int, module: nn.Module) -> None:
        self.handle = handle
        self.layer_idx = layer_idx
        self.module = module
        self.cache = None  # the cache of the call in flight
        self.original_config = module.config
        # A config class that keeps transformers' `_attn_implementation` property has the name in its
        # fields: read there, it skips the config's __getattribute__ overrides (several us a layer and token).
        keeps_property = inspect.getattr_static(type(module.config), "_attn_implementation", None) is _NAME_PROPERTY
        self.config_fields = vars(module.config) if keeps_property else None
        self.eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        self.had_instance_forward = "forward" in module.__dict__
        self.inner_forward = module.forward
        self.cache_position = _positional_index(type(module).forward, _CACHE_NAMES)
        self.stats: dict = {"layer": layer_idx, "pruned": False, "reason": "no prefill seen yet"}
        self._original: Optional[tuple] = None  # (attention implementation name, its function)
        self._events = None

    # -- install / remove
    def install(self) -> None:
        module = self.module
        patched_config = copy.copy(self.original_config)
        # Set the backing field directly: the public setter would recurse into (shared) sub-configs.
        patched_config.__dict__["_attn_implementation_internal"] = ATTENTION_NAME
        inner, cache_position = self.inner_forward, self.cache_position

        def forward(*args, **kwargs):
            cache = None
            for name in _CACHE_NAMES:
                if kwargs.get(name) is not None:
                    cache = kwargs[name]
                    break
            else:
                if cache_position is not None and len(args) > cache_position:
                    cache = args[cache_position]
            if cache is not None and not isinstance(cache, DynamicCache):
                cache_mod.check_cache(cache)
            self.cache = cache
            try:
                return inner(*args, **kwargs)
            finally:
                self.cache = None

        module.config = patched_config
        module.forward = forward
        module._cspkv_layer = self

    def remove(self) -> None:
        module = self.module
        module.config = self.original_config
        if self.had_instance_forward:
            module.forward = self.inner_forward
        else:
            module.__dict__.pop("forward", None)
        module.__dict__.pop("_cspkv_layer", None)

    # -- attention
    def original_attention(self):
        """The attention function the model's config names now (it may be changed after patching)."""
        fields = self.config_fields
        name = self.original_config._attn_implementation if fields is None else fields.get("_attn_implementation_internal")
        if self._original is not None and self._original[0] == name:
            return self._original[1]
        if name in (None, "eager"):
            if self.eager is None:
                raise RuntimeError(f"cspkv: {type(self.module).__module__} defines no eager_attention_forward")
            function = self.eager
        elif name == ATTENTION_NAME:
            raise RuntimeError("cspkv: the model-level config names the cspkv attention; patch state is corrupt")
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            function = ALL_ATTENTION_FUNCTIONS[name]
        self._original = (name, function)
        return function

    def attend(self, query, key, value, attention_mask, scaling, dropout, kwargs):
        if scaling is None:
            scaling = getattr(self.module, "scaling", None) or query.shape[-1] ** -0.5
        layer = cache_mod.layer_at(self.cache, self.layer_idx)
        # type(), not isinstance(): cache layers derive from an ABC, whose isinstance costs a decode step host time.
        if type(layer) is cache_mod.PrunedLayer and layer.is_pruned:
            self._check_supported(kwargs, dropout)
            return self._attend_pruned(layer, query, key, value, scaling)
        prefill = (
            layer is not None
            and type(layer) in (DynamicLayer, cache_mod.PrunedLayer)
            and key.shape[-2] == query.shape[-2]
        )
        if prefill:
            self._check_supported(kwargs, dropout)
        config = self.handle.config
        capture = prefill_lse.Capture() if prefill and config.prefill_lse and config.policy in prefill_lse.POLICIES else None
        with capture if capture is not None else _NO_CONTEXT:
            output = self.original_attention()(
                self.module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if prefill:
            self._prune(layer, query, key, value, scaling, capture)
        elif layer is not None and key.shape[-2] == query.shape[-2]:
            self._skip(f"its cache layer is a {type(layer).__name__}", key.shape[-2])
        return output

    def _check_supported(self, kwargs, dropout) -> None:
        if kwargs.get("sliding_window") is not None:
            why = f"sliding-window attention (window {kwargs['sliding_window']}) cannot be pruned; the adapter should skip this layer"
        elif kwargs.get("softcap") is not None:
            why = f"attention logit soft-capping (softcap={kwargs['softcap']}) is not supported by the CSP ops"
        elif kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            why = "attention sinks are not supported by the CSP ops"
        elif dropout and self.module.training:
            why = "attention dropout in training mode; cspkv prunes at inference (call model.eval())"
        else:
            return
        raise NotImplementedError(f"cspkv: layer {self.layer_idx}: {why}")

    def _attend_pruned(self, layer, query, key, value, scaling):
        # Padding inside the new chunk (a padded follow-up turn) was stored dead by the append (Liveness.chunk_live).
        out = ops.nsoftmax_attention(query, key, value, scale=scaling, n=self.handle.config.decode_n, kv_valid=layer.kv_valid)
        return out.transpose(1, 2).contiguous(), None

    def _skip(self, reason: str, length: int) -> None:
        self.stats = {"layer": self.layer_idx, "pruned": False, "reason": reason, "prompt_len": length}
        logger.debug("cspkv: layer %d not pruned: %s", self.layer_idx, reason)

    def _prune(self, layer, query, key, value, scaling, capture: Optional[prefill_lse.Capture]) -> None:
        handle, config = self.handle, self.handle.config
        call = handle._call
        if call is None:  # the attention module was called outside the model's forward
            call = _Call(handle, None, None, handle._modality_override)
        B, L = key.shape[0], key.shape[-2]
        device = key.device
        k_mod, q_mod, plans = call.prepared(B, L, device)
        if not any(p.pruned for p in plans):
            reason = f"prompt of {max(p.length for p in plans)} tokens is shorter than min_prompt={config.min_prompt}"
            if not call.logged_short:
                call.logged_short = True
                logger.debug("cspkv: not pruning: %s", reason)
            self.stats = {"layer": self.layer_idx, "pruned": False, "reason": reason, "prompt_len": L}
            return

        nvtx = handle.nvtx and device.type == "cuda"
        side = None
        if config.overlap_pruning and _has_streams(device) and call is handle._call:
            side = call.side_stream(device)
            # Tensors of the layer's stream read on the side one: their memory is not reused before that work ran.
            for t in (query, key, value, None if capture is None else capture.lse):
                if t is not None:
                    t.record_stream(side)
        with torch.cuda.stream(side) if side is not None else _NO_CONTEXT:
            timer = _Timer(device)
            keys_c, values_c, keep_valid, scoring = self._score_select_compact(query, key, value, scaling, capture, call,
                                                                               k_mod, q_mod, plans, nvtx)
            self._events = timer.stop()
        self.cache.layers[self.layer_idx] = cache_mod.PrunedLayer(keys_c, values_c, keep_valid, L, handle.liveness)
        bytes_before = key.numel() * key.element_size() + value.numel() * value.element_size()
        self.stats = {
            "layer": self.layer_idx,
            "pruned": True,
            "reason": None,
            "prompt_len": L,
            "kept": keys_c.shape[-2],
            "kept_per_row": [p.budget for p in plans],
            "kv_bytes_before": bytes_before,
            "kv_bytes_after": keys_c.numel() * keys_c.element_size() + values_c.numel() * values_c.element_size(),
            "device": str(device),
            **scoring,
        }

    def _score_select_compact(self, query, key, value, scaling, capture, call, k_mod, q_mod, plans, nvtx):
        """(kept keys, kept values, keep_valid, {"scoring": how} or {}) of the layer's prompt."""
        config = self.handle.config
        scoring = {}
        lse = None
        if config.policy in prefill_lse.POLICIES:
            lse, why = prefill_lse.window_lse(capture, scale=scaling, query=query, k_mod=k_mod, q_mod=q_mod, plans=plans,
                                              checked_masks=call.checked_masks)
            scoring["scoring"] = "one pass (log-sum-exp of the prefill attention)" if lse is not None else f"two passes: {why}"
        with _Range("cspkv::score", nvtx):
            self_scores, cross_scores = policy.scores(config, query, key, q_mod, k_mod, scale=scaling, layer=self.layer_idx, lse=lse)
        with _Range("cspkv::select", nvtx):
            keep_idx, keep_valid = policy.select(self_scores, cross_scores, k_mod, plans)
        with _Range("cspkv::compact", nvtx):
            keys_c, values_c = cache_mod.compact(key, value, keep_idx, keep_valid if policy.has_dead_slots(plans) else None)
        return keys_c, values_c, keep_valid, scoring

    def snapshot(self) -> dict:
        out = dict(self.stats)
        if self._events is not None:
            out["prune_ms"] = _Timer.elapsed_ms(self._events)
        return out


def _has_streams(device: torch.device) -> bool:
    """Whether pruning on `device` can run on a side stream (CSPConfig.overlap_pruning)."""
    return device.type == "cuda"


class _Timer:
    """Wall time on CPU; CUDA events (resolved lazily in stats()) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return ("cuda", self.start, end)
        return ("cpu", (time.perf_counter() - self.start) * 1e3)

    @staticmethod
    def elapsed_ms(events) -> float:
        if events[0] == "cuda":
            events[2].synchronize()
            return float(events[1].elapsed_time(events[2]))
        return float(events[1])


def _cspkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "cspkv"; only patched modules name it."""
    patch = module.__dict__.get("_cspkv_layer")
    if patch is None:
        raise RuntimeError("cspkv: the cspkv attention function was called by a module that is not patched")
    return patch.attend(query, key, value, attention_mask, scaling, dropout, kwargs)


# --------------------------------------------------------------------------- the handle


class PatchHandle:
    """A patched model. `remove()` restores it; usable as a context manager.

    Attributes
    ----------
    model : the patched model.
    config : the `CSPConfig` in force.
    adapter : the `cspkv.models.Adapter` of the model's family.
    layers : {layer index: per-layer patch}, the pruned layers.
    skipped : {layer index: reason} for layers left alone.
    """

    def __init__(self, model: nn.Module, config: CSPConfig, adapter: models.Adapter) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter
        self.layers: Dict[int, _LayerPatch] = {}
        self.skipped: Dict[int, str] = {}
        self.liveness = cache_mod.Liveness()
        self.nvtx = os.environ.get("CSPKV_NVTX", "0") == "1"
        self._hooks: list = []
        self._call: Optional[_Call] = None
        self._depth = 0
        self._side_streams: Dict[torch.device, "torch.cuda.Stream"] = {}  # CSPConfig.overlap_pruning
        self._modality_override: Optional[torch.Tensor] = None
        self.removed = False

    # -- hooks on the top model / text model
    def _pre_hook(self, module, args, kwargs):
        self._depth += 1
        if self._depth > 1:
            return None
        bound = _bind(module, args, kwargs)
        cache = next((bound[n] for n in _CACHE_NAMES if bound.get(n) is not None), None)
        cache_mod.check_cache(cache)
        input_ids, attention_mask = bound.get("input_ids"), bound.get("attention_mask")
        override = self._modality_override
        prefill = cache is None or cache.get_seq_length() == 0
        if override is not None and prefill:
            prompt = input_ids if isinstance(input_ids, torch.Tensor) else bound.get("inputs_embeds")
            if isinstance(prompt, torch.Tensor):
                check_shape(override, prompt.shape[0], prompt.shape[1])
        self._call = _Call(self, input_ids, attention_mask, override)
        self.liveness.chunk_live = self._call.chunk_live
        if prefill:  # the first pruned layer will need them
            self._call.start_host_copies()
        return None

    def _post_hook(self, module, args, kwargs, output):
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            if self._call is not None:
                self._call.join()
            self._call = self.liveness.chunk_live = None
        return None

    # -- public
    def remove(self) -> None:
        """Restore the model exactly; caches pruned under this patch can no longer be continued."""
        if self.removed:
            return
        for patch in self.layers.values():
            patch.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.liveness.active = False
        if self._call is not None:
            self._call.join()
        self._call, self._depth, self.liveness.chunk_live = None, 0, None
        self.removed = True
        if getattr(self.model, "_cspkv_handle", None) is self:
            del self.model._cspkv_handle
        logger.info("cspkv: unpatched %s", type(self.model).__name__)

    def stats(self) -> dict:
        """Per-layer pruning statistics of the last prefill and their totals.

        Returns {"layers": {idx: {...}}, "skipped": {idx: reason}, "pruned_layers",
        "kv_bytes_before", "kv_bytes_after", "prune_ms"}. A pruned layer's entry has
        prompt_len, kept (stored slots), kept_per_row, kv_bytes_before/after,
        prune_ms (wall time on a CPU; on a GPU the time between CUDA events around
        the layer's pruning, which with `overlap_pruning` runs on a side stream
        alongside the later layers: their sum is then more than what pruning
        adds to the prefill), device and, for the window-scoring policies (csp, snapkv),
        scoring: "one pass (...)" when the prefill attention's log-sum-exp was
        used, else "two passes: <why not>" (see `cspkv.prefill_lse`); an
        unpruned one has the reason.
        """
        layers = {idx: patch.snapshot() for idx, patch in sorted(self.layers.items())}
        pruned = [s for s in layers.values() if s.get("pruned")]
        return {
            "layers": layers,
            "skipped": dict(self.skipped),
            "pruned_layers": len(pruned),
            "kv_bytes_before": sum(s["kv_bytes_before"] for s in pruned),
            "kv_bytes_after": sum(s["kv_bytes_after"] for s in pruned),
            "prune_ms": sum(s.get("prune_ms", 0.0) for s in pruned),
        }

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.layers)} layers"
        return f"PatchHandle({type(self.model).__name__}, {state}, {self.config})"


@functools.lru_cache(maxsize=64)
def _positional_names(fn) -> Optional[Tuple[str, ...]]:
    """Names of `fn`'s parameters that a positional argument can fill, after self, once per function
    (a model called with positional ids binds them at every decode step); None if `fn` takes *args."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _bind(module: nn.Module, args, kwargs) -> dict:
    """The call's arguments by name (positional ones mapped through the forward's signature)."""
    if not args:
        return kwargs
    try:
        names = _positional_names(type(module).forward)
    except (TypeError, ValueError):
        names = None
    if names is None or len(args) > len(names):
        named = dict(kwargs)
        named.setdefault("input_ids", args[0])
        return named
    named = dict(zip(names, args))
    named.update(kwargs)
    return named


_registered = False


def _register_attention() -> None:
    global _registered
    if not _registered:
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _cspkv_attention)
        _registered = True


def patch(model: nn.Module, config: Optional[CSPConfig] = None, **overrides) -> PatchHandle:
    """Rewrite the decoder attention modules of `model` in place to prune their KV cache with CSP.

    Parameters
    ----------
    model : a transformers model of a supported family (see `cspkv.models`), any
        attention backend, possibly dispatched over several devices.
    config : `CSPConfig` (default CSPConfig()); `overrides` replace its fields.

    Returns
    -------
    PatchHandle; `handle.remove()` or `cspkv.unpatch(model)` restores the model.
    Patching an already patched model with the same config returns its handle;
    with another config it raises RuntimeError.

    Example
    -------
    >>> handle = cspkv.patch(model, budget=0.2)                      # doctest: +SKIP
    >>> out = model.generate(**inputs, max_new_tokens=32)            # doctest: +SKIP
    >>> handle.stats()["kv_bytes_after"]                             # doctest: +SKIP
    """
    config = resolve(config, overrides)
    existing = getattr(model, "_cspkv_handle", None)
    if existing is not None:
        if existing.config == config:
            return existing
        raise RuntimeError(
            f"cspkv.patch: the model is already patched with {existing.config}; call cspkv.unpatch(model) "
            "before patching it with another config"
        )
    adapter = models.adapter_for(model)
    modules = adapter.attention_modules(model)
    indices = [idx for idx, _ in modules]
    if config.layers is not None:
        missing = [i for i in config.layers if i not in indices]
        if missing:
            raise ValueError(f"CSPConfig.layers names layers {missing} that this model does not have (it has {min(indices)}..{max(indices)})")
    skipped = adapter.skipped_layers(model)

    _register_attention()
    handle = PatchHandle(model, config, adapter)
    for idx, module in modules:
        if config.layers is not None and idx not in config.layers:
            handle.skipped[idx] = "not in CSPConfig.layers"
            continue
        if idx in skipped:
            handle.skipped[idx] = skipped[idx]
            continue
        handle.layers[idx] = _LayerPatch(handle, idx, module)
    for patch_ in handle.layers.values():
        patch_.install()

    owners = [model]
    decoder = adapter.decoder(model)
    if decoder is not None and decoder is not model:
        owners.append(decoder)
    for owner in owners:
        handle._hooks.append(owner.register_forward_pre_hook(handle._pre_hook, with_kwargs=True))
        handle._hooks.append(owner.register_forward_hook(handle._post_hook, with_kwargs=True, always_call=True))
    model._cspkv_handle = handle

    reasons = {}
    for idx, reason in handle.skipped.items():
        reasons.setdefault(reason, []).append(idx)
    for reason, idxs in reasons.items():
        logger.info("cspkv: not pruning layers %s: %s", idxs, reason)
    if not handle.layers:
        message = f"cspkv.patch: no layer of {type(model).__name__} will be pruned ({'; '.join(reasons)})"
        warnings.warn(message, UserWarning, stacklevel=2)
    logger.info("cspkv: patched %d of %d layers of %s (%s) with %s",
                len(handle.layers), len(modules), type(model).__name__, adapter.name, config)
    return handle


def unpatch(model: nn.Module) -> bool:
    """Restore a patched model; returns False (and does nothing) if it was not patched."""
    handle = getattr(model, "_cspkv_handle", None)
    if handle is None:
        logger.debug("cspkv.unpatch: %s is not patched", type(model).__name__)
        return False
    handle.remove()
    return True


@contextlib.contextmanager
def patched(model: nn.Module, config: Optional[CSPConfig] = None, **overrides) -> Iterator[PatchHandle]:
    """``with cspkv.patched(model, budget=0.2) as handle: ...``; restores the model on exit.

    If the model was already patched with the same config, it stays patched on exit.
    """
    before = getattr(model, "_cspkv_handle", None)
    handle = patch(model, config, **overrides)
    try:
        yield handle
    finally:
        if handle is not before:
            handle.remove()


def _handle_of(model: nn.Module, what: str) -> PatchHandle:
    handle = getattr(model, "_cspkv_handle", None)
    if handle is None:
        raise ValueError(f"cspkv.{what}: {type(model).__name__} is not patched; call cspkv.patch(model) first")
    return handle


@contextlib.contextmanager
def modalities(model: nn.Module, modality_ids) -> Iterator[None]:
    """Explicit modality ids [B, L] (int, -1 = padding) for the prompts of the calls inside.

    The ids must have the shape of the prompt being prefilled (checked before
    the call does any work); padding (attention_mask == 0) is -1 regardless.
    Generated tokens need no ids: scoring happens at prefill only.
    """
    handle = _handle_of(model, "modalities")
    ids = validate_ids(modality_ids)
    previous = handle._modality_override
    handle._modality_override = ids
    try:
        yield
    finally:
        handle._modality_override = previous


def stats(model: nn.Module) -> dict:
    """`PatchHandle.stats()` of a patched model."""
    return _handle_of(model, "stats").stats()
