"""Model-family adapters: where a family keeps its decoder attention, which
layers CSP must leave alone, and how prompt tokens map to modalities.

Adding a family is one small module in this package::

    from . import Adapter, register
    from ...pruning.modality import IMAGE

    @register
    class Llava(Adapter):
        name = "LLaVA"
        model_types = ("llava",)
        layer_paths = ("model.language_model.layers", "language_model.model.layers")

        def special_tokens(self, model):
            return {model.config.image_token_id: IMAGE}

and one import line at the bottom of this file. What an adapter answers:

* `layer_paths`: dotted paths, from the top model, to the decoder layers'
  ModuleList (the first that exists wins; covers layouts that moved between
  transformers versions). Each layer's `attention_attr` module must dispatch
  through transformers' ``ALL_ATTENTION_FUNCTIONS`` with ``self.config`` and
  carry ``layer_idx`` (the index of its cache layer).
* `skipped_layers(model)`: {layer index: reason} for layers that must not be
  pruned (default: sliding-window / chunked layers from the text config).
* `special_tokens(model)`: {token id: modality id} for the default modality
  ids (text is 0); override `modality_ids` for anything more involved.

A model whose `config.model_type` no adapter claims is patched by `Generic`
(with an "untested" warning) if it has the common layout, and rejected with
the list of supported families otherwise.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...pruning.modality import token_modality_ids

logger = logging.getLogger("cspkv")


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def text_config(model: nn.Module):
    """The decoder's config (the text config of a VLM, the config itself otherwise)."""
    config = model.config
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:  # older signatures
        return getter()


class Adapter:
    """How cspkv finds its way around one model family (see the module docstring)."""

    #: Family name shown in messages.
    name: str = ""
    #: `config.model_type` values of the top model handled by this adapter.
    model_types: Tuple[str, ...] = ()
    #: False for the generic fallback: patching warns that the family is untested.
    tested: bool = True
    #: Dotted paths from the top model to the decoder layers' ModuleList; the first found wins.
    layer_paths: Tuple[str, ...] = ("model.layers", "layers")
    #: Attribute of a decoder layer holding its attention module.
    attention_attr: str = "self_attn"

    def decoder_layers(self, model: nn.Module) -> Tuple[Optional[str], Optional[nn.ModuleList]]:
        """(path, ModuleList) of the decoder layers, or (None, None)."""
        for path in self.layer_paths:
            layers = _get_path(model, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return path, layers
        return None, None

    def decoder(self, model: nn.Module) -> Optional[nn.Module]:
        """The module that owns the decoder layers (the text model): cspkv hooks it too, for direct calls."""
        path, _ = self.decoder_layers(model)
        if path is None:
            return None
        return _get_path(model, path.rsplit(".", 1)[0]) if "." in path else model

    def attention_modules(self, model: nn.Module) -> List[Tuple[int, nn.Module]]:
        """[(layer_idx, attention module)] in layer order; layer_idx is the cache index."""
        _, layers = self.decoder_layers(model)
        found = []
        for position, layer in enumerate(layers or ()):
            attn = getattr(layer, self.attention_attr, None)
            if isinstance(attn, nn.Module):
                found.append((int(getattr(attn, "layer_idx", position)), attn))
        return found

    def skipped_layers(self, model: nn.Module) -> Dict[int, str]:
        """{layer index: reason} for layers CSP must not prune."""
        config = text_config(model)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return {
                i: f"{kind} layer (its window already bounds the cache)"
                for i, kind in enumerate(layer_types)
                if kind in ("sliding_attention", "chunked_attention")
            }
        window = getattr(config, "sliding_window", None)
        if window is not None:
            count = getattr(config, "num_hidden_layers", len(self.attention_modules(model)))
            reason = f"sliding-window attention (config.sliding_window={window}; set it to None for full attention)"
            return {i: reason for i in range(count)}
        return {}

    def special_tokens(self, model: nn.Module) -> Dict[int, int]:
        """{token id: modality id} of the family's non-text placeholder tokens (none for text models)."""
        return {}

    def modality_ids(self, model: nn.Module, input_ids: Optional[torch.Tensor], shape: Sequence[int], device) -> torch.Tensor:
        """Default modality ids [B, L] of a prompt (padding is handled by the caller)."""
        return token_modality_ids(input_ids, shape, self.special_tokens(model), device)


class Generic(Adapter):
    """Fallback for unknown families with the common decoder layout (warns: untested)."""

    name = "generic decoder layout"
    tested = False
    layer_paths = (
        "model.layers",
        "model.language_model.layers",
        "language_model.model.layers",
        "model.text_model.layers",
        "model.model.layers",
        "layers",
    )

    def matches(self, model: nn.Module) -> bool:
        """Decoder layers whose attention carries layer_idx and dispatches via ALL_ATTENTION_FUNCTIONS."""
        modules = self.attention_modules(model)
        if not modules:
            return False
        for _, attn in modules:
            source = sys.modules.get(type(attn).__module__)
            if not (
                hasattr(attn, "layer_idx")
                and hasattr(getattr(attn, "config", None), "_attn_implementation")
                and source is not None
                and hasattr(source, "ALL_ATTENTION_FUNCTIONS")
            ):
                return False
        return True


_ADAPTERS: List[Adapter] = []


def register(cls):
    """Class decorator: make an `Adapter` subclass known to `adapter_for`."""
    adapter = cls()
    if not adapter.name or not adapter.model_types:
        raise TypeError(f"cspkv.models.register: {cls.__name__} must set `name` and `model_types`")
    _ADAPTERS.append(adapter)
    return cls


def supported_families() -> List[str]:
    """Names of the tested families, each with its model_type values."""
    return [f"{a.name} ({', '.join(a.model_types)})" for a in _ADAPTERS]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`; raises before touching the model when there is none."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        raise TypeError(
            f"cspkv.patch: expected a transformers model (an nn.Module with a .config), got {type(model).__name__}"
        )
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            if not adapter.attention_modules(model):
                raise ValueError(
                    f"cspkv.patch: found no decoder attention modules in this {adapter.name} model "
                    f"({type(model).__name__}; looked at {', '.join(adapter.layer_paths)})"
                )
            return adapter
    generic = Generic()
    if generic.matches(model):
        message = (
            f"cspkv: model family {model_type!r} ({type(model).__name__}) is untested; it matches the generic "
            f"decoder layout, so it is patched anyway. Tested families: {'; '.join(supported_families())}"
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning(message)
        return generic
    if not generic.attention_modules(model):
        detail = "it has no decoder attention modules cspkv can find"
    else:
        detail = "its attention modules do not follow the generic layout (layer_idx, dispatch via ALL_ATTENTION_FUNCTIONS)"
    raise ValueError(
        f"cspkv.patch: unsupported model family {model_type!r} ({type(model).__name__}): {detail}. "
        f"Supported families: {'; '.join(supported_families())}"
    )


# Family modules register themselves on import; one line per family.
from . import llama  # noqa: E402,F401
from . import llava  # noqa: E402,F401
from . import qwen2_vl  # noqa: E402,F401
from . import gemma3  # noqa: E402,F401
from . import idefics3  # noqa: E402,F401
from . import gemma4  # noqa: E402,F401
