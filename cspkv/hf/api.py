"""The public patching API: `patch`, `unpatch`, `patched`, `modalities`, `stats`, and the
`PatchHandle` of a patched model.

`patch` installs a `layer.LayerPatch` on every prunable decoder attention module
and forward hooks on the top model (and on the text model, for direct calls)
that open a `call.CallContext` per top-level call, with the call's input_ids /
attention_mask, and check the cache type before any work. `PatchHandle.remove()`
(or `unpatch`) restores the original config objects, forwards and hooks, so
the model computes exactly what it did before. Works the same on transformers
4.57 and 5.x.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..ops.profiling import nvtx_enabled
from ..pruning.config import CSPConfig, resolve
from ..pruning.modality import fit_to_prompt, validate_ids
from . import cache as cache_mod
from . import models
from .call import CallContext
from .layer import CACHE_NAMES, LayerPatch, register_attention
from .stats import summarize

logger = logging.getLogger("cspkv")


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
        self.layers: Dict[int, LayerPatch] = {}
        self.skipped: Dict[int, str] = {}
        self.liveness = cache_mod.Liveness()
        self.nvtx = nvtx_enabled()
        self.owners: List[nn.Module] = []  # the modules whose forward opens a call: the top model first
        self._hooks: list = []
        self._local = threading.local()  # the current thread's call and explicit modality ids
        self._side_streams: Dict[torch.device, "torch.cuda.Stream"] = {}  # CSPConfig.overlap_pruning
        # torch.compile: the module whose call is open and the pruning deferred to its end (LayerPatch._later);
        # plain attributes, as dynamo cannot trace a threading.local
        self.compiled_owner: Optional[nn.Module] = None
        self.deferred: list = []
        self.removed = False

    @property
    def _call(self) -> Optional[CallContext]:
        """The current thread's call in flight, if any."""
        return getattr(self._local, "call", None)

    @_call.setter
    def _call(self, call: Optional[CallContext]) -> None:
        self._local.call = call

    @property
    def _modality_override(self) -> Optional[torch.Tensor]:
        """The ids given by `cspkv.modalities` in the current thread, if any."""
        return getattr(self._local, "override", None)

    @_modality_override.setter
    def _modality_override(self, ids: Optional[torch.Tensor]) -> None:
        self._local.override = ids

    # -- hooks on the top model / text model
    def _rank(self, module: nn.Module) -> int:
        return next(i for i, owner in enumerate(self.owners) if owner is module)

    def _pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            # Traced by torch.compile: the call opens outside the graph (a graph break at the top
            # model's call, before its forward); the text model's hooks inside it then have nothing to do.
            return None if self.compiled_owner is not None else _open_call_eagerly(self, module, args, kwargs)
        return self._open_call(module, args, kwargs)

    def _open_call(self, module, args, kwargs):
        call = self._call
        # The text model inside the top model's call joins that call. Any other entry opens a new
        # call: a module is never called inside itself, so an open call of the same (or an inner)
        # module is left over from an interrupted forward (KeyboardInterrupt skips the post-hook).
        if call is not None and call.owner is not None and self._rank(module) > self._rank(call.owner):
            return None
        bound = _bind(module, args, kwargs)
        cache = next((bound[n] for n in CACHE_NAMES if bound.get(n) is not None), None)
        cache_mod.check_cache(cache)
        input_ids, attention_mask = bound.get("input_ids"), bound.get("attention_mask")
        override = self._modality_override
        prefill = cache is None or cache.get_seq_length() == 0
        if override is not None and prefill:
            prompt = input_ids if isinstance(input_ids, torch.Tensor) else bound.get("inputs_embeds")
            if isinstance(prompt, torch.Tensor):
                fit_to_prompt(override, prompt.shape[0], prompt.shape[1])
        self._call = call = CallContext(self, input_ids, attention_mask, override, owner=module)
        self.liveness.chunk_live = call.chunk_live
        self.liveness.compiled_mask = call.attention_mask
        self.compiled_owner = module
        self.deferred.clear()  # left over from an interrupted compiled call
        if prefill:  # the first pruned layer will need them
            call.start_host_copies()
        return None

    def _post_hook(self, module, args, kwargs, output):
        if torch.compiler.is_compiling():
            return _close_call_eagerly(self, module, args, kwargs, output) if self.compiled_owner is module else None
        return self._close_call(module, args, kwargs, output)

    def _close_call(self, module, args, kwargs, output):
        call = self._call
        if call is not None and call.owner is module:
            try:
                deferred, self.deferred = self.deferred, []
                for step, step_args in deferred:  # the pruning of compiled code (LayerPatch._later)
                    step(*step_args)
                while call.deferred:  # what waits for every layer (CallContext.at_end), queued by the steps too
                    deferred, call.deferred = call.deferred, []
                    for step, step_args in deferred:
                        step(*step_args)
            finally:
                call.join()
                self._call = self.liveness.chunk_live = self.liveness.compiled_mask = self.compiled_owner = None
        return None

    # -- copies
    def __deepcopy__(self, memo) -> "PatchHandle":
        """A copy of a patched model (``copy.deepcopy(model)``) is patched on its own: its layers,
        hooks and caches belong to the copy's handle, with no call in flight."""
        clone = object.__new__(PatchHandle)
        memo[id(self)] = clone
        memo[id(self.liveness)] = cache_mod.Liveness()  # the copy's caches answer to the copy
        clone.liveness = memo[id(self.liveness)]
        clone.liveness.active = self.liveness.active
        clone._local = threading.local()
        clone._side_streams = {}
        clone.compiled_owner, clone.deferred = None, []
        for name, value in self.__dict__.items():
            if name not in ("liveness", "_local", "_side_streams", "compiled_owner", "deferred"):
                setattr(clone, name, copy.deepcopy(value, memo))
        return clone

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"cspkv: a patched {type(self.model).__name__} cannot be pickled (torch.save of the module included): its "
            "attention modules run cspkv's patch. Call cspkv.unpatch(model) first and patch again after loading, "
            "or save model.state_dict(), which patching does not change"
        )

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
        self._call = self.liveness.chunk_live = self.liveness.compiled_mask = self.compiled_owner = None
        self.deferred = []
        self.removed = True
        if getattr(self.model, "_cspkv_handle", None) is self:
            del self.model._cspkv_handle
        logger.info("cspkv: unpatched %s", type(self.model).__name__)

    def stats(self) -> dict:
        """Per-layer pruning statistics of the last prefill and their totals.

        Returns {"layers": {idx: {...}}, "skipped": {idx: reason}, "pruned_layers",
        "kv_bytes_before", "kv_bytes_after", "prune_ms"}. A pruned layer's entry has
        prompt_len, kept (stored slots), kept_per_row, kept_per_head (per row, each KV
        head's kept tokens: they differ under ``head_allocation="adaptive"``), kv_bytes_before/after,
        prune_ms (wall time on a CPU; on a GPU the time between CUDA events around
        the layer's pruning, which with `overlap_pruning` runs on a side stream
        alongside the later layers: their sum is then more than what pruning
        adds to the prefill), device and, for the window-scoring policies (csp, snapkv),
        scoring: "one pass (...)" when the prefill attention's log-sum-exp was
        used, else "two passes: <why not>" (see `cspkv.hf.prefill_lse`); an
        unpruned one has the reason.
        """
        return summarize({idx: patch.stats.as_dict() for idx, patch in sorted(self.layers.items())}, self.skipped)

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.layers)} layers"
        return f"PatchHandle({type(self.model).__name__}, {state}, {self.config})"


# What a hook traced by torch.compile runs outside the graph (PatchHandle._pre_hook / _post_hook).
_open_call_eagerly = torch.compiler.disable(PatchHandle._open_call)
_close_call_eagerly = torch.compiler.disable(PatchHandle._close_call)


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

    register_attention()
    handle = PatchHandle(model, config, adapter)
    for idx, module in modules:
        if config.layers is not None and idx not in config.layers:
            handle.skipped[idx] = "not in CSPConfig.layers"
            continue
        if idx in skipped:
            handle.skipped[idx] = skipped[idx]
            continue
        handle.layers[idx] = LayerPatch(handle, idx, module)
    for patch_ in handle.layers.values():
        patch_.install()

    handle.owners = [model]
    decoder = adapter.decoder(model)
    if decoder is not None and decoder is not model:
        handle.owners.append(decoder)
    for owner in handle.owners:
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
    the call does any work), or that of the prompt before generate() expands
    its rows for beam search or ``num_return_sequences`` (each row is then
    repeated as generate() repeats the prompt's); padding (attention_mask == 0)
    is -1 regardless. Generated tokens need no ids: scoring happens at prefill
    only. The ids hold for the current thread: other threads calling the same
    model are not affected.
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
