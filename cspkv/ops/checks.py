"""Argument validation for the cspkv ops, shared by the pure-torch reference and the fake kernels.

The C++ ops (csrc/checks.cpp) enforce the same contract with the same
messages, character for character: dtypes and floats are printed as C++
prints them (``Float``, ``0.5``, ``1e-07``), so that a call fails the same way
on the kernel, on the reference and under torch.compile or meta tensors (the
fake kernels run these checks). tests/test_bad_input.py runs every case
against the kernel and the reference, tests/test_ops_edges.py against the
fake kernels. Messages name the op, the argument and what was expected:
``cspkv.compact_kv: keep_idx must be int64, got Float``.

Integer and real scalar arguments may be numpy scalars too: `as_int` and
`as_real` turn them into plain Python numbers first (the config and the
policies use them as well).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ID_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, message: str, kind: type = ValueError) -> None:
    raise kind(f"cspkv.{op}: {message}")


def as_int(value):
    """`value` as a plain int if it is an integer number other than a bool (a numpy integer
    scalar, say); anything else as given, for the checks to reject by name."""
    if type(value) is not int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def as_real(value):
    """`value` as a plain int or float if it is a real number other than a bool; anything else
    as given, for the checks to reject by name.

    A numpy float32 or float16 scalar becomes the float of its shortest repr:
    ``np.float32(0.2)`` holds 0.20000000298..., but the 0.2 it prints is what was
    meant, and what ``CSPConfig(budget=0.2)`` or a ``floor(cross_ratio * n)`` sees."""
    if type(value) is float or type(value) is int or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        dtype = getattr(value, "dtype", None)
        return float(str(value)) if getattr(dtype, "itemsize", 8) < 8 else float(value)
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _real_text(value) -> str:
    """A float argument as the C++ checks print a double (ostream's default, like %g)."""
    return f"{value:g}" if _is_number(value) else repr(value)


# c10's ScalarType names, as csrc/checks.cpp prints a dtype (a fake kernel runs under
# FakeTensorMode, so they cannot be read off a tensor made there).
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.bool: "Bool", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64",
}


