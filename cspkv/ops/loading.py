"""Loading the compiled extension ``cspkv._C`` and choosing a backend per device.

The extension registers the ops with the torch op registry (CPU kernels
always, CUDA kernels when the build had them). It is loaded when `cspkv.ops`
is imported (a first load inside a `torch.compile`d function could not be
traced). When it is missing or fails to load, every op runs its pure-torch
version from `cspkv.ops.reference` and cspkv warns once, naming the cause; the
same happens once for CUDA tensors when the extension was built without CUDA
kernels.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def _initial_state() -> dict:
    """What is known before the extension is first asked for."""
    return {"loaded": False, "ext": None, "error": None, "warned": set(), "backends": {}, "on_load": []}


_state = _initial_state()


def on_load(callback) -> None:
    """Run `callback()` once the extension has loaded (now, if it already has): the ops'
    fake kernels can only be registered for ops the extension defined."""
    _state["on_load"].append(callback)
    if _state["ext"] is not None:
        callback()


def extension():
    """The loaded ``cspkv._C`` module, or None (the cause is in `extension_error()`)."""
    if not _state["loaded"]:
        _state["loaded"] = True
        try:
            from .. import _C  # noqa: F401  (importing registers torch.ops.cspkv.*)

            _state["ext"] = _C
            _state["with_cuda"] = bool(_C.build_info()["with_cuda"])  # asked once: backend() runs on every op call
        except Exception as exc:  # ImportError, undefined symbols, ABI mismatch ...
            _state["error"] = f"{type(exc).__name__}: {exc}"
        else:
            for callback in _state["on_load"]:
                callback()
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
