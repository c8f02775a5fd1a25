"""Kernel benchmark: every cspkv op against its pure-torch reference (and peers).

For model shapes of SmolLM2-135M, LLaVA-1.5-7B and Qwen2-VL-7B, prompt lengths
1k/4k/16k (64k on GPU), windows 32 and 10% of the prompt, budget 20%: median
time of the compiled kernel, of `cspkv.reference` on the same inputs, the
speed-up, and on GPU GB/s as a share of a device-to-device copy measured in
the same run (plus TFLOP/s against a measured GEMM peak where compute matters).
`nsoftmax_attention` decode is also timed against
`torch.nn.functional.scaled_dot_product_attention` on the same pruned cache,
and `window_scores` against a bare `torch.matmul` of its window queries with
the keys (`vs_qk_gemm`): the product every scoring of the window must compute,
so the reference's time over that GEMM's bounds the speed-up any kernel of the
same precision can reach on the machine.
"cache append (decode)": one token appended to a pruned layer of 20% of the
prompt and cropped off again, cspkv's `PrunedLayer` (written in place into its
store) against transformers' `DynamicLayer` (concatenation) as the reference.
Writes benchmarks/results/ops-<device>.md/.json and prints whether each target
holds. Each case runs inside an NVTX range named after it.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from transformers.cache_utils import DynamicLayer  # noqa: E402

from cspkv import ops, reference  # noqa: E402
from cspkv.hf.cache import Liveness, PrunedLayer  # noqa: E402

SHAPES = {  # name: (H, Hkv, D)
    "SmolLM2-135M": (9, 3, 64),
    "LLaVA-1.5-7B": (32, 32, 128),
    "Qwen2-VL-7B": (28, 4, 128),
}
# The reference window_scores materialises [H, W, L] float32 several times over;
# cases beyond this many bytes of it are reported as skipped instead of swapping.
REFERENCE_BYTES_CAP = 6 << 30


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy GB/s (read + write) of a 512 MiB buffer."""
    src = torch.empty(512 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = common.median_time(lambda: dst.copy_(src), device)
    return 2 * src.numel() / t / 1e9


def gemm_peak(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul in `dtype`: the compute roof used for ratios."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = common.median_time(lambda: a @ a, device)
    return 2 * n**3 / t / 1e12


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(device: torch.device, lengths, dtype, quick: bool):
    copy_gbs = copy_bandwidth(device) if device.type == "cuda" else None
    peak_tflops = gemm_peak(device, dtype) if device.type == "cuda" else None
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = [(name, L, W) for name in SHAPES for L in lengths for W in sorted({32, max(L // 10, 1)})]
    if quick:
        cases = cases[:2]
    try:
        from tqdm import tqdm

        cases = tqdm(cases, desc="bench_ops", file=sys.stderr)
    except ImportError:
        pass
    for name, L, W in cases:
        H, Hkv, D = SHAPES[name]
        K = max(int(0.2 * L), 1)
        q_win = torch.randn(1, H, W, D, generator=gen).to(device, dtype)
        keys = torch.randn(1, Hkv, L, D, generator=gen).to(device, dtype)
        values = torch.randn(1, Hkv, L, D, generator=gen).to(device, dtype)
        k_mod = (torch.rand(1, L, generator=gen) < 0.3).long().to(device)  # ~30% "image" tokens
        q_mod = k_mod[:, L - W:]
        scale = D ** -0.5
        label = f"{name} L={L} W={W}"

        def case(op, kernel, ref, bytes_moved, flops=0.0, peer=None, peer_name=""):
            with common.nvtx_range(f"{op} {label}", device):
                t_kernel, t_ref, t_peer = common.median_times([kernel, ref, peer], device)
            row = {"op": op, "model": name, "L": L, "W": W, "kernel_ms": 1e3 * t_kernel,
                   "reference_ms": 1e3 * t_ref if t_ref else "skipped (memory)",
                   "speedup": t_ref / t_kernel if t_ref else ""}
            if peer is not None:
                row[f"vs_{peer_name}"] = t_peer / t_kernel
                row["peer_ms"] = 1e3 * t_peer
            gbs = bytes_moved / t_kernel / 1e9
            row["GB/s"] = gbs
            if copy_gbs:
                row["of_copy_bw"] = gbs / copy_gbs
                with common.nvtx_range(f"{op} {label} (device time)", device):
                    t_device = common.device_time(kernel, device)
                row["device_ms"] = 1e3 * t_device
                row["device_of_copy_bw"] = bytes_moved / t_device / 1e9 / copy_gbs
            if flops:
                row["TFLOP/s"] = flops / t_kernel / 1e12
                if copy_gbs:
                    roof = max(bytes_moved / (copy_gbs * 1e9), flops / (peak_tflops * 1e12))
                    row["of_roofline"] = roof / t_kernel
            if op == "compact_kv":
                row["cache_MB"] = cache_mb
            rows.append(row)

        ref_bytes = 4 * H * W * L * 4
        # The window's logits as one GEMM per KV head (query heads of a group stacked): [Hkv, G * W, L].
        q_groups = q_win.reshape(Hkv, H // Hkv * W, D)
        qk_gemm = (lambda: torch.matmul(q_groups, keys[0].transpose(1, 2))) if ref_bytes <= REFERENCE_BYTES_CAP else None
        case("window_scores",
             lambda: ops.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=1.0),
             (lambda: reference.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=1.0))
             if ref_bytes <= REFERENCE_BYTES_CAP else None,
             nbytes(q_win, keys) + 2 * 4 * Hkv * L, flops=2.0 * H * W * L * D, peer=qk_gemm, peer_name="qk_gemm")

        # As a patched layer runs it under SDPA: each row's log-sum-exp taken from the prefill
        # attention (timing does not depend on its values), one pass over the keys.
        lse = torch.full((1, H, W), math.log(L), device=device)
        case("window_scores (lse given)",
             lambda: ops.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=1.0, lse=lse),
             (lambda: reference.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=1.0, lse=lse))
             if ref_bytes <= REFERENCE_BYTES_CAP else None,
             nbytes(q_win, keys, lse) + 2 * 4 * Hkv * L, flops=2.0 * H * W * L * D, peer=qk_gemm, peer_name="qk_gemm")

        self_s, cross_s = ops.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=1.0)
        recent = min(W, K)
        select = lambda: ops.select_keep(self_s, cross_s, k_mod, budget=K, recent=recent, cross_ratio=0.5)  # noqa: E731
        case("select_keep", select,
             lambda: reference.select_keep(self_s, cross_s, k_mod, budget=K, recent=recent, cross_ratio=0.5),
             nbytes(self_s, cross_s) + 9 * Hkv * K)

        keep_idx, keep_valid = select()
        cache_mb = nbytes(keys, values) / 1e6
        # As pruning calls it: select_keep's indices need no value check (which on a GPU is a device sync).
        compact_bytes = 2 * 2 * Hkv * K * D * keys.element_size() + keep_idx.numel() * 8  # read + write
        case("compact_kv", lambda: ops.compact_kv(keys, values, keep_idx, check_indices=False),
             lambda: reference.compact_kv(keys, values, keep_idx), compact_bytes)
        if copy_gbs:  # the copy rate at this size: a device-to-device copy of as many bytes, timed alike
            src = torch.empty(compact_bytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            t_copy = common.device_time(lambda: dst.copy_(src), device)
            rows[-1]["device_of_same_size_copy"] = t_copy / (rows[-1]["device_ms"] / 1e3)
            del src, dst

        kc, vc = ops.compact_kv(keys, values, keep_idx)
        q1 = torch.randn(1, H, 1, D, generator=gen).to(device, dtype)
        case("nsoftmax_attention (decode)",
             lambda: ops.nsoftmax_attention(q1, kc, vc, scale=scale),
             lambda: reference.nsoftmax_attention(q1, kc, vc, scale=scale),
             nbytes(q1, kc, vc) + q1.numel() * q1.element_size(), flops=4.0 * H * K * D,
             peer=lambda: F.scaled_dot_product_attention(q1, kc, vc, scale=scale, enable_gqa=True),
             peer_name="sdpa")

        if W == 32:  # a decode step's append to the pruned cache (no window in it: once per model and length)
            k1 = torch.randn(1, Hkv, 1, D, generator=gen).to(device, dtype)
            in_place = PrunedLayer(kc, vc, torch.ones(1, Hkv, K, dtype=torch.bool, device=device), L, Liveness())
            in_place.update(k1, k1)  # steady state: the pruned layer has its store
            concatenating = DynamicLayer()
            concatenating.update(kc, vc)
            case("cache append (decode)", lambda: (in_place.update(k1, k1), in_place.crop(-1)),
                 lambda: (concatenating.update(k1, k1), concatenating.crop(-1)), 2 * nbytes(k1))
    return rows, copy_gbs, peak_tflops


def targets(rows, device: torch.device):
    """(description, holds) for each performance target of the issue that applies to `device`."""
    out = []

    def rows_of(op, **match):
        return [r for r in rows if r["op"] == op and all(r[k] == v for k, v in match.items())]

    if device.type == "cpu":
        ws = [r for r in rows_of("window_scores", L=4096) + rows_of("window_scores (lse given)", L=4096)
              if r["speedup"] != ""]
        if ws:
            # Where it misses: how much faster than the reference the bare QK^T GEMM alone ran (the bound).
            short = "; ".join(f"{r['op']} {r['model']} W={r['W']}: {r['speedup']:.2f}x (the bare QK^T GEMM "
                              f"{r['reference_ms'] / r['peer_ms']:.2f}x)" for r in ws if r["speedup"] < 3)
            out.append(("CPU window_scores >= 3x the reference at 4k tokens (every shape and window, with and "
                        "without a given log-sum-exp)" + (f"; short: {short}" if short else ""),
                        all(r["speedup"] >= 3 for r in ws)))
        ck = rows_of("compact_kv")
        out.append(("CPU compact_kv at least as fast as the reference", all(r["speedup"] >= 1 for r in ck)))
        at = rows_of("nsoftmax_attention (decode)")
        out.append(("CPU nsoftmax_attention decode at least as fast as SDPA on the same pruned cache",
                    all(r["vs_sdpa"] >= 1 for r in at)))
    else:
        big = [r for r in rows_of("compact_kv") if r["cache_MB"] >= 64]
        out.append(("GPU compact_kv >= 80% of copy bandwidth for caches >= 64 MB (op time, host work included)",
                    bool(big) and all(r["of_copy_bw"] >= 0.8 for r in big)))
        out.append(("GPU compact_kv >= 80% of copy bandwidth for caches >= 64 MB (device time)",
                    bool(big) and all(r["device_of_copy_bw"] >= 0.8 for r in big)))
        out.append(("GPU compact_kv >= 80% of a same-size device-to-device copy's bandwidth for caches >= 64 MB "
                    "(device time)", bool(big) and all(r["device_of_same_size_copy"] >= 0.8 for r in big)))
        for op, how in (("window_scores", "two passes"), ("window_scores (lse given)", "one pass, lse given")):
            ws = rows_of(op, L=16384)
            out.append((f"GPU window_scores ({how}) >= 50% of its roofline at 16k tokens",
                        bool(ws) and all(r["of_roofline"] >= 0.5 for r in ws)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two cases only (smoke test)")
    parser.add_argument("--out", default=common.RESULTS, help="folder of the result files (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if ops.backend(device) != "kernel":
        raise SystemExit(f"bench_ops: no compiled kernels for {device} ({ops.extension_error()})")
    lengths = [1024, 4096, 16384] + ([65536] if device.type == "cuda" else [])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, copy_gbs, peak = run(device, lengths, dtype, args.quick)

    header = (f"# cspkv op benchmark on {common.device_description(device)}\n\n"
              f"dtype {str(dtype).replace('torch.', '')}, batch 1, budget 20%, recent = window; "
              f"median of up to 7 runs; reference = cspkv/reference.py on the same inputs (for the cache "
              f"append: a transformers DynamicLayer of the same size, one token appended and cropped off again)"
              + ("; kernel, reference and peer calls interleaved round by round, each round timing as many "
                 f"back-to-back calls of each as take about {common.CPU_SAMPLE_SECONDS * 1e3:g} ms (at most 100)."
                 if device.type == "cpu" else "."))
    if device.type == "cuda":
        header += ("\nCUDA times: events around back-to-back calls (as many as take 1 ms, at most 100), L2 "
                   "flushed before each batch; an op's time includes its host work (compact_kv runs with "
                   "check_indices=False, as pruning does: no device sync). device_ms: one call with L2 flushed "
                   "while the GPU is held busy, so the host work is hidden (as in a model whose GPU runs behind "
                   "its host); device_of_same_size_copy: compact_kv's device time against a device-to-device copy of "
                   "as many bytes, timed alike. Kernel-only times: ncu-<device>.md.")
    if copy_gbs:
        header += f"\nDevice-to-device copy: {copy_gbs:.0f} GB/s; {dtype} GEMM peak: {peak:.0f} TFLOP/s."
    checks = targets(rows, device)
    extra = "\n## Targets\n\n" + "\n".join(f"- {'HOLDS' if ok else 'MISSED'}: {text}" for text, ok in checks) + "\n"
    columns = ["op", "model", "L", "W", "cache_MB", "kernel_ms", "reference_ms", "speedup", "peer_ms", "vs_sdpa", "vs_qk_gemm", "GB/s",
               "of_copy_bw", "device_ms", "device_of_copy_bw", "device_of_same_size_copy", "TFLOP/s", "of_roofline"]
    if device.type == "cpu":
        columns = [c for c in columns if c not in ("of_copy_bw", "device_ms", "device_of_copy_bw",
                                                   "device_of_same_size_copy", "of_roofline")]
    stem = f"ops-{common.device_label(device)}" + ("-quick" if args.quick else "")
    table = common.write_results(stem, header, rows, columns, extra, folder=args.out)
    print(header + "\n\n" + table + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
