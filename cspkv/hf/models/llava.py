"""LLaVA 1.5-style (`llava`) and LLaVA-NeXT (`llava_next`) vision-language models.

A CLIP-like vision tower and a projector turn each image into feature
vectors that replace the `config.image_token_id` placeholders of the prompt
(`image_token_index` in the config; transformers maps the two names): one
placeholder per patch for LLaVA 1.5, base view + tiles + row newlines for
LLaVA-NeXT. Those positions are the image modality; everything else is text.
The language model is any decoder with the Llama layout; only its attention
is patched, never the vision tower's.

Layouts: `model.language_model.layers` (4.52+ and 5.x, *ForConditionalGeneration),
`language_model.layers` (the bare LlavaModel), `language_model.model.layers` (before 4.52).
"""

from . import Adapter, register
from ...pruning.modality import IMAGE


@register
class Llava(Adapter):
    name = "LLaVA/LLaVA-NeXT"
    model_types = ("llava", "llava_next")
    layer_paths = ("model.language_model.layers", "language_model.layers", "language_model.model.layers")

    def special_tokens(self, model):
        config = model.config
        token = getattr(config, "image_token_id", None)  # an alias of image_token_index via attribute_map
        return {config.image_token_index if token is None else token: IMAGE}