def dtype_text(dtype: torch.dtype) -> str:
    """A dtype as the C++ checks print it: c10's ScalarType name (Float, Half, BFloat16, Long);
    a rarer dtype as torch names it."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def tensor(op: str, name: str, t, rank: int, layout: str, dtypes: Sequence[torch.dtype]) -> None:
    """Type, rank, dtype and non-emptiness of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor {layout}, got {type(t).__name__}", TypeError)
    if t.dim() != rank:
        _fail(op, f"{name} must have rank {rank} {layout}, got shape {list(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(op, f"{name} must be {names}, got {dtype_text(t.dtype)}", TypeError)
    if t.numel() == 0:
        _fail(op, f"{name} must not be empty {layout}, got shape {list(t.shape)}")


def same_dim(op: str, what: str, pairs: Sequence[tuple]) -> None:
    """Every (name, size) pair must agree on the size of dimension `what`."""
    first_name, first = pairs[0]
    for name, size in pairs[1:]:
        if size != first:
            _fail(op, f"{what} mismatch: {first_name} has {first}, {name} has {size}")


def same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        _fail(op, f"all tensors must be on one device, got {listing}")


def positive(op: str, name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        _fail(op, f"{name} must be a finite number > 0, got {_real_text(value)}")


def boolean(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        _fail(op, f"{name} must be a bool, got {value!r}", TypeError)


def non_negative(op: str, name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        _fail(op, f"{name} must be a finite number >= 0, got {_real_text(value)}")


def window_scores_args(q_win, keys, q_mod, k_mod, scale, n, lse=None) -> None:
    op = "window_scores"
    tensor(op, "q_win", q_win, 4, "[B, H, W, D]", FLOAT_DTYPES)
    tensor(op, "keys", keys, 4, "[B, Hkv, L, D]", FLOAT_DTYPES)
    tensor(op, "q_mod", q_mod, 2, "[B, W]", ID_DTYPES)
    tensor(op, "k_mod", k_mod, 2, "[B, L]", ID_DTYPES)
    same_device(op, q_win=q_win, keys=keys, q_mod=q_mod, k_mod=k_mod)
    if keys.dtype != q_win.dtype:
        _fail(op, f"keys must have the dtype of q_win ({dtype_text(q_win.dtype)}), got {dtype_text(keys.dtype)}", TypeError)
    B, H, W, D = q_win.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    same_dim(op, "batch size B", [("q_win", B), ("keys", keys.shape[0]), ("q_mod", q_mod.shape[0]), ("k_mod", k_mod.shape[0])])
    same_dim(op, "head dim D", [("q_win", D), ("keys", keys.shape[3])])
    same_dim(op, "window W", [("q_win", W), ("q_mod", q_mod.shape[1])])
    same_dim(op, "key length L", [("keys", L), ("k_mod", k_mod.shape[1])])
    if H % Hkv != 0:
        _fail(op, f"query heads H={H} (q_win) must be a multiple of KV heads Hkv={Hkv} (keys)")
    if W > L:
        _fail(op, f"window W={W} (q_win) must be <= key length L={L} (keys)")
    positive(op, "scale", scale)
    non_negative(op, "n", n)
    if lse is not None:
        tensor(op, "lse", lse, 3, "[B, H, W]", (torch.float32,))
        same_device(op, q_win=q_win, lse=lse)
        if list(lse.shape) != [B, H, W]:
            _fail(op, f"lse must have shape [B, H, W]={[B, H, W]} (one log-sum-exp per window query row of q_win), got {list(lse.shape)}")


def select_keep_args(self_scores, cross_scores, k_mod, budget, recent, cross_ratio) -> None:
    op = "select_keep"
    tensor(op, "self_scores", self_scores, 3, "[B, Hkv, L]", (torch.float32,))
    tensor(op, "cross_scores", cross_scores, 3, "[B, Hkv, L]", (torch.float32,))
    tensor(op, "k_mod", k_mod, 2, "[B, L]", ID_DTYPES)
    same_device(op, self_scores=self_scores, cross_scores=cross_scores, k_mod=k_mod)
    if self_scores.shape != cross_scores.shape:
        _fail(op, f"cross_scores must have the shape of self_scores {list(self_scores.shape)}, got {list(cross_scores.shape)}")
    B, _, L = self_scores.shape
    same_dim(op, "batch size B", [("self_scores", B), ("k_mod", k_mod.shape[0])])
    same_dim(op, "key length L", [("self_scores", L), ("k_mod", k_mod.shape[1])])
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= L:
        _fail(op, f"budget must be an int in [1, L={L}] (tokens kept per row and KV head), got {budget!r}")
    if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= budget:
        _fail(op, f"recent must be an int in [0, budget={budget}], got {recent!r}")
    if not (_is_number(cross_ratio) and 0.0 <= cross_ratio <= 1.0):
        _fail(op, f"cross_ratio must be a number in [0, 1], got {_real_text(cross_ratio)}")


def compact_kv_args(keys, values, keep_idx, check_indices: bool = True) -> None:
    """Everything; the values of keep_idx (which need its data) only with check_indices."""
    compact_kv_shapes(keys, values, keep_idx)
    boolean("compact_kv", "check_indices", check_indices)
    if check_indices:
        keep_idx_values(keep_idx, keys.shape[2])


def compact_kv_shapes(keys, values, keep_idx) -> None:
    """What needs no data: types, dtypes, ranks, sizes, devices (the fake kernel's checks)."""
    op = "compact_kv"
    tensor(op, "keys", keys, 4, "[B, Hkv, L, D]", FLOAT_DTYPES)
    tensor(op, "values", values, 4, "[B, Hkv, L, Dv]", FLOAT_DTYPES)
    tensor(op, "keep_idx", keep_idx, 3, "[B, Hkv, K]", (torch.int64,))
    same_device(op, keys=keys, values=values, keep_idx=keep_idx)
    if values.dtype != keys.dtype:
        _fail(op, f"values must have the dtype of keys ({dtype_text(keys.dtype)}), got {dtype_text(values.dtype)}", TypeError)
    B, Hkv, L, _ = keys.shape
    same_dim(op, "batch size B", [("keys", B), ("values", values.shape[0]), ("keep_idx", keep_idx.shape[0])])
    same_dim(op, "KV heads Hkv", [("keys", Hkv), ("values", values.shape[1]), ("keep_idx", keep_idx.shape[1])])
    same_dim(op, "key length L", [("keys", L), ("values", values.shape[2])])
    K = keep_idx.shape[2]
    if K > L:
        _fail(op, f"keep_idx keeps K={K} tokens, more than the key length L={L}")


def keep_idx_values(keep_idx: torch.Tensor, L: int) -> None:
    """Range and strict order of keep_idx's values (reads them: a device sync on a GPU)."""
    op = "compact_kv"
    K = keep_idx.shape[2]
    lo, hi = int(keep_idx.min()), int(keep_idx.max())
    if lo < 0 or hi >= L:
        _fail(op, f"keep_idx values must lie in [0, L={L}), got values in [{lo}, {hi}]", IndexError)
    if K > 1 and bool((keep_idx[..., 1:] <= keep_idx[..., :-1]).any()):
        _fail(op, "keep_idx must be strictly ascending along K (sorted, no duplicates)")


def nsoftmax_attention_args(q, keys, values, scale, n, kv_valid) -> None:
    op = "nsoftmax_attention"
    tensor(op, "q", q, 4, "[B, H, Q, D]", FLOAT_DTYPES)
    tensor(op, "keys", keys, 4, "[B, Hkv, Lc, D]", FLOAT_DTYPES)
    tensor(op, "values", values, 4, "[B, Hkv, Lc, Dv]", FLOAT_DTYPES)
    same_device(op, q=q, keys=keys, values=values, kv_valid=kv_valid)
    for name, t in (("keys", keys), ("values", values)):
        if t.dtype != q.dtype:
            _fail(op, f"{name} must have the dtype of q ({dtype_text(q.dtype)}), got {dtype_text(t.dtype)}", TypeError)
    B, H, Q, D = q.shape
    Hkv, Lc = keys.shape[1], keys.shape[2]
    same_dim(op, "batch size B", [("q", B), ("keys", keys.shape[0]), ("values", values.shape[0])])
    same_dim(op, "head dim D", [("q", D), ("keys", keys.shape[3])])
    same_dim(op, "KV heads Hkv", [("keys", Hkv), ("values", values.shape[1])])
    same_dim(op, "cache length Lc", [("keys", Lc), ("values", values.shape[2])])
    if H % Hkv != 0:
        _fail(op, f"query heads H={H} (q) must be a multiple of KV heads Hkv={Hkv} (keys)")
    if Q > Lc:
        _fail(op, f"queries Q={Q} (q) must be <= cache length Lc={Lc} (keys): new tokens sit at the end of the cache")
    positive(op, "scale", scale)
    non_negative(op, "n", n)
    if kv_valid is not None:
        if not isinstance(kv_valid, torch.Tensor) or kv_valid.dtype != torch.bool:
            got = dtype_text(kv_valid.dtype) if isinstance(kv_valid, torch.Tensor) else type(kv_valid).__name__
            _fail(op, f"kv_valid must be a bool tensor [B, Lc] or [B, Hkv, Lc], got {got}", TypeError)
        if list(kv_valid.shape) not in ([B, Lc], [B, Hkv, Lc]):
            _fail(op, f"kv_valid must have shape [B, Lc]={[B, Lc]} or [B, Hkv, Lc]={[B, Hkv, Lc]}, got {list(kv_valid.shape)}")


def packed_attention_args(q, key_data, value_data, offsets, lengths, scale, n) -> None:
    """What needs no data (the fake kernel's checks); `packed_segment_values` checks the segments."""
    op = "packed_attention"
    tensor(op, "q", q, 4, "[B, H, T, D]", FLOAT_DTYPES)
    tensor(op, "key_data", key_data, 2, "[N, D]", FLOAT_DTYPES)
    tensor(op, "value_data", value_data, 2, "[N, Dv]", FLOAT_DTYPES)
    tensor(op, "offsets", offsets, 1, "[B * Hkv]", (torch.int64,))
    tensor(op, "lengths", lengths, 1, "[B * Hkv]", (torch.int64,))
    same_device(op, q=q, key_data=key_data, value_data=value_data, offsets=offsets, lengths=lengths)
    for name, t in (("key_data", key_data), ("value_data", value_data)):
        if t.dtype != q.dtype:
            _fail(op, f"{name} must have the dtype of q ({dtype_text(q.dtype)}), got {dtype_text(t.dtype)}", TypeError)
    B, H, _, D = q.shape
    same_dim(op, "head dim D", [("q", D), ("key_data", key_data.shape[1])])
    same_dim(op, "rows N", [("key_data", key_data.shape[0]), ("value_data", value_data.shape[0])])
    segments = offsets.shape[0]
    same_dim(op, "segments B*Hkv", [("offsets", segments), ("lengths", lengths.shape[0])])
    if segments % B != 0:
        _fail(op, f"offsets must hold B*Hkv entries (one per batch row and KV head), a multiple of B={B} (q), got {segments}")
    Hkv = segments // B
    if H % Hkv != 0:
        _fail(op, f"query heads H={H} (q) must be a multiple of KV heads Hkv={Hkv} (offsets: B*Hkv={segments})")
    positive(op, "scale", scale)
    non_negative(op, "n", n)


def packed_segment_values(offsets: torch.Tensor, lengths: torch.Tensor, N: int) -> None:
    """Each segment [offsets, offsets + lengths) must lie in [0, N) (reads them: a device sync on a GPU)."""
    lo_off, lo_len = int(offsets.min()), int(lengths.min())
    hi_end = int((offsets + lengths).max())
    if lo_off < 0 or lo_len < 0 or hi_end > N:
        _fail("packed_attention", f"segments [offsets, offsets + lengths) must lie in [0, N={N}) with lengths >= 0, "
              f"got offsets >= {lo_off}, lengths >= {lo_len}, ends up to {hi_end}", IndexError)
