"""Idefics3 (`idefics3`) and SmolVLM (`smolvlm`), which shares its architecture.

Each image (and each tile of a split image) becomes `image_seq_len`
placeholders of `config.image_token_id` (modality 1), after pixel shuffling
by `scale_factor`. The `<fake_token_around_image>`, `<row_x_col_y>` and
`<global-img>` markers around them are ordinary text tokens. The text model
is a Llama-layout decoder at `model.text_model.layers` in 4.57 and 5.x alike
(`text_model.layers` in the bare Idefics3Model); the SigLIP-like vision
encoder is never patched.
"""

from . import Adapter, register
from ...pruning.modality import IMAGE


@register
class Idefics3(Adapter):
    name = "Idefics3/SmolVLM"
    model_types = ("idefics3", "smolvlm")
    layer_paths = ("model.text_model.layers", "text_model.layers")

    def special_tokens(self, model):
        return {model.config.image_token_id: IMAGE}
