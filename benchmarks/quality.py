"""Quality of CSP, the baseline policies and (optionally) kvpress's presses on a real model (SmolLM2-135M-Instruct, CPU).

Tasks (each `--cases-X N`; prompts from local text only: English prose from
pydoc_data.topics, records made up from a seed):

- A, retrieval across segments: prompts of 1k-4k tokens, prose with three
  one-line records ("The locker number is 417.") at spread depths, one asked.
  The three segment kinds are CSP's modalities (instruction 0, records 1, prose 2).
- R, retrieval of one-record blocks: 1-6 records, each its own paragraph among
  long prose, codes of 4-6 digits, prompts of `--lengths-r` tokens; every other
  case unprimed (the model answers in its own words, up to 16 tokens).
- N, a needle among distractors: `--distractors` records of the same form with
  other keys, each its own paragraph, one asked (the CSP paper's weakest column).
- C, compress once, then ask: a context with three records is pruned before
  the question arrives (query-agnostic: the window is the context's own end),
  then three questions are answered from copies of the pruned cache.
- B, continuation fidelity: natural passages (one segment each), a prompt of
  1k-2k tokens, then 64 teacher-forced tokens; mean KL(full || pruned) of the
  next-token distributions and top-1 agreement with the full cache.

Retrieval answers are primed ("The <key> number is"), but for half of task R;
metric: exact match (the greedy answer contains the code). Accuracy with a 95%
Wilson interval, KL with a 95% bootstrap interval over passages.

Lines: `csp (defaults)` is exactly `CSPConfig(budget=b)`, window and recent
included (what a user gets); `csp one segment` the same with every token in one
modality; snapkv, h2o, streaming, random at their defaults (the same window);
`csp w=0.1` with window = recent = 10% of the prompt (the earlier
default); csp and snapkv with adaptive head and layer allocation
(`CSPConfig.head_allocation`, `layer_allocation`). `--line
'NAME:field=value,...'` adds a line. kvpress's
presses (SnapKV, AdaKV(SnapKV), PyramidKV) run in benchmarks/quality_peers.py
(under a venv with transformers < 5.3) on the same cases; `--peers FILE`
merges its results into this report.

How a case runs. Pruning happens after each layer's prefill attention, so the
prefill's hidden states, keys and queries do not depend on the policy: the
benchmark prefills each prompt once (its first L-1 tokens; task C: the whole
context), captures every layer's post-RoPE queries, and then builds each
configuration's pruned cache with the library's own pipeline, in its two halves
(`cspkv.pruning.score_layer` once per scoring setting, `select_and_compact` per
budget, with the layer and head allocation of `cspkv.pruning.allocation`: what
the patched attention does at prefill). The last
prompt token is held back: it is fed over the pruned cache by the patched model
(later_prefill off, so nothing but the prompt is pruned), followed by the greedy
answer or the teacher-forced continuation. Task C feeds each question over a
fresh copy of the pruned context and checks the capture path against
`cspkv.compress` (line `csp (defaults) via compress`, at `--compress-check`).

    python benchmarks/quality.py            # default sweep (hours on 2 cores; see benchmarks/README.md)
    python benchmarks/quality.py --quick    # a small subset (< 4 min), exercised by the tests
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cspkv  # noqa: E402
from cspkv import CSP, CSPConfig, ScoreInputs, ops  # noqa: E402
from cspkv.hf import models  # noqa: E402
from cspkv.hf.cache import PrunedLayer  # noqa: E402
from cspkv.pruning import (PrunedKV, head_allocation, layer_budgets, layer_plans, plan_batch,  # noqa: E402
                           score_layer, select_and_compact, window_query_ids)
from cspkv.demo import english_passages  # noqa: E402
from cspkv.hf.prompts import chat_prompt  # noqa: E402
from common import RESULTS, bootstrap_mean, device_description, wilson, write_results  # noqa: E402

BASELINES = ("snapkv", "h2o", "streaming", "random")
INSTRUCTION, RECORDS, PROSE = 0, 1, 2
QUESTION = 9  # a placeholder segment that marks where task C's question starts (relabelled INSTRUCTION)
CONTINUATION = 64
ANSWER_TOKENS = 4  # a space and three digits (SmolLM2 writes one token per digit)
FREE_ANSWER_TOKENS = 16  # task R's unprimed answers
# The window of `csp w=0.1`: window = recent = 10% of the prompt, the earlier library default.
FRACTION_WINDOW = 0.1
# The lines: name -> CSPConfig fields besides the budget. `csp (defaults)` is CSPConfig(budget=b).
LINES: Dict[str, dict] = {
    "csp (defaults)": {},
    "csp one segment": {},
    **{name: {"policy": name} for name in BASELINES},
    "csp w=0.1": {"window": FRACTION_WINDOW},
    "csp head=adaptive": {"head_allocation": "adaptive"},
    "csp layer=adaptive": {"layer_allocation": "adaptive"},
    "snapkv head=adaptive": {"policy": "snapkv", "head_allocation": "adaptive"},
    "snapkv layer=adaptive": {"policy": "snapkv", "layer_allocation": "adaptive"},
}
ONE_SEGMENT = {"csp one segment"}  # lines whose tokens all get modality 0
CSP_LINE = "csp (defaults)"
SCORED_BASELINES = BASELINES + ("snapkv head=adaptive", "snapkv layer=adaptive")
PEER_LINES = ("kvpress SnapKV", "kvpress AdaKV(SnapKV)", "kvpress PyramidKV")
RETRIEVAL_TASKS = ("A", "R", "N")  # the question in the prompt
TASKS = {
    "A": "retrieval across segments (3 records, 3-digit numbers)",
    "R": "one-record blocks among prose (1-6 records, 4-6 digit codes)",
    "N": "one needle among distractor records of the same form",
    "C": "compress once (no question), then 3 questions",
    "B": "continuation KL (64 teacher-forced tokens)",
}

# Keys of the records: objects that Python's reference manual (the filler) never talks about.
THINGS = "locker invoice flight ticket badge parcel passport cabin voucher pager berth vault".split()
MORE_THINGS = THINGS + "permit coupon trailer kiosk pallet shuttle ferry canister crate hangar garage mailbox".split()

PHASES: Dict[str, float] = {}  # seconds spent per phase (prefill, scores, select, decode, ...)


@contextlib.contextmanager
def phase(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    task: str  # "A", "R", "N", "C" or "B"
    input_ids: torch.Tensor  # [1, L] prompt (task C: the context, without question)
    segment_ids: torch.Tensor  # [1, L]
    answer: str = ""  # retrieval tasks
    continuation: Optional[torch.Tensor] = None  # task B: [1, 64]
    depth: float = 0.0  # relative position of the asked record
    answer_tokens: int = ANSWER_TOKENS
    questions: List[torch.Tensor] = field(default_factory=list)  # task C: [1, T] question chunks
    answers: List[str] = field(default_factory=list)  # task C
    records: int = 0
    primed: bool = True  # retrieval: the answer's first words are given ("The <key> number is")

    def fingerprint(self) -> str:
        """The case's identity across processes (quality_peers.py runs the same cases by seed)."""
        h = hashlib.sha1()
        for t in [self.input_ids, self.segment_ids] + list(self.questions) + (
                [self.continuation] if self.continuation is not None else []):
            h.update(bytes(str(t.tolist()), "ascii"))
        h.update((self.answer + "|" + ",".join(self.answers)).encode())
        return h.hexdigest()[:16]


