"""The cspkv ops: typed wrappers over ``torch.ops.cspkv.*``, each with its fake kernel.

The wing that knows kernels and nothing of models: it imports no transformers.
Each wrapper runs the compiled kernel when `backend(device)` says the
extension serves the device (see `cspkv.ops.loading`), else the pure-torch
version in `cspkv.ops.reference`, which documents shapes and semantics and is
the oracle the kernels are tested against. Each fake kernel (a shape function
for torch.compile and meta tensors) sits beside its wrapper; it runs every
check that needs no data (`cspkv.ops.checks`, the C++ checks' messages), so a
bad call fails the same way under torch.compile or with meta tensors.

Gradients: `compact_kv` is a gather and has one (its backward scatters the
output gradients back to the kept rows). `window_scores` and
`nsoftmax_attention` / `packed_attention` have none: cspkv prunes at inference, so asking for one
(grad mode on and an input that requires grad) raises a RuntimeError on
every backend, instead of torch's silent None. `select_keep` returns indices
and flags, which carry no gradient: scores that require grad are fine.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, loading, reference
from .loading import backend, build_info, cpu_threads, extension, extension_error

__all__ = [
    "window_scores", "select_keep", "compact_kv", "nsoftmax_attention", "packed_attention",
    "backend", "build_info", "cpu_threads", "extension", "extension_error", "reference",
]


def _no_gradient(op: str, **tensors) -> None:
    """Raise if an input requires grad (call in grad mode only): `op` has no gradient."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"cspkv.{op}: has no gradient (cspkv prunes at inference), but {name} requires grad; "
                "call it under torch.no_grad() / torch.inference_mode() or detach the inputs"
            )


def _plain(*values) -> bool:
    """All scalar arguments are Python numbers (else the Python checks name the bad one)."""
    for value in values:
        if not (type(value) is float or type(value) is int):
            return False
    return True


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
    """Fused modality-masked window scores; see `cspkv.reference.window_scores`.

    No gradient: raises a RuntimeError when grad mode is on and an input requires grad."""
    if torch.is_grad_enabled():
        _no_gradient("window_scores", q_win=q_win, keys=keys, lse=lse)
    scale, n = checks.as_real(scale), checks.as_real(n)
    if isinstance(keys, torch.Tensor) and backend(keys.device) == "kernel":
        if not _plain(scale, n):
            checks.window_scores_args(q_win, keys, q_mod, k_mod, scale, n, lse)
        return torch.ops.cspkv.window_scores.default(q_win, keys, q_mod, k_mod, scale=float(scale), n=float(n), lse=lse)
    return reference.window_scores(q_win, keys, q_mod, k_mod, scale=scale, n=n, lse=lse)


@_fake("cspkv::window_scores")
def _window_scores_fake(q_win, keys, q_mod, k_mod, *, scale, n=1.0, lse=None):
    checks.window_scores_args(q_win, keys, q_mod, k_mod, scale, n, lse)
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
    """Kept key indices per row and KV head; see `cspkv.reference.select_keep`.

    The outputs are indices and flags, which have no gradient: scores that require grad
    are accepted (as by any integer-valued torch op) and the outputs do not require grad."""
    budget, recent, cross_ratio = checks.as_int(budget), checks.as_int(recent), checks.as_real(cross_ratio)
    if isinstance(self_scores, torch.Tensor) and backend(self_scores.device) == "kernel":
        if not (_plain(cross_ratio) and type(budget) is int and type(recent) is int):
            checks.select_keep_args(self_scores, cross_scores, k_mod, budget, recent, cross_ratio)
        return torch.ops.cspkv.select_keep.default(
            self_scores, cross_scores, k_mod, budget=budget, recent=recent, cross_ratio=float(cross_ratio)
        )
    return reference.select_keep(self_scores, cross_scores, k_mod, budget=budget, recent=recent, cross_ratio=cross_ratio)


@_fake("cspkv::select_keep")
def _select_keep_fake(self_scores, cross_scores, k_mod, *, budget, recent, cross_ratio):
    checks.select_keep_args(self_scores, cross_scores, k_mod, budget, recent, cross_ratio)
    B, Hkv = self_scores.shape[0], self_scores.shape[1]
    return (
        self_scores.new_empty((B, Hkv, budget), dtype=torch.int64),
        self_scores.new_empty((B, Hkv, budget), dtype=torch.bool),
    )


