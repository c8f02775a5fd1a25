"""Quality of CSP across turns and during long generations (SmolLM2-135M-Instruct, CPU).

Three ways of using a pruned cache beyond one prompt and a short answer, each
next to the full cache and to the first-chunk-only behaviour:

1. Two-turn retrieval. Turn 1 is a long user message (prose with three
   one-line records, "The locker number is 417.") and a fixed assistant reply;
   turn 2 is a second long user message (more prose, three more records) that
   ends with a question about one record, half the cases about a turn-1
   record and half about a turn-2 record. Turn 2 is fed as a continuation of
   turn 1's returned cache. Lines: the full cache, and CSP with
   `later_prefill` "off" (turn 2 kept whole), "chunk" and "total". Metrics:
   exact match (the greedy answer contains the number) and the stored KV
   bytes after turn 2.
2. Compress once, ask many. A context (prose with three records, no
   question) is compressed once with `cspkv.compress`; three questions, each
   about a different record, are answered from `context.cache()` copies.
   Compared with the question inside the prompt (query-aware, ordinary
   pruning) and the full cache.
3. Long-generation KL. A prose prompt, then continuation tokens teacher-forced
   one token per forward over the pruned cache, so that decode-time
   compression (`decode_budget`) triggers. KL(full || pruned) of the
   next-token distributions per step, averaged over all steps and per
   128-step bucket (drift), decode compression off vs `decode_budget` values.

Segments are CSP's modalities, as in benchmarks/quality.py: instructions,
questions and chat scaffolding 0, records 1, prose 2 (tasks 1 and 2);
passage index (task 3). The last prompt token before an answer is held back and
fed over the pruned cache, as in quality.py, so the first answer token is not
computed before pruning.

    python benchmarks/quality_turns.py            # default run (about 25 min on 2 cores)
    python benchmarks/quality_turns.py --quick    # a small subset (< 3 min), run by the tests

Every run also checks itself: each line whose budget keeps everything (budget
1.0, a decode budget never reached) must answer like the full cache (task 3:
KL below 1e-4); a failed check exits with status 1.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

# Idle OpenMP threads sleep instead of spinning: on a shared VM whose cores are busy, two spinning
# threads made a decode step of this 135M model 8x slower than one thread (the results are the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cspkv  # noqa: E402
from cspkv import CSPConfig, ops  # noqa: E402
from cspkv.demo import english_passages  # noqa: E402
from cspkv.hf.smollm2 import kv_nbytes  # noqa: E402
from cspkv.pruning.budget import window_count  # noqa: E402
from common import RESULTS, bootstrap_mean, device_description, wilson, write_results  # noqa: E402
from quality import (  # noqa: E402  the retrieval pieces and the capture path of the quality benchmark
    ANSWER_TOKENS, INSTRUCTION, PROSE, RECORDS, THINGS, Prefill, _dynamic_cache, _prose, capturing_queries, greedy,
    pruned_cache, pruned_kv,
)

STEM = "quality-turns"
MODES = ("off", "chunk", "total")  # CSPConfig.later_prefill
BUCKET = 128  # task 3: steps per drift bucket
KL_MATCH = 1e-4  # task 3: a line that keeps everything must stay below this mean KL
MiB = float(1 << 20)
PHASES: Dict[str, float] = {}


def _forward_kw(model) -> str:
    """The name of the cache argument of the model's forward: `cache` (transformers 5.x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


# ----------------------------------------------------------------------------- prompts
class Template:
    """The chat template split into the pieces around one or two user messages."""

    def __init__(self, tokenizer, reply: str = "OK, I have read it."):
        a, b = "\x00CSPKV_A\x00", "\x00CSPKV_B\x00"
        one = tokenizer.apply_chat_template([{"role": "user", "content": a}, {"role": "assistant", "content": reply}],
                                            tokenize=False)
        two = tokenizer.apply_chat_template([{"role": "user", "content": a}, {"role": "assistant", "content": reply},
                                             {"role": "user", "content": b}], tokenize=False, add_generation_prompt=True)
        single = tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False, add_generation_prompt=True)
        if not two.startswith(one) or one.count(a) != 1 or two.count(b) != 1:
            raise SystemExit("quality_turns: the chat template does not render turns as consecutive pieces")
        self.head1, self.tail1 = one.split(a)  # turn 1: user message + the assistant's fixed reply
        self.head2, self.tail2 = two[len(one):].split(b)  # turn 2: user message + generation prompt
        self.head, self.tail = single.split(a)  # one user message + generation prompt


