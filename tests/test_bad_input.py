"""Every op rejects bad arguments with a message naming the op and the argument.

One table of cases, each run against the compiled op (through `cspkv.ops`, whose
CPU path is ``torch.ops.cspkv.*``) and against `cspkv.reference`: both must raise
the same exception type (C++ TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE ->
TypeError, TORCH_CHECK_INDEX -> IndexError) with ``cspkv.<op>`` and the
argument's name in the message.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Tuple

import pytest
import torch

import cspkv.ops
from cspkv import reference


def _base(op: str) -> dict:
    """Valid arguments of `op`, on CPU: B=2, H=4, Hkv=2, W=3 / Q=2, L=6, D=8, Dv=5."""
    g = torch.Generator().manual_seed(0)
    k_mod = torch.tensor([[-1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 0, 1]])
    if op == "window_scores":
        return dict(q_win=torch.randn(2, 4, 3, 8, generator=g), keys=torch.randn(2, 2, 6, 8, generator=g),
                    q_mod=k_mod[:, 3:].clone(), k_mod=k_mod, scale=0.35, n=1.0)
    if op == "select_keep":
        return dict(self_scores=torch.rand(2, 2, 6, generator=g), cross_scores=torch.rand(2, 2, 6, generator=g),
                    k_mod=k_mod, budget=3, recent=1, cross_ratio=0.5)
    if op == "compact_kv":
        return dict(keys=torch.randn(2, 2, 6, 8, generator=g), values=torch.randn(2, 2, 6, 5, generator=g),
                    keep_idx=torch.tensor([0, 2, 5]).expand(2, 2, 3).contiguous())
    return dict(q=torch.randn(2, 4, 2, 8, generator=g), keys=torch.randn(2, 2, 6, 8, generator=g),
                values=torch.randn(2, 2, 6, 5, generator=g), scale=0.35, n=0.0, kv_valid=k_mod >= 0)


class Bad(NamedTuple):
    op: str
    label: str
    change: Callable[[dict, torch.device], dict]  # (base arguments, a second device) -> arguments to replace
    error: type
    names: Tuple[str, ...]  # words the message must contain besides "cspkv.<op>"


def _idx(*rows):
    return torch.tensor(rows[0] if len(rows) == 1 else rows).expand(2, 2, -1).contiguous()


V, T, I = ValueError, TypeError, IndexError

CASES = [
    # ------------------------------------------------------- window_scores
    Bad("window_scores", "q_win-rank3", lambda a, other: dict(q_win=a["q_win"][0]), V, ("q_win",)),
    Bad("window_scores", "keys-rank5", lambda a, other: dict(keys=a["keys"][None]), V, ("keys",)),
    Bad("window_scores", "q_mod-rank1", lambda a, other: dict(q_mod=a["q_mod"][0]), V, ("q_mod",)),
    Bad("window_scores", "k_mod-rank3", lambda a, other: dict(k_mod=a["k_mod"][None]), V, ("k_mod",)),
    Bad("window_scores", "B-keys", lambda a, other: dict(keys=a["keys"][:1]), V, ("keys",)),
    Bad("window_scores", "B-q_mod", lambda a, other: dict(q_mod=a["q_mod"][:1]), V, ("q_mod",)),
    Bad("window_scores", "B-k_mod", lambda a, other: dict(k_mod=a["k_mod"][:1]), V, ("k_mod",)),
    Bad("window_scores", "L-k_mod", lambda a, other: dict(k_mod=a["k_mod"][:, :5]), V, ("k_mod",)),
    Bad("window_scores", "D-keys", lambda a, other: dict(keys=a["keys"][..., :7]), V, ("keys",)),
    Bad("window_scores", "W-q_mod", lambda a, other: dict(q_mod=a["q_mod"][:, :2]), V, ("q_mod",)),
    Bad("window_scores", "H-not-multiple", lambda a, other: dict(q_win=a["q_win"][:, :3]), V, ("q_win", "keys")),
    Bad("window_scores", "W-over-L", lambda a, other: dict(q_win=torch.randn(2, 4, 7, 8), q_mod=torch.zeros(2, 7, dtype=torch.long)), V, ("q_win",)),
    Bad("window_scores", "float-q_mod", lambda a, other: dict(q_mod=a["q_mod"].float()), T, ("q_mod",)),
    Bad("window_scores", "float-k_mod", lambda a, other: dict(k_mod=a["k_mod"].float()), T, ("k_mod",)),
    Bad("window_scores", "int-q_win", lambda a, other: dict(q_win=a["q_win"].long()), T, ("q_win",)),
    Bad("window_scores", "float64-inputs", lambda a, other: dict(q_win=a["q_win"].double(), keys=a["keys"].double()), T, ("q_win",)),
    Bad("window_scores", "keys-dtype", lambda a, other: dict(keys=a["keys"].half()), T, ("keys",)),
    Bad("window_scores", "empty-q_win", lambda a, other: dict(q_win=a["q_win"][:, :, :0]), V, ("q_win",)),
    Bad("window_scores", "empty-keys", lambda a, other: dict(keys=a["keys"][:, :, :0]), V, ("keys",)),
    Bad("window_scores", "keys-on-other-device", lambda a, other: dict(keys=a["keys"].to(other)), V, ("keys",)),
    Bad("window_scores", "k_mod-on-other-device", lambda a, other: dict(k_mod=a["k_mod"].to(other)), V, ("k_mod",)),
    Bad("window_scores", "scale-0", lambda a, other: dict(scale=0.0), V, ("scale",)),
    Bad("window_scores", "scale-negative", lambda a, other: dict(scale=-0.5), V, ("scale",)),
    Bad("window_scores", "scale-nan", lambda a, other: dict(scale=float("nan")), V, ("scale",)),
    Bad("window_scores", "scale-inf", lambda a, other: dict(scale=float("inf")), V, ("scale",)),
    Bad("window_scores", "n-negative", lambda a, other: dict(n=-1.0), V, ("n",)),
    Bad("window_scores", "n-inf", lambda a, other: dict(n=float("inf")), V, ("n",)),
    Bad("window_scores", "lse-rank2", lambda a, other: dict(lse=torch.zeros(2, 4)), V, ("lse",)),
    Bad("window_scores", "lse-shape", lambda a, other: dict(lse=torch.zeros(2, 4, 6)), V, ("lse", "[B, H, W]")),
    Bad("window_scores", "lse-heads", lambda a, other: dict(lse=torch.zeros(2, 2, 3)), V, ("lse", "[B, H, W]")),
    Bad("window_scores", "lse-float16", lambda a, other: dict(lse=torch.zeros(2, 4, 3, dtype=torch.float16)), T, ("lse", "float32")),
    Bad("window_scores", "lse-on-other-device", lambda a, other: dict(lse=torch.zeros(2, 4, 3, device=other)), V, ("lse",)),
    # --------------------------------------------------------- select_keep
    Bad("select_keep", "self_scores-rank2", lambda a, other: dict(self_scores=a["self_scores"][0]), V, ("self_scores",)),
    Bad("select_keep", "k_mod-rank3", lambda a, other: dict(k_mod=a["k_mod"][None]), V, ("k_mod",)),
    Bad("select_keep", "cross_scores-shape", lambda a, other: dict(cross_scores=a["cross_scores"][:, :1]), V, ("cross_scores",)),
    Bad("select_keep", "B-k_mod", lambda a, other: dict(k_mod=a["k_mod"][:1]), V, ("k_mod",)),
    Bad("select_keep", "L-k_mod", lambda a, other: dict(k_mod=a["k_mod"][:, :5]), V, ("k_mod",)),
    Bad("select_keep", "float-k_mod", lambda a, other: dict(k_mod=a["k_mod"].float()), T, ("k_mod",)),
    Bad("select_keep", "half-self_scores", lambda a, other: dict(self_scores=a["self_scores"].half()), T, ("self_scores",)),
    Bad("select_keep", "float64-cross_scores", lambda a, other: dict(cross_scores=a["cross_scores"].double()), T, ("cross_scores",)),
    Bad("select_keep", "empty", lambda a, other: dict(self_scores=a["self_scores"][..., :0], cross_scores=a["cross_scores"][..., :0], k_mod=a["k_mod"][:, :0]), V, ("self_scores",)),
    Bad("select_keep", "k_mod-on-other-device", lambda a, other: dict(k_mod=a["k_mod"].to(other)), V, ("k_mod",)),
    Bad("select_keep", "cross_scores-on-other-device", lambda a, other: dict(cross_scores=a["cross_scores"].to(other)), V, ("cross_scores",)),
    Bad("select_keep", "budget-over-L", lambda a, other: dict(budget=7), V, ("budget",)),
    Bad("select_keep", "budget-0", lambda a, other: dict(budget=0), V, ("budget",)),
    Bad("select_keep", "budget-float", lambda a, other: dict(budget=2.0), V, ("budget",)),
    Bad("select_keep", "recent-over-budget", lambda a, other: dict(recent=4), V, ("recent",)),
    Bad("select_keep", "recent-negative", lambda a, other: dict(recent=-1), V, ("recent",)),
    Bad("select_keep", "cross_ratio-negative", lambda a, other: dict(cross_ratio=-0.1), V, ("cross_ratio",)),
    Bad("select_keep", "cross_ratio-over-1", lambda a, other: dict(cross_ratio=1.5), V, ("cross_ratio",)),
    Bad("select_keep", "cross_ratio-nan", lambda a, other: dict(cross_ratio=float("nan")), V, ("cross_ratio",)),
    # ---------------------------------------------------------- compact_kv
    Bad("compact_kv", "keys-rank3", lambda a, other: dict(keys=a["keys"][0]), V, ("keys",)),
    Bad("compact_kv", "values-rank5", lambda a, other: dict(values=a["values"][None]), V, ("values",)),
    Bad("compact_kv", "keep_idx-rank2", lambda a, other: dict(keep_idx=a["keep_idx"][0]), V, ("keep_idx",)),
    Bad("compact_kv", "B-values", lambda a, other: dict(values=a["values"][:1]), V, ("values",)),
    Bad("compact_kv", "B-keep_idx", lambda a, other: dict(keep_idx=a["keep_idx"][:1]), V, ("keep_idx",)),
    Bad("compact_kv", "Hkv-keep_idx", lambda a, other: dict(keep_idx=a["keep_idx"][:, :1]), V, ("keep_idx",)),
    Bad("compact_kv", "Hkv-values", lambda a, other: dict(values=a["values"][:, :1]), V, ("values",)),
    Bad("compact_kv", "L-values", lambda a, other: dict(values=a["values"][:, :, :5]), V, ("values",)),
    Bad("compact_kv", "float-keep_idx", lambda a, other: dict(keep_idx=a["keep_idx"].float()), T, ("keep_idx",)),
    Bad("compact_kv", "int32-keep_idx", lambda a, other: dict(keep_idx=a["keep_idx"].int()), T, ("keep_idx",)),
    Bad("compact_kv", "int-keys", lambda a, other: dict(keys=a["keys"].int()), T, ("keys",)),
    Bad("compact_kv", "values-dtype", lambda a, other: dict(values=a["values"].bfloat16()), T, ("values",)),
    Bad("compact_kv", "keep_idx-equals-L", lambda a, other: dict(keep_idx=_idx(0, 2, 6)), I, ("keep_idx",)),
    Bad("compact_kv", "keep_idx-negative", lambda a, other: dict(keep_idx=_idx(-1, 2, 5)), I, ("keep_idx",)),
    Bad("compact_kv", "keep_idx-one-row-out", lambda a, other: dict(keep_idx=torch.tensor([[[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [3, 4, 60]]])), I, ("keep_idx",)),
    Bad("compact_kv", "keep_idx-unsorted", lambda a, other: dict(keep_idx=_idx(2, 0, 5)), V, ("keep_idx",)),
    Bad("compact_kv", "keep_idx-duplicated", lambda a, other: dict(keep_idx=_idx(0, 2, 2)), V, ("keep_idx",)),
    Bad("compact_kv", "keep_idx-one-row-unsorted", lambda a, other: dict(keep_idx=torch.tensor([[[0, 1, 2], [0, 1, 2]], [[0, 1, 2], [4, 3, 5]]])), V, ("keep_idx",)),
    Bad("compact_kv", "K-over-L", lambda a, other: dict(keep_idx=_idx(0, 1, 2, 3, 4, 5, 5)), V, ("keep_idx",)),
    Bad("compact_kv", "empty-keep_idx", lambda a, other: dict(keep_idx=a["keep_idx"][..., :0]), V, ("keep_idx",)),
    Bad("compact_kv", "empty-keys", lambda a, other: dict(keys=a["keys"][..., :0]), V, ("keys",)),
    Bad("compact_kv", "keep_idx-on-other-device", lambda a, other: dict(keep_idx=a["keep_idx"].to(other)), V, ("keep_idx",)),
    Bad("compact_kv", "values-on-other-device", lambda a, other: dict(values=a["values"].to(other)), V, ("values",)),
    Bad("compact_kv", "check_indices-int", lambda a, other: dict(check_indices=1), T, ("check_indices",)),
    # -------------------------------------------------- nsoftmax_attention
    Bad("nsoftmax_attention", "q-rank3", lambda a, other: dict(q=a["q"][0]), V, ("q",)),
    Bad("nsoftmax_attention", "keys-rank5", lambda a, other: dict(keys=a["keys"][None]), V, ("keys",)),
    Bad("nsoftmax_attention", "values-rank3", lambda a, other: dict(values=a["values"][0]), V, ("values",)),
    Bad("nsoftmax_attention", "B-keys", lambda a, other: dict(keys=a["keys"][:1]), V, ("keys",)),
    Bad("nsoftmax_attention", "B-values", lambda a, other: dict(values=a["values"][:1]), V, ("values",)),
    Bad("nsoftmax_attention", "D-keys", lambda a, other: dict(keys=a["keys"][..., :7]), V, ("keys",)),
    Bad("nsoftmax_attention", "H-not-multiple", lambda a, other: dict(q=a["q"][:, :3]), V, ("q", "keys")),
    Bad("nsoftmax_attention", "Hkv-values", lambda a, other: dict(values=a["values"][:, :1]), V, ("values",)),
    Bad("nsoftmax_attention", "Lc-values", lambda a, other: dict(values=a["values"][:, :, :5]), V, ("values",)),
    Bad("nsoftmax_attention", "Q-over-Lc", lambda a, other: dict(q=torch.randn(2, 4, 7, 8)), V, ("q",)),
    Bad("nsoftmax_attention", "int-q", lambda a, other: dict(q=a["q"].long()), T, ("q",)),
    Bad("nsoftmax_attention", "keys-dtype", lambda a, other: dict(keys=a["keys"].half()), T, ("keys",)),
    Bad("nsoftmax_attention", "values-dtype", lambda a, other: dict(values=a["values"].bfloat16()), T, ("values",)),
    Bad("nsoftmax_attention", "empty-q", lambda a, other: dict(q=a["q"][:, :, :0]), V, ("q",)),
    Bad("nsoftmax_attention", "empty-values", lambda a, other: dict(values=a["values"][..., :0]), V, ("values",)),
    Bad("nsoftmax_attention", "keys-on-other-device", lambda a, other: dict(keys=a["keys"].to(other)), V, ("keys",)),
    Bad("nsoftmax_attention", "kv_valid-on-other-device", lambda a, other: dict(kv_valid=a["kv_valid"].to(other)), V, ("kv_valid",)),
    Bad("nsoftmax_attention", "scale-0", lambda a, other: dict(scale=0.0), V, ("scale",)),
    Bad("nsoftmax_attention", "scale-negative", lambda a, other: dict(scale=-1.0), V, ("scale",)),
    Bad("nsoftmax_attention", "n-negative", lambda a, other: dict(n=-0.5), V, ("n",)),
    Bad("nsoftmax_attention", "kv_valid-length", lambda a, other: dict(kv_valid=a["kv_valid"][:, :5]), V, ("kv_valid",)),
    Bad("nsoftmax_attention", "kv_valid-heads", lambda a, other: dict(kv_valid=a["kv_valid"][:, None].expand(2, 3, 6)), V, ("kv_valid",)),
    Bad("nsoftmax_attention", "kv_valid-rank1", lambda a, other: dict(kv_valid=a["kv_valid"][0]), V, ("kv_valid",)),
    Bad("nsoftmax_attention", "kv_valid-rank4", lambda a, other: dict(kv_valid=a["kv_valid"][:, None, None].expand(2, 2, 1, 6)), V, ("kv_valid",)),
    Bad("nsoftmax_attention", "kv_valid-float", lambda a, other: dict(kv_valid=a["kv_valid"].float()), T, ("kv_valid",)),
    Bad("nsoftmax_attention", "kv_valid-int64", lambda a, other: dict(kv_valid=a["kv_valid"].long()), T, ("kv_valid",)),
]

_BACKENDS = {"kernel": lambda op: getattr(cspkv.ops, op), "reference": lambda op: getattr(reference, op)}

# The second device is CUDA when a GPU is visible (the CUDA kernel runs the C++
# device check), else "meta": a call with a meta tensor is dispatched to the fake
# kernels of cspkv.ops, which run the same device check as the reference.
_OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def _params():
    for case in CASES:
        for backend in ("kernel", "reference"):
            other = _OTHER_DEVICE if "other-device" in case.label else None
            yield pytest.param(case, backend, other, id=f"{case.op}-{case.label}-{backend}")


@pytest.mark.parametrize("case, backend, other", list(_params()))
def test_bad_input_is_rejected_naming_op_and_argument(case, backend, other, request):
    if backend == "kernel":
        request.getfixturevalue("extension")  # fails, does not skip, without cspkv._C
        assert cspkv.ops.backend("cpu") == "kernel"
    args = _base(case.op)
    args.update(case.change(args, torch.device(other or "meta")))
    with pytest.raises(Exception) as info:
        _BACKENDS[backend](case.op)(**args)
    message = str(info.value)
    assert type(info.value) is case.error, f"raised {type(info.value).__name__}, want {case.error.__name__}: {message}"
    assert f"cspkv.{case.op}" in message, message
    for name in case.names:
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), f"{name!r} not named in: {message}"


def test_base_arguments_are_valid():
    """The cases above differ from a valid call only in what they change."""
    for op in ("window_scores", "select_keep", "compact_kv", "nsoftmax_attention"):
        getattr(reference, op)(**_base(op))
    assert len({(c.op, c.label) for c in CASES}) == len(CASES)
