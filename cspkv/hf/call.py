"""The per-call context: what one top-level forward call tells every patched layer.

A forward pre-hook on the model opens a `CallContext` with the call's input ids,
attention mask and any explicit modality ids; each patched layer then asks it
for the prompt's modality ids and row plans, which are computed once per call
and sent once to each device.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from ..pruning import budget
from ..pruning.modality import fit_to_prompt, key_live_mask, mask_padding

if TYPE_CHECKING:
    from .api import PatchHandle

logger = logging.getLogger("cspkv")


class HostCopies:
    """CPU copies of `tensors` (None stays None). Those of CUDA tensors are only started here,
    into pinned memory, behind an event; `get()` waits for that event, i.e. for the copies, not
    for whatever the GPU was given after them."""

    def __init__(self, *tensors: Optional[torch.Tensor]) -> None:
        self.tensors: List[Optional[torch.Tensor]] = []
        self.events = []
        for t in tensors:
            if t is not None and t.device.type == "cuda":
                self.tensors.append(t.to("cpu", non_blocking=True))
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(t.device))
                self.events.append(event)
            else:
                self.tensors.append(None if t is None else t.to("cpu"))

    def get(self) -> List[Optional[torch.Tensor]]:
        for event in self.events:
            event.synchronize()
        self.events = []
        return self.tensors


class CallContext:
    """What one top-level forward call tells every patched layer: the prompt's ids and mask.

    Modality ids and row plans are computed once per call, on first use. A call belongs to the
    thread that made it (`PatchHandle` keeps one per thread) and to the module whose forward
    opened it (`owner`: the top model, or the text model called directly). A 4-D attention mask
    is read as the 2-D key mask of its last query (`key_live_mask`), so its padding is known too.
    """

    def __init__(self, handle: "PatchHandle", input_ids, attention_mask, override, owner=None) -> None:
        self.handle = handle
        self.owner = owner
        self.input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        self.attention_mask = key_live_mask(mask) if mask is not None and mask.dim() == 4 else mask
        self.override = override
        self._ids: Optional[torch.Tensor] = None
        self._on_device: Dict[torch.device, tuple] = {}
        self._chunk_live: Dict[tuple, Optional[torch.Tensor]] = {}
        self.checked_masks: Dict[int, tuple] = {}  # prefill_lse.window_lse's memo
        self.plans: Optional[List[budget.RowPlan]] = None
        self.logged_short = False
        self.joins: Dict[torch.device, tuple] = {}  # device: (the layers' stream, the side stream pruning ran on)
        self._host: Optional[HostCopies] = None
        self.deferred: list = []  # (step, args) run at the call's end (`at_end`)
        self.scored_layers: list = []  # layers waiting for the budgets of all (CSPConfig.layer_allocation)

    def at_end(self, step, *args) -> None:
        """Run `step(*args)` at the end of the call (`PatchHandle._close_call`), after the pruning
        deferred by compiled code: the eager side of `PatchHandle.deferred`, kept per call because
        eager calls of one model may run in several threads at once."""
        self.deferred.append((step, args))

    def start_host_copies(self) -> None:
        """Start copying the prompt's ids (given or `input_ids`) and mask to the host: called before
        a prefill's work is queued, the first pruned layer then waits for these copies only."""
        if self._host is None:
            self._host = HostCopies(self.override if self.override is not None else self.input_ids, self.attention_mask)

    def modality_ids(self, batch: int, length: int) -> torch.Tensor:
        """k_mod [B, L] (CPU int64), -1 at padding."""
        if self._ids is None:
            if self.override is not None:
                fit_to_prompt(self.override, batch, length)
            elif self.input_ids is not None and tuple(self.input_ids.shape[:2]) != (batch, length):
                raise RuntimeError(
                    f"cspkv: the layer prunes a prompt of shape [B, L] = [{batch}, {length}] but the call's "
                    f"input_ids have shape {list(self.input_ids.shape)}; give explicit ids with cspkv.modalities(model, ids)"
                )
            self.start_host_copies()  # already started by the pre-hook of a prefill call
            given, mask = self._host.get()
            if self.override is not None:
                ids = fit_to_prompt(given, batch, length)
            else:
                ids = self.handle.adapter.modality_ids(self.handle.model, given, (batch, length), torch.device("cpu"))
            self._ids = mask_padding(ids.long(), mask)
        return self._ids

    def real_lengths(self, batch: int, total: int) -> List[int]:
        """Real tokens per row among the call's `total` logical positions: from a 2-D mask of that
        length (read on the host), else all of them."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[1] != total:
            return [total] * batch
        self.start_host_copies()
        host_mask = self._host.get()[1]
        return [int(n) for n in (host_mask != 0).sum(dim=1).tolist()]

    def prepared(self, batch: int, length: int, device: torch.device):
        """(k_mod, q_mod) int32 on `device` and the row plans.

        int32 is what the kernels read: given int64, each op of each layer would convert them
        (a kernel launch apiece on a GPU); here they are built on the host and sent once per call."""
        ids = self.modality_ids(batch, length)
        if self.plans is None:
            self.plans = budget.plan_batch(self.handle.config, ids)
            if ids.shape[0] > 1 and bool(((ids[:, -1] < 0) & (ids >= 0).any(dim=1)).any()):
                logger.warning("cspkv: a batch row ends with padding; cspkv expects left padding (its window then holds fewer queries)")
        if device not in self._on_device:
            k_mod = ids.to(torch.int32)
            q_mod = budget.window_query_ids(k_mod, self.plans)
            pinned = device.type == "cuda"  # from pinned memory a copy to a GPU does not wait for the GPU's queue to drain
            self._on_device[device] = tuple((t.pin_memory() if pinned else t).to(device, non_blocking=pinned) for t in (k_mod, q_mod))
        return self._on_device[device] + (self.plans,)

    def side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        """The handle's side stream on `device`, made to wait for the work queued so far on the
        current stream; the call's end (`PatchHandle._post_hook`) makes that stream wait for it."""
        main = torch.cuda.current_stream(device)
        side = self.handle._side_streams.get(device)
        if side is None:  # high priority: pruning keeps up with the layers, the full K/V it reads are freed soon
            side = self.handle._side_streams[device] = torch.cuda.Stream(device, priority=-1)
        side.wait_stream(main)
        self.joins.setdefault(device, (main, side))
        return side

    def join(self) -> None:
        """Make each device's layer stream wait for the pruning queued on its side stream."""
        for main, side in self.joins.values():
            main.wait_stream(side)
        self.joins.clear()

    def chunk_live(self, chunk: int, total: int, device: torch.device) -> Optional[torch.Tensor]:
        """bool [B, 1, chunk]: which of the last `chunk` of `total` positions the call's 2-D mask
        marks real (a padded follow-up turn), computed once per call for every layer; None without
        a 2-D mask of that length."""
        mask = self.attention_mask
        if mask is None:
            return None
        key = (chunk, total, device)
        if key not in self._chunk_live:
            live = None
            if mask.dim() == 2 and mask.shape[1] == total:
                live = mask[:, None, -chunk:].to(device=device, dtype=torch.bool)
            self._chunk_live[key] = live
        return self._chunk_live[key]

