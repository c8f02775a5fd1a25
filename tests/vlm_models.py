"""Tiny random-init vision-language models and hand-built image prompts.

One builder per family, all from transformers configs (no hub): a 2-layer
text decoder (hidden 64, 4 query heads over 2 KV heads, vocab 512) and a
1-layer vision tower (hidden 32) on 32x32 images. Each `Family` knows how
many placeholder tokens one image expands to and builds the processor-free
inputs: input_ids with the placeholders (image token id 500, video 501,
marker tokens 502-504) plus pixel_values and whatever else the family's
forward needs (image_grid_thw, image_sizes, ...).

`prompt_inputs(family, images=2)` gives text, image, text, image, text with
about 70 tokens; `images=0` a text-only prompt of the same length.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Dict, List, Optional

import torch
import transformers

from patch_models import PAD, tiny_text_kwargs

IMAGE_TOKEN, VIDEO_TOKEN = 500, 501
START_TOKEN, END_TOKEN, ROW_TOKEN = 502, 503, 504  # vision start/end (Qwen2-VL), boi/eoi (Gemma3), fake token (Idefics3)
TEXT_HIGH = 400  # text tokens are drawn from [3, TEXT_HIGH)


def _vision(**overrides) -> dict:
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------- configs


def _llava_config():
    return transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**tiny_text_kwargs()),
        vision_config=transformers.CLIPVisionConfig(**_vision(projection_dim=32)),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        image_seq_length=16,
    )


def _llava_next_config():
    return transformers.LlavaNextConfig(
        text_config=transformers.LlamaConfig(**tiny_text_kwargs()),
        vision_config=transformers.CLIPVisionConfig(**_vision(image_size=16, projection_dim=32)),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32]],
        image_seq_length=4,
    )


def _mrope_text(**overrides) -> dict:
    # head_dim 16: the three mrope sections (temporal, height, width) cover its 8 rotary frequencies.
    return tiny_text_kwargs(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=10000.0, **overrides)


def _qwen2_vl_config():
    return transformers.Qwen2VLConfig(
        text_config=_mrope_text(),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=START_TOKEN,
        vision_end_token_id=END_TOKEN,
    )


def _qwen2_5_vl_config():
    return transformers.Qwen2_5_VLConfig(
        text_config=_mrope_text(),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=START_TOKEN,
        vision_end_token_id=END_TOKEN,
    )


def _gemma3_text(**overrides):
    # Layer 0 slides, layer 1 is global: cspkv must prune layer 1 only.
    # query_pre_attn_scalar 24 makes the attention scale differ from head_dim ** -0.5.
    kwargs = tiny_text_kwargs(
        head_dim=16, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"],
        sliding_window=256, hidden_activation="gelu_pytorch_tanh",
    )
    kwargs.update(overrides)
    return transformers.Gemma3TextConfig(**kwargs)


def _gemma3_config():
    return transformers.Gemma3Config(
        text_config=_gemma3_text(),
        vision_config=transformers.SiglipVisionConfig(**_vision()),
        mm_tokens_per_image=16,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=START_TOKEN,
        eoi_token_index=END_TOKEN,
        tie_word_embeddings=False,  # 5.x ties by default at the top level
    )


def _idefics3_config(config_cls=transformers.Idefics3Config, vision_cls=transformers.Idefics3VisionConfig):
    # 64x64 images of 8x8 patches, pixel-shuffled by 2: 16 tokens per image.
    return config_cls(
        text_config=transformers.LlamaConfig(**tiny_text_kwargs()),
        vision_config=vision_cls(**_vision(image_size=64)),
        image_token_id=IMAGE_TOKEN,
        scale_factor=2,
    )


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_cls: str
    config: Callable
    tokens_per_image: int
    pixels: Callable  # (n_images, generator) -> dict of vision inputs
    before: tuple = ()  # marker tokens around each image placeholder run
    after: tuple = ()
    skipped: tuple = ()  # layers cspkv must leave alone
    type_ids: Optional[str] = None  # name of the per-token modality input the processor would add


# transformers 5.x computes Qwen2-VL's 3-D positions from `mm_token_type_ids` (without them generate()
# silently falls back to 1-D positions); 4.57 finds the placeholders in input_ids itself.
_QWEN_TYPE_IDS = "mm_token_type_ids" if "mm_token_type_ids" in inspect.signature(
    transformers.Qwen2VLModel.get_rope_index).parameters else None


def _llava_pixels(n, g):
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


def _llava_next_pixels(n, g):
    # One 32x32 image: a 16x16 base view plus 2x2 tiles (pinpoint [32, 32]).
    return {"pixel_values": torch.randn(n, 5, 3, 16, 16, generator=g), "image_sizes": torch.tensor([[32, 32]] * n)}


def _qwen_pixels(n, g):
    # grid (t, h, w) = (1, 8, 8) patches of 3 x 2 x 4 x 4 values; merged 2x2 -> 16 tokens.
    return {"pixel_values": torch.randn(n * 64, 3 * 2 * 4 * 4, generator=g), "image_grid_thw": torch.tensor([[1, 8, 8]] * n)}


def _gemma3_pixels(n, g):
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


def _idefics3_pixels(n, g):
    return {"pixel_values": torch.randn(1, n, 3, 64, 64, generator=g)}


FAMILIES: Dict[str, Family] = {
    f.name: f
    for f in (
        Family("llava", "LlavaForConditionalGeneration", _llava_config, 16, _llava_pixels),
        Family("llava_next", "LlavaNextForConditionalGeneration", _llava_next_config, 24, _llava_next_pixels),
        Family("qwen2_vl", "Qwen2VLForConditionalGeneration", _qwen2_vl_config, 16, _qwen_pixels, (START_TOKEN,), (END_TOKEN,),
               type_ids=_QWEN_TYPE_IDS),
        Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl_config, 16, _qwen_pixels, (START_TOKEN,), (END_TOKEN,),
               type_ids=_QWEN_TYPE_IDS),
        # token_type_ids: each image's tokens attend to each other bidirectionally at prefill.
        Family("gemma3", "Gemma3ForConditionalGeneration", _gemma3_config, 16, _gemma3_pixels, (START_TOKEN,), (END_TOKEN,), (0,),
               type_ids="token_type_ids"),
        Family("idefics3", "Idefics3ForConditionalGeneration", _idefics3_config, 16, _idefics3_pixels, (ROW_TOKEN,), (ROW_TOKEN,)),
        Family(
            "smolvlm", "SmolVLMForConditionalGeneration",
            lambda: _idefics3_config(transformers.SmolVLMConfig, transformers.SmolVLMVisionConfig),
            16, _idefics3_pixels, (ROW_TOKEN,), (ROW_TOKEN,),
        ),
    )
}


def family_of(name: str) -> Family:
    """The `Family` named `name`, from FAMILIES or RECENT_FAMILIES (appended below)."""
    return FAMILIES[name] if name in FAMILIES else RECENT_FAMILIES[name]


def tiny_vlm(name: str, *, attn: str = "sdpa", seed: int = 0):
    """A random-init *ForConditionalGeneration of family `name` in eval mode (same weights per seed)."""
    family = family_of(name)
    config = family.config()
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_cls)(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def prompt_ids(name: str, images: int = 2, seed: int = 0, text: int = 24) -> List[int]:
    """Token ids: `text`-token chunks around `images` placeholder runs (text only when images=0)."""
    family = family_of(name)
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, TEXT_HIGH, (text,), generator=g).tolist() for _ in range(images + 1)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += list(family.before) + [IMAGE_TOKEN] * family.tokens_per_image + list(family.after) + chunk
    return ids


def prompt_inputs(name: str, images: int = 2, seed: int = 0, text: int = 24) -> dict:
    """Model inputs (batch 1): input_ids, attention_mask and the family's vision inputs."""
    ids = torch.tensor([prompt_ids(name, images, seed, text)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        family = family_of(name)
        inputs.update(family.pixels(images, torch.Generator().manual_seed(seed + 1)))
        if family.type_ids:
            inputs[family.type_ids] = type_ids(ids)
    return inputs


def type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """What processors return as (mm_)token_type_ids: 0 text, 1 image, 2 video."""
    return (input_ids == IMAGE_TOKEN).long() + 2 * (input_ids == VIDEO_TOKEN).long()


def prompt_length(name: str, images: int = 2, text: int = 24) -> int:
    family = family_of(name)
    return text * (images + 1) + images * (family.tokens_per_image + len(family.before) + len(family.after))


# ----------------------------------------------------------------------------- recent families
# Qwen3-VL (dense and MoE), Gemma 4, LLaVA-OneVision, InternVL and Mistral 3, with the same tiny
# sizes. A family whose classes the installed transformers lacks (Gemma 4 before 5.x) is listed
# with `available(name) == False`; its builders are only called when it is available.


def _qwen3_vl_text(**overrides) -> dict:
    # head_dim 16: 8 rotary frequencies, interleaved over the three mrope axes (temporal, height, width).
    return tiny_text_kwargs(
        head_dim=16, rope_theta=10000.0,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}, **overrides,
    )


def _qwen3_vl_vision() -> dict:
    # 8x8 patches of 3 x 2 x 4 x 4 values, merged 2x2: 16 tokens per image; an 8x8 grid of learned
    # position embeddings; deepstack features from the one vision block go to decoder layer 0.
    return dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0],
    )


