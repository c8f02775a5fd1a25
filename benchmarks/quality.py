"""Quality of CSP and the baseline policies on a real model (SmolLM2-135M-Instruct, CPU).

Task A, retrieval across segments: prompts of 1k-4k tokens made of prose filler
(English from pydoc_data.topics), three one-line records ("The locker number
is 417.") at spread depths, one of them asked about, and the instruction. The
three segment kinds are CSP's modalities (instruction 0, records 1, prose 2).
The answer is primed ("The locker number is"); metric: exact match (the greedy
answer contains the number).

Task B, continuation fidelity: natural English passages, a prompt of 1k-2k
tokens, then 64 teacher-forced continuation tokens. Each passage is its own
segment (modality = passage index). Metrics: mean KL(full || pruned) of the
next-token distributions and top-1 agreement with the full cache.

Lines: `csp` (library defaults, scores max-pooled over 15 keys), `csp pool=1`
(the same unpooled, to show what pooling buys), snapkv, h2o, streaming,
random, at budgets 0.1-0.5; CSP's n x decode_n x cross_ratio x pool grid at a
subset of budgets.

How a case runs. Pruning happens after each layer's prefill attention, so the
prefill's hidden states, keys and queries do not depend on the policy: the
benchmark prefills each prompt once (its first L-1 tokens), captures every
layer's post-RoPE queries, and then builds each configuration's pruned cache
with the library's own pipeline, in its two halves (`cspkv.pruning.score_layer`
once per scoring setting, `select_and_compact` per budget: what the patched
attention's `prune_layer` does at prefill). The last prompt token is held back:
it is fed over the pruned cache by the patched model (so the first answer token
is not free), followed by the greedy answer (A) or the teacher-forced
continuation (B); configurations of equal decode_n and budgets within a factor 2
run as one batch (dead slots fill the smaller rows).

    python benchmarks/quality.py            # default sweep (<= 40 min on 2 cores)
    python benchmarks/quality.py --quick    # a small subset (< 3 min), exercised by the tests
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
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
from cspkv.pruning import PrunedKV, plan_batch, score_layer, select_and_compact, window_query_ids  # noqa: E402
from cspkv.demo import english_passages  # noqa: E402
from cspkv.hf.prompts import chat_prompt  # noqa: E402
from common import RESULTS, device_description, write_results  # noqa: E402

BASELINES = ("snapkv", "h2o", "streaming", "random")
# The lines of the main table and the plot: name -> CSPConfig fields besides window and budget.
LINES = {"csp": {}, "csp pool=1": {"pool": 1}, **{name: {"policy": name} for name in BASELINES}}
CSP_LINES = ("csp", "csp pool=1")  # the lines whose targets are checked
INSTRUCTION, RECORDS, PROSE = 0, 1, 2
CONTINUATION = 64
ANSWER_TOKENS = 4  # a space and three digits
# Window (and recent, = window) of every policy. The library default 0.1 would make a
# 10% budget nothing but the recent window for every score-based policy.
WINDOW = 0.05

# Keys of the records: objects that Python's reference manual (the filler) never talks about.
THINGS = "locker invoice flight ticket badge parcel passport cabin voucher pager berth vault".split()

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
    task: str  # "A" or "B"
    input_ids: torch.Tensor  # [1, L] prompt
    segment_ids: torch.Tensor  # [1, L]
    answer: str = ""  # task A
    continuation: Optional[torch.Tensor] = None  # task B: [1, 64]
    depth: float = 0.0  # task A: relative position of the asked record


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
    return Case("A", input_ids, segment_ids, answer=str(values[0]), depth=at / len(ids))


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


# ----------------------------------------------------------------------------- configurations
def label(config: Optional[CSPConfig]) -> str:
    """A configuration's name in the tables: CSP with its settings, a baseline with the fields
    it changes from its defaults."""
    if config is None:
        return "full"
    policy = config.policy
    if isinstance(policy, CSP):
        return (f"{policy.name} b={config.budget} n={policy.n:g} dn={config.decode_n:g} cr={policy.cross_ratio} "
                f"pool={policy.pool}")
    changed = [f" {f.name}={getattr(policy, f.name)}" for f in dataclasses.fields(policy)
               if getattr(policy, f.name) != f.default]
    return f"{policy.name} b={config.budget}" + "".join(changed)


def line_config(line: str, budget: float) -> CSPConfig:
    """The configuration of a main-table line at `budget` (CSP lines: library defaults otherwise)."""
    return CSPConfig(window=WINDOW, budget=budget, **LINES[line])


def sweep(budgets: Sequence[float], grid_budgets: Sequence[float], grid: dict) -> List[CSPConfig]:
    """Every line at every budget, plus CSP's n x decode_n x cross_ratio x pool grid at `grid_budgets`."""
    configs = [line_config(line, budget) for budget in budgets for line in LINES]
    base = CSPConfig(window=WINDOW)
    for budget in grid_budgets:
        for pool in grid["pool"]:
            for n in grid["n"]:
                for decode_n in grid["decode_n"]:
                    for ratio in grid["cross_ratio"]:
                        configs.append(base.replace(budget=budget, n=float(n), decode_n=float(decode_n),
                                                    cross_ratio=ratio, pool=pool))
    # One configuration per label: the grid repeats the default line's settings.
    return list({label(config): config for config in configs}.values())


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


