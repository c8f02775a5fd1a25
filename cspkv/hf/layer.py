"""One patched attention module: the cspkv attention function and what it does per layer.

cspkv registers its own attention function under the name ``"cspkv"`` and
gives each patched attention module a shallow copy of its config naming it
(the model-level config keeps eager/sdpa/flash, so masks are built as before).
The module's forward is wrapped on the instance only to capture the cache of
the call. In the cspkv attention function, for a patched layer:

* prefill (the layer's cache was empty): run the original attention function
  for the output (inside `prefill_lse.Capture`, which also keeps the
  log-sum-exp of an SDPA flash call), then `cspkv.pruning.prune_layer` (score,
  select, compact) and replace the cache layer by a `cache.PrunedLayer`
  reporting the logical length; with ``CSPConfig.layer_allocation="adaptive"``
  the layer is only scored there, and every scored layer selects and compacts
  at the end of the model's forward call (`_select_layers`), once the budgets
  of all layers are known;
* decode / later chunks on a pruned layer: `ops.nsoftmax_attention` over the
  stored slots with `kv_valid`, or `ops.packed_attention` over a packed layer
  (the model's mask is sized in logical positions and is ignored there);
* anything else (no cache, a continued unpruned cache): the original function.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from .. import ops
from ..ops.profiling import Timer
from ..pruning import allocation
from ..pruning import budget as budget_mod
from ..pruning import head_allocation, prune_layer, prune_stored, score_layer, select_and_compact
from ..pruning.policies import ScoreInputs
from . import cache as cache_mod
from . import prefill_lse
from .call import CallContext
from .stats import LayerStats

if TYPE_CHECKING:
    from .api import PatchHandle

logger = logging.getLogger("cspkv")

ATTENTION_NAME = "cspkv"
CACHE_NAMES = ("cache", "past_key_values", "past_key_value")
_NAME_PROPERTY = inspect.getattr_static(PretrainedConfig, "_attn_implementation")
_NO_CONTEXT = contextlib.nullcontext()  # reusable: one object for every call that needs no context


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


class _CapturingForward:
    """The forward installed on a patched attention module: records the call's cache for the
    cspkv attention function (per thread), then runs the module's own forward. An object rather
    than a closure, so that a deep copy of the model runs the copy's module and patch."""

    __slots__ = ("patch",)

    def __init__(self, patch: "LayerPatch") -> None:
        self.patch = patch

    def __call__(self, *args, **kwargs):
        patch = self.patch
        cache = None
        for name in CACHE_NAMES:
            if kwargs.get(name) is not None:
                cache = kwargs[name]
                break
        else:
            if patch.cache_position is not None and len(args) > patch.cache_position:
                cache = args[patch.cache_position]
        if cache is not None and not isinstance(cache, DynamicCache):
            cache_mod.check_cache(cache)
        # dynamo cannot trace a threading.local: compiled code keeps the cache in a plain attribute
        holder = patch if torch.compiler.is_compiling() else patch._local
        name = "compiled_cache" if holder is patch else "cache"
        setattr(holder, name, cache)
        try:
            if patch.instance_forward is not None:
                return patch.instance_forward(*args, **kwargs)
            return type(patch.module).forward(patch.module, *args, **kwargs)
        finally:
            setattr(holder, name, None)