def _prose(tokenizer, passages, rng, tokens: int) -> str:
    """About `tokens` tokens of English: whole passages, the last one cut at a sentence end."""
    text, length = [], 0
    while length < tokens:
        passage = passages[rng.randrange(len(passages))]
        n = len(tokenizer(passage, add_special_tokens=False)["input_ids"]) + 1
        if length + n > tokens:
            sentences = passage.split(". ")
            keep = max(1, int(len(sentences) * (tokens - length) / n))
            passage = ". ".join(sentences[:keep]).rstrip(".") + "."
            n = len(tokenizer(passage, add_special_tokens=False)["input_ids"]) + 1
        text.append(passage)
        length += n
    return " ".join(text)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def retrieval_case(tokenizer, passages, *, seed: int, target_tokens: int, depth: float, records: int = 3,
                   digits: int = 3) -> Case:
    """Task A: prose with `records` one-line records at spread depths; the asked one at `depth`.

    The assistant's answer is primed ("The <key> number is"), so the next tokens
    are the number itself; SmolLM2-135M otherwise often answers in prose.
    Numbers have `digits` digits (one token each); one-word values instead of
    numbers are beyond SmolLM2-135M even with the full cache.
    """
    rng = random.Random(seed)
    keys = rng.sample(THINGS, records)
    values = rng.sample(range(10 ** (digits - 1), 10 ** digits), records)
    lines = [f"The {k} number is {v}." for k, v in zip(keys, values)]
    where = {0: depth}  # record 0 is asked; the others sit at the middles of equal slices
    for j in range(1, records):
        where[j] = (j - 0.5) / (records - 1)
    order = sorted(where, key=where.get)
    tail = f"Question: what is the {keys[0]} number?"
    prime = f"The {keys[0]} number is"
    fixed = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in lines + [tail, prime]) + 40
    prose_total = max(target_tokens - fixed, 100)
    segments = [("Read the text below, then answer the question.\n\n", INSTRUCTION)]
    previous = 0.0
    for j in order:
        segments.append((_prose(tokenizer, passages, rng, int(prose_total * max(where[j] - previous, 0.01))) + " ", PROSE))
        segments.append((lines[j] + " ", RECORDS))
        previous = where[j]
    segments.append((_prose(tokenizer, passages, rng, int(prose_total * max(1.0 - previous, 0.01))) + "\n\n", PROSE))
    segments.append((tail, INSTRUCTION))
    input_ids, segment_ids = chat_prompt(tokenizer, segments)
    primed = torch.tensor([tokenizer(prime, add_special_tokens=False)["input_ids"]])
    input_ids = torch.cat([input_ids, primed], dim=1)
    segment_ids = torch.cat([segment_ids, torch.full_like(primed, INSTRUCTION)], dim=1)
    fact = tokenizer(lines[0], add_special_tokens=False)["input_ids"][:4]
    ids = input_ids[0].tolist()
    at = next((i for i in range(len(ids)) if ids[i:i + len(fact)] == fact), 0)
    return Case("A", input_ids, segment_ids, answer=str(values[0]), depth=at / len(ids), records=records)


def _blocks(tokenizer, passages, rng, lines: Sequence[str], prose_tokens: int) -> List[Tuple[str, int]]:
    """`prose_tokens` of prose with each of `lines` as its own paragraph, at random depths (sorted), as
    (text, segment) pieces: a record is a block of its own, not a sentence inside the prose."""
    n = len(lines)
    at = sorted(rng.uniform(0.03, 0.97) for _ in range(n))
    order = list(range(n))
    rng.shuffle(order)
    pieces, previous = [], 0.0
    for j, depth in zip(order, at):
        pieces.append((_prose(tokenizer, passages, rng, max(8, int(prose_tokens * (depth - previous)))) + "\n\n", PROSE))
        pieces.append((lines[j] + "\n\n", RECORDS))
        previous = depth
    pieces.append((_prose(tokenizer, passages, rng, max(8, int(prose_tokens * (1.0 - previous)))) + "\n\n", PROSE))
    return pieces


def _codes(rng, n: int, digits: int) -> List[int]:
    return rng.sample(range(10 ** (digits - 1), 10 ** digits), n)


def _primed(tokenizer, pieces: List[Tuple[str, int]], prime: str) -> Tuple[torch.Tensor, torch.Tensor]:
    input_ids, segment_ids = chat_prompt(tokenizer, pieces)
    primed = torch.tensor([tokenizer(prime, add_special_tokens=False)["input_ids"]])
    return (torch.cat([input_ids, primed], dim=1),
            torch.cat([segment_ids, torch.full_like(primed, INSTRUCTION)], dim=1))


def _depth_of(tokenizer, input_ids: torch.Tensor, line: str) -> float:
    fact = tokenizer(line, add_special_tokens=False)["input_ids"][:4]
    ids = input_ids[0].tolist()
    at = next((i for i in range(len(ids)) if ids[i:i + len(fact)] == fact), 0)
    return at / len(ids)


