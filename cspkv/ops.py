"""The cspkv ops: typed wrappers over ``torch.ops.cspkv.*`` with a pure-torch fallback.

The compiled extension ``cspkv._C`` registers the four ops with the torch op
registry (CPU kernels always, CUDA kernels when the build had them). It is
loaded when this module is imported (a first load inside a `torch.compile`d
function could not be traced). When it is missing or fails to load, every op runs
its pure-torch version from `cspkv.reference` and cspkv warns once, naming the
cause; the same happens once for CUDA tensors when the extension was built
without CUDA kernels. `backend(device)` tells which path a device gets.

Shapes and semantics are documented on the functions of `cspkv.reference`,
which are the oracle the kernels are tested against.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional, Tuple

import torch

from . import checks, reference

logger = logging.getLogger("cspkv")


def _initial_state() -> dict:
    """What cspkv.ops knows before the extension is first asked for."""
    return {"loaded": False, "ext": None, "error": None, "warned": set(), "backends": {}}


_state = _initial_state()


def extension():
    """The loaded ``cspkv._C`` module, or None (the cause is in `extension_error()`)."""
    if not _state["loaded"]:
        _state["loaded"] = True
        try:
            from . import _C  # noqa: F401  (importing registers torch.ops.cspkv.*)

            _state["ext"] = _C
            _state["with_cuda"] = bool(_C.build_info()["with_cuda"])  # asked once: backend() runs on every op call
            _register_fakes()
        except Exception as exc:  # ImportError, undefined symbols, ABI mismatch ...
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["ext"]


def extension_error() -> Optional[str]:
    """Why ``cspkv._C`` could not be loaded, or None if it loaded (or was not tried)."""
    extension()
    return _state["error"]


def build_info() -> dict:
    """How the extension was built (with_cuda, cuda_archs, versions); {} without it."""
    ext = extension()
    return dict(ext.build_info()) if ext is not None else {}


def cpu_threads() -> int:
    """Threads the CPU kernels run on now: torch.get_num_threads(), or 1 if the
    extension was built without OpenMP; 0 without the extension."""
    ext = extension()
    return int(ext.parallel_threads()) if ext is not None else 0


def _warn_once(key: str, message: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        # 1 here, 2 _find_backend(), 3 backend(), 4 the op wrapper, 5 the caller's line.
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def backend(device: torch.device) -> str:
    """``"kernel"`` if the compiled ops serve tensors on `device`, else ``"reference"``.

    Found once per device type (each op call asks, a decode step once per layer)."""
    kind = (device if isinstance(device, torch.device) else torch.device(device)).type
    found = _state["backends"].get(kind)
    if found is None:
        found = _state["backends"][kind] = _find_backend(kind)
    return found


def _find_backend(kind: str) -> str:
    ext = extension()
    if ext is None:
        _warn_once("missing", f"cspkv: compiled kernels unavailable ({_state['error']}); using the pure-torch reference ops")
        return "reference"
    if kind == "cuda" and not _state["with_cuda"]:
        _warn_once("no-cuda", "cspkv: the extension was built without CUDA kernels; CUDA tensors use the pure-torch reference ops (rebuild with CSPKV_CUDA=1)")
        return "reference"
    if kind not in ("cpu", "cuda", "meta"):
        _warn_once(f"device-{kind}", f"cspkv: no kernels for device type {kind!r}; using the pure-torch reference ops")
        return "reference"
    return "kernel"


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


def compact_kv(
    keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, *, check_indices: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather of the kept tokens; see `cspkv.reference.compact_kv`."""
    if isinstance(keys, torch.Tensor) and backend(keys.device) == "kernel":
        checks.boolean("compact_kv", "check_indices", check_indices)
        return torch.ops.cspkv.compact_kv.default(keys, values, keep_idx, check_indices=check_indices)
    return reference.compact_kv(keys, values, keep_idx, check_indices=check_indices)


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
        return _state["ext"].nsoftmax_attention(q, keys, values, float(scale), float(n), kv_valid)
    return reference.nsoftmax_attention(q, keys, values, scale=scale, n=n, kv_valid=kv_valid)


def _register_fakes() -> None:
    """Shape functions for torch.compile / meta tensors (torch.library.register_fake)."""

    # Fake kernels see only metadata: they check what needs no data (devices) so a
    # mixed-device call fails the same way under torch.compile / meta tensors.
    @torch.library.register_fake("cspkv::window_scores")
    def _(q_win, keys, q_mod, k_mod, *, scale, n=1.0, lse=None):
        checks.same_device("window_scores", q_win=q_win, keys=keys, q_mod=q_mod, k_mod=k_mod, lse=lse)
        B, Hkv, L = keys.shape[0], keys.shape[1], keys.shape[2]
        return keys.new_empty((B, Hkv, L), dtype=torch.float32), keys.new_empty((B, Hkv, L), dtype=torch.float32)

    @torch.library.register_fake("cspkv::select_keep")
    def _(self_scores, cross_scores, k_mod, *, budget, recent, cross_ratio):
        checks.same_device("select_keep", self_scores=self_scores, cross_scores=cross_scores, k_mod=k_mod)
        B, Hkv = self_scores.shape[0], self_scores.shape[1]
        return (
            self_scores.new_empty((B, Hkv, budget), dtype=torch.int64),
            self_scores.new_empty((B, Hkv, budget), dtype=torch.bool),
        )

    @torch.library.register_fake("cspkv::compact_kv")
    def _(keys, values, keep_idx, *, check_indices=True):
        checks.same_device("compact_kv", keys=keys, values=values, keep_idx=keep_idx)
        B, Hkv, K = keep_idx.shape
        return keys.new_empty((B, Hkv, K, keys.shape[3])), values.new_empty((B, Hkv, K, values.shape[3]))

    @torch.library.register_fake("cspkv::nsoftmax_attention")
    def _(q, keys, values, *, scale, n=0.0, kv_valid=None):
        checks.same_device("nsoftmax_attention", q=q, keys=keys, values=values, kv_valid=kv_valid)
        B, H, Q = q.shape[0], q.shape[1], q.shape[2]
        return q.new_empty((B, H, Q, values.shape[3]))


extension()  # now, not at the first op call: torch.compile cannot trace the import
