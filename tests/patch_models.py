"""Tiny random-init models and generate() helpers for the patching tests.

Every text family cspkv supports, built from its transformers config with a
few KB of weights: hidden 64, 4 query heads over 2 KV heads (GQA), vocab 512.
`initializer_range` is raised so that logits and attention are peaked enough
for greedy decoding not to hinge on float noise. `eos_token_id` is None so
generate() always produces exactly `max_new_tokens`.

transformers 5.x renamed the cache argument (`past_key_values` -> `cache`);
`CACHE_KW` and `returned_cache` hide the difference.
"""

from __future__ import annotations

import copy
import inspect
from typing import List, Sequence, Tuple

import torch
import transformers
from transformers import LlamaModel

from cspkv.hf.cache import returned_cache  # noqa: F401  (the tests import it from here with the other helpers)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
PAD = 0

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}

CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
TF5 = int(transformers.__version__.split(".")[0]) >= 5


def tiny_text_kwargs(**overrides) -> dict:
    """Config fields of the tiny text decoder (text families and the VLMs' language models)."""
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_config(family: str, *, attn: str = "sdpa", layers: int = 2, **overrides):
    config_name, _, extra = _CLASSES[family]
    kwargs = tiny_text_kwargs(**{"num_hidden_layers": layers, **extra, **overrides})
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = attn
    return config


def tiny_model(family: str = "llama", *, attn: str = "sdpa", layers: int = 2, seed: int = 0, **overrides):
    """A random-init *ForCausalLM of `family` in eval mode (same weights for the same seed)."""
    _, model_name, _ = _CLASSES[family]
    config = tiny_config(family, attn=attn, layers=layers, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def twin(model):
    """A never-patched deep copy (same weights)."""
    return copy.deepcopy(model)


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Random token ids [batch, length] avoiding pad/bos/eos."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (batch, length), generator=g)


def left_pad(prompts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts with left padding: (input_ids, attention_mask) [B, max L]."""
    L = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - p.numel():] = p
        mask[b, L - p.numel():] = 1
    return ids, mask


def generate(model, input_ids, attention_mask=None, *, new: int = 12, **kwargs):
    """Greedy by default; returns the GenerateDecoderOnlyOutput (sequences, logits, cache)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )


def cache_layer_lengths(cache) -> List[int]:
    """Stored tokens per cache layer (a packed pruned layer: of its longest row and KV head)."""
    return [layer.stored_len if getattr(layer, "packed", None) is not None else layer.keys.shape[-2] for layer in cache.layers]


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
