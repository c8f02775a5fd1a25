"""Chat prompts made of segments, with per-token segment ids.

Text-only models have no image tokens, so CSP needs another notion of
"modality": the caller marks segments of the prompt (documents, records,
instructions) and passes their ids to `cspkv.modalities`. `chat_prompt` builds
such a prompt through a tokenizer's chat template and returns the ids token by
token.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

INSTRUCTION = 0  # segment id of the chat scaffolding and the question
DOCUMENT = 1  # segment id of the first context document (document i gets DOCUMENT + i)

_MARK = "\x00CSPKV_SEGMENTS\x00"


def chat_prompt(tokenizer, segments: Sequence[Tuple[str, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokenise one user turn made of `segments`, wrapped in the chat template.

    Each segment is tokenised on its own, so no token straddles two segments.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer with a chat template.
    segments : ``(text, segment_id)`` pairs, concatenated in order into the user message.

    Returns
    -------
    (input_ids, segment_ids) : two int64 ``[1, L]`` tensors; ``segment_ids`` is
    usable as the ids of `cspkv.modalities`. The template's own tokens (role
    markers, generation prompt) get `INSTRUCTION`.

    Example
    -------
    >>> ids, seg = chat_prompt(tok, [("Some document.", DOCUMENT), ("Question?", INSTRUCTION)])  # doctest: +SKIP
    >>> with cspkv.patched(model, budget=0.2), cspkv.modalities(model, seg):  # doctest: +SKIP
    ...     out = model.generate(ids, max_new_tokens=16)
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("cspkv: the tokenizer has no chat template; cannot build a chat prompt")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
    )
    if rendered.count(_MARK) != 1:
        raise ValueError("cspkv: the chat template does not place the user message exactly once")
    head, tail = rendered.split(_MARK)
    pieces = [(head, INSTRUCTION), *segments, (tail, INSTRUCTION)]
    ids: List[int] = []
    seg: List[int] = []
    for text, segment_id in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        seg += [segment_id] * len(piece)
    return torch.tensor([ids]), torch.tensor([seg])
