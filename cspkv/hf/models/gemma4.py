"""Gemma 4: the multimodal `gemma4` model and the text-only `gemma4_text`.

Quirks that matter to CSP:

* Most layers use sliding-window attention (`layer_types`; five of every six
  by default). Their cache is bounded by the window, so they are left alone
  and reported as skipped; only the global (`full_attention`) layers are
  pruned. Global layers may have their own head size and number of KV heads
  (`global_head_dim`, `num_global_key_value_heads`), which changes nothing for
  cspkv: each layer is pruned on its own tensors.
* KV sharing (`num_kv_shared_layers`, the small "E" models): the last layers
  have no cache of their own and attend over the keys and values of the last
  earlier layer of their kind (`config.kv_sharing_modes`: "reuse"), taken
  from that layer's cache with the model's own mask. Both sides are skipped:
  the consumers have nothing to prune, and pruning a producer ("store") would
  hand its consumers a cache shorter than their mask. Without shared layers
  the "store" mark (kept for assistant models that read the states) does not
  stop the layer from being pruned.
* The attention scale is 1.0 (queries and keys are RMS-normalised); the
  module passes it as `scaling`, and cspkv scores and decodes with what the
  module passes. No attention logit soft-capping (only the final logits are
  capped, which does not concern the cache).
* With `use_bidirectional_attention="vision"` the sliding layers let each
  image's tokens see each other at prefill; the global layers stay causal, so
  the pruned layers are plain causal attention. `"all"` (embedding models)
  makes every layer an encoder layer without a decoding cache: all skipped.
* Placeholders: `image_token_id` (modality 1), `video_token_id` (2) and
  `audio_token_id` (3), between begin/end markers that stay text.

Layouts: `model.language_model.layers` (Gemma4ForConditionalGeneration),
`language_model.layers` (bare Gemma4Model), `model.layers` (Gemma4ForCausalLM),
`layers` (bare Gemma4TextModel). Gemma 4 exists in transformers 5.x only. The
vision and audio towers are never patched.
"""

from . import Adapter, register, text_config
from ...pruning.modality import IMAGE, VIDEO

AUDIO = 3  # modality id of audio placeholders (after text 0, image 1, video 2)


@register
class Gemma4(Adapter):
    name = "Gemma 4"
    model_types = ("gemma4", "gemma4_text")
    layer_paths = ("model.language_model.layers", "language_model.layers", "model.layers", "layers")

    def skipped_layers(self, model):
        config = text_config(model)
        count = getattr(config, "num_hidden_layers", len(self.attention_modules(model)))
        if getattr(config, "use_bidirectional_attention", None) == "all":
            reason = 'bidirectional attention (use_bidirectional_attention="all": an encoder, no decoding cache)'
            return {i: reason for i in range(count)}
        skipped = super().skipped_layers(model)
        modes = getattr(config, "kv_sharing_modes", None) or ()
        shared = getattr(config, "num_kv_shared_layers", 0) or 0
        kinds = getattr(config, "layer_types", None) or ()
        for i, mode in enumerate(modes):
            if i in skipped:
                continue
            if mode == "reuse":
                skipped[i] = f"reuses the keys and values of an earlier layer (num_kv_shared_layers={shared}): no cache of its own"
            elif mode == "store" and shared and any(
                m == "reuse" and j < len(kinds) and i < len(kinds) and kinds[j] == kinds[i] for j, m in enumerate(modes)
            ):
                skipped[i] = (
                    f"its keys and values are shared with later layers (num_kv_shared_layers={shared}), "
                    "which attend over them with the model's mask"
                )
        return skipped

    def special_tokens(self, model):
        config = model.config
        tokens = {}
        for name, modality in (("image", IMAGE), ("video", VIDEO), ("audio", AUDIO)):
            token = getattr(config, f"{name}_token_id", None)
            if token is not None:
                tokens[token] = modality
        return tokens  # gemma4_text has none
