"""The demo job: full cache vs CSP on one long prompt, with a pass key to retrieve.

`passkey_case` builds the prompt (six documents of English filler, a pass key
hidden in one, the question last; each document its own modality), `run`
answers it with the full cache and with CSP and times both, `timed_generate`
times one ``generate()`` call per forward pass. The prompt also serves the
real-model test and the benchmarks. ``python -m cspkv demo`` prints the result.
"""

from __future__ import annotations

import contextlib
import random
import re
import statistics
import time
from dataclasses import dataclass
from typing import List

import torch

import cspkv

from .hf.prompts import DOCUMENT, INSTRUCTION, chat_prompt
from .hf.smollm2 import kv_nbytes


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


def timed_generate(model, input_ids, max_new_tokens: int, segment_ids=None, *, warmup: bool = True) -> dict:
    """One greedy ``generate()``, each of its forward calls timed apart.

    The first forward call is the prefill (time to first token, CSP's pruning
    included); each later one is a decode step. The decode time per token is
    the mean of the decode steps, the definition of ``decode_ms_per_token`` in
    benchmarks/bench_e2e.py, whose hand-written loop times the same forward
    calls; generate()'s own work between them (logits processors, stopping
    criteria) is not counted. With `warmup`, a 2-token generate() runs first,
    so one-time costs (allocator growth, kernel set-up) stay out of the times.

    Returns a dict: ``tokens`` (the new token ids, [T]), ``prefill_ms``,
    ``decode_ms_per_token``, ``decode_steps`` and ``kv_bytes`` (of the cache
    generate() returned).
    """
    try:
        from .hf.cache import returned_cache
    except ImportError:  # cspkv.cache before its move into cspkv.hf
        from .cache import returned_cache

    cuda = next(model.parameters()).is_cuda
    starts: List[float] = []
    times: List[float] = []

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def before(module, args):
        starts.append(clock())

    def after(module, args, output):
        times.append(clock() - starts[-1])

    kwargs = dict(attention_mask=torch.ones_like(input_ids), do_sample=False,
                  pad_token_id=model.generation_config.eos_token_id, return_dict_in_generate=True)
    context = cspkv.modalities(model, segment_ids) if segment_ids is not None else contextlib.nullcontext()
    with context, torch.inference_mode():
        if warmup:
            model.generate(input_ids, max_new_tokens=2, **kwargs)
        # Prepended so that the clock starts before any hook cspkv put on the model and stops after.
        hooks = [model.register_forward_pre_hook(before, prepend=True), model.register_forward_hook(after)]
        try:
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
    decode = times[1:]
    return {
        "tokens": out.sequences[0, input_ids.shape[1]:],
        "prefill_ms": 1000 * times[0],
        "decode_ms_per_token": 1000 * statistics.mean(decode) if decode else float("nan"),
        "decode_steps": len(decode),
        "kv_bytes": kv_nbytes(returned_cache(out)),
    }


def csp_settings(case: PassKeyCase, *, budget, cross_ratio, pool=None) -> dict:
    """The demo's `cspkv.CSPConfig` fields (`pool` None: the policy's default).

    The observation window is the question: the default window (10% of the
    prompt, at most 64 tokens) would be mostly the last document looking at
    itself. CSP's score pooling keeps the neighbours of strongly attended
    tokens, so a multi-token key survives whole.
    """
    settings = dict(budget=budget, cross_ratio=cross_ratio, window=case.question_tokens)
    if pool is not None:
        settings["pool"] = pool
    return settings


def run(model, case: PassKeyCase, settings: dict, max_new_tokens: int) -> dict:
    """The case answered with the full cache, then with CSP under `settings`, each side timed the same way
    (`timed_generate`, after a warm-up). Returns ``{"full": ..., "csp": ..., "kept": prompt tokens CSP kept
    per layer and KV head}``."""
    full = timed_generate(model, case.input_ids, max_new_tokens)
    with cspkv.patched(model, **settings) as handle:
        pruned = timed_generate(model, case.input_ids, max_new_tokens, case.segment_ids)
        stats = handle.stats()
    kept = max((s["kept"] for s in stats["layers"].values() if s.get("pruned")), default=case.input_ids.shape[1])
    return {"full": full, "csp": pruned, "kept": kept}
