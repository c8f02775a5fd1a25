"""Compress once, ask many times: a context prefilled and pruned once, continued by several
independent `generate()` calls.

The context (documents, images, a video) is prefilled and pruned without the
question, so scoring is query-agnostic: the observation window is the
context's own last `CSPConfig.window` tokens. A window that covers the end of
the context's instructions or last passage ranks what the context itself
points at; a question that asks about something the window never looked at
finds less of it than when the question is in the prompt (see
docs/performance.md for the measured cost).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Optional

import torch
from torch import nn

from .api import _handle_of, modalities
from .cache import returned_cache


class CompressedContext:
    """A pruned context, shared read-only by the questions that continue it.

    Attributes
    ----------
    input_ids : [B, L] the context's tokens; attention_mask [B, L] or None.
    length : L, the context's logical length (what the next token's position counts from).
    stats : `PatchHandle.stats()` of the compressing prefill.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cache, stats):
        self.model = model
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.stats = stats
        self._cache = cache

    @property
    def length(self) -> int:
        return self._cache.get_seq_length()

    def cache(self):
        """A copy of the compressed cache for one continuation (the kept tokens only, so cheap);
        the shared one is never handed out, so no question sees another's tokens."""
        return copy.deepcopy(self._cache)

    def inputs(self, question_ids: torch.Tensor, question_mask: Optional[torch.Tensor] = None) -> dict:
        """``input_ids`` and ``attention_mask`` of context + question, for ``generate(**inputs, cache=...)``
        (``past_key_values=`` on transformers 4.57); `question_ids` [B, T], `question_mask` [B, T]
        (default: all real)."""
        if not isinstance(question_ids, torch.Tensor) or question_ids.dim() != 2 or question_ids.shape[0] != self.input_ids.shape[0]:
            shape = list(question_ids.shape) if isinstance(question_ids, torch.Tensor) else type(question_ids).__name__
            raise ValueError(f"cspkv.CompressedContext.inputs: question_ids must be a tensor [B, T] with the context's "
                             f"B = {self.input_ids.shape[0]}, got {shape}")
        question_ids = question_ids.to(self.input_ids.device)
        ids = torch.cat([self.input_ids, question_ids], dim=1)
        context_mask = self.attention_mask if self.attention_mask is not None else torch.ones_like(self.input_ids)
        if question_mask is None:
            question_mask = torch.ones_like(question_ids)
        return {"input_ids": ids, "attention_mask": torch.cat([context_mask, question_mask.to(context_mask)], dim=1)}


def compress(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             modality_ids: Optional[torch.Tensor] = None, **model_inputs) -> CompressedContext:
    """Prefill and prune a context once on a patched model; ask it questions with `CompressedContext`.

    Parameters
    ----------
    model : a model patched with `cspkv.patch`.
    input_ids : [B, L] the context (left-padded with `attention_mask` [B, L] for a batch).
    modality_ids : optional explicit ids [B, L], as with `cspkv.modalities`.
    **model_inputs : what else the model's forward needs for the context (pixel_values, ...).

    Example
    -------
    >>> context = cspkv.compress(model, doc_ids)                                # doctest: +SKIP
    >>> for q in questions:                                                     # doctest: +SKIP
    ...     out = model.generate(**context.inputs(q), past_key_values=context.cache(), max_new_tokens=32)
    """
    _handle_of(model, "compress")
    given = modalities(model, modality_ids) if modality_ids is not None else contextlib.nullcontext()
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        model_inputs.setdefault("logits_to_keep", 1)  # the context's logits are not needed
    with given, torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **model_inputs)
    handle = _handle_of(model, "compress")
    return CompressedContext(model, input_ids, attention_mask, returned_cache(output), handle.stats())
