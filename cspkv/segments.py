"""Multi-segment text prompts with per-token segment ids.

Text-only models have no image tokens, so CSP needs another notion of
"modality": the caller marks segments of the prompt (documents, records,
instructions) and passes their ids to `cspkv.modalities`. This module builds
such prompts through a tokenizer's chat template and returns the ids token by
token, plus the pass-key task used by the demo, the SmolLM2 test and the
quality benchmark.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

INSTRUCTION = 0  # segment id of the chat scaffolding and the question
DOCUMENT = 1  # segment id of the first context document (document i gets DOCUMENT + i)

_MARK = "\x00CSPKV_SEGMENTS\x00"


def chat_prompt(tokenizer, segments: Sequence[Tuple[str, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokenise one user turn made of `segments`, wrapped in the chat template.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer with a chat template.
    segments : ``(text, segment_id)`` pairs, concatenated in order into the user message.

    Returns
    -------
    (input_ids, segment_ids) : two int64 ``[1, L]`` tensors. The template's own
    tokens (role markers, generation prompt) get `INSTRUCTION`.

    Example
    -------
    >>> ids, seg = chat_prompt(tok, [("Some document.", DOCUMENT), ("Question?", INSTRUCTION)])  # doctest: +SKIP
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


def english_passages() -> List[str]:
    """Paragraphs of natural English (Python's reference manual, shipped with CPython)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            # Prose only: skip code, grammar rules and short headings.
            if len(text) > 200 and text[0].isupper() and "::=" not in text and ">>>" not in text:
                paragraphs.append(text)
    return paragraphs


@dataclass
class PassKeyCase:
    """A retrieval prompt: documents of filler with one pass key hidden among them."""

    input_ids: torch.Tensor  # [1, L]
    segment_ids: torch.Tensor  # [1, L]
    answer: str
    question_tokens: int  # tokens after the last document (question + chat scaffolding)


def passkey_case(tokenizer, *, seed: int, target_tokens: int = 1500, n_documents: int = 6) -> PassKeyCase:
    """A pass-key retrieval prompt of about `target_tokens` tokens.

    `n_documents` documents of English filler; one (chosen by `seed`) carries
    the sentence with the key, at a random depth. The question comes last.
    Document i's tokens get segment id ``DOCUMENT + i``, the rest `INSTRUCTION`,
    so CSP's cross score of a document token is the attention it gets from the
    question (and from the other documents).
    """
    rng = random.Random(seed)
    passages = english_passages()
    key = str(rng.randint(10000, 99999))
    per_document = max(target_tokens // n_documents - 20, 20)
    documents = []
    for _ in range(n_documents):
        text, length = [], 0
        while length < per_document:
            passage = passages[rng.randrange(len(passages))]
            text.append(passage)
            length += len(tokenizer(passage, add_special_tokens=False)["input_ids"])
        documents.append(" ".join(text))
    holder = rng.randrange(n_documents)
    sentences = documents[holder].split(". ")
    sentences.insert(rng.randrange(len(sentences) + 1), f"The pass key is {key}. Remember it: {key}")
    documents[holder] = ". ".join(sentences)

    segments = []
    for i, document in enumerate(documents):
        segments.append((f"Document {i + 1}:\n{document}\n\n", DOCUMENT + i))
    segments.append(("What is the pass key? Answer with the number only.", INSTRUCTION))
    input_ids, segment_ids = chat_prompt(tokenizer, segments)
    last_document = int((segment_ids[0] != INSTRUCTION).nonzero().max())
    return PassKeyCase(input_ids, segment_ids, key, input_ids.shape[1] - 1 - last_document)
