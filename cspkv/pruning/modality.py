"""Modality ids per prompt token: 0 text, 1 image, 2 video, ... and -1 padding.

The default comes from `input_ids` and the model family's special token ids
(`token_modality_ids`); a caller may give explicit ids instead
(`cspkv.modalities(model, ids)`), checked by `validate_ids`. Either way padding
(attention_mask == 0) is forced to -1: it never scores and is never kept.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def validate_ids(modality_ids) -> torch.Tensor:
    """Check explicit modality ids: an integer tensor [B, L] with values >= -1.

    Returns the ids as int64 (same device). Raises TypeError for a wrong type or
    dtype and ValueError for a wrong rank or values below -1.

    >>> validate_ids(torch.tensor([[0, 1, 1, 0]])).dtype
    torch.int64
    """
    if not isinstance(modality_ids, torch.Tensor):
        raise TypeError(f"cspkv.modalities: modality_ids must be an integer torch.Tensor [B, L], got {type(modality_ids).__name__}")
    if modality_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"cspkv.modalities: modality_ids must have an integer dtype (int32/int64), got {modality_ids.dtype}")
    if modality_ids.dim() != 2:
        raise ValueError(f"cspkv.modalities: modality_ids must have shape [B, L] (rank 2), got shape {list(modality_ids.shape)}")
    if modality_ids.numel() and int(modality_ids.min()) < -1:
        raise ValueError(f"cspkv.modalities: modality_ids must be >= 0 (-1 marks padding), got minimum {int(modality_ids.min())}")
    return modality_ids.long()


def fit_to_prompt(modality_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Explicit ids for a prompt of shape [batch, length]: the ids themselves, or, when generate()
    expanded each prompt row into `batch // B` rows (beam search, num_return_sequences), each row
    of the ids repeated as generate() repeats the prompt's rows.

    >>> fit_to_prompt(torch.tensor([[0, 1], [1, 0]]), 4, 2).tolist()
    [[0, 1], [0, 1], [1, 0], [1, 0]]
    """
    B, L = modality_ids.shape
    if L == length and B == batch:
        return modality_ids
    if L == length and B > 0 and batch % B == 0:
        return modality_ids.repeat_interleave(batch // B, dim=0)
    raise ValueError(
        f"cspkv.modalities: modality_ids must have the prompt's shape [B, L] = [{batch}, {length}], got "
        f"{list(modality_ids.shape)} (or [{batch} / k, {length}] when generate() expands each row k times for beams "
        "or num_return_sequences)"
    )


def token_modality_ids(
    input_ids: Optional[torch.Tensor],
    shape: Sequence[int],
    special_tokens: Mapping[int, int],
    device: torch.device,
) -> torch.Tensor:
    """Default ids [B, L]: TEXT everywhere, `special_tokens[token]` for listed token ids.

    >>> token_modality_ids(torch.tensor([[5, 9, 9, 5]]), (1, 4), {9: IMAGE}, torch.device("cpu")).tolist()
    [[0, 1, 1, 0]]
    """
    ids = torch.full(tuple(shape), TEXT, dtype=torch.long, device=device)
    if input_ids is not None and special_tokens:
        tokens = input_ids.to(device)
        for token_id, modality in special_tokens.items():
            ids = ids.masked_fill(tokens == token_id, modality)
    return ids


def key_live_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, K]: the keys a 4-D attention mask [B, 1 or H, Q, K] lets its last query see (bool:
    True = attend; float: added to the logits, masked where very negative). Under causal attention
    with left padding the last query is real and sees every real key, so this marks the padding;
    a fully masked padding query row that was unmasked (as transformers does for SDPA) is not read.
    """
    last = attention_mask[:, :, -1, :]
    allowed = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return allowed.any(dim=1)


def mask_padding(modality_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Set -1 where a 2-D `attention_mask` [B, L] (aligned at the end) is 0."""
    if attention_mask is None or attention_mask.dim() != 2:
        return modality_ids
    L = modality_ids.shape[1]
    if attention_mask.shape[1] < L:
        return modality_ids
    pad = attention_mask[:, -L:].to(modality_ids.device) == 0
    return modality_ids.masked_fill(pad, -1)
