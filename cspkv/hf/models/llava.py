"""LLaVA-style vision-language models: LLaVA 1.5 (`llava`), LLaVA-NeXT
(`llava_next`), LLaVA-OneVision (`llava_onevision`), InternVL (`internvl`)
and Mistral 3 (`mistral3`, Mistral Small 3.x with its Pixtral vision tower).

A vision tower and a projector turn each image into feature vectors that
replace the `config.image_token_id` placeholders of the prompt
(`image_token_index` in some configs; transformers maps the two names): one
placeholder per patch for LLaVA 1.5, base view + tiles + row newlines for
LLaVA-NeXT and LLaVA-OneVision, one per pixel-shuffled patch of each tile for
InternVL, one per merged patch for Mistral 3 (whose `[IMG_BREAK]` / `[IMG_END]`
row markers are text tokens, as are InternVL's `<img>` / `</img>`). Those
placeholders are the image modality (1). LLaVA-OneVision's video frames are
`config.video_token_id` placeholders (modality 2); InternVL writes a video as
frames of image placeholders, so its videos are modality 1.

The language model is any decoder with the Llama layout (Llama, Mistral,
Qwen2, Qwen3, ...); only its attention is patched, never the vision tower's.
Its sliding-window layers, if any, are skipped by the default rule.

Layouts: `model.language_model.layers` (4.52+ and 5.x, *ForConditionalGeneration),
`language_model.layers` (the bare *Model), `language_model.model.layers` (before 4.52).
"""

from . import Adapter, register
from ...pruning.modality import IMAGE, VIDEO


def _token(config, name: str):
    """`config.<name>_token_id`, or its older spelling `<name>_token_index`; None when neither is set."""
    token = getattr(config, f"{name}_token_id", None)
    return getattr(config, f"{name}_token_index", None) if token is None else token


@register
class Llava(Adapter):
    name = "LLaVA/LLaVA-NeXT/LLaVA-OneVision/InternVL/Mistral 3"
    model_types = ("llava", "llava_next", "llava_onevision", "internvl", "mistral3")
    layer_paths = ("model.language_model.layers", "language_model.layers", "language_model.model.layers")

    def special_tokens(self, model):
        config = model.config
        tokens = {_token(config, "image"): IMAGE}
        video = _token(config, "video")
        if video is not None:
            tokens[video] = VIDEO
        return tokens
