"""One call of each cspkv op at a representative shape: the target of the profilers.

Nsight Compute replays every kernel it profiles, so no warm-up or timing loop
is needed here; the shapes are the ones the GPU targets of bench_ops.py are
stated at (16k prompt tokens, 10% window, 20% budget; random inputs, each op
its own). Each op runs inside an NVTX range named after the op (and, with
CSPKV_NVTX=1, the extension's own ``cspkv::<op>`` range inside it). See the README's "Profiling" section.

    python benchmarks/profile_ops.py [--op window_scores ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cspkv import ops  # noqa: E402
from common import nvtx_range  # noqa: E402

OPS = ("window_scores", "select_keep", "compact_kv", "nsoftmax_attention")
L = 16384
# (H, Hkv, D): window_scores on Qwen2-VL-7B (GQA, the harder case for it), the
# other ops on LLaVA-1.5-7B (32 KV heads: a 256 MB cache for compact_kv).
QWEN2_VL, LLAVA = (28, 4, 128), (32, 32, 128)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if ops.backend(device) != "kernel":
        raise SystemExit(f"profile_ops: no compiled kernels for {device} ({ops.extension_error()})")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    W, K = L // 10, L // 5

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    k_mod = (torch.rand(1, L, generator=gen) < 0.3).long().to(device)  # ~30% "image" tokens

    def window_scores():
        H, Hkv, D = QWEN2_VL
        q_win, keys = randn(1, H, W, D), randn(1, Hkv, L, D)
        return lambda: ops.window_scores(q_win, keys, k_mod[:, L - W:], k_mod, scale=D ** -0.5, n=1.0)

    def select_keep():
        Hkv = LLAVA[1]
        self_s, cross_s = (torch.rand(1, Hkv, L, generator=gen).to(device) for _ in range(2))
        return lambda: ops.select_keep(self_s, cross_s, k_mod, budget=K, recent=W, cross_ratio=0.9)

    def compact_kv():
        _, Hkv, D = LLAVA
        keys, values = randn(1, Hkv, L, D), randn(1, Hkv, L, D)
        keep = torch.stack([torch.randperm(L, generator=gen)[:K].sort().values for _ in range(Hkv)])[None].to(device)
        return lambda: ops.compact_kv(keys, values, keep, check_indices=False)

    def nsoftmax_attention():
        H, Hkv, D = LLAVA
        q1, keys, values = randn(1, H, 1, D), randn(1, Hkv, K, D), randn(1, Hkv, K, D)
        return lambda: ops.nsoftmax_attention(q1, keys, values, scale=D ** -0.5)

    builders = {"window_scores": window_scores, "select_keep": select_keep, "compact_kv": compact_kv,
                "nsoftmax_attention": nsoftmax_attention}
    for name in args.op:
        call = builders[name]()
        with nvtx_range(name, device):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"profile_ops: ran {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
