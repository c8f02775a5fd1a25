"""The prefill attention's log-sum-exp per query row, so that window scoring takes one pass.

`ops.window_scores` divides each window query's exps by the row's n-softmax
denominator, which comes from the log-sum-exp (LSE) of the row's logits over
the keys it may see. Without it the kernels compute it in a first pass over
the keys, which costs as much as the scoring pass itself on a GPU. The
layer's prefill attention has just computed exactly this quantity, but
``torch.nn.functional.scaled_dot_product_attention`` (SDPA) returns only the
output.

`Capture` is a torch function mode, active while a patched layer's original
attention function runs. When that function calls SDPA, the mode asks torch
which backend SDPA would run (``torch._fused_sdp_choice``, SDPA's own choice)
and, for the flash backends (CPU; CUDA with a head dim divisible by 8, which
SDPA would not pad) and for cuDNN without a mask (SDPA's choice on Hopper GPUs),
calls that backend's op itself: the same computation and output as SDPA, plus
the LSE. Any other case runs SDPA untouched and records why there is no LSE.

`window_lse` then checks that the captured attention is the one the scores
assume (one SDPA call over the layer's prompt, the same scale, causal with
padding keys masked out) and returns the LSE of the window rows, or None and
the reason; the scoring then takes two passes.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..pruning.budget import RowPlan

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_FLASH = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
_CUDNN = int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
_BACKEND_NAMES = {int(b): b.name.lower() for b in torch.nn.attention.SDPBackend.__members__.values()}


def _sdpa_arguments(args, kwargs) -> dict:
    """SDPA's arguments by name, defaults filled in."""
    named = dict(_SDPA_DEFAULTS)
    named.update(zip(_SDPA_ARGS, args))
    named.update(kwargs)
    return named


def _attention_with_lse(a: dict) -> Tuple[Optional[tuple], str]:
    """((output, lse [B, H, Lq] float32), "") from the backend SDPA would run, or (None, why not)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return None, "the attention inputs are not 4-D tensors"
    if a["dropout_p"]:
        return None, f"attention dropout {a['dropout_p']}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None, "the attention inputs require grad"
    if torch.is_autocast_enabled(q.device.type):
        return None, "autocast is on"
    choice = torch._fused_sdp_choice(q, k, v, mask, a["dropout_p"], a["is_causal"], scale=a["scale"], enable_gqa=a["enable_gqa"])
    if choice == _CUDNN and q.device.type == "cuda" and mask is None:
        return _cudnn_attention_with_lse(q, k, v, a)
    if choice != _FLASH:
        with_mask = " with a mask" if mask is not None else ""
        return None, f"SDPA runs its {_BACKEND_NAMES.get(int(choice), choice)} backend{with_mask}, which gives no log-sum-exp here"
    if q.device.type == "cpu":
        if mask is not None and mask.dtype == torch.bool:  # as SDPA does before the CPU flash op
            mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, a["dropout_p"], a["is_causal"], attn_mask=mask, scale=a["scale"]
        )
        return (out, lse.float()), ""
    if q.device.type == "cuda" and q.shape[-1] % 8 == 0:
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, a["dropout_p"], a["is_causal"], False, scale=a["scale"])
        return (result[0], result[1]), ""
    return None, f"no log-sum-exp is taken from SDPA's flash backend on {q.device.type} with head dim {q.shape[-1]}"


def _cudnn_attention_with_lse(q, k, v, a: dict) -> Tuple[Optional[tuple], str]:
    """SDPA's cuDNN call (no mask) with its softmax statistics turned on: the same output, plus
    the LSE [B, H, Lq, 1]. Should cuDNN refuse that graph, SDPA runs instead, and the reason is kept."""
    try:
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, a["dropout_p"], a["is_causal"], False, scale=a["scale"]
        )
    except RuntimeError as error:
        return None, f"cuDNN attention with its log-sum-exp failed: {error}"
    return (result[0], result[1].squeeze(-1)), ""


class Capture(TorchFunctionMode):
    """Runs SDPA calls so that they also return their LSE (see the module docstring).

    After the ``with`` block: `lse` (float32 [B, H, Lq]) with `attn_mask`,
    `is_causal` and `scale` (the effective one) of the call, or `lse` None and
    `reason`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.lse: Optional[torch.Tensor] = None
        self.attn_mask: Optional[torch.Tensor] = None
        self.is_causal = False
        self.scale: Optional[float] = None
        self.reason = "the attention function made no scaled_dot_product_attention call"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        named = _sdpa_arguments(args, kwargs)
        result, reason = _attention_with_lse(named) if self.calls == 1 else (None, "scaled_dot_product_attention ran more than once")
        if result is None:
            self.lse, self.reason = None, reason
            return func(*args, **kwargs)
        out, self.lse = result
        self.attn_mask, self.is_causal = named["attn_mask"], bool(named["is_causal"])
        scale = named["scale"]
        self.scale = float(scale) if scale is not None else named["query"].shape[-1] ** -0.5
        return out