def prefill(model, case: Case) -> Prefill:
    """Prefill the first L-1 prompt tokens with the full cache; keep keys, values and queries."""
    store: dict = {}
    ids = case.input_ids[:, :-1]
    cache = _dynamic_cache(model)
    with capturing_queries(model, store), torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    n = len(cache.layers)
    return Prefill(
        keys=[cache.layers[i].keys for i in range(n)],
        values=[cache.layers[i].values for i in range(n)],
        queries=[store[i][0] for i in range(n)],
        scaling=[float(store[i][1]) for i in range(n)],
        k_mod=case.segment_ids[:, :-1].long(),
    )


def _score_key(config: CSPConfig) -> tuple:
    """What a layer's scores depend on: the window and the policy (CSP's cross ratio only splits the budget)."""
    policy = config.policy
    return (config.window, policy.replace(cross_ratio=0.0) if isinstance(policy, CSP) else policy)


def pruned_kv(pre: Prefill, config: CSPConfig) -> List[PrunedKV]:
    """Per layer, the cache `config` keeps: the library's pipeline, its scores shared across budgets."""
    plans = plan_batch(config, pre.k_mod)
    q_mod = window_query_ids(pre.k_mod, plans)
    key = _score_key(config)
    if key not in pre.scores:  # scores do not depend on budget, cross ratio or decode_n
        pre.scores[key] = [
            score_layer(config, ScoreInputs(q, k, q_mod, pre.k_mod, s, i))
            for i, (q, k, s) in enumerate(zip(pre.queries, pre.keys, pre.scaling))
        ]
    return [select_and_compact(scores, k, v, pre.k_mod, plans) for scores, k, v in zip(pre.scores[key], pre.keys, pre.values)]


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


def batches(configs: Sequence[CSPConfig]) -> Dict[tuple, List[CSPConfig]]:
    """Configurations that run as one batch: equal decode_n (the n-softmax constant is per patch) and
    budgets within a factor 2 (smaller rows are filled with dead slots up to the largest)."""
    first_of_bucket, bucket = None, {}
    for budget in sorted({c.budget for c in configs}):
        if first_of_bucket is None or budget > 2 * first_of_bucket:
            first_of_bucket = budget
        bucket[budget] = first_of_bucket
    groups: Dict[tuple, List[CSPConfig]] = {}
    for config in configs:
        groups.setdefault((config.decode_n, bucket[config.budget]), []).append(config)
    return groups


