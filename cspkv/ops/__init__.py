"""The cspkv ops: typed wrappers over ``torch.ops.cspkv.*``, each with its fake kernel.

The wing that knows kernels and nothing of models: it imports no transformers.
Each wrapper runs the compiled kernel when `backend(device)` says the
extension serves the device (see `cspkv.ops.loading`), else the pure-torch
version in `cspkv.ops.reference`, which documents shapes and semantics and is
the oracle the kernels are tested against. Each fake kernel (a shape function
for torch.compile and meta tensors) sits beside its wrapper; it checks only
what needs no data (devices), so a mixed-device call fails the same way under
torch.compile.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, loading, reference
from .loading import backend, build_info, cpu_threads, extension, extension_error

__all__ = [
    "window_scores", "select_keep", "compact_kv", "nsoftmax_attention",
    "backend", "build_info", "cpu_threads", "extension", "extension_error", "reference",
]


def _fake(op: str):
    """Register the decorated function as `op`'s fake kernel once the extension has defined `op`."""

    def register(fn):
        loading.on_load(lambda: torch.library.register_fake(op)(fn))
        return fn

    return register


def window_scores(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    q_mod: torch.Tensor,
    k_mod: torch.Tensor,
    *,
    scale: float,
    n: float = 1.0,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused modality-masked window scores; see `cspkv.reference.window_scores`."""
    if isinstance(keys, torch.Tensor) and backend(keys.device) == "kernel":
        return torch.ops.cspkv.window_scores.default(q_win, keys, q_mod, k_mod, scale=float(scale), n=float(n), lse=lse)
    return reference.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=n, lse=lse)


@_fake("cspkv::window_scores")
def _window_scores_fake(q_win, keys, q_mod, k_mod, *, scale, n=1.0, lse=None):
    checks.same_device("window_scores", q_win=q_win, keys=keys, q_mod=q_mod, k_mod=k_mod, lse=lse)
    B, Hkv, L = keys.shape[0], keys.shape[1], keys.shape[2]
    return keys.new_empty((B, Hkv, L), dtype=torch.float32), keys.new_empty((B, Hkv, L), dtype=torch.float32)


def select_keep(
    self_scores: torch.Tensor,
    cross_scores: torch.Tensor,
    k_mod: torch.Tensor,
    *,
    budget: int,
    recent: int,
    cross_ratio: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kept key indices per row and KV head; see `cspkv.reference.select_keep`."""
    if isinstance(self_scores, torch.Tensor) and backend(self_scores.device) == "kernel":
        for name, value in (("budget", budget), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"cspkv.select_keep: {name} must be an int, got {value!r}")
        return torch.ops.cspkv.select_keep.default(
            self_scores, cross_scores, k_mod, budget=budget, recent=recent, cross_ratio=float(cross_ratio)
        )
    return reference.select_keep(self_scores, cross_scores, k_mod, budget=budget, recent=recent, cross_ratio=cross_ratio)


@_fake("cspkv::select_keep")
def _select_keep_fake(self_scores, cross_scores, k_mod, *, budget, recent, cross_ratio):
    checks.same_device("select_keep", self_scores=self_scores, cross_scores=cross_scores, k_mod=k_mod)
    B, Hkv = self_scores.shape[0], self_scores.shape[1]
    return (
        self_scores.new_empty((B, Hkv, budget), dtype=torch.int64),
        self_scores.new_empty((B, Hkv, budget), dtype=torch.bool),
    )


def compact_kv(
    keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, *, check_indices: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather of the kept tokens; see `cspkv.reference.compact_kv`."""
    if isinstance(keys, torch.Tensor) and backend(keys.device) == "kernel":
        checks.boolean("compact_kv", "check_indices", check_indices)
        return torch.ops.cspkv.compact_kv.default(keys, values, keep_idx, check_indices=check_indices)
    return reference.compact_kv(keys, values, keep_idx, check_indices=check_indices)


@_fake("cspkv::compact_kv")
def _compact_kv_fake(keys, values, keep_idx, *, check_indices=True):
    checks.same_device("compact_kv", keys=keys, values=values, keep_idx=keep_idx)
    B, Hkv, K = keep_idx.shape
    return keys.new_empty((B, Hkv, K, keys.shape[3])), values.new_empty((B, Hkv, K, values.shape[3]))


def nsoftmax_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    scale: float,
    n: float = 0.0,
    kv_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention over a pruned cache with an n-softmax; see `cspkv.reference.nsoftmax_attention`.

    Outside torch.compile the op is called through the extension's typed binding: the same
    dispatch (kernels, profiler records, dispatch modes, meta and fake tensors) with less
    host time than ``torch.ops``' call by schema, once per pruned layer and decode step."""
    if isinstance(q, torch.Tensor) and backend(q.device) == "kernel":
        if torch.compiler.is_compiling():
            return torch.ops.cspkv.nsoftmax_attention.default(q, keys, values, scale=float(scale), n=float(n), kv_valid=kv_valid)
        return loading._state["ext"].nsoftmax_attention(q, keys, values, float(scale), float(n), kv_valid)
    return reference.nsoftmax_attention(q, keys, values, scale=scale, n=n, kv_valid=kv_valid)


@_fake("cspkv::nsoftmax_attention")
def _nsoftmax_attention_fake(q, keys, values, *, scale, n=0.0, kv_valid=None):
    checks.same_device("nsoftmax_attention", q=q, keys=keys, values=values, kv_valid=kv_valid)
    B, H, Q = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((B, H, Q, values.shape[3]))


extension()  # now, not at the first op call: torch.compile cannot trace the import
