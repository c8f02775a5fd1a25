"""Profiling aids: NVTX ranges for Nsight (behind CSPKV_NVTX=1) and a timer that does not
wait for the GPU."""

from __future__ import annotations

import os
import time

import torch


def nvtx_enabled() -> bool:
    """Whether CSPKV_NVTX=1 asks for NVTX ranges (read when a model is patched)."""
    return os.environ.get("CSPKV_NVTX", "0") == "1"


class NvtxRange:
    """An NVTX range around a step when `on` (CSPKV_NVTX=1 and the tensors on CUDA); nothing otherwise."""

    __slots__ = ("name", "on")

    def __init__(self, name: str, on: bool) -> None:
        self.name, self.on = name, on

    def __enter__(self) -> None:
        if self.on:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc) -> None:
        if self.on:
            torch.cuda.nvtx.range_pop()


class Timer:
    """Wall time on a CPU; CUDA events on a GPU, resolved only when `elapsed_ms` is asked."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self):
        """What `elapsed_ms` reads: the CPU time now, or an event recorded now."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return ("cuda", self.start, end)
        return ("cpu", (time.perf_counter() - self.start) * 1e3)

    @staticmethod
    def elapsed_ms(events) -> float:
        if events[0] == "cuda":
            events[2].synchronize()
            return float(events[1].elapsed_time(events[2]))
        return float(events[1])
