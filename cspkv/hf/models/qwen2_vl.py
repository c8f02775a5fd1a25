"""Qwen2-VL (`qwen2_vl`) and Qwen2.5-VL (`qwen2_5_vl`).

Images and videos are placeholder runs of `config.image_token_id` (modality
1) and `config.video_token_id` (modality 2), each wrapped in
`vision_start_token_id` / `vision_end_token_id` markers, which stay text: they
are ordinary embedded tokens.

Positions are 3-D (temporal, height, width; "mrope"): the prompt's position
ids come from `get_rope_index`, and later tokens get `cache length +
rope_deltas`. transformers reads that cache length from `get_seq_length()`,
which a pruned layer reports as the logical length, so decoding continues at
the positions the unpruned model would use. RoPE is applied to the keys before
they are cached, so a kept key keeps its 3-D position.

Layouts: `model.language_model.layers` (4.52+ and 5.x), `language_model.layers`
(the bare Qwen2VLModel), `model.layers` (before 4.52, when `model` was the text
model). The vision tower (`visual.blocks`) is never patched.
"""

from . import Adapter, register
from ...pruning.modality import IMAGE, VIDEO


@register
class Qwen2VL(Adapter):
    name = "Qwen2-VL/Qwen2.5-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    layer_paths = ("model.language_model.layers", "language_model.layers", "model.layers")

    def special_tokens(self, model):
        config = model.config
        return {config.image_token_id: IMAGE, config.video_token_id: VIDEO}