def _qwen3_vl_config():
    return transformers.Qwen3VLConfig(
        text_config=_qwen3_vl_text(), vision_config=_qwen3_vl_vision(),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=START_TOKEN, vision_end_token_id=END_TOKEN,
    )


def _qwen3_vl_moe_config():
    text = _qwen3_vl_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return transformers.Qwen3VLMoeConfig(
        text_config=text, vision_config=_qwen3_vl_vision(),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=START_TOKEN, vision_end_token_id=END_TOKEN,
    )


AUDIO_TOKEN = 505  # Gemma 4's audio placeholder (no audio tower is built)


def _gemma4_text(**overrides):
    # Layer 0 slides, layer 1 is global (skipped / pruned). Per-layer embeddings (PLE) of width 8.
    kwargs = tiny_text_kwargs(
        head_dim=16, global_head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=256,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=512, hidden_activation="gelu_pytorch_tanh",
    )
    kwargs.update(overrides)
    return transformers.Gemma4TextConfig(**kwargs)


def _gemma4_config():
    # Vision: 8x8 patches of 4x4 pixels, average-pooled 2x2 into 16 soft tokens per image. Each image's
    # tokens see each other in the sliding layers at prefill (use_bidirectional_attention="vision").
    vision = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=16,
    )
    return transformers.Gemma4Config(
        text_config=_gemma4_text(use_bidirectional_attention="vision"), vision_config=vision, audio_config=None,
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=AUDIO_TOKEN,
        boi_token_id=START_TOKEN, eoi_token_id=END_TOKEN, boa_token_id=506, eoa_token_index=507,
        tie_word_embeddings=False,
    )