def run_case(model, tokenizer, case: Case, configs: List[CSPConfig]) -> Dict[str, dict]:
    """Results of the full cache and every configuration on one case."""
    with phase(f"prefill {case.task}"):
        pre = prefill(model, case)
    L1 = pre.k_mod.shape[1]
    last = case.input_ids[:, -1:]
    stop = {tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False)["input_ids"]}
    results: Dict[str, dict] = {}

    def score_a(tokens: torch.Tensor) -> List[dict]:
        rows = []
        for row in tokens.tolist():
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            rows.append({"answer": text[:30], "correct": case.answer in text})
        return rows

    full_cache = _dynamic_cache(model, pre.keys, pre.values)
    chunk = None if case.continuation is None else torch.cat([last, case.continuation[:, :-1]], dim=1)
    with phase(f"full-cache answer {case.task}"):
        if case.task == "A":
            results["full"] = score_a(greedy(model, full_cache, last, ANSWER_TOKENS, stop))[0]
        else:
            full_lp = teacher_forced_logprobs(model, full_cache, chunk)[0]
            results["full"] = {"kl": 0.0, "top1": 1.0}
    del full_cache

    for (decode_n, _), group in batches(configs).items():
        with phase(f"score+select+compact {case.task}"):
            rows = [pruned_kv(pre, config) for config in group]
        with phase(f"pruned-cache answers {case.task}"), cspkv.patched(model, CSPConfig(decode_n=decode_n)) as handle:
            cache = pruned_cache(model, rows, L1, handle.liveness)
            R = len(group)
            if case.task == "A":
                outcome = score_a(greedy(model, cache, last.expand(R, 1), ANSWER_TOKENS, stop))
            else:
                lp = teacher_forced_logprobs(model, cache, chunk.expand(R, -1))
                p_full = full_lp.exp()
                kl = (p_full * (full_lp - lp)).sum(-1).clamp_min(0)  # [R, T]
                top1 = (lp.argmax(-1) == full_lp.argmax(-1)).float()
                outcome = [{"kl": float(kl[r].mean()), "top1": float(top1[r].mean())} for r in range(R)]
        for config, result in zip(group, outcome):
            results[label(config)] = result
    return results


# ----------------------------------------------------------------------------- aggregation and report
def aggregate(per_case: List[dict], cases: List[Case], labels: List[str]) -> Dict[str, dict]:
    out = {}
    a = [(r, c) for r, c in zip(per_case, cases) if c.task == "A"]
    b = [r for r, c in zip(per_case, cases) if c.task == "B"]
    for name in labels:
        entry = {}
        ra = [r[name] for r, _ in a if name in r]
        rb = [r[name] for r in b if name in r]
        if ra:
            entry["acc"] = 100.0 * sum(r["correct"] for r in ra) / len(ra)
        if rb:
            entry["kl"] = sum(r["kl"] for r in rb) / len(rb)
            entry["top1"] = 100.0 * sum(r["top1"] for r in rb) / len(rb)
        out[name] = entry
    return out


def parse_label(name: str) -> dict:
    if name == "full":
        return {"policy": "full", "budget": 1.0}
    parts = name.split()
    row = {"policy": parts[0]}
    for part in parts[1:]:
        k, v = part.split("=")
        key = {"b": "budget", "n": "n", "dn": "decode_n", "cr": "cross_ratio", "pool": "pool"}[k]
        row[key] = v if v == "auto" else (int(v) if key == "pool" else float(v))
    return row


def targets(summary: Dict[str, dict], budgets: Sequence[float], line: str = "csp") -> List[Tuple[str, bool, str]]:
    """The issue's targets for the CSP line `line`: (what, holds, detail)."""
    def get(name, b):
        return summary[label(line_config(name, b))]

    out = []
    full = summary["full"]
    if 0.2 in budgets and "acc" in full:
        gap = full["acc"] - get(line, 0.2)["acc"]
        out.append((f"task A: {line} at 20% within 2 points of the full cache", gap <= 2.0,
                    f"full {full['acc']:.1f}%, {line} {get(line, 0.2)['acc']:.1f}% (gap {gap:+.1f})"))
    for b in budgets:
        c, snap, h2o = get(line, b), get("snapkv", b), get("h2o", b)
        if "acc" in c:
            out.append((f"task A, budget {b}: {line} accuracy >= snapkv and h2o", c["acc"] >= max(snap["acc"], h2o["acc"]),
                        f"{line} {c['acc']:.1f}%, snapkv {snap['acc']:.1f}%, h2o {h2o['acc']:.1f}%"))
        if "kl" in c:
            out.append((f"task B, budget {b}: {line} mean KL < snapkv and h2o", c["kl"] < min(snap["kl"], h2o["kl"]),
                        f"{line} {c['kl']:.4f}, snapkv {snap['kl']:.4f}, h2o {h2o['kl']:.4f}"))
    return out


