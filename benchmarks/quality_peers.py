"""kvpress's presses (NVIDIA, PyPI `kvpress`) on the cases of benchmarks/quality.py.

Run it with a venv whose transformers kvpress supports (< 5.3), e.g. the project's
4.57 venv with kvpress installed there (`.venv-tf4/bin/pip install kvpress`); the
project itself does not depend on kvpress. It takes quality.py's arguments, builds
the same cases from the same seed (each case carries a fingerprint), and runs:

- `kvpress SnapKV`: SnapKVPress(compression_ratio = 1 - budget), window_size 64
  (its default; the window is kept), kernel_size 5;
- `kvpress AdaKV(SnapKV)`: AdaKVPress(SnapKVPress(...)), alpha_safeguard 0.2
  (per-head budgets; pruned keys are masked, not removed);
- `kvpress PyramidKV`: PyramidKVPress(compression_ratio = 1 - budget), window_size 64.

Each press is a context manager around the model's prefill of the prompt
without its last token (`with press(model): model(...)`; task C: of the context
alone), exactly as kvpress's own pipeline does; the held-back token (task C: the
question chunk) and the greedy answer (task B: the teacher-forced continuation)
then run over the compressed cache without the press, with explicit position ids
(the logical positions, as kvpress's pipeline passes them). The full cache runs
the same way with no press, as a check against quality.py's full line.

Writes quality-peers.{md,json}; `quality.py --peers quality-peers.json` merges
the rows into its report (cases matched by fingerprint).

    .venv-tf4/bin/python benchmarks/quality_peers.py --cases-a 30 ... --out /tmp/peers
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
from quality import PEER_LINES, Case, aggregate, answer_check, key, stop_ids, task_tables  # noqa: E402
from common import device_description, write_results  # noqa: E402


def presses(budget: float) -> Dict[str, object]:
    from kvpress import AdaKVPress, PyramidKVPress, SnapKVPress

    ratio = round(1.0 - budget, 6)
    return {
        "kvpress SnapKV": SnapKVPress(compression_ratio=ratio),
        "kvpress AdaKV(SnapKV)": AdaKVPress(SnapKVPress(compression_ratio=ratio)),
        "kvpress PyramidKV": PyramidKVPress(compression_ratio=ratio),
    }


def _cache():
    from transformers import DynamicCache

    return DynamicCache()


def prefill(model, ids: torch.Tensor, press=None):
    cache = _cache()
    with torch.inference_mode(), (press(model) if press is not None else _null()):
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def forward(model, cache, ids: torch.Tensor, start: int, logits_to_keep: int = 1):
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True,
                     logits_to_keep=logits_to_keep).logits


def answer(model, tokenizer, cache, chunk: torch.Tensor, start: int, steps: int, expected: str) -> dict:
    """Feed `chunk` at logical position `start`, then greedy tokens until `steps` or a stop token."""
    stop = stop_ids(tokenizer)
    token = forward(model, cache, chunk, start)[:, -1].argmax(-1, keepdim=True)
    out, pos = [int(token)], start + chunk.shape[1]
    while len(out) < steps and out[-1] not in stop:
        token = forward(model, cache, token, pos)[:, -1].argmax(-1, keepdim=True)
        out.append(int(token))
        pos += 1
    return answer_check(tokenizer, out, expected)


def run_case(model, tokenizer, case: Case, budgets, only: Sequence[str] = PEER_LINES) -> Dict[str, object]:
    results: Dict[str, object] = {}
    qa = case.task == "C"
    ids = case.input_ids if qa else case.input_ids[:, :-1]
    L = ids.shape[1]
    last = case.input_ids[:, -1:]
    full_lp = None

    def run(name: str, press) -> None:
        nonlocal full_lp
        cache = prefill(model, ids, press)
        if qa:
            results[name] = [answer(model, tokenizer, copy.deepcopy(cache), q, L, case.answer_tokens, a)
                             for q, a in zip(case.questions, case.answers)]
        elif case.task == "B":
            chunk = torch.cat([last, case.continuation[:, :-1]], dim=1)
            lp = torch.log_softmax(forward(model, cache, chunk, L, logits_to_keep=0).float(), -1)[0]
            if full_lp is None:
                full_lp = lp
                results[name] = {"kl": 0.0, "top1": 1.0}
                return
            kl = (full_lp.exp() * (full_lp - lp)).sum(-1).clamp_min(0)
            results[name] = {"kl": float(kl.mean()), "top1": float((lp.argmax(-1) == full_lp.argmax(-1)).float().mean())}
        else:
            results[name] = answer(model, tokenizer, cache, last, L, case.answer_tokens, case.answer)

    run("full", None)
    for b in budgets:
        for name, press in presses(b).items():
            if name in only:
                run(key(name, b), press)
    return results


def main(argv=None) -> int:
    p = quality.parser()
    p.add_argument("--presses", nargs="+", default=list(PEER_LINES), choices=list(PEER_LINES),
                   help="the presses to run (default all)")
    args = p.parse_args(argv)
    st = quality.settings(args)
    budgets = st["budgets"]
    import kvpress  # noqa: F401  fails here, before the model loads, where kvpress is missing
    import transformers
    from tqdm import tqdm

    started = time.perf_counter()
    path, tokenizer, model = quality.load(args)
    cases = quality.build_cases(tokenizer, quality.english_passages(), seed=args.seed, counts=st["counts"],
                                lengths=st["lengths"], distractors=args.distractors)
    per_case: List[dict] = []
    for case in tqdm(cases, desc="cases", unit="case", file=sys.stdout, mininterval=10):
        per_case.append(run_case(model, tokenizer, case, budgets, args.presses))
    summary = aggregate(cases, per_case)
    total_s = time.perf_counter() - started
    header = (f"# Quality: kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else ''} presses on "
              f"quality.py's cases, {os.path.basename(path)}\n\n"
              f"transformers {transformers.__version__}; seed {args.seed}; cases "
              + ", ".join(f"{t} {st['counts'][t]}" for t in quality.TASKS) + f"; budgets {', '.join(map(str, budgets))} "
              f"(compression_ratio = 1 - budget). Press around the prefill of the prompt without its last token (task C: "
              f"the context alone); the rest runs over the compressed cache with logical position ids. Device: "
              f"{device_description(torch.device('cpu'))}. Wall time {total_s / 60:.1f} min.")
    tables = task_tables(summary, list(args.presses), budgets)
    os.makedirs(args.out, exist_ok=True)
    write_results("quality-peers", header, quality.flat_rows(summary), ["task", "line", "budget", "n", "acc", "kl", "lo", "hi"],
                  extra_md="\n" + tables, folder=args.out, extra_json={
                      "budgets": budgets, "counts": st["counts"], "lengths": st["lengths"], "seed": args.seed,
                      "cases": [{"task": c.task, "fingerprint": c.fingerprint(), "results": r}
                                for c, r in zip(cases, per_case)]})
    print(tables)
    print(f"wrote {args.out}/quality-peers.{{md,json}} in {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
