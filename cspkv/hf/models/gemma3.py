"""Gemma 3: the vision-language `gemma3` model and the text-only `gemma3_text`.

Quirks that matter to CSP:

* Most layers use sliding-window attention (five of every six in the released
  models). Their cache is already bounded by the window, so they are left
  alone and reported as skipped; only the global (`full_attention`) layers are
  pruned. The layer kinds come from the text config's `layer_types`, or, in
  configs that predate it, from `sliding_window_pattern` (every n-th layer is
  global).
* The attention scale is `query_pre_attn_scalar ** -0.5`, not
  `head_dim ** -0.5`; the module passes it as `scaling`, and cspkv scores and
  decodes with what the module passes. `attn_logit_softcapping` is not applied
  by Gemma 3's attention in transformers, so neither does cspkv.
* Image placeholders are `config.image_token_id` (`image_token_index`),
  `mm_tokens_per_image` per image between begin/end-of-image markers that stay
  text. At prefill the model lets each image's tokens attend to each other
  bidirectionally (from `token_type_ids`); CSP's window scores stay causal,
  which only changes how image queries in the window are counted.
* `use_bidirectional_attention` (embedding models) makes every layer an
  encoder layer with no KV cache worth pruning: all layers are skipped.

Layouts: `model.language_model.layers` (4.52+ and 5.x), `language_model.layers`
(bare Gemma3Model), `language_model.model.layers` (before 4.52), `model.layers`
(Gemma3ForCausalLM), `layers` (bare Gemma3TextModel).
"""

from . import Adapter, register, text_config
from ...pruning.modality import IMAGE


@register
class Gemma3(Adapter):
    name = "Gemma 3"
    model_types = ("gemma3", "gemma3_text")
    layer_paths = (
        "model.language_model.layers",
        "language_model.layers",
        "language_model.model.layers",
        "model.layers",
        "layers",
    )

    def skipped_layers(self, model):
        config = text_config(model)
        count = getattr(config, "num_hidden_layers", len(self.attention_modules(model)))
        if getattr(config, "use_bidirectional_attention", False):
            reason = "bidirectional attention (config.use_bidirectional_attention: an encoder, no decoding cache)"
            return {i: reason for i in range(count)}
        if getattr(config, "layer_types", None):
            return super().skipped_layers(model)
        pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None)
        if pattern:
            reason = f"sliding_attention layer (config.sliding_window_pattern={pattern}; its window already bounds the cache)"
            return {i: reason for i in range(count) if (i + 1) % pattern}
        return super().skipped_layers(model)

    def special_tokens(self, model):
        config = model.config
        token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        return {} if token is None else {token: IMAGE}  # gemma3_text has no image token
