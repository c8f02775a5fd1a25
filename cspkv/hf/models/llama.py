"""Decoder-only text LLMs with the Llama layout.

Llama, Mistral, Qwen2, Qwen3 and Phi3 share it in transformers 4.57 and 5.x:
`model.layers[i].self_attn` applies RoPE (after QK-norm in Qwen3; on a fused
qkv projection in Phi3), updates the cache at `layer_idx`, then calls the
attention function named by `self.config._attn_implementation`. Sliding-window
layers (Mistral / Phi3 with `sliding_window` set, Qwen2/3 `layer_types`) are
skipped by the default `Adapter.skipped_layers`. Text only: every real token
has modality 0 unless the caller gives explicit ids.
"""

from . import Adapter, register


@register
class LlamaLayout(Adapter):
    name = "Llama/Mistral/Qwen2/Qwen3/Phi3"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "phi3")
    layer_paths = ("model.layers", "layers")  # *ForCausalLM, or the bare *Model