def compact_kv(
    keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, *, check_indices: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather of the kept tokens; see `cspkv.reference.compact_kv`.

    Differentiable in keys and values on every backend (the gradient of a gather)."""
    if isinstance(keys, torch.Tensor) and backend(keys.device) == "kernel":
        checks.boolean("compact_kv", "check_indices", check_indices)
        return torch.ops.cspkv.compact_kv.default(keys, values, keep_idx, check_indices=check_indices)
    return reference.compact_kv(keys, values, keep_idx, check_indices=check_indices)


@_fake("cspkv::compact_kv")
def _compact_kv_fake(keys, values, keep_idx, *, check_indices=True):
    checks.compact_kv_shapes(keys, values, keep_idx)  # keep_idx's values need its data
    B, Hkv, K = keep_idx.shape
    return keys.new_empty((B, Hkv, K, keys.shape[3])), values.new_empty((B, Hkv, K, values.shape[3]))


def _compact_kv_setup_context(ctx, inputs, keyword_only_inputs, output):
    keys, values, keep_idx = inputs
    ctx.save_for_backward(keep_idx)
    ctx.shapes = (keys.shape, values.shape)
    # An output the loss does not use passes None, not zeros: its input then gets no
    # gradient (None), as from a gather on the reference path, and no scatter runs.
    ctx.set_materialize_grads(False)


def _compact_kv_backward(ctx, grad_keys_out, grad_values_out):
    """The adjoint of the gather: each output row's gradient added back at the row it was read from
    (keep_idx holds no duplicates, so this is a scatter; a row never kept gets zeros)."""
    (keep_idx,) = ctx.saved_tensors
    grads = []
    for i, (grad, shape) in enumerate(zip((grad_keys_out, grad_values_out), ctx.shapes)):
        if grad is None or not ctx.needs_input_grad[i]:
            grads.append(None)
            continue
        index = keep_idx[..., None].expand(-1, -1, -1, shape[3])
        grads.append(grad.new_zeros(shape).scatter_add_(2, index, grad))
    return grads[0], grads[1], None


loading.on_load(lambda: torch.library.register_autograd(
    "cspkv::compact_kv", _compact_kv_backward, setup_context=_compact_kv_setup_context
))


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
    host time than ``torch.ops``' call by schema, once per pruned layer and decode step.

    No gradient: raises a RuntimeError when grad mode is on and an input requires grad."""
    if torch.is_grad_enabled():
        _no_gradient("nsoftmax_attention", q=q, keys=keys, values=values)
    plain = type(scale) is float and type(n) is float  # else ints, numpy numbers or bad values: off the decode path
    if not plain:
        scale, n = checks.as_real(scale), checks.as_real(n)
    if isinstance(q, torch.Tensor) and backend(q.device) == "kernel":
        if not plain and not _plain(scale, n):
            checks.nsoftmax_attention_args(q, keys, values, scale, n, kv_valid)
        if torch.compiler.is_compiling():
            return torch.ops.cspkv.nsoftmax_attention.default(q, keys, values, scale=float(scale), n=float(n), kv_valid=kv_valid)
        return loading._state["ext"].nsoftmax_attention(q, keys, values, float(scale), float(n), kv_valid)
    return reference.nsoftmax_attention(q, keys, values, scale=scale, n=n, kv_valid=kv_valid)


@_fake("cspkv::nsoftmax_attention")
def _nsoftmax_attention_fake(q, keys, values, *, scale, n=0.0, kv_valid=None):
    checks.nsoftmax_attention_args(q, keys, values, scale, n, kv_valid)
    B, H, Q = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((B, H, Q, values.shape[3]))


def packed_attention(
    q: torch.Tensor,
    key_data: torch.Tensor,
    value_data: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    n: float = 0.0,
) -> torch.Tensor:
    """Attention over a packed cache (one segment per batch row and KV head); see
    `cspkv.reference.packed_attention`. Called through the extension's typed binding outside
    torch.compile, like `nsoftmax_attention`.

    No gradient: raises a RuntimeError when grad mode is on and an input requires grad."""
    if torch.is_grad_enabled():
        _no_gradient("packed_attention", q=q, key_data=key_data, value_data=value_data)
    plain = type(scale) is float and type(n) is float
    if not plain:
        scale, n = checks.as_real(scale), checks.as_real(n)
    if isinstance(q, torch.Tensor) and backend(q.device) == "kernel":
        if not plain and not _plain(scale, n):
            checks.packed_attention_args(q, key_data, value_data, offsets, lengths, scale, n)
        if torch.compiler.is_compiling():
            return torch.ops.cspkv.packed_attention.default(q, key_data, value_data, offsets, lengths,
                                                            scale=float(scale), n=float(n))
        return loading._state["ext"].packed_attention(q, key_data, value_data, offsets, lengths, float(scale), float(n))
    return reference.packed_attention(q, key_data, value_data, offsets, lengths, scale=scale, n=n)


@_fake("cspkv::packed_attention")
def _packed_attention_fake(q, key_data, value_data, offsets, lengths, *, scale, n=0.0):
    checks.packed_attention_args(q, key_data, value_data, offsets, lengths, scale, n)
    B, H, T = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((B, H, T, value_data.shape[1]))


extension()  # now, not at the first op call: torch.compile cannot trace the import