class LayerPatch:
    """The patch of one attention module and the pruning statistics of its layer."""

    def __init__(self, handle: "PatchHandle", layer_idx: int, module: nn.Module) -> None:
        self.handle = handle
        self.layer_idx = layer_idx
        self.module = module
        self._local = threading.local()  # the cache of the current thread's call in flight
        self.compiled_cache = None  # the same, in code compiled by torch.compile (see `cache`)
        self.original_config = module.config
        # A config class that keeps transformers' `_attn_implementation` property has the name in its
        # fields: read there, it skips the config's __getattribute__ overrides (several us a layer and token).
        keeps_property = inspect.getattr_static(type(module.config), "_attn_implementation", None) is _NAME_PROPERTY
        self.config_fields = vars(module.config) if keeps_property else None
        self.eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        self.instance_forward = module.__dict__.get("forward")  # a forward set on the instance before patching
        self.cache_position = _positional_index(type(module).forward, CACHE_NAMES)
        self.stats = LayerStats(layer_idx)
        self._original: Optional[tuple] = None  # (attention implementation name, its function)

    @property
    def cache(self):
        """The cache of the current thread's call in flight, or None.

        In code compiled by torch.compile (which cannot trace a threading.local) it is a plain
        attribute, set for the duration of the module's call: compiled code of one patched model
        must not run in two threads at once."""
        if torch.compiler.is_compiling():
            return self.compiled_cache
        return getattr(self._local, "cache", None)

    def __deepcopy__(self, memo) -> "LayerPatch":
        clone = object.__new__(LayerPatch)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name not in ("_local", "config_fields"):
                setattr(clone, name, copy.deepcopy(value, memo))
        clone._local = threading.local()
        clone.config_fields = None if self.config_fields is None else vars(clone.original_config)
        return clone

    # -- install / remove
    def install(self) -> None:
        module = self.module
        patched_config = copy.copy(self.original_config)
        # Set the backing field directly: the public setter would recurse into (shared) sub-configs.
        patched_config.__dict__["_attn_implementation_internal"] = ATTENTION_NAME
        module.config = patched_config
        module.forward = _CapturingForward(self)
        module._cspkv_layer = self

    def remove(self) -> None:
        module = self.module
        module.config = self.original_config
        if self.instance_forward is not None:
            module.forward = self.instance_forward
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
            output = self._attend_pruned(layer, query, key, value, scaling)
            config = self.handle.config
            if query.shape[-2] > 1:
                layer.decode_queries = None
                if config.later_prefill != "off" and query.shape[-2] >= config.min_prompt:
                    self._later(self._prune_again, layer, query, key, value, scaling)
            elif config.decode_budget is not None:
                self._later(self._compress_decoded, layer, query, key, value, scaling)
            return output
        prefill = (
            layer is not None
            and type(layer) in (DynamicLayer, cache_mod.PrunedLayer)
            and key.shape[-2] == query.shape[-2]
        )
        if prefill:
            self._check_supported(kwargs, dropout)
            if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
                raise NotImplementedError(
                    f"cspkv: layer {self.layer_idx}: pruning a cache is not differentiable, and this forward asks for "
                    "gradients with a cache. Generate under torch.no_grad() or torch.inference_mode(); to train a "
                    "patched model pass use_cache=False (the layers then run their own attention), or unpatch it"
                )
        config = self.handle.config
        capture = None
        if prefill and config.prefill_lse and config.policy.uses_prefill_lse and not torch.compiler.is_compiling():
            capture = prefill_lse.Capture()
        with capture if capture is not None else _NO_CONTEXT:
            output = self.original_attention()(
                self.module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if prefill:
            self._later(self._prune, layer, query, key, value, scaling, capture, self.cache)
        elif layer is not None and key.shape[-2] == query.shape[-2]:
            self._skip(f"its cache layer is a {type(layer).__name__}", key.shape[-2])
        return output

    def _later(self, step, *args) -> None:
        """Run a pruning step (`_prune`, `_prune_again`, `_compress_decoded`) now; in code compiled
        by torch.compile, which could not trace it without graph breaks, after the model's forward:
        the layer's output does not depend on it, and the call's end (`PatchHandle._post_hook`,
        run outside the compiled code) runs `handle.deferred` in order. What it stores keeps the
        padded layout: the compiled decode steps append by concatenation, which a packed store
        cannot take."""
        if torch.compiler.is_compiling():
            self.handle.deferred.append((_in_padded_layout, (step,) + args))
        else:
            step(*args)

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
        packed = layer.packed
        if packed is not None:  # rows / KV heads of different lengths, each stored without padding
            out = ops.packed_attention(query, packed.key_data, packed.value_data, packed.offsets, packed.lengths,
                                       scale=scaling, n=self.handle.config.decode_n)
        else:
            out = ops.nsoftmax_attention(query, key, value, scale=scaling, n=self.handle.config.decode_n, kv_valid=layer.kv_valid)
        return out.transpose(1, 2).contiguous(), None

    def _skip(self, reason: str, length: int) -> None:
        self.stats = LayerStats(self.layer_idx, reason=reason, prompt_len=length)
        logger.debug("cspkv: layer %d not pruned: %s", self.layer_idx, reason)

    def _prune(self, layer, query, key, value, scaling, capture: Optional[prefill_lse.Capture], cache=None) -> None:
        handle, config = self.handle, self.handle.config
        call = handle._call
        if call is None:  # the attention module was called outside the model's forward
            call = CallContext(handle, None, None, handle._modality_override)
        B, L = key.shape[0], key.shape[-2]
        device = key.device
        k_mod, q_mod, plans = call.prepared(B, L, device)
        if not any(p.pruned for p in plans):
            reason = f"prompt of {max(p.length for p in plans)} tokens is shorter than min_prompt={config.min_prompt}"
            if not call.logged_short:
                call.logged_short = True
                logger.debug("cspkv: not pruning: %s", reason)
            self.stats = LayerStats(self.layer_idx, reason=reason, prompt_len=L)
            return

        nvtx = handle.nvtx and device.type == "cuda"
        # CSPConfig.layer_allocation: the budgets of the layers need every layer's scores, so this layer is scored
        # now and selects at the call's end. A module called outside its model has no call end: it prunes alone.
        across_layers = config.layer_allocation == "adaptive" and call is handle._call
        side = None
        if config.overlap_pruning and not across_layers and _has_streams(device) and call is handle._call:
            side = call.side_stream(device)
            # Tensors of the layer's stream read on the side one: their memory is not reused before that work ran.
            for t in (query, key, value, None if capture is None else capture.lse):
                if t is not None:
                    t.record_stream(side)
        scoring, lse, kept, scores = None, None, None, None
        with torch.cuda.stream(side) if side is not None else _NO_CONTEXT:
            timer = Timer(device)
            if config.policy.uses_prefill_lse:
                lse, why = prefill_lse.window_lse(capture, scale=scaling, query=query, k_mod=k_mod, q_mod=q_mod,
                                                  plans=plans, checked_masks=call.checked_masks)
                scoring = "one pass (log-sum-exp of the prefill attention)" if lse is not None else f"two passes: {why}"
            if across_layers:
                scores = score_layer(config, ScoreInputs(query, key, q_mod, k_mod, scaling, self.layer_idx, lse), nvtx=nvtx)
            else:
                kept = prune_layer(config, query, key, value, k_mod, q_mod, plans, scale=scaling, layer=self.layer_idx,
                                   lse=lse, nvtx=nvtx)
            timing = timer.stop()
        cache = self.cache if cache is None else cache
        if across_layers:
            if not call.scored_layers:
                call.at_end(_select_layers, call.scored_layers)
            call.scored_layers.append(_Scored(self, cache, key, value, k_mod, plans, scores, scoring, timing))
            return
        self._install(cache, kept, key, value, k_mod, plans, scoring, [timing])

    def _install(self, cache, kept, key, value, k_mod, plans, scoring, timings) -> None:
        """Replace the layer's cache by the kept slots `kept` of a first prefill, and say so in its stats."""
        L, device = key.shape[-2], key.device
        slot_mod = _kept_modalities(k_mod, kept)
        # A call traced by torch.compile decodes by concatenation: what it prunes is stored padded (`_in_padded_layout`).
        padded = getattr(self.handle._call, "stores_padded", False)
        with cache_mod.padded_layout() if padded else _NO_CONTEXT:
            pruned = cache_mod.PrunedLayer(kept.keys, kept.values, kept.keep_valid, L, self.handle.liveness,
                                           _croppable(plans), slot_mod)
        cache.layers[self.layer_idx] = pruned
        if self.handle.config.head_allocation == "adaptive":  # read on the host already, by the allocation
            kept_per_head = kept.keep_valid.sum(-1).tolist()
        else:
            kept_per_head = [[p.budget] * key.shape[1] for p in plans]
        self.stats = LayerStats(
            self.layer_idx,
            pruned=True,
            reason=None,
            prompt_len=L,
            kept=kept.keys.shape[-2],
            kept_per_row=[p.budget for p in plans],
            kept_per_head=kept_per_head,
            kv_bytes_before=_nbytes(key) + _nbytes(value),
            kv_bytes_after=cache_mod.stored_bytes(pruned),  # packed: the live tokens only
            device=str(device),
            scoring=scoring,
            timing=timings,
        )

    def _prune_again(self, layer, query, key, value, scaling) -> None:
        """A later prompt chunk on a pruned layer (`CSPConfig.later_prefill`): scored by its own
        window over the whole stored cache, then the chunk ("chunk") or the whole cache ("total")
        selected again."""
        handle, config = self.handle, self.handle.config
        if not config.policy.prunes_stored:
            logger.debug("cspkv: layer %d: policy %s does not prune a later chunk", self.layer_idx, config.policy.name)
            return
        call = handle._call
        if call is None:
            call = CallContext(handle, None, None, handle._modality_override)
        B, Q = query.shape[0], query.shape[-2]
        chunk_mod, q_mod, plans = call.prepared(B, Q, query.device)
        if not any(p.pruned for p in plans):
            return
        before = cache_mod.stored_bytes(layer)
        key, value, _ = layer.stored_slots()  # packed: padded to the longest row and head, the chunk last in each
        S = key.shape[-2]
        keep_before = S - Q
        if config.later_prefill == "total":
            keep_before = 0
            totals = call.real_lengths(B, layer.logical_len)
            plans = [budget_mod.whole_cache_plan(config, p, total, S) for p, total in zip(plans, totals)]
        timer = Timer(key.device)
        slot_mod = layer.slot_modalities(chunk_mod)
        kept = prune_stored(config, query, key, value, slot_mod, q_mod, plans, scale=scaling, layer=self.layer_idx,
                            keep_before=keep_before)
        timing = timer.stop()
        layer.replace_slots(kept.keys, kept.values, kept.keep_valid, _kept_modalities(slot_mod, kept), _croppable(plans))
        self.stats = LayerStats(
            self.layer_idx, pruned=True, reason=None, prompt_len=Q, kept=kept.keys.shape[-2],
            kept_per_row=[p.budget for p in plans], kept_per_head=[[p.budget] * key.shape[1] for p in plans],
            kv_bytes_before=before,
            kv_bytes_after=cache_mod.stored_bytes(layer), device=str(key.device),
            scoring=f"later chunk ({config.later_prefill})", timing=timing,
        )

    def _compress_decoded(self, layer, query, key, value, scaling) -> None:
        """Decode-time compression (`CSPConfig.decode_budget`): remember the latest decoded
        tokens' queries; once the layer stores `decode_budget + decode_interval` slots, select
        `decode_budget` of them again with those queries as the window."""
        config = self.handle.config
        window = config.decode_window
        ring = layer.decode_queries
        ring = query if ring is None else torch.cat([ring[:, :, 1 - window:] if window > 1 else ring[:, :, :0], query], 2)
        layer.decode_queries = ring
        S = layer.stored_len
        if S < config.decode_budget + config.decode_interval or ring.shape[2] < window or not config.policy.prunes_stored:
            return
        key, value, _ = layer.stored_slots()  # packed: padded to the longest row and head, the decoded tokens last
        slot_mod = layer.slot_modalities()
        plans = [budget_mod.decode_plan(config, slot_mod[b, 0]) for b in range(key.shape[0])]
        q_mod = torch.zeros(key.shape[0], window, dtype=torch.int32, device=key.device)  # decoded tokens: text
        kept = prune_stored(config, ring, key, value, slot_mod, q_mod, plans, scale=scaling, layer=self.layer_idx)
        layer.replace_slots(kept.keys, kept.values, kept.keep_valid, _kept_modalities(slot_mod, kept), window)
        self.stats.decode_compressions = (self.stats.decode_compressions or 0) + 1


class _Scored(NamedTuple):
    """A layer scored at its prefill, waiting for the call's end to select (`_select_layers`)."""

    patch: LayerPatch
    cache: Any
    key: torch.Tensor
    value: torch.Tensor
    k_mod: torch.Tensor
    plans: list
    scores: Any  # cspkv.pruning.policies.Scores
    scoring: Optional[str]
    timing: Any


def _select_layers(scored: List[_Scored]) -> None:
    """``CSPConfig.layer_allocation="adaptive"``, at the end of the forward call: the per-layer
    budgets from every scored layer's scores (`allocation.layer_budgets`), then each layer's
    selection (spread over its heads by `head_allocation`) and compaction, in layer order."""
    if not scored:
        return
    config = scored[0].patch.handle.config
    budgets = allocation.layer_budgets([s.scores for s in scored], scored[0].k_mod, scored[0].plans,
                                       config.allocation_floor)
    for i, s in enumerate(scored):
        patch, device = s.patch, s.key.device
        nvtx = patch.handle.nvtx and device.type == "cuda"
        timer = Timer(device)
        plans = allocation.layer_plans(s.plans, budgets[i])
        head_budgets, cross_ratios = head_allocation(config, s.scores, s.k_mod, plans)
        kept = select_and_compact(s.scores, s.key, s.value, s.k_mod, plans, budgets=head_budgets,
                                  cross_ratios=cross_ratios, nvtx=nvtx)
        patch._install(s.cache, kept, s.key, s.value, s.k_mod, plans, s.scoring, [s.timing, timer.stop()])
    scored.clear()


def _in_padded_layout(step, *args) -> None:
    """Run a pruning step deferred from compiled code, storing what it keeps padded; so does what
    the call's end selects after it (`CSPConfig.layer_allocation`, `_install`)."""
    call = step.__self__.handle._call
    if call is not None:
        call.stores_padded = True
    with cache_mod.padded_layout():
        step(*args)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _croppable(plans) -> int:
    """Every row stores its last `recent` prompt positions as its last slots (a row too short to prune: all)."""
    return min((p.recent for p in plans if p.length > 0), default=0)


def _kept_modalities(slot_mod: torch.Tensor, kept) -> torch.Tensor:
    """int32 [B, Hkv, K]: the modality id of each kept slot (-1 dead); `slot_mod` [B, L] or [B, Hkv, L]."""
    if slot_mod.dim() == 2:
        slot_mod = slot_mod[:, None, :].expand(kept.keep_idx.shape[0], kept.keep_idx.shape[1], -1)
    return slot_mod.to(torch.int32).gather(2, kept.keep_idx).masked_fill_(~kept.keep_valid, -1)


def _has_streams(device: torch.device) -> bool:
    """Whether pruning on `device` can run on a side stream (CSPConfig.overlap_pruning)."""
    return device.type == "cuda"


def _cspkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "cspkv"; only patched modules name it."""
    patch = module.__dict__.get("_cspkv_layer")
    if patch is None:
        raise RuntimeError("cspkv: the cspkv attention function was called by a module that is not patched")
    return patch.attend(query, key, value, attention_mask, scaling, dropout, kwargs)



_registered = False


def register_attention() -> None:
    """Register the "cspkv" attention function with transformers (once)."""
    global _registered
    if not _registered:
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, _cspkv_attention)
        _registered = True