def _llava_onevision_config():
    # SigLIP on 16x16 views of 8x8 patches; anyres with one 32x32 pinpoint: a base view plus 2x2 tiles.
    return transformers.LlavaOnevisionConfig(
        text_config=transformers.Qwen2Config(**tiny_text_kwargs()),
        vision_config=transformers.SiglipVisionConfig(**_vision(image_size=16)),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[32, 32]],
        vision_aspect_ratio="anyres_max_9",
    )


def _internvl_config():
    # 32x32 tiles of 4x4 patches, pixel-shuffled by 0.5: 16 tokens per tile.
    return transformers.InternVLConfig(
        text_config=transformers.Qwen2Config(**tiny_text_kwargs()),
        vision_config=transformers.InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=[32, 32], patch_size=[4, 4],
        ),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
        downsample_ratio=0.5,
    )


def _mistral3_config():
    # Pixtral on 32x32 images of 4x4 patches, merged 2x2: 16 tokens per image.
    return transformers.Mistral3Config(
        text_config=transformers.MistralConfig(**tiny_text_kwargs(sliding_window=None)),
        vision_config=transformers.PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
            image_size=32, patch_size=4,
        ),
        image_token_index=IMAGE_TOKEN,
        spatial_merge_size=2,
    )


def _gemma4_pixels(n, g):
    # Patches flattened to 3 * 4 * 4 values, with their (x, y) positions on the 8x8 grid.
    xy = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="xy"), dim=-1).reshape(1, 64, 2)
    return {"pixel_values": torch.rand(n, 64, 3 * 4 * 4, generator=g), "image_position_ids": xy.repeat(n, 1, 1)}


def _mistral3_pixels(n, g):
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[32, 32]] * n)}


def _internvl_pixels(n, g):
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}