def _mask_matches(mask: torch.Tensor, k_mod: torch.Tensor, q_mod: torch.Tensor) -> bool:
    """Whether `mask` [B or 1, heads or 1, L, L] (bool, or additive 0 / -inf / dtype min) lets
    every real window query see exactly its causal, non-padding keys."""
    B, L = k_mod.shape
    W = q_mod.shape[1]
    rows = mask[..., -W:, :]
    if rows.dtype == torch.bool:
        allowed = rows
    else:
        allowed = rows == 0
        if not bool((allowed | (rows <= torch.finfo(rows.dtype).min)).all()):
            return False  # additive biases other than "blocked": the LSE is not the causal one
    positions = torch.arange(L, device=k_mod.device)
    causal = positions[None, :] <= (L - W + torch.arange(W, device=k_mod.device))[:, None]  # [W, L]
    expected = causal[None, None] & (k_mod >= 0)[:, None, None, :]  # [B, 1, W, L]
    real_row = (q_mod >= 0)[:, None, :, None]  # [B, 1, W, 1]
    return bool(((allowed == expected) | ~real_row).all())


def window_lse(capture: Optional[Capture], *, scale: float, query: torch.Tensor, k_mod: torch.Tensor,
               q_mod: torch.Tensor, plans: Sequence[RowPlan], checked_masks: Dict[int, tuple]) -> Tuple[Optional[torch.Tensor], str]:
    """(lse [B, H, W] of the window rows, "") when `capture` holds the LSE of the attention the
    scores assume, else (None, why not).

    `k_mod` [B, L] and `q_mod` [B, W] are the layer's modality ids (on its device; -1 =
    padding or a window query the row does not own). `checked_masks` memoises mask checks
    within one forward call (every layer of a call gets the same mask tensor).
    """
    if capture is None:
        return None, "disabled (CSPConfig.prefill_lse=False)"
    lse = capture.lse
    if lse is None:
        return None, capture.reason
    B, H, L = query.shape[0], query.shape[1], query.shape[2]
    W = q_mod.shape[1]
    if tuple(lse.shape) != (B, H, L):
        return None, f"the captured log-sum-exp has shape {list(lse.shape)}, not [B, H, L]={[B, H, L]}"
    if abs(capture.scale - scale) > 1e-6 * scale:
        return None, f"the attention used scale {capture.scale}, the scores use {scale}"
    mask = capture.attn_mask
    if mask is None:
        if not capture.is_causal:
            return None, "the attention ran without a mask and not causal"
        if any(p.length < L for p in plans):
            return None, "the prompt has padding but the attention ran without a mask"
    else:
        key = id(mask)
        if key not in checked_masks:  # keep the tensor so that its id is not reused within the call
            checked_masks[key] = (mask, _mask_matches(mask, k_mod, q_mod))
        if not checked_masks[key][1]:
            return None, "the attention mask is not the causal mask with padding keys masked out"
    return lse[:, :, -W:], ""