def block_case(tokenizer, passages, *, seed: int, target_tokens: int, task: str = "R",
               distractors: int = 15) -> Case:
    """Task R (1-6 records, codes of 4-6 digits) or N (one needle and `distractors` records of the same
    form with other keys, 4-digit codes): each record a paragraph of its own among prose; one asked.
    Task R primes every other answer ("The <key> number is"); the rest answer freely in up to
    FREE_ANSWER_TOKENS tokens (the code must appear in them)."""
    rng = random.Random(seed)
    if task == "R":
        records, digits = rng.randint(1, 6), rng.choice((4, 5, 6))
        keys = rng.sample(THINGS, records)
    else:
        records, digits = distractors + 1, 4
        keys = rng.sample(MORE_THINGS, records)
    values = _codes(rng, records, digits)
    lines = [f"The {k} number is {v}." for k, v in zip(keys, values)]
    asked = rng.randrange(records)
    tail = f"Question: what is the {keys[asked]} number?"
    prime = f"The {keys[asked]} number is"
    intro = "Read the text below, then answer the question.\n\n"
    fixed = sum(_count(tokenizer, t) for t in lines + [tail, prime, intro]) + 3 * records + 30
    pieces = [(intro, INSTRUCTION), *_blocks(tokenizer, passages, rng, lines, max(target_tokens - fixed, 100)),
              (tail, INSTRUCTION)]
    primed = not (task == "R" and seed % 2)
    if primed:
        input_ids, segment_ids = _primed(tokenizer, pieces, prime)
    else:
        input_ids, segment_ids = chat_prompt(tokenizer, pieces)
    return Case(task, input_ids, segment_ids, answer=str(values[asked]), primed=primed,
                answer_tokens=digits + 1 if primed else FREE_ANSWER_TOKENS,
                depth=_depth_of(tokenizer, input_ids, lines[asked]), records=records)


def context_case(tokenizer, passages, *, seed: int, target_tokens: int, records: int = 3) -> Case:
    """Task C: a context (chat head, instruction, prose with `records` one-record blocks, 4-digit codes)
    and per record a question chunk (question, end of the user turn, generation prompt, primed answer).
    Context + question chunk is exactly the one-turn prompt with the question at its end."""
    rng = random.Random(seed)
    keys = rng.sample(THINGS, records)
    values = _codes(rng, records, 4)
    lines = [f"The {k} number is {v}." for k, v in zip(keys, values)]
    intro = "Read the text below, then answer the question.\n\n"
    fixed = sum(_count(tokenizer, t) for t in lines + [intro]) + 3 * records + 40
    body = [(intro, INSTRUCTION), *_blocks(tokenizer, passages, rng, lines, max(target_tokens - fixed, 100))]
    context, seg, questions = None, None, []
    for k in keys:
        ids, s = _primed(tokenizer, body + [(f"Question: what is the {k} number?", QUESTION)], f"The {k} number is")
        cut = int((s[0] == QUESTION).nonzero()[0])
        if context is None:
            context, seg = ids[:, :cut], s[:, :cut]
        assert torch.equal(ids[:, :cut], context)
        questions.append(ids[:, cut:])
    return Case("C", context, seg, questions=questions, answers=[str(v) for v in values], answer_tokens=5,
                records=records)


def continuation_case(tokenizer, passages, *, seed: int, prompt_tokens: int) -> Case:
    """Task B: passages one after the other (one segment each), cut after `prompt_tokens` tokens."""
    rng = random.Random(seed)
    ids: List[int] = []
    seg: List[int] = []
    index = 0
    while len(ids) < prompt_tokens + CONTINUATION:
        piece = tokenizer(("\n\n" if ids else "") + passages[rng.randrange(len(passages))], add_special_tokens=False)["input_ids"]
        ids += piece
        seg += [index] * len(piece)
        index += 1
    ids, seg = ids[:prompt_tokens + CONTINUATION], seg[:prompt_tokens]
    return Case("B", torch.tensor([ids[:prompt_tokens]]), torch.tensor([seg]),
                continuation=torch.tensor([ids[prompt_tokens:]]))