def _get_rope_index_type_ids(model_cls: str) -> Optional[str]:
    model = getattr(transformers, model_cls, None)
    if model is None:
        return None
    return "mm_token_type_ids" if "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters else None


RECENT_FAMILIES: Dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen3_vl", "Qwen3VLForConditionalGeneration", _qwen3_vl_config, 16, _qwen_pixels, (START_TOKEN,), (END_TOKEN,),
               type_ids=_get_rope_index_type_ids("Qwen3VLModel")),
        Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", _qwen3_vl_moe_config, 16, _qwen_pixels,
               (START_TOKEN,), (END_TOKEN,), type_ids=_get_rope_index_type_ids("Qwen3VLMoeModel")),
        # mm_token_type_ids: each image's tokens attend to each other in the sliding layers at prefill.
        Family("gemma4", "Gemma4ForConditionalGeneration", _gemma4_config, 16, _gemma4_pixels, (START_TOKEN,), (END_TOKEN,), (0,),
               type_ids="mm_token_type_ids"),
        Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", _llava_onevision_config, 24, _llava_next_pixels),
        Family("internvl", "InternVLForConditionalGeneration", _internvl_config, 16, _internvl_pixels, (START_TOKEN,), (END_TOKEN,)),
        # Mistral 3 ends each row of [IMG] tokens with [IMG_BREAK] and the image with [IMG_END]; one run here.
        Family("mistral3", "Mistral3ForConditionalGeneration", _mistral3_config, 16, _mistral3_pixels, (), (END_TOKEN,)),
    )
}


def available(name: str) -> bool:
    """Whether the installed transformers has the family's model class."""
    return hasattr(transformers, family_of(name).model_cls)


def video_inputs(name: str, seed: int = 0, text: int = 16) -> dict:
    """Model inputs (batch 1): text, one image, text, one video, text, for the families with video
    placeholders: Qwen3-VL (2 temporal patches, each frame group between its own start/end markers
    after a timestamp token, as the processor writes them), LLaVA-OneVision (6 frames of 16x16,
    each pooled to one token, plus a newline token), Gemma 4 (2 frames of 16 tokens each) and
    Qwen2-VL / Qwen2.5-VL (2 temporal patches in one run of 32 tokens between start/end markers)."""
    g = torch.Generator().manual_seed(seed + 7)
    inputs = prompt_inputs(name, images=1, seed=seed, text=text)
    tail = torch.randint(3, TEXT_HIGH, (text,), generator=g).tolist()
    if name.startswith("qwen3_vl"):
        # grid (t, h, w) = (2, 8, 8): two frame groups of 16 tokens, each after a timestamp token.
        video = []
        for stamp in (301, 302):
            video += [stamp, START_TOKEN] + [VIDEO_TOKEN] * 16 + [END_TOKEN]
        extra = {"pixel_values_videos": torch.randn(2 * 64, 3 * 2 * 4 * 4, generator=g), "video_grid_thw": torch.tensor([[2, 8, 8]])}
    elif name.startswith("qwen2"):
        # grid (t, h, w) = (2, 8, 8) patches, merged 2x2 in space: 32 video tokens.
        video = [START_TOKEN] + [VIDEO_TOKEN] * 32 + [END_TOKEN]
        extra = {"pixel_values_videos": torch.randn(2 * 64, 3 * 2 * 4 * 4, generator=g), "video_grid_thw": torch.tensor([[2, 8, 8]])}
    elif name == "llava_onevision":
        video = [VIDEO_TOKEN] * 7
        extra = {"pixel_values_videos": torch.randn(1, 6, 3, 16, 16, generator=g)}
    elif name == "gemma4":
        video = [START_TOKEN] + [VIDEO_TOKEN] * 16 + [END_TOKEN] + [START_TOKEN] + [VIDEO_TOKEN] * 16 + [END_TOKEN]
        frames = _gemma4_pixels(2, g)
        extra = {"pixel_values_videos": frames["pixel_values"], "video_position_ids": frames["image_position_ids"],
                 "num_frames_per_video": torch.tensor([2])}
    else:
        raise ValueError(f"no video inputs for {name}")
    ids = torch.cat([inputs["input_ids"], torch.tensor([video + tail])], dim=1)
    inputs.update(extra, input_ids=ids, attention_mask=torch.ones_like(ids))
    family = family_of(name)
    if family.type_ids:
        inputs[family.type_ids] = type_ids(ids)
    return inputs