def tokens(tokenizer, pieces: Sequence[Tuple[str, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[1, L] ids and segment ids of `pieces`, each piece tokenised on its own (as cspkv.hf.prompts.chat_prompt)."""
    ids: List[int] = []
    seg: List[int] = []
    for text, segment in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        seg += [segment] * len(piece)
    return torch.tensor([ids]), torch.tensor([seg])


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prose(tokenizer, passages, rng, tokens: int) -> str:
    """quality.py's `_prose` (whole passages, the last one cut at a sentence end), its overshoot (up to a
    long sentence) trimmed: the longest run of whole words within `tokens` tokens, ended at its last
    sentence end when that keeps at least 90% of it."""
    text = _prose(tokenizer, passages, rng, tokens)
    if _count(tokenizer, text) <= tokens:
        return text
    words = text.split(" ")
    lo, hi = 1, len(words)  # the longest prefix of words within the budget: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, " ".join(words[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo]).rstrip(".,;:")
    end = text.rfind(". ")
    return text[:end + 1] if end >= 0.9 * len(text) else text + "."


def records_in_prose(tokenizer, passages, rng, lines: Sequence[str], prose_tokens: int) -> List[Tuple[str, int]]:
    """`prose_tokens` of prose with `lines` at spread depths (the middles of equal slices, jittered by a
    quarter slice), as (text, segment) pieces."""
    n = len(lines)
    at = [(j + 0.5 + rng.uniform(-0.25, 0.25)) / n for j in range(n)]
    pieces, previous = [], 0.0
    for line, depth in zip(lines, at):
        pieces.append((prose(tokenizer, passages, rng, max(8, int(prose_tokens * (depth - previous)))) + " ", PROSE))
        pieces.append((line + " ", RECORDS))
        previous = depth
    pieces.append((prose(tokenizer, passages, rng, max(8, int(prose_tokens * (1.0 - previous)))), PROSE))
    return pieces


def _records(rng, keys: Sequence[str]) -> Tuple[List[str], List[int]]:
    values = rng.sample(range(100, 1000), len(keys))
    return [f"The {k} number is {v}." for k, v in zip(keys, values)], values


@dataclass
class TurnCase:
    """Task 1: turn 1 and turn 2 ([1, L1], [1, L2] ids and segments); turn 2 ends with the question
    and the primed answer ("The <key> number is")."""

    turn1: torch.Tensor
    seg1: torch.Tensor
    turn2: torch.Tensor
    seg2: torch.Tensor
    answer: str
    asked_turn: int  # 1 or 2


def two_turn_case(tokenizer, passages, template: Template, *, seed: int, turn1_tokens: int, turn2_tokens: int,
                  asked_turn: int, records: int = 3) -> TurnCase:
    rng = random.Random(seed)
    keys = rng.sample(THINGS, 2 * records)
    lines, values = _records(rng, keys)
    asked = (0 if asked_turn == 1 else records) + rng.randrange(records)
    intro1 = "Read the text below. I will ask about it later.\n\n"
    intro2 = "Here is more text.\n\n"
    question = f"\n\nQuestion: what is the {keys[asked]} number?"
    prime = f"The {keys[asked]} number is"
    fixed1 = sum(_count(tokenizer, t) for t in [template.head1, intro1, template.tail1] + lines[:records]) + 2 * records
    fixed2 = sum(_count(tokenizer, t) for t in [template.head2, intro2, question, template.tail2, prime]
                 + lines[records:]) + 2 * records
    turn1 = tokens(tokenizer, [(template.head1, INSTRUCTION), (intro1, INSTRUCTION),
                               *records_in_prose(tokenizer, passages, rng, lines[:records], turn1_tokens - fixed1),
                               (template.tail1, INSTRUCTION)])
    turn2 = tokens(tokenizer, [(template.head2, INSTRUCTION), (intro2, INSTRUCTION),
                               *records_in_prose(tokenizer, passages, rng, lines[records:], turn2_tokens - fixed2),
                               (question, INSTRUCTION), (template.tail2, INSTRUCTION), (prime, INSTRUCTION)])
    return TurnCase(turn1[0], turn1[1], turn2[0], turn2[1], str(values[asked]), asked_turn)


@dataclass
class ContextCase:
    """Task 2: a context [1, L] without question, and per record a question chunk [1, T] (question,
    generation prompt and primed answer) with its answer."""

    context: torch.Tensor
    seg: torch.Tensor
    questions: List[torch.Tensor]
    answers: List[str]


def context_case(tokenizer, passages, template: Template, *, seed: int, context_tokens: int, records: int = 3) -> ContextCase:
    rng = random.Random(seed)
    keys = rng.sample(THINGS, records)
    lines, values = _records(rng, keys)
    intro = "Read the text below, then answer the question.\n\n"
    fixed = sum(_count(tokenizer, t) for t in [template.head, intro] + lines) + 2 * records + 2
    context = tokens(tokenizer, [(template.head, INSTRUCTION), (intro, INSTRUCTION),
                                 *records_in_prose(tokenizer, passages, rng, lines, context_tokens - fixed),
                                 ("\n\n", PROSE)])
    questions = [tokens(tokenizer, [(f"Question: what is the {k} number?", INSTRUCTION), (template.tail, INSTRUCTION),
                                    (f"The {k} number is", INSTRUCTION)])[0] for k in keys]
    return ContextCase(context[0], context[1], questions, [str(v) for v in values])


def passage_stream(tokenizer, passages, *, seed: int, total: int) -> Tuple[List[int], List[int]]:
    """Task 3: `total` tokens of whole passages one after the other (as quality.py's task B) and each
    token's passage index."""
    rng = random.Random(seed)
    ids: List[int] = []
    seg: List[int] = []
    index = 0
    while len(ids) < total:
        piece = tokenizer(("\n\n" if ids else "") + passages[rng.randrange(len(passages))], add_special_tokens=False)["input_ids"]
        ids += piece
        seg += [index] * len(piece)
        index += 1
    return ids[:total], seg[:total]


# ----------------------------------------------------------------------------- task 1: two turns
def answer_text(tokenizer, row: Sequence[int]) -> str:
    return tokenizer.decode(list(row), skip_special_tokens=True).strip()


def run_two_turn(model, tokenizer, case: TurnCase, budgets: Sequence[float], stop: set, kw: str, *,
                 full: bool = True, fresh: bool = False) -> Dict[str, dict]:
    """Results per line label: {"answer", "correct", "bytes"} (bytes stored after turn 2, before the held-back token).

    For each budget, turn 1 is prefilled once under one patch and each later_prefill mode continues a
    deep copy of its cache, the patch's config switched to that mode (turn 1 does not depend on it;
    --quick checks this against a fresh patch per mode). `fresh` runs each mode from scratch instead;
    `full` adds the full cache's line.
    """
    results: Dict[str, dict] = {}
    last, chunk, chunk_seg = case.turn2[:, -1:], case.turn2[:, :-1], case.seg2[:, :-1]

    def finish(name: str, cache) -> None:
        stored = kv_nbytes(cache)
        text = answer_text(tokenizer, greedy(model, cache, last, ANSWER_TOKENS, stop)[0].tolist())
        results[name] = {"answer": text[:30], "correct": case.answer in text, "bytes": stored}

    if full:
        with phase("task 1 full"), torch.inference_mode():
            cache = _dynamic_cache(model)
            model(input_ids=case.turn1, use_cache=True, logits_to_keep=1, **{kw: cache})
            model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{kw: cache})
            finish("full", cache)
    for budget in budgets:
        base = CSPConfig(budget=budget, later_prefill=MODES[0])
        with phase("task 1 csp"), cspkv.patched(model, base) as handle:
            def turn_one():
                first = _dynamic_cache(model)
                with cspkv.modalities(model, case.seg1), torch.inference_mode():
                    model(input_ids=case.turn1, use_cache=True, logits_to_keep=1, **{kw: first})
                return first

            shared = None if fresh else turn_one()
            try:
                for mode in MODES:
                    handle.config = base.replace(later_prefill=mode)
                    with torch.inference_mode():
                        cache = turn_one() if fresh else copy.deepcopy(shared)
                    with cspkv.modalities(model, chunk_seg), torch.inference_mode():
                        model(input_ids=chunk, use_cache=True, logits_to_keep=1, **{kw: cache})
                    finish(turn_label(mode, budget), cache)
            finally:
                handle.config = base
    return results


def turn_label(mode: str, budget: float) -> str:
    return f"later_prefill={mode} b={budget}"


# ----------------------------------------------------------------------------- task 2: compress once
def question_prefills(model, case: ContextCase, kw: str) -> List[Prefill]:
    """Per question, quality.py's `Prefill` of context + question without its last token (keys, values,
    post-RoPE queries of every layer): the context is prefilled once, each question continues a copy
    of its cache (causal attention: the same keys and queries as one prefill of the whole prompt)."""
    store: dict = {}
    cache = _dynamic_cache(model)
    with capturing_queries(model, store), torch.inference_mode():
        model(input_ids=case.context, use_cache=True, logits_to_keep=1, **{kw: cache})
    context_queries = {i: q for i, (q, _) in store.items()}
    out = []
    for question in case.questions:
        store = {}
        with torch.inference_mode():
            copy_ = copy.deepcopy(cache)
        with capturing_queries(model, store), torch.inference_mode():
            model(input_ids=question[:, :-1], use_cache=True, logits_to_keep=1, **{kw: copy_})
        n = len(copy_.layers)
        seg = torch.cat([case.seg, torch.full_like(question[:, :-1], INSTRUCTION)], dim=1)
        out.append(Prefill(keys=[copy_.layers[i].keys for i in range(n)], values=[copy_.layers[i].values for i in range(n)],
                           queries=[torch.cat([context_queries[i], store[i][0]], dim=2) for i in range(n)],
                           scaling=[float(store[i][1]) for i in range(n)], k_mod=seg.long()))
    return out


def run_context(model, tokenizer, case: ContextCase, budgets: Sequence[float], stop: set, kw: str) -> Dict[str, List[dict]]:
    """Per line label, one {"answer", "correct", "bytes"} per question (bytes: the context's stored KV)."""
    results: Dict[str, List[dict]] = {}

    def add(name: str, row: Sequence[int], answer: str, stored: int) -> None:
        text = answer_text(tokenizer, row)
        results.setdefault(name, []).append({"answer": text[:30], "correct": answer in text, "bytes": stored})

    # Full cache and query-aware pruning: quality.py's capture path (the library's score_layer +
    # select_and_compact per budget on captured queries; tests/test_benchmarks.py checks that it keeps
    # what cspkv.patched keeps), last prompt token held back. All budgets answer as one batch (dead
    # slots fill the smaller rows).
    with phase("task 2 prefill (full, query-aware)"):
        prefills = question_prefills(model, case, kw)
    for question, answer, pre in zip(case.questions, case.answers, prefills):
        last = question[:, -1:]
        with phase("task 2 full"):
            cache = _dynamic_cache(model, pre.keys, pre.values)
            add("full", greedy(model, cache, last, ANSWER_TOKENS, stop)[0].tolist(), answer, kv_nbytes(cache))
        with phase("task 2 query-aware"):
            rows = [pruned_kv(pre, CSPConfig(budget=b)) for b in budgets]
            with cspkv.patched(model, CSPConfig()) as handle:
                out = greedy(model, pruned_cache(model, rows, pre.k_mod.shape[1], handle.liveness),
                             last.expand(len(rows), 1), ANSWER_TOKENS, stop)
            for b, kept, row in zip(budgets, rows, out.tolist()):
                stored = sum(k.keys.numel() * k.keys.element_size() + k.values.numel() * k.values.element_size() for k in kept)
                add(f"query-aware b={b}", row, answer, stored)
    # Compress once: cspkv.compress without the question, then each question over a copy of its cache.
    for b in budgets:
        with phase("task 2 compress-once"), cspkv.patched(model, budget=b):
            with torch.inference_mode():
                context = cspkv.compress(model, case.context, modality_ids=case.seg)
            stored = kv_nbytes(context.cache())
            for question, answer in zip(case.questions, case.answers):
                with torch.inference_mode():
                    cache = context.cache()
                    logits = model(input_ids=question, use_cache=True, **{kw: cache}).logits[:, -1]
                    first = logits.argmax(-1, keepdim=True)
                    rest = greedy(model, cache, first, ANSWER_TOKENS - 1, stop)
                add(f"compress-once b={b}", torch.cat([first, rest], 1)[0].tolist(), answer, stored)
    return results


# ----------------------------------------------------------------------------- task 3: long generation
@dataclass
class DecodeLine:
    name: str
    budget: float
    decode_budget: Optional[int]


def run_generation(model, prompts: torch.Tensor, segs: torch.Tensor, conts: torch.Tensor, lines: Sequence[DecodeLine],
                   decode_interval: int, decode_window: int, kw: str, desc: str) -> Dict[str, dict]:
    """Per line: KL(full || pruned) [N, C] and top-1 agreement [N, C] of each step, stored bytes per
    passage at the end, decode-time compressions per layer. The passages run as one batch of N rows
    (equal lengths, no padding); the pruned lines feed one token per forward."""
    from tqdm import tqdm

    N, C = conts.shape
    held, last = prompts[:, :-1], prompts[:, -1:]
    steps = torch.cat([last, conts[:, :-1]], dim=1)  # the token fed at each step
    full_lp = []
    with phase("task 3 full"), torch.inference_mode():
        for i in range(N):  # one row at a time: [1, C, V] float32 log-probabilities
            cache = _dynamic_cache(model)
            model(input_ids=held[i:i + 1], use_cache=True, logits_to_keep=1, **{kw: cache})
            logits = model(input_ids=steps[i:i + 1], use_cache=True, **{kw: cache}).logits
            full_lp.append(torch.log_softmax(logits.float(), -1)[0])
        full_bytes = kv_nbytes(cache)
    full_lp = torch.stack(full_lp)  # [N, C, V]
    out: Dict[str, dict] = {}
    for line in lines:
        settings = dict(budget=line.budget, decode_budget=line.decode_budget, decode_interval=decode_interval,
                        decode_window=min(decode_window, line.decode_budget or decode_window))
        kl = torch.zeros(N, C, dtype=torch.float64)
        top1 = torch.zeros(N, C, dtype=torch.float64)
        with phase("task 3 csp"), cspkv.patched(model, **settings) as handle, torch.inference_mode():
            cache = _dynamic_cache(model)
            with cspkv.modalities(model, segs[:, :-1]):
                model(input_ids=held, use_cache=True, logits_to_keep=1, **{kw: cache})
            for t in tqdm(range(C), desc=f"{desc} {line.name}", unit="step", file=sys.stdout, mininterval=10, leave=False):
                lp = torch.log_softmax(model(input_ids=steps[:, t:t + 1], use_cache=True, **{kw: cache}).logits[:, -1].float(), -1)
                ref = full_lp[:, t]
                kl[:, t] = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0).double()
                top1[:, t] = (lp.argmax(-1) == ref.argmax(-1)).double()
            compressions = [s.get("decode_compressions") or 0 for s in handle.stats()["layers"].values() if s.get("pruned")]
        out[line.name] = {"kl": kl, "top1": top1, "bytes": kv_nbytes(cache) / N,
                          "compressions": max(compressions, default=0)}
    out["full"] = {"kl": torch.zeros(N, C, dtype=torch.float64), "top1": torch.ones(N, C, dtype=torch.float64),
                   "bytes": full_bytes, "compressions": 0}
    return out


# ----------------------------------------------------------------------------- helpers
class phase:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        PHASES[self.name] = PHASES.get(self.name, 0.0) + time.perf_counter() - self.start


def acc_entry(outcomes: Sequence[dict]) -> dict:
    n = len(outcomes)
    k = sum(bool(o["correct"]) for o in outcomes)
    lo, hi = wilson(k, n)
    return {"n": n, "acc": 100.0 * k / n if n else float("nan"), "acc_lo": lo, "acc_hi": hi,
            "kv_mib": sum(o["bytes"] for o in outcomes) / max(n, 1) / MiB}


def ci(lo: float, hi: float, digits: int = 1) -> str:
    if math.isnan(lo):
        return "-"
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join([f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
                     + [f"| {' | '.join(map(str, r))} |" for r in rows])


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (< 3 min), for the tests")
    parser.add_argument("--turn-cases", type=int, default=None, help="task 1 cases (default 40; quick 2)")
    parser.add_argument("--contexts", type=int, default=None, help="task 2 contexts, 3 questions each (default 30; quick 1)")
    parser.add_argument("--passages", type=int, default=None, help="task 3 passages (default 10; quick 2)")
    parser.add_argument("--turn-budgets", type=float, nargs="+", default=None, help="task 1 budgets (default 0.2 0.3)")
    parser.add_argument("--context-budgets", type=float, nargs="+", default=None, help="task 2 budgets (default 0.2 0.3 0.5)")
    parser.add_argument("--decode-budgets", type=int, nargs="+", default=None, help="task 3 decode budgets (default 128 256)")
    parser.add_argument("--check-cases", type=int, default=None,
                        help="cases (task 3: passages) per task that also run the keep-everything lines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a model directory or .gguf file instead of the embedded SmolLM2")
    parser.add_argument("--out", default=RESULTS, help=f"folder of {STEM}.{{md,json,png}}")
    args = parser.parse_args(argv)

    quick = args.quick
    n1 = args.turn_cases if args.turn_cases is not None else (2 if quick else 40)
    n2 = args.contexts if args.contexts is not None else (1 if quick else 30)
    n3 = args.passages if args.passages is not None else (2 if quick else 10)
    budgets1 = tuple(args.turn_budgets or ((0.3,) if quick else (0.2, 0.3)))
    budgets2 = tuple(args.context_budgets or ((0.3,) if quick else (0.2, 0.3, 0.5)))
    decode_budgets = tuple(args.decode_budgets or ((48,) if quick else (128, 256)))
    turn1_tokens, turn2_tokens = (448, 320) if quick else (1536, 1024)
    context_tokens = 448 if quick else 1536
    prompt_tokens, continuation = (256, 64) if quick else (1024, 512)
    decode_interval, decode_window = (16, 8) if quick else (64, 16)
    check_steps = continuation if quick else min(continuation, 256)  # task 3's keep-everything lines
    prompt_budget = 0.3
    if args.check_cases is None:
        args.check_cases = 1 if quick else 2
    checks_n = lambda n: min(args.check_cases, n)  # noqa: E731

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*compiled kernels unavailable.*")
    backend = ops.backend("cpu")
    if backend != "kernel":
        print(f"note: cspkv ops run the pure-torch reference ({ops.extension_error()}); slower", flush=True)

    from cspkv.hf.smollm2 import load_causal_lm, smollm2_gguf
    from tqdm import tqdm

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    path = args.model or smollm2_gguf()
    tokenizer, model = load_causal_lm(path)
    loaded = time.perf_counter() - started
    kw = _forward_kw(model)
    passages = english_passages()
    template = Template(tokenizer)
    stop = {tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False)["input_ids"]}
    default = CSPConfig()
    print(f"{os.path.basename(path)}: task 1 {n1} two-turn cases (~{turn1_tokens} + ~{turn2_tokens} tokens, budgets "
          f"{budgets1}), task 2 {n2} contexts x 3 questions (~{context_tokens} tokens, budgets {budgets2}), task 3 {n3} "
          f"passages ({prompt_tokens} + {continuation} tokens, decode budgets {decode_budgets}); ops {backend}; "
          f"{torch.get_num_threads()} threads", flush=True)
    failures: List[str] = []
    timings: Dict[str, float] = {}

    # ---- task 1
    t0 = time.perf_counter()
    cases1 = [two_turn_case(tokenizer, passages, template, seed=args.seed * 100003 + i, turn1_tokens=turn1_tokens,
                            turn2_tokens=turn2_tokens, asked_turn=1 + i % 2) for i in range(n1)]
    per1: List[Dict[str, dict]] = []
    for i, case in enumerate(tqdm(cases1, desc="task 1 (two turns)", unit="case", file=sys.stdout, mininterval=10)):
        result = run_two_turn(model, tokenizer, case, budgets1, stop, kw)
        if i < checks_n(n1):
            everything = run_two_turn(model, tokenizer, case, (1.0,), stop, kw, full=False)
            for mode in MODES:
                got, want = everything[turn_label(mode, 1.0)]["answer"], result["full"]["answer"]
                if got != want:
                    failures.append(f"task 1 case {i}: later_prefill={mode} at budget 1.0 answered {got!r}, the full cache {want!r}")
            result.update(everything)
        if quick and i == 0:  # the shared turn 1 + switched config equals a fresh patch per mode
            fresh = run_two_turn(model, tokenizer, case, budgets1[:1], stop, kw, full=False, fresh=True)
            for mode in MODES:
                name = turn_label(mode, budgets1[0])
                if (fresh[name]["answer"], fresh[name]["bytes"]) != (result[name]["answer"], result[name]["bytes"]):
                    failures.append(f"task 1: {name} with a shared turn 1 gave {result[name]}, a fresh patch {fresh[name]}")
        per1.append(result)
    timings["task 1"] = time.perf_counter() - t0

    # ---- task 2
    t0 = time.perf_counter()
    cases2 = [context_case(tokenizer, passages, template, seed=args.seed * 100003 + 50000 + i,
                           context_tokens=context_tokens) for i in range(n2)]
    per2: List[Dict[str, List[dict]]] = []
    for i, case in enumerate(tqdm(cases2, desc="task 2 (compress once)", unit="context", file=sys.stdout, mininterval=10)):
        result = run_context(model, tokenizer, case, budgets2 + ((1.0,) if i < checks_n(n2) else ()), stop, kw)
        if i < checks_n(n2):
            for line in ("query-aware", "compress-once"):
                got = [o["answer"] for o in result.pop(f"{line} b=1.0")]
                want = [o["answer"] for o in result["full"]]
                if got != want:
                    failures.append(f"task 2 context {i}: {line} at budget 1.0 answered {got}, the full cache {want}")
                result.setdefault("checks", []).append({"line": f"{line} b=1.0", "answers": got, "full": want})
        per2.append(result)
    timings["task 2"] = time.perf_counter() - t0

    # ---- task 3
    t0 = time.perf_counter()
    streams = [passage_stream(tokenizer, passages, seed=args.seed * 100003 + 90000 + i, total=prompt_tokens + continuation)
               for i in range(n3)]
    ids = torch.tensor([s[0] for s in streams])
    segs = torch.tensor([s[1] for s in streams])
    prompts, conts, prompt_segs = ids[:, :prompt_tokens], ids[:, prompt_tokens:], segs[:, :prompt_tokens]
    lines3 = [DecodeLine("decode off", prompt_budget, None)] + [DecodeLine(f"decode_budget={d}", prompt_budget, d)
                                                               for d in decode_budgets]
    print(f"task 3: {n3} passages as one batch, {len(lines3)} pruned lines x {continuation} steps", flush=True)
    gen = run_generation(model, prompts, prompt_segs, conts, lines3, decode_interval, decode_window, kw, "task 3")
    k3 = checks_n(n3)
    big = prompt_tokens + continuation + decode_interval  # a decode budget never reached
    check_lines = [DecodeLine("budget 1.0, decode off", 1.0, None), DecodeLine(f"budget 1.0, decode_budget={big}", 1.0, big)]
    gen_checks = run_generation(model, prompts[:k3], prompt_segs[:k3], conts[:k3, :check_steps], check_lines, decode_interval,
                                decode_window, kw, "task 3 check")
    for line in check_lines:
        worst = float(gen_checks[line.name]["kl"].mean(1).max())
        if not worst < KL_MATCH:
            failures.append(f"task 3: {line.name} has mean KL {worst:.3g} against the full cache (>= {KL_MATCH})")
    for line in lines3[1:]:
        if gen[line.name]["compressions"] == 0:
            failures.append(f"task 3: {line.name} never compressed during {continuation} steps")
    timings["task 3"] = time.perf_counter() - t0
    total_s = time.perf_counter() - started

    # ---- aggregate
    rows: List[dict] = []
    full1 = acc_entry([r["full"] for r in per1])
    rows.append({"task": "1 two turns", "line": "full cache", "budget": 1.0, **_acc_cells(full1, full1)})
    by_turn = []
    for b in budgets1:
        for mode in MODES:
            name = turn_label(mode, b)
            entry = acc_entry([r[name] for r in per1])
            rows.append({"task": "1 two turns", "line": f"csp later_prefill={mode}" + (" (first chunk only)" if mode == "off" else ""),
                         "budget": b, **_acc_cells(entry, full1)})
    for name in ["full"] + [turn_label(m, b) for b in budgets1 for m in MODES]:
        cells = []
        for turn in (1, 2):
            e = acc_entry([r[name] for r, c in zip(per1, cases1) if c.asked_turn == turn])
            cells.append(f"{e['acc']:.1f} {ci(e['acc_lo'], e['acc_hi'])} (n={e['n']})")
        by_turn.append([name.replace("later_prefill=", "").replace(" b=", " @"), *cells])

    full2 = acc_entry([o for r in per2 for o in r["full"]])
    rows.append({"task": "2 compress once", "line": "full cache", "budget": 1.0, **_acc_cells(full2, full2)})
    for b in budgets2:
        for line in ("query-aware", "compress-once"):
            entry = acc_entry([o for r in per2 for o in r[f"{line} b={b}"]])
            rows.append({"task": "2 compress once", "line": "csp " + line, "budget": b, **_acc_cells(entry, full2)})

    buckets = list(range(0, continuation, BUCKET))
    full3_mib = gen["full"]["bytes"] / MiB
    bucket_rows = []
    for name in ["decode off"] + [f"decode_budget={d}" for d in decode_budgets]:
        g = gen[name]
        per_passage = g["kl"].mean(1).tolist()
        lo, hi = bootstrap_mean(per_passage, seed=args.seed)
        line_name = ("csp, decode compression off" if name == "decode off" else
                     f"csp {name} (interval {decode_interval}, window {decode_window})")
        rows.append({"task": "3 long generation", "line": line_name, "budget": prompt_budget, "n": n3,
                     "kl": float(g["kl"].mean()), "kl_ci": ci(lo, hi, 4), "top1": 100 * float(g["top1"].mean()),
                     "kv_mib": round(g["bytes"] / MiB, 2), "kv_vs_full": round(g["bytes"] / MiB / full3_mib, 3),
                     "decode_compressions": g["compressions"]})
        cells = []
        for start in buckets:
            vals = g["kl"][:, start:start + BUCKET].mean(1).tolist()
            blo, bhi = bootstrap_mean(vals, seed=args.seed)
            cells.append(f"{sum(vals) / len(vals):.4f} {ci(blo, bhi, 4)}")
        bucket_rows.append([name, *cells])
    rows.append({"task": "3 long generation", "line": "full cache", "budget": 1.0, "n": n3, "kl": 0.0, "top1": 100.0,
                 "kv_mib": round(full3_mib, 2), "kv_vs_full": 1.0})

    # ---- report
    check_md = [f"- task 1: budget 1.0 with later_prefill {', '.join(MODES)} answers like the full cache on "
                f"{checks_n(n1)} cases",
                f"- task 2: budget 1.0, query-aware and compress-once, answers like the full cache on {checks_n(n2)} contexts",
                *(f"- task 3: {line.name}: mean KL {float(gen_checks[line.name]['kl'].mean()):.2e} "
                  f"(max per passage {float(gen_checks[line.name]['kl'].mean(1).max()):.2e}) on {k3} passages x {check_steps} steps"
                  for line in check_lines)]
    if quick:
        check_md.append("- task 1: a shared turn 1 with the config switched per mode equals a fresh patch per mode")
    status = "all hold" if not failures else "FAILED:\n" + "\n".join(f"- {f}" for f in failures)
    header = (
        f"# Quality across turns, compress-once and long generations: CSP on {os.path.basename(path)}\n\n"
        f"Task 1, two-turn retrieval: {n1} cases. Turn 1 = a user message of {span(c.turn1 for c in cases1)} (prose from "
        f"pydoc_data.topics with 3 one-line records, \"The locker number is 417.\") and a fixed assistant reply; turn 2 = "
        f"{span(c.turn2 for c in cases1)} (more prose, 3 more records, then the question and the primed answer, \"The locker "
        f"number is\"). Half the cases ask about a turn-1 record, half about a turn-2 record. Turn 2 is fed as a "
        f"continuation of turn 1's returned cache; its last token is held back and fed over the (pruned) cache, then "
        f"{ANSWER_TOKENS} greedy tokens; exact match = the number appears in the answer. KV MiB = stored key + value "
        f"bytes after turn 2 (`cspkv.hf.cache.stored_bytes` per layer, free store slots included), per case. Turn 1 "
        f"is pruned once per budget and each `later_prefill` mode continues a copy of that cache (the patch's config "
        f"switched to the mode; --quick checks this equals a fresh patch per mode).\n\n"
        f"Task 2, compress once, ask many: {n2} contexts of {span(c.context for c in cases2)} (prose with 3 records, no "
        f"question) x 3 questions (one per record) = {3 * n2} questions. `compress-once`: `cspkv.compress` of the "
        f"context, then each question chunk over a `context.cache()` copy. `query-aware`: the question inside the "
        f"prompt, ordinary pruning (quality.py's capture path: one prefill, the library's score + select per budget, "
        f"last token held back). KV MiB = the context's stored KV (query-aware: the pruned prompt). The 3 questions of "
        f"a context share it, so the Wilson intervals (which assume independent questions) are somewhat too narrow.\n\n"
        f"Task 3, long generation: {n3} passages of {prompt_tokens} prompt tokens (whole passages, one segment each), "
        f"then {continuation} continuation tokens teacher-forced one token per forward (the {n3} passages as one batch, "
        f"equal lengths, no padding) over a cache pruned to {prompt_budget} of the prompt; mean KL(full || pruned) of "
        f"the next-token distributions over the {continuation} steps, 95% bootstrap interval over passages; decode "
        f"compression with decode_interval {decode_interval}, decode_window {decode_window}. The full cache's "
        f"distributions come from one forward over the continuation. KV MiB = stored at the end, per passage.\n\n"
        f"Settings: library defaults (policy csp, cross_ratio {default.policy.cross_ratio}, pool {default.policy.pool}, "
        f"window = recent = 10% of each pruned chunk, at most 64 tokens, min_prompt {default.min_prompt}) with budget "
        f"and the field named on the line. Window choice: one patch's window serves both turns of task 1, where turn 1 "
        f"holds no question, so the library default stands rather than the question's tokens (the demo's choice). With "
        f"`chunk` and `total`, the turn-2 window (its last ~{window_count(default.window, turn2_tokens)} tokens) holds "
        f"the question and "
        f"the primed answer. Segments are CSP's modalities (instructions/questions 0, records 1, prose 2; task 3: "
        f"passage index). Accuracy intervals: 95% Wilson. {'QUICK SUBSET. ' if quick else ''}"
        f"Device: {device_description(torch.device('cpu'))}; ops: {backend}; load average at start {load_at_start:.1f}, at the end {os.getloadavg()[0]:.1f}. "
        f"Wall time: {total_s / 60:.1f} min (model load {loaded:.0f} s; task 1 {timings['task 1'] / 60:.1f} min, "
        f"task 2 {timings['task 2'] / 60:.1f} min, task 3 {timings['task 3'] / 60:.1f} min).")
    extra = (
        "\n## Task 1 accuracy by the turn of the asked record (%, 95% Wilson)\n\n"
        + md_table(["line", "asked about a turn-1 record", "asked about a turn-2 record"], by_turn)
        + f"\n\n## Task 3: mean KL(full || pruned) per {BUCKET}-step bucket (95% bootstrap over passages)\n\n"
        + md_table(["line"] + [f"steps {s}-{min(s + BUCKET, continuation) - 1}" for s in buckets], bucket_rows)
        + "\n\n## Self-checks\n\n" + "\n".join(check_md) + f"\n\nResult: {status}\n")
    columns = ["task", "line", "budget", "n", "acc", "acc_ci", "kl", "kl_ci", "top1", "kv_mib", "kv_vs_full"]
    os.makedirs(args.out, exist_ok=True)
    table = write_results(STEM, header, rows, columns, extra_md=extra, folder=args.out, extra_json={
        "settings": {"turn1_tokens": turn1_tokens, "turn2_tokens": turn2_tokens, "context_tokens": context_tokens,
                     "prompt_tokens": prompt_tokens, "continuation": continuation, "decode_interval": decode_interval,
                     "decode_window": decode_window, "prompt_budget": prompt_budget, "quick": quick, "threads": args.threads},
        "failures": failures, "wall_s": total_s, "timings_s": timings, "phases_s": PHASES, "backend": backend,
        "task1_cases": [{"asked_turn": c.asked_turn, "answer": c.answer, "tokens": [c.turn1.shape[1], c.turn2.shape[1]],
                         "results": r} for c, r in zip(cases1, per1)],
        "task2_contexts": [{"tokens": c.context.shape[1], "answers": c.answers, "results": r} for c, r in zip(cases2, per2)],
        "task3_kl_per_bucket": {name: [[round(float(gen[name]["kl"][i, s:s + BUCKET].mean()), 5) for s in buckets]
                                       for i in range(n3)] for name in gen},
        "task3_checks": {line.name: float(gen_checks[line.name]["kl"].mean()) for line in check_lines},
    })
    plot(rows, bucket_rows_data(gen, buckets), buckets, os.path.join(args.out, f"{STEM}.png"),
         f"{os.path.basename(path)}: {n1} two-turn cases, {n2}x3 questions, {n3} passages")
    print("\n" + table + "\n")
    print("task 1 by asked turn:\n" + md_table(["line", "turn-1 record", "turn-2 record"], by_turn) + "\n")
    print("task 3 KL per bucket:\n" + md_table(["line"] + [f"{s}+" for s in buckets], bucket_rows) + "\n")
    print("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(PHASES.items())))
    print(f"self-checks: {status}")
    print(f"wrote {args.out}/{STEM}.{{md,json,png}} in {total_s / 60:.1f} min")
    return 1 if failures else 0


def span(tensors) -> str:
    """'mean (min-max)' of the lengths of [1, L] tensors."""
    lengths = [t.shape[1] for t in tensors]
    return f"{sum(lengths) / len(lengths):.0f} tokens on average ({min(lengths)}-{max(lengths)})" if lengths else "-"


def _acc_cells(entry: dict, full: dict) -> dict:
    return {"n": entry["n"], "acc": round(entry["acc"], 1), "acc_ci": ci(entry["acc_lo"], entry["acc_hi"]),
            "kv_mib": round(entry["kv_mib"], 2), "kv_vs_full": round(entry["kv_mib"] / full["kv_mib"], 3)}


def bucket_rows_data(gen: Dict[str, dict], buckets: Sequence[int]) -> Dict[str, List[Tuple[float, float, float]]]:
    out = {}
    for name, g in gen.items():
        if name == "full":
            continue
        series = []
        for s in buckets:
            vals = g["kl"][:, s:s + BUCKET].mean(1).tolist()
            lo, hi = bootstrap_mean(vals)
            series.append((sum(vals) / len(vals), lo, hi))
        out[name] = series
    return out


def plot(rows: List[dict], buckets_data: Dict[str, list], buckets: Sequence[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))

    def errorbar(ax, subset, x_of, label, **kw):
        xs = [x_of(r) for r in subset]
        ys = [r["acc"] for r in subset]
        los = [float(r["acc_ci"].strip("[]").split(",")[0]) for r in subset]
        his = [float(r["acc_ci"].strip("[]").split(",")[1]) for r in subset]
        if "fmt" not in kw:
            kw["marker"] = "o"
        ax.errorbar(xs, ys, yerr=[[y - lo for y, lo in zip(ys, los)], [hi - y for y, hi in zip(ys, his)]],
                    capsize=3, label=label, **kw)

    ax = axes[0]
    task1 = [r for r in rows if r["task"].startswith("1")]
    span = max(r["kv_mib"] for r in task1)
    for k, (mode, marker) in enumerate(zip(MODES, "osD")):  # chunk and total store alike: offset them a little
        subset = [r for r in task1 if f"later_prefill={mode}" in r["line"]]
        errorbar(ax, subset, lambda r: r["kv_mib"] + (k - 1) * 0.008 * span,
                 f"later_prefill={mode} (budgets {', '.join(str(r['budget']) for r in subset)})", fmt=f"-{marker}")
    full = next(r for r in task1 if r["line"] == "full cache")
    errorbar(ax, [full], lambda r: r["kv_mib"], "full cache", color="black")
    ax.set_xlabel("stored KV after turn 2 (MiB)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("task 1: two-turn retrieval", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    task2 = [r for r in rows if r["task"].startswith("2")]
    for line in ("query-aware", "compress-once"):
        errorbar(ax, [r for r in task2 if r["line"] == "csp " + line], lambda r: r["budget"], line)
    f2 = next(r for r in task2 if r["line"] == "full cache")
    ax.axhline(f2["acc"], color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_xlabel("budget (fraction of the context kept)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("task 2: compress once vs question in the prompt", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    centres = [s + BUCKET / 2 for s in buckets]
    for name, series in buckets_data.items():
        ys = [m for m, _, _ in series]
        err = [[m - lo for m, lo, _ in series], [hi - m for m, _, hi in series]]
        ax.errorbar(centres, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("continuation step (bucket centre)")
    ax.set_ylabel("mean KL(full || pruned)")
    ax.set_title("task 3: drift during a long generation", fontsize=10)
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