def build_cases(tokenizer, passages, *, seed: int, counts: Dict[str, int], lengths: Dict[str, Sequence[int]],
                distractors: int) -> List[Case]:
    """Every task's cases, each from its own seed (quality_peers.py rebuilds the same ones)."""
    cases: List[Case] = []
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    base = seed * 100003
    la = lengths["A"]
    for i in range(counts.get("A", 0)):
        cases.append(retrieval_case(tokenizer, passages, seed=base + i, target_tokens=la[i % len(la)],
                                    depth=depths[(i // len(la)) % len(depths)]))
    for task, offset in (("R", 20000), ("N", 30000)):
        for i in range(counts.get(task, 0)):
            ls = lengths[task]
            cases.append(block_case(tokenizer, passages, seed=base + offset + i, target_tokens=ls[i % len(ls)],
                                    task=task, distractors=distractors))
    for i in range(counts.get("C", 0)):
        lc = lengths["C"]
        cases.append(context_case(tokenizer, passages, seed=base + 40000 + i, target_tokens=lc[i % len(lc)]))
    for i in range(counts.get("B", 0)):
        lb = lengths["B"]
        cases.append(continuation_case(tokenizer, passages, seed=base + 50000 + i, prompt_tokens=lb[i % len(lb)]))
    return cases


# ----------------------------------------------------------------------------- configurations
def line_config(line: str, budget: float, extra: Optional[Dict[str, dict]] = None) -> CSPConfig:
    """The configuration of a line at `budget`: `csp (defaults)` is CSPConfig(budget=budget)."""
    fields_ = (extra or {}).get(line, LINES.get(line))
    return CSPConfig(budget=budget, **fields_)


def key(line: str, budget: float) -> str:
    return f"{line} @{budget:g}"


def parse_line(spec: str) -> Tuple[str, dict]:
    """'NAME:field=value,field=value' -> (NAME, fields). Values: int, float, else the string."""
    name, _, rest = spec.partition(":")
    out = {}
    for part in filter(None, rest.split(",")):
        k, v = part.split("=")
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        if k in ("pool", "n", "cross_ratio", "self_ratio") or k in {f.name for f in dataclasses.fields(CSP)}:
            out.setdefault("_policy", {})[k] = v
        else:
            out[k] = v
    return name.strip(), out


def resolve_fields(fields_: dict) -> dict:
    """A line's CSPConfig fields, policy fields (`_policy`) folded into a Policy object."""
    fields_ = dict(fields_)
    pol = fields_.pop("_policy", None)
    if pol:
        base = fields_.get("policy", "csp")
        policy = CSPConfig(policy=base).policy
        fields_["policy"] = policy.replace(**pol) if hasattr(policy, "replace") else dataclasses.replace(policy, **pol)
    return fields_
# ----------------------------------------------------------------------------- the model side
@dataclass
class Prefill:
    keys: List[torch.Tensor]  # per layer [1, Hkv, L-1, D]
    values: List[torch.Tensor]
    queries: List[torch.Tensor]  # per layer [1, H, L-1, D]
    scaling: List[float]
    k_mod: torch.Tensor  # [1, L-1]
    scores: Dict[tuple, list] = field(default_factory=dict)


@contextlib.contextmanager
def capturing_queries(model, store: dict):
    """Run the model's own attention, recording each layer's (post-RoPE) queries and scale."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = "cspkv_quality_capture"
    original = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        store[module.layer_idx] = (query, scaling if scaling is not None else module.scaling)
        return original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(name, attention)
    modules = [m for _, m in models.adapter_for(model).attention_modules(model)]
    saved = [m.config for m in modules]
    for m in modules:
        m.config = copy.copy(m.config)
        m.config.__dict__["_attn_implementation_internal"] = name  # as cspkv.patch does
    try:
        yield store
    finally:
        for m, config in zip(modules, saved):
            m.config = config


def _dynamic_cache(model, keys=None, values=None):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    if keys is not None:
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.layers[i].update(k, v)
    return cache


def prefill(model, case: Case, hold_last: bool = True) -> Prefill:
    """Prefill the first L-1 prompt tokens (all L with `hold_last` False) with the full cache; keep keys,
    values and queries."""
    store: dict = {}
    ids = case.input_ids[:, :-1] if hold_last else case.input_ids
    cache = _dynamic_cache(model)
    with capturing_queries(model, store), torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    n = len(cache.layers)
    return Prefill(
        keys=[cache.layers[i].keys for i in range(n)],
        values=[cache.layers[i].values for i in range(n)],
        queries=[store[i][0] for i in range(n)],
        scaling=[float(store[i][1]) for i in range(n)],
        k_mod=(case.segment_ids[:, :-1] if hold_last else case.segment_ids).long(),
    )


def _score_key(config: CSPConfig, one_segment: bool = False) -> tuple:
    """What a layer's scores depend on: the window and the policy (CSP's cross ratio only splits the
    budget; recent and budget only select), and the modalities."""
    policy = config.policy
    return (config.window, policy.replace(cross_ratio=0.0) if isinstance(policy, CSP) else policy, one_segment)


def pruned_kv(pre: Prefill, config: CSPConfig, one_segment: bool = False) -> List[PrunedKV]:
    """Per layer, the cache `config` keeps: the library's pipeline (budgets spread over layers and
    KV heads as `config`'s allocation says, as cspkv.patched does), its scores shared across
    budgets. `one_segment`: every token in modality 0 (CSP without modalities)."""
    k_mod = torch.zeros_like(pre.k_mod) if one_segment else pre.k_mod
    plans = plan_batch(config, k_mod)
    q_mod = window_query_ids(k_mod, plans)
    key_ = _score_key(config, one_segment)
    if key_ not in pre.scores:  # scores do not depend on budget, cross ratio, allocation or decode_n
        pre.scores[key_] = [
            score_layer(config, ScoreInputs(q, k, q_mod, k_mod, s, i))
            for i, (q, k, s) in enumerate(zip(pre.queries, pre.keys, pre.scaling))
        ]
    scores = pre.scores[key_]
    per_layer = [plans] * len(scores)
    if config.layer_allocation == "adaptive":
        budgets = layer_budgets(scores, k_mod, plans, config.allocation_floor)
        per_layer = [layer_plans(plans, budgets[i]) for i in range(len(scores))]
    out = []
    for layer_scores, k, v, row_plans in zip(scores, pre.keys, pre.values, per_layer):
        budgets, cross_ratios = head_allocation(config, layer_scores, k_mod, row_plans)
        out.append(select_and_compact(layer_scores, k, v, k_mod, row_plans, budgets=budgets, cross_ratios=cross_ratios))
    return out


def pruned_cache(model, rows: List[List[PrunedKV]], logical_len: int, liveness):
    """A DynamicCache of PrunedLayers, one batch row per configuration in `rows`.

    Rows of smaller budgets are filled up to the largest with dead slots
    (kv_valid False), as selection does for the rows of a padded batch.
    """
    cache = _dynamic_cache(model)
    for i in range(len(rows[0])):
        kept = [r[i] for r in rows]
        K = max(k.keys.shape[-2] for k in kept)
        keys = torch.cat([F.pad(k.keys, (0, 0, 0, K - k.keys.shape[-2])) for k in kept])
        values = torch.cat([F.pad(k.values, (0, 0, 0, K - k.values.shape[-2])) for k in kept])
        valid = torch.cat([F.pad(k.keep_valid, (0, K - k.keep_valid.shape[-1]), value=False) for k in kept])
        cache.layers[i] = PrunedLayer(keys, values, valid, logical_len, liveness)
    return cache


def greedy(model, cache, first: torch.Tensor, steps: int, stop_ids: set) -> torch.Tensor:
    """[R, steps] greedy tokens after feeding `first` [R, 1] over `cache`; stops when every row has stopped."""
    out, token = [], first
    done = torch.zeros(first.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            done |= torch.tensor([t in stop_ids for t in token[:, 0].tolist()])
            if bool(done.all()):
                break
    return torch.cat(out, dim=1)


def teacher_forced_logprobs(model, cache, chunk: torch.Tensor) -> torch.Tensor:
    """[R, T, V] float32 log-probabilities of the tokens after each position of `chunk` [R, T]."""
    with torch.inference_mode():
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
    return torch.log_softmax(logits.float(), dim=-1)


def batches(items: Sequence[Tuple[str, CSPConfig]]) -> List[List[Tuple[str, CSPConfig]]]:
    """Configurations that run as one batch: equal decode_n (the n-softmax constant is per patch) and
    budgets within a factor 2 (smaller rows are filled with dead slots up to the largest)."""
    first_of_bucket, bucket = None, {}
    for budget in sorted({c.budget for _, c in items}):
        if first_of_bucket is None or budget > 2 * first_of_bucket:
            first_of_bucket = budget
        bucket[budget] = first_of_bucket
    groups: Dict[tuple, list] = {}
    for k, config in items:
        groups.setdefault((config.decode_n, bucket[config.budget]), []).append((k, config))
    return list(groups.values())


def answer_check(tokenizer, row: Sequence[int], answer: str) -> dict:
    text = tokenizer.decode(list(row), skip_special_tokens=True).strip()
    return {"answer": text[:30], "correct": answer in text}


def stop_ids(tokenizer) -> set:
    return {tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False)["input_ids"]}


def _answer_questions(model, tokenizer, case: Case, make_cache, rows: int) -> List[List[dict]]:
    """Task C: per question, [rows] results of feeding the question chunk over a fresh `make_cache()`."""
    stop = stop_ids(tokenizer)
    out = []
    for question, answer in zip(case.questions, case.answers):
        cache = make_cache()
        with torch.inference_mode():
            logits = model(input_ids=question.expand(rows, -1), past_key_values=cache, use_cache=True).logits[:, -1]
        first = logits.argmax(-1, keepdim=True)
        rest = greedy(model, cache, first, case.answer_tokens - 1, stop)
        out.append([answer_check(tokenizer, r, answer) for r in torch.cat([first, rest], 1).tolist()])
    return out  # [question][row]


def run_case(model, tokenizer, case: Case, configs: Dict[str, CSPConfig], one_segment: Sequence[str] = (),
             compress_check: Sequence[float] = ()) -> Dict[str, object]:
    """Results of the full cache and every configuration (key -> config) on one case: per key a dict
    (retrieval: answer, correct; B: kl, top1) or, for task C, a list of one dict per question.
    `one_segment`: keys whose configuration runs with every token in modality 0. `compress_check`:
    task C budgets at which `cspkv.compress` answers too (line `csp (defaults) via compress`)."""
    qa = case.task == "C"
    with phase(f"prefill {case.task}"):
        pre = prefill(model, case, hold_last=not qa)
    L1 = pre.k_mod.shape[1]
    last = case.input_ids[:, -1:]
    stop = stop_ids(tokenizer)
    results: Dict[str, object] = {}

    def retrieval(tokens: torch.Tensor) -> List[dict]:
        return [answer_check(tokenizer, row, case.answer) for row in tokens.tolist()]

    chunk = None if case.continuation is None else torch.cat([last, case.continuation[:, :-1]], dim=1)
    full_lp = None
    with phase(f"full-cache answer {case.task}"):
        if qa:
            per_q = _answer_questions(model, tokenizer, case, lambda: _dynamic_cache(model, pre.keys, pre.values), 1)
            results["full"] = [q[0] for q in per_q]
        elif case.task == "B":
            full_lp = teacher_forced_logprobs(model, _dynamic_cache(model, pre.keys, pre.values), chunk)[0]
            results["full"] = {"kl": 0.0, "top1": 1.0}
        else:
            results["full"] = retrieval(greedy(model, _dynamic_cache(model, pre.keys, pre.values), last,
                                               case.answer_tokens, stop))[0]

    def finish_b(lp: torch.Tensor) -> List[dict]:
        p_full = full_lp.exp()
        kl = (p_full * (full_lp - lp)).sum(-1).clamp_min(0)  # [R, T]
        top1 = (lp.argmax(-1) == full_lp.argmax(-1)).float()
        return [{"kl": float(kl[r].mean()), "top1": float(top1[r].mean())} for r in range(lp.shape[0])]

    for group in batches(list(configs.items())):
        decode_n = group[0][1].decode_n
        with phase(f"score+select+compact {case.task}"):
            rows = [pruned_kv(pre, config, k in one_segment) for k, config in group]
        R = len(group)
        with phase(f"pruned-cache answers {case.task}"), \
                cspkv.patched(model, CSPConfig(decode_n=decode_n, later_prefill="off")) as handle:
            if qa:
                per_q = _answer_questions(model, tokenizer, case, lambda: pruned_cache(model, rows, L1, handle.liveness), R)
                outcome = [[q[r] for q in per_q] for r in range(R)]
            elif case.task == "B":
                outcome = finish_b(teacher_forced_logprobs(model, pruned_cache(model, rows, L1, handle.liveness),
                                                           chunk.expand(R, -1)))
            else:
                outcome = retrieval(greedy(model, pruned_cache(model, rows, L1, handle.liveness), last.expand(R, 1),
                                           case.answer_tokens, stop))
        for (k, _), result in zip(group, outcome):
            results[k] = result

    # Task C's check: the library's own entry points give the same answers.
    for b in compress_check if qa else ():
        config = CSPConfig(budget=b)
        with phase(f"compress check {case.task}"), cspkv.patched(model, config) as handle:
            with torch.inference_mode():
                context = cspkv.compress(model, case.input_ids, modality_ids=case.segment_ids)
            handle.config = config.replace(later_prefill="off")
            results[key(CSP_LINE + " via compress", b)] = [q[0] for q in _answer_questions(model, tokenizer, case,
                                                                                            context.cache, 1)]
    return results


def aggregate(cases: List[Case], per_case: List[dict]) -> Dict[str, Dict[str, dict]]:
    """task -> key -> {n, acc, lo, hi} (retrieval, C: one item per question) or {n, kl, lo, hi, top1} (B)."""
    out: Dict[str, Dict[str, dict]] = {}
    keys_by_task: Dict[str, list] = {}
    for case, res in zip(cases, per_case):
        for k in res:
            keys_by_task.setdefault(case.task, [])
            if k not in keys_by_task[case.task]:
                keys_by_task[case.task].append(k)
    for task, keys in keys_by_task.items():
        out[task] = {}
        rows = [r for c, r in zip(cases, per_case) if c.task == task]
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            if task == "B":
                kl = [v["kl"] for v in vals]
                lo, hi = bootstrap_mean(kl)
                out[task][k] = {"n": len(kl), "kl": sum(kl) / len(kl), "lo": lo, "hi": hi,
                                "top1": 100.0 * sum(v["top1"] for v in vals) / len(vals)}
            else:
                items = [q for v in vals for q in (v if isinstance(v, list) else [v])]
                hits = sum(bool(q["correct"]) for q in items)
                lo, hi = wilson(hits, len(items))
                out[task][k] = {"n": len(items), "acc": 100.0 * hits / max(len(items), 1), "lo": lo, "hi": hi}
    return out


# ----------------------------------------------------------------------------- report
def targets(summary: Dict[str, Dict[str, dict]], budgets: Sequence[float]) -> List[Tuple[str, bool, str]]:
    """The issue's targets: (what, holds, detail); a target whose lines did not run is left out."""
    out = []

    def get(task, line, b):
        return summary.get(task, {}).get(key(line, b))

    def others(task, b):
        return [(n, get(task, n, b)) for n in SCORED_BASELINES + PEER_LINES if get(task, n, b) is not None]

    for task in RETRIEVAL_TASKS:
        full, csp = summary.get(task, {}).get("full"), get(task, CSP_LINE, 0.2)
        if full is None or csp is None:
            continue
        gap = full["acc"] - csp["acc"]
        out.append((f"task {task}, budget 0.2: {CSP_LINE} within 3 points of the full cache", gap <= 3.0,
                    f"full {full['acc']:.1f}%, csp {csp['acc']:.1f}% (gap {gap:+.1f}; n={csp['n']})"))
        rest = others(task, 0.2)
        if rest:
            best_name, best = max(rest, key=lambda x: x[1]["acc"])
            out.append((f"task {task}, budget 0.2: {CSP_LINE} >= every baseline and kvpress press",
                        csp["acc"] >= best["acc"], f"csp {csp['acc']:.1f}%, best other {best_name} {best['acc']:.1f}%"))
    full, csp = summary.get("C", {}).get("full"), get("C", CSP_LINE, 0.3)
    if full is not None and csp is not None:
        gap = full["acc"] - csp["acc"]
        out.append((f"task C (query-agnostic), budget 0.3: {CSP_LINE} within 5 points of the full cache", gap <= 5.0,
                    f"full {full['acc']:.1f}%, csp {csp['acc']:.1f}% (gap {gap:+.1f}; n={csp['n']} questions)"))
    for task in RETRIEVAL_TASKS + ("C",):
        for b in budgets:
            ours, theirs = get(task, cspkv.SnapKV.name, b), get(task, "kvpress SnapKV", b)
            if ours is None or theirs is None:
                continue
            out.append((f"task {task}, budget {b}: cspkv snapkv within 2 points of kvpress SnapKV",
                        ours["acc"] >= theirs["acc"] - 2.0,
                        f"cspkv {ours['acc']:.1f}%, kvpress {theirs['acc']:.1f}%"))
    for b in budgets:
        csp = get("B", CSP_LINE, b)
        rest = [(n, e) for n, e in others("B", b) if n != cspkv.Random.name]
        if csp is None or not rest:
            continue
        best_name, best = min(rest, key=lambda x: x[1]["kl"])
        out.append((f"task B, budget {b}: {CSP_LINE} KL <= the best baseline's", csp["kl"] <= best["kl"],
                    f"csp {csp['kl']:.4f}, best {best_name} {best['kl']:.4f}"))
    return out


def cell(entry: Optional[dict], task: str) -> str:
    if entry is None:
        return "-"
    if task == "B":
        return f"{entry['kl']:.4f} [{entry['lo']:.4f}, {entry['hi']:.4f}]"
    return f"{entry['acc']:.1f} [{entry['lo']:.1f}, {entry['hi']:.1f}]"


def task_tables(summary: Dict[str, Dict[str, dict]], lines: Sequence[str], budgets: Sequence[float]) -> str:
    out = []
    for task, title in TASKS.items():
        if task not in summary:
            continue
        s = summary[task]
        n = s["full"]["n"]
        metric = "mean KL(full || pruned) [95% bootstrap]" if task == "B" else "exact match % [95% Wilson]"
        out.append(f"\n### Task {task}: {title}; n = {n} {'passages' if task == 'B' else 'questions' if task == 'C' else 'cases'}; "
                   f"{metric}\n")
        out.append("| line | " + " | ".join(f"@{b:g}" for b in budgets) + " |")
        out.append("|" + "---|" * (1 + len(budgets)))
        out.append("| full | " + " | ".join([cell(s["full"], task)] * len(budgets)) + " |")
        for line in lines:
            cells = [cell(s.get(key(line, b)), task) for b in budgets]
            if any(c != "-" for c in cells):
                out.append(f"| {line} | " + " | ".join(cells) + " |")
        if task == "B":
            out.append("\nTop-1 agreement with the full cache (%): " + "; ".join(
                f"{line} " + "/".join(f"{s[key(line, b)]['top1']:.1f}" for b in budgets if key(line, b) in s)
                for line in lines if any(key(line, b) in s for b in budgets)))
    return "\n".join(out) + "\n"


def answer_forms(cases: List[Case], per_case: List[dict], lines: Sequence[str], budget: float) -> str:
    """A table of task R at `budget`, primed and free answers apart (the issue's independent set answered
    freely); empty without task R."""
    rows = []
    for line in ["full"] + list(lines):
        k = line if line == "full" else key(line, budget)
        cells = []
        for primed in (True, False):
            hits = [bool(r[k]["correct"]) for c, r in zip(cases, per_case) if c.task == "R" and c.primed == primed and k in r]
            cells.append(f"{100.0 * sum(hits) / len(hits):.1f} [{', '.join(f'{x:.1f}' for x in wilson(sum(hits), len(hits)))}]"
                         f" (n={len(hits)})" if hits else "-")
        if any(c != "-" for c in cells):
            rows.append(f"| {line} | " + " | ".join(cells) + " |")
    if len(rows) <= 1:
        return ""
    return (f"\n### Task R by answer form, budget {budget:g}; exact match % [95% Wilson]\n\n| line | primed | free (up to "
            f"{FREE_ANSWER_TOKENS} tokens) |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def flat_rows(summary: Dict[str, Dict[str, dict]]) -> List[dict]:
    rows = []
    for task, entries in summary.items():
        for k, e in entries.items():
            line, _, b = k.rpartition(" @")
            rows.append({"task": task, "line": line or k, "budget": float(b) if line else 1.0,
                         **{m: round(v, 5) if isinstance(v, float) else v for m, v in e.items()}})
    return rows


def plot(summary: Dict[str, Dict[str, dict]], lines: Sequence[str], budgets: Sequence[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in summary]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "kl" if task == "B" else "acc"
        for line in lines:
            pts = [(b, summary[task][key(line, b)][metric]) for b in budgets if key(line, b) in summary[task]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=line, linewidth=2.2 if line.startswith("csp (") else 1.2)
        if metric == "acc":
            ax.axhline(summary[task]["full"]["acc"], color="black", linestyle="--", linewidth=1, label="full")
        else:
            ax.set_yscale("log")
        ax.set_title(f"task {task}", fontsize=9)
        ax.set_xlabel("budget")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_peers(cases: List[Case], per_case: List[dict], path: str) -> Tuple[int, List[str]]:
    """Adds quality_peers.py's results (matched by case fingerprint) to `per_case`; returns the number of
    matched cases and the peer lines seen."""
    with open(path) as f:
        peers = json.load(f)
    by_fp = {c["fingerprint"]: c["results"] for c in peers["cases"]}
    matched, names = 0, []
    for case, res in zip(cases, per_case):
        theirs = by_fp.get(case.fingerprint())
        if theirs is None:
            continue
        matched += 1
        for k, v in theirs.items():
            if k == "full":
                continue
            res[k] = v
            line = k.rpartition(" @")[0]
            if line not in names:
                names.append(line)
    return matched, names


def earlier_results(cases: List[Case], paths: Sequence[str]) -> Tuple[List[dict], float]:
    """`--from-results`: each case's results from the quality.json files of earlier runs (matched by
    fingerprint; runs of other lines on the same case add their keys, a later file's key replaces an
    earlier one's), and the sum of their wall times; a case found in none of them is an error."""
    by_fp: Dict[str, dict] = {}
    sweep_s = 0.0
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        for c in run["cases"]:
            by_fp.setdefault(c["fingerprint"], {}).update(c["results"])
        sweep_s += run["wall_s"]
        for k, v in run["phases_s"].items():
            PHASES[k] = PHASES.get(k, 0.0) + v
    missing = [c for c in cases if c.fingerprint() not in by_fp]
    if missing:
        raise SystemExit(f"--from-results: {len(missing)} of {len(cases)} cases are in none of {list(paths)} "
                         f"(first: task {missing[0].task}); give the same --seed, case counts and lengths")
    return [by_fp[c.fingerprint()] for c in cases], sweep_s


# ----------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset (< 4 min), for the tests")
    for task, default in (("a", 100), ("r", 100), ("n", 100), ("c", 100), ("b", 100)):
        p.add_argument(f"--cases-{task}", type=int, default=None, help=f"task {task.upper()} cases (default {default})")
        p.add_argument(f"--lengths-{task}", type=int, nargs="+", default=None,
                       help=f"task {task.upper()} prompt lengths in tokens, used in turn")
    p.add_argument("--distractors", type=int, default=15, help="task N: distractor records (default 15)")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="default 0.1 0.2 0.3 0.5")
    p.add_argument("--compress-check", type=float, nargs="*", default=None,
                   help="task C budgets at which cspkv.compress answers too (default 0.3, else the first budget)")
    p.add_argument("--lines", nargs="+", default=None, help="run only these lines (default: all)")
    p.add_argument("--line", action="append", default=[], metavar="'NAME:field=value,...'",
                   help="an extra line: CSPConfig fields (window=64,recent=64,policy=snapkv) and policy fields "
                        "(pool=7,cross_ratio=0.5)")
    p.add_argument("--from-results", nargs="+", default=None, metavar="QUALITY_JSON",
                   help="report without running: per-case results of earlier runs (same seed; e.g. tasks or lines "
                        "split over processes), matched to this run's cases by fingerprint")
    p.add_argument("--peers", default=None, help="quality-peers.json of benchmarks/quality_peers.py on the same cases")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a model directory or .gguf file instead of the embedded SmolLM2")
    p.add_argument("--out", default=RESULTS, help="folder of quality.{md,json,png}")
    return p


def settings(args) -> dict:
    """Case counts, lengths and budgets from the arguments (shared with quality_peers.py)."""
    quick = args.quick
    counts = {"A": (2, 100), "R": (2, 100), "N": (2, 100), "C": (1, 100), "B": (2, 100)}
    lengths = {"A": ((1024,), (1024, 1536, 2048, 3072, 4096)), "R": ((1024,), (1024, 2048, 4096)),
               "N": ((1024,), (1024, 2048)), "C": ((1024,), (1024, 2048)), "B": ((1024,), (1024, 1536, 2048))}
    out = {"counts": {}, "lengths": {}}
    for t in TASKS:
        given = getattr(args, f"cases_{t.lower()}")
        out["counts"][t] = given if given is not None else counts[t][0 if quick else 1]
        out["lengths"][t] = tuple(getattr(args, f"lengths_{t.lower()}") or lengths[t][0 if quick else 1])
    out["budgets"] = tuple(args.budgets or ((0.2,) if quick else (0.1, 0.2, 0.3, 0.5)))
    return out


def load(args):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*compiled kernels unavailable.*")
    from cspkv.hf.smollm2 import load_causal_lm, smollm2_gguf

    path = args.model or smollm2_gguf()
    tokenizer, model = load_causal_lm(path)
    return path, tokenizer, model


def span(cases: List[Case], task: str) -> str:
    lengths = [c.input_ids.shape[1] + (c.questions[0].shape[1] if c.questions else 0) for c in cases if c.task == task]
    return f"{min(lengths)}-{max(lengths)}" if lengths else "-"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    quick = args.quick
    st = settings(args)
    budgets = st["budgets"]
    backend = ops.backend("cpu")
    if backend != "kernel":
        print(f"note: cspkv ops run the pure-torch reference ({ops.extension_error()}); slower", flush=True)
    from tqdm import tqdm

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    path, tokenizer, model = load(args)
    loaded = time.perf_counter() - started
    cases = build_cases(tokenizer, english_passages(), seed=args.seed, counts=st["counts"], lengths=st["lengths"],
                        distractors=args.distractors)

    extra = {}
    for spec in args.line:
        name, fields_ = parse_line(spec)
        extra[name] = resolve_fields(fields_)
    all_lines = {**LINES, **extra}
    lines = [line for line in all_lines if line in extra or args.lines is None or line in args.lines]
    configs = {}
    for line in lines:
        for b in budgets:
            configs[key(line, b)] = line_config(line, b, extra)
    one_segment = [key(l, b) for l in lines if l in ONE_SEGMENT for b in budgets]
    compress_check = () if CSP_LINE not in lines else tuple(
        args.compress_check if args.compress_check is not None else (0.3,) if 0.3 in budgets else budgets[:1])
    print(f"{os.path.basename(path)}: " + ", ".join(f"{t} {st['counts'][t]} cases ({span(cases, t)} tokens)" for t in TASKS)
          + f"; {len(lines)} lines x {len(budgets)} budgets; ops: {backend}; {torch.get_num_threads()} threads", flush=True)

    sweep_started = time.perf_counter()
    if args.from_results:
        per_case, sweep_s = earlier_results(cases, args.from_results)
    else:
        per_case = [run_case(model, tokenizer, case, configs, one_segment, compress_check)
                    for case in tqdm(cases, desc="cases", unit="case", file=sys.stdout, mininterval=10)]
        sweep_s = time.perf_counter() - sweep_started
    print("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(PHASES.items())), flush=True)

    peer_note = ""
    shown = list(lines) + ([CSP_LINE + " via compress"] if compress_check else [])
    if args.peers:
        matched, names = merge_peers(cases, per_case, args.peers)
        shown += names
        peer_note = (f" kvpress lines from {os.path.basename(args.peers)} (benchmarks/quality_peers.py, same cases by "
                     f"fingerprint: {matched} of {len(cases)} matched).")
    summary = aggregate(cases, per_case)
    checks = targets(summary, budgets)
    total_s = time.perf_counter() - started
    default = CSPConfig()
    dp = default.policy
    header = (
        f"# Quality: CSP vs baselines on {os.path.basename(path)}\n\n"
        + "Tasks: " + "; ".join(f"{t}, {TASKS[t]}: {st['counts'][t]} {'contexts x 3 questions' if t == 'C' else 'passages' if t == 'B' else 'cases'}, "
                                f"{span(cases, t)} tokens" for t in TASKS if st["counts"][t]) + ". "
        f"Task N: {args.distractors} distractors. Prompts: English from pydoc_data.topics and made-up records (seed "
        f"{args.seed}). The last prompt token is held back and fed over the pruned cache (task C: the whole question "
        f"chunk, after the context was pruned without it); nothing after the prompt is pruned (later_prefill off). "
        f"Every pruned cache is built by the library's score_layer + select_and_compact on the captured prefill "
        f"(tests/test_benchmarks.py checks it equals cspkv.patched's). `{CSP_LINE}` = CSPConfig(budget=b): "
        f"window={default.window} (10% of the prompt, at most 64 tokens), recent={default.recent} (= window), "
        f"n={dp.n:g}, decode_n={default.decode_n:g}, cross_ratio={dp.cross_ratio}, pool={dp.pool}; baselines at their "
        f"defaults (same window); `csp w=0.1`: window = recent = 10% of the prompt. Task R: every other answer "
        f"unprimed ({FREE_ANSWER_TOKENS} new tokens). "
        f"Accuracy: exact match, 95% Wilson interval (task C: questions of one context share it, so its interval is "
        f"somewhat too narrow); KL: mean over the 64 steps, 95% bootstrap over passages.{peer_note} "
        f"{'QUICK SUBSET. ' if quick else ''}Device: {device_description(torch.device('cpu'))}; ops: {backend}. "
        + (f"Per-case results of {len(args.from_results)} earlier runs (--from-results), {sweep_s / 60:.1f} min of "
           f"wall time summed over them." if args.from_results
           else f"Load average at start {load_at_start:.1f}. Wall time: {total_s / 60:.1f} min (model load "
                f"{loaded:.0f} s, sweep {sweep_s / 60:.1f} min)."))
    tables = task_tables(summary, shown, budgets) + answer_forms(cases, per_case, shown, 0.2)
    extra_md = ("\n## Tasks x lines x budgets\n" + tables
                + "\nTargets as HOLDS / MISSED:\n\n"
                + "\n".join(f"- {'HOLDS' if ok else 'MISSED'} {what}: {detail}" for what, ok, detail in checks) + "\n")
    os.makedirs(args.out, exist_ok=True)
    target_rows = [{"target": w, "status": "HOLDS" if ok else "MISSED", "detail": d} for w, ok, d in checks]
    write_results("quality", header, target_rows, ["target", "status", "detail"], extra_md=extra_md, folder=args.out,
                  extra_json={"results": flat_rows(summary), "lines": {l: {k: str(v) for k, v in all_lines[l].items()}
                                                                       for l in lines},
                              "wall_s": sweep_s if args.from_results else total_s, "phases_s": PHASES, "backend": backend,
                              "quick": quick,
                              "budgets": budgets, "counts": st["counts"], "lengths": st["lengths"],
                              "cases": [{"task": c.task, "tokens": c.input_ids.shape[1], "fingerprint": c.fingerprint(),
                                         "records": c.records, "depth": round(c.depth, 3), "primed": c.primed, "results": r}
                                        for c, r in zip(cases, per_case)]})
    plot(summary, shown, budgets, os.path.join(args.out, "quality.png"), f"{os.path.basename(path)}, seed {args.seed}")
    print(tables)
    print("targets:")
    for what, ok, detail in checks:
        print(f"  {'HOLDS' if ok else 'MISSED'}  {what}: {detail}")
    print(f"\nwrote {args.out}/quality.{{md,json,png}} in {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