def compact_cases(cases: List[Case], per_case: List[dict], configs: Dict[str, List[CSPConfig]],
                  budgets: Sequence[float]) -> dict:
    """Per-case results for the JSON, kept small: one label list per task and per case one value per label.

    Task A: `correct` is a string of 0/1 in the order of `labels_A`, and the
    answers of the main-table lines only; task B: `kl` (4 decimals) and `top1`
    lists in the order of `labels_B`.
    """
    labels = {task: ["full"] + [label(c) for c in configs[task]] for task in ("A", "B")}
    main = ["full"] + [label(line_config(line, b)) for b in budgets for line in LINES]
    out = []
    for case, results in zip(cases, per_case):
        row = {"task": case.task, "tokens": case.input_ids.shape[1]}
        names = labels[case.task]
        if case.task == "A":
            row.update(depth=round(case.depth, 3), answer=case.answer,
                       correct="".join(str(int(results[n]["correct"])) for n in names),
                       answers={n: results[n]["answer"] for n in main})
        else:
            row.update(kl=[round(results[n]["kl"], 4) for n in names], top1=[round(results[n]["top1"], 4) for n in names])
        out.append(row)
    return {"labels_A": labels["A"], "labels_B": labels["B"], "cases": out}


def plot(summary: Dict[str, dict], budgets: Sequence[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("acc", "task A: exact-match accuracy (%)"), ("kl", "task B: mean KL(full || pruned)"),
               ("top1", "task B: top-1 agreement (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (metric, ylabel) in zip(axes, metrics):
        for name in LINES:
            ys = [summary[label(line_config(name, b))].get(metric) for b in budgets]
            ax.plot(budgets, ys, marker="o", label=name, linewidth=2.2 if name.startswith("csp") else 1.4,
                    linestyle=":" if name == "csp pool=1" else "-")
        full = summary["full"].get(metric)
        if metric == "kl":
            ax.set_yscale("log")  # random is orders of magnitude above the rest; the full cache is 0
            ax.text(0.02, 0.02, "full cache: KL = 0", transform=ax.transAxes, fontsize=8)
        elif full is not None:
            ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
        ax.set_xlabel("budget (fraction of the prompt kept)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(list(budgets))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (< 3 min), for the tests")
    parser.add_argument("--cases-a", type=int, default=None, help="task A cases (default 100; quick 3)")
    parser.add_argument("--cases-b", type=int, default=None, help="task B passages (default 50; quick 2)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--grid-budgets-a", type=float, nargs="+", default=None,
                        help="budgets of CSP's n x decode_n x cross_ratio x pool grid on task A (default 0.1 0.2)")
    parser.add_argument("--grid-budgets-b", type=float, nargs="+", default=None,
                        help="budgets of CSP's n x decode_n x cross_ratio x pool grid on task B (default 0.2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a model directory or .gguf file instead of the embedded SmolLM2")
    parser.add_argument("--out", default=RESULTS, help="folder of quality.{md,json,png}")
    args = parser.parse_args(argv)

    quick = args.quick
    n_a = args.cases_a if args.cases_a is not None else (3 if quick else 100)
    n_b = args.cases_b if args.cases_b is not None else (2 if quick else 50)
    budgets = tuple(args.budgets or ((0.1, 0.2) if quick else (0.1, 0.2, 0.3, 0.5)))
    grid_a = tuple(args.grid_budgets_a or ((0.2,) if quick else (0.1, 0.2)))
    grid_b = tuple(args.grid_budgets_b or (0.2,))
    grid_budgets = tuple(sorted(set(grid_a) | set(grid_b)))
    grid = ({"n": (0, 1), "decode_n": (0, 1), "cross_ratio": (0.5, "auto"), "pool": (1,)} if quick else
            {"n": (0, 1), "decode_n": (0, 1), "cross_ratio": (0.1, 0.5, 0.9, "auto"), "pool": (1, 15)})
    lengths_a = (1024,) if quick else (1024, 1536, 2048, 3072, 4096)
    lengths_b = (1024,) if quick else (1024, 1536, 2048)

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
    passages = english_passages()

    cases: List[Case] = []
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    for i in range(n_a):
        cases.append(retrieval_case(tokenizer, passages, seed=args.seed * 100003 + i,
                                    target_tokens=lengths_a[i % len(lengths_a)],
                                    depth=depths[(i // len(lengths_a)) % len(depths)]))
    for i in range(n_b):
        cases.append(continuation_case(tokenizer, passages, seed=args.seed * 100003 + 50000 + i,
                                       prompt_tokens=lengths_b[i % len(lengths_b)]))
    configs = {"A": sweep(budgets, grid_a, grid), "B": sweep(budgets, grid_b, grid)}
    labels = ["full"] + list(dict.fromkeys(label(c) for c in configs["A"] + configs["B"]))
    print(f"{os.path.basename(path)}: {n_a} task-A cases ({min(lengths_a)}-{max(lengths_a)} tokens), "
          f"{n_b} task-B passages ({min(lengths_b)}-{max(lengths_b)} + {CONTINUATION} tokens), "
          f"{len(configs['A'])} / {len(configs['B'])} pruned configurations + full cache; ops: {backend}; {torch.get_num_threads()} threads",
          flush=True)

    per_case = []
    sweep_started = time.perf_counter()
    for case in tqdm(cases, desc="cases", unit="case", file=sys.stdout, mininterval=5):
        per_case.append(run_case(model, tokenizer, case, configs[case.task]))
    sweep_s = time.perf_counter() - sweep_started
    print("time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(PHASES.items())), flush=True)
    total_s = time.perf_counter() - started
    summary = aggregate(per_case, cases, labels)
    default = CSPConfig()

    # ---- report
    rows = []
    for name in labels:
        row = parse_label(name)
        row.update({key: round(value, 4) for key, value in summary[name].items()})
        rows.append(row)
    line_rows = []
    for line in LINES:
        for b in budgets:
            row = {"line": line, **parse_label(label(line_config(line, b)))}
            row.update({key: round(value, 4) for key, value in summary[label(line_config(line, b))].items()})
            line_rows.append(row)
    full_row = {"line": "full", **rows[0]}
    grid_rows = [r for r in rows if r["policy"] == CSP.name]

    def table(selected, columns, metrics=("acc", "kl", "top1")):
        lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
        for r in selected:
            lines.append("| " + " | ".join(_fmt(r.get(c, ""), c if c in metrics else "") for c in columns) + " |")
        return "\n".join(lines)

    pivot = ["| line | " + " | ".join(f"A acc % @{b}" for b in budgets) + " | "
             + " | ".join(f"B KL @{b}" for b in budgets) + " |", "|" + "---|" * (1 + 2 * len(budgets))]
    for line in ("full",) + tuple(LINES):
        cells = []
        for metric in ("acc", "kl"):
            for b in budgets:
                entry = summary["full"] if line == "full" else summary[label(line_config(line, b))]
                cells.append(_fmt(entry.get(metric, float("nan")), metric))
        pivot.append(f"| {line} | " + " | ".join(cells) + " |")
    pivot = "\n".join(pivot)

    # Best CSP setting per (grid budget, metric, pool), and overall per pool: mean rank over the
    # (budget, metric) columns of the grid (0 = best; ties share the better rank).
    best_lines = []
    current = (default.policy.n, default.decode_n, default.policy.cross_ratio)
    for pool in grid["pool"]:
        ranking: Dict[tuple, List[int]] = {}
        for b in grid_budgets:
            for metric, sign in (("acc", -1), ("kl", 1)):
                cand = [r for r in grid_rows if r["budget"] == b and r["pool"] == pool and metric in r]
                if len(cand) < 2:
                    continue
                best = min(cand, key=lambda r: sign * r[metric])
                best_lines.append(f"- pool={pool}, budget {b}, best {metric}: n={best['n']:g}, "
                                  f"decode_n={best['decode_n']:g}, cross_ratio={best['cross_ratio']} "
                                  f"({_fmt(best[metric], metric)})")
                for r in cand:
                    rank = sum(sign * o[metric] < sign * r[metric] for o in cand)
                    ranking.setdefault((r["n"], r["decode_n"], r["cross_ratio"]), []).append(rank)
        overall = sorted(ranking.items(), key=lambda kv: (sum(kv[1]) / len(kv[1]), kv[0] != current, str(kv[0])))
        if overall:
            (bn, bdn, bcr), ranks = overall[0]
            best_lines.append(f"- pool={pool}, overall (mean rank over the grid's budget x metric columns, 0 = best): "
                              f"n={bn:g}, decode_n={bdn:g}, cross_ratio={bcr} (mean rank {sum(ranks) / len(ranks):.2f} "
                              f"of {len(overall)} settings)")

    # Task A by prompt length at one budget: where the full cache itself fails (long prompts).
    by_length = ""
    b_len = 0.2 if 0.2 in budgets else budgets[0]
    a_cases = [(c, r) for c, r in zip(cases, per_case) if c.task == "A"]
    if a_cases:
        names = ("full",) + tuple(LINES)
        out = ["| task A tokens (cases) | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
        for lo, hi in zip(lengths_a, list(lengths_a[1:]) + [10 ** 9]):
            sel = [r for c, r in a_cases if lo <= c.input_ids.shape[1] < hi]
            if not sel:
                continue
            cells = [100.0 * sum(r[n if n == "full" else label(line_config(n, b_len))]["correct"] for r in sel) / len(sel)
                     for n in names]
            span = f"{lo}-{hi - 1}" if hi < 10 ** 9 else f">= {lo}"
            out.append(f"| {span} ({len(sel)}) | "
                       + " | ".join(_fmt(c, "acc") for c in cells) + " |")
        by_length = f"\n## Task A accuracy (%) by prompt length, budget {b_len}\n\n" + "\n".join(out) + "\n"

    checks = [check for line in CSP_LINES for check in targets(summary, budgets, line)]
    target_md = "\n".join(f"- [{'x' if ok else ' '}] {what}: {detail}" for what, ok, detail in checks)
    header = (f"# Quality: CSP vs baselines on {os.path.basename(path)}\n\n"
              f"{n_a} task-A cases (retrieval across segments, {min(lengths_a)}-{max(lengths_a)} tokens, "
              f"exact match), {n_b} task-B passages ({min(lengths_b)}-{max(lengths_b)} tokens + {CONTINUATION} "
              f"teacher-forced; KL(full || pruned), top-1 agreement). The last prompt token is held back and "
              f"computed over the pruned cache. window = recent = {WINDOW} of the prompt for every policy. "
              f"Line `csp` = the library defaults (n={default.policy.n:g}, decode_n={default.decode_n:g}, "
              f"cross_ratio={default.policy.cross_ratio}, pool={default.policy.pool}); `csp pool=1` = the same without "
              f"score pooling. "
              f"CSP's n x decode_n x cross_ratio x pool grid runs at budgets {', '.join(map(str, grid_a))} "
              f"on task A and {', '.join(map(str, grid_b))} on task B only. {'QUICK SUBSET. ' if quick else ''}"
              f"Device: {device_description(torch.device('cpu'))}; ops: {backend}; load average at start "
              f"{load_at_start:.1f}. Wall time: {total_s / 60:.1f} min (model load {loaded:.0f} s, "
              f"sweep {sweep_s / 60:.1f} min).")
    extra = (f"\n## Lines x budgets\n\n{pivot}\n{by_length}\n## Targets\n\n{target_md}\n\n"
             f"## CSP grid (task A at budgets {', '.join(map(str, grid_a))}; task B at {', '.join(map(str, grid_b))})\n\n"
             + table(grid_rows, ["budget", "pool", "n", "decode_n", "cross_ratio", "acc", "kl", "top1"])
             + "\n\n" + "\n".join(best_lines) + "\n")
    os.makedirs(args.out, exist_ok=True)
    columns = ["line", "budget", "acc", "kl", "top1"]
    write_results("quality", header, [full_row] + line_rows, columns, extra_md=extra, folder=args.out, extra_json={
        "grid": grid_rows, "targets": [{"target": w, "holds": ok, "detail": d} for w, ok, d in checks],
        "best": best_lines, "wall_s": total_s, "phases_s": PHASES, "backend": backend, "quick": quick,
        **compact_cases(cases, per_case, configs, budgets),
    })
    plot(summary, budgets, os.path.join(args.out, "quality.png"),
         f"{os.path.basename(path)}: {n_a} retrieval cases, {n_b} continuation passages (window {WINDOW})")

    print("\n" + pivot + "\n")
    print("\n".join(best_lines))
    print("\ntargets:")
    for what, ok, detail in checks:
        print(f"  {'HOLDS' if ok else 'MISSED'}  {what}: {detail}")
    print(f"\nwrote {args.out}/quality.{{md,json,png}} in {total_s / 60:.1f} min")
    return 0


def _fmt(value, metric: str = "") -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if metric == "kl":
            return f"{value:.4f}"
        if metric == "acc":
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
