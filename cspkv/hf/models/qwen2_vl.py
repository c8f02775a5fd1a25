"""Qwen2-VL (`qwen2_vl`), Qwen2.5-VL (`qwen2_5_vl`) and Qwen3-VL, dense
(`qwen3_vl`) and mixture-of-experts (`qwen3_vl_moe`).

Images and videos are placeholder runs of `config.image_token_id` (modality
1) and `config.video_token_id` (modality 2), each wrapped in
`vision_start_token_id` / `vision_end_token_id` markers, which stay text: they
are ordinary embedded tokens (so are Qwen3-VL's per-frame timestamps,
``<t seconds>``, between the frames of a video).

Positions are 3-D (temporal, height, width; "mrope"; Qwen3-VL interleaves the
three axes over the rotary frequencies): the prompt's position ids come from
`get_rope_index`, and later tokens get `cache length + rope_deltas`.
transformers reads that cache length from `get_seq_length()`, which a pruned
layer reports as the logical length, so decoding continues at the positions
the unpruned model would use. RoPE is applied to the keys before they are
cached, so a kept key keeps its 3-D position.

Qwen3-VL adds "deepstack" vision features to the hidden states of the first
decoder layers at the vision positions during the prefill; that changes what
those layers cache, not how, and the MoE variant differs in its MLPs only:
the attention modules (QK-norm, as in Qwen3) are the same in all four.

Layouts: `model.language_model.layers` (4.52+ and 5.x; Qwen3-VL has only this
one), `language_model.layers` (the bare *VLModel), `model.layers` (before
4.52, when `model` was the text model). The vision tower (`visual.blocks`) is
never patched.
"""

from . import Adapter, register
from ...pruning.modality import IMAGE, VIDEO


@register
class Qwen2VL(Adapter):
    name = "Qwen2-VL/Qwen2.5-VL/Qwen3-VL"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    layer_paths = ("model.language_model.layers", "language_model.layers", "model.layers")

    def special_tokens(self, model):
        config = model.config
        return {config.image_token_id: IMAGE, config.video_token_id: VIDEO}
