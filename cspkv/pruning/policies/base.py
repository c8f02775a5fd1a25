"""The policy contract: how a layer's prompt keys are ranked, and the registry of policies by name.

A policy is a small frozen dataclass, one per method, holding that method's
own settings. The pipeline (`cspkv.pruning.pipeline`) asks it for scores,
then selects and compacts the same way for every policy: the budget, the
recent window, the de-duplication and "padding is never kept" are common.
A new method is one subclass in one file::

    @cspkv.register_policy
    @dataclass(frozen=True)
    class KeyNorm(cspkv.Policy):
        name = "keynorm"

        def score(self, inputs):
            return Scores(-inputs.keys.float().norm(dim=-1))   # [B, Hkv, L]

`CSPConfig(policy=KeyNorm())` uses it; registered, `policy="keynorm"` does too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, NamedTuple, Optional, Tuple, Type

import torch

from ...ops.checks import as_int
from ..budget import RowPlan


@dataclass(frozen=True)
class ScoreInputs:
    """What a policy may score a layer's prompt from.

    Attributes
    ----------
    q : [B, H, Lq, D] the prefill's queries (post-RoPE): every prompt position, or at
        least the window's (the last `window` of them).
    keys : [B, Hkv, L, D] the layer's keys (post-RoPE).
    q_mod : int [B, W] modality ids of the window queries (-1: padding, or a query
        beyond its row's own window).
    k_mod : int [B, L] modality ids of the keys (-1: padding).
    scale : the attention's softmax scale.
    layer : the decoder layer's index.
    lse : float32 [B, H, W] log-sum-exp of the window rows in the prefill attention,
        or None (see `cspkv.ops.window_scores`); given only to policies that use it.
    """

    q: torch.Tensor
    keys: torch.Tensor
    q_mod: torch.Tensor
    k_mod: torch.Tensor
    scale: float
    layer: int = 0
    lse: Optional[torch.Tensor] = None

    @property
    def window(self) -> int:
        return self.q_mod.shape[1]

    @property
    def window_queries(self) -> torch.Tensor:
        """[B, H, W, D] the last W queries."""
        return self.q[:, :, -self.window:, :]


class Scores(NamedTuple):
    """float32 [B, Hkv, L] rankings, higher = keep first. `cross` (None for a single ranking)
    ranks the heavy-hitter slots that `RowPlan.cross_ratio` gives it; `primary` ranks the rest."""

    primary: torch.Tensor
    cross: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Policy:
    """Base of the selection policies: override `score` (and `plan` if the method sets its
    own budget split); fields hold the method's settings, validated in ``__post_init__``.

    Class attributes
    ----------------
    name : the registry name (``CSPConfig(policy=name)``).
    uses_prefill_lse : the scores are window attention, so they can take the prefill
        attention's log-sum-exp (`ScoreInputs.lse`) and save a pass over the keys.
    splits_cross_self : `score` returns a cross ranking that gets its own share of the budget.
    prunes_stored : the scores need only the window's queries, so a pruned cache can be scored
        again (a later prompt chunk, decode-time compression; `pipeline.prune_stored`).
    allocates : the scores are attention mass (sums of attention probabilities), comparable
        across heads and layers, so ``CSPConfig(head_allocation="adaptive")`` and
        ``layer_allocation="adaptive"`` can spend a budget by them (`pruning.allocation`).
        A policy whose scores are ranks, positions or random draws sets it False.
    """

    name: ClassVar[str] = ""
    uses_prefill_lse: ClassVar[bool] = False
    splits_cross_self: ClassVar[bool] = False
    prunes_stored: ClassVar[bool] = True
    allocates: ClassVar[bool] = True

    def score(self, inputs: ScoreInputs) -> Scores:
        raise NotImplementedError(f"{type(self).__name__} must implement score(inputs) -> Scores")

    def plan(self, plan: RowPlan, real_ids: torch.Tensor) -> RowPlan:
        """A row's plan under this policy; `real_ids` are the row's real tokens' modality ids
        (1-D, CPU). The default keeps the common plan (one ranking: cross_ratio 0)."""
        return plan

    def replace(self, **fields) -> "Policy":
        """A copy with `fields` changed (validated again); an unknown field raises TypeError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            have = ", ".join(sorted(known)) or "none"
            raise TypeError(f"policy {type(self).__name__} has no field {', '.join(map(repr, unknown))} (its fields: {have})")
        return dataclasses.replace(self, **fields)


_REGISTRY: Dict[str, Type[Policy]] = {}


def register_policy(cls: Type[Policy]) -> Type[Policy]:
    """Class decorator: make `cls` usable by its `name` in ``CSPConfig(policy=...)``."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"cspkv.register_policy: expected a subclass of cspkv.Policy, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"cspkv.register_policy: {cls.__name__}.name must be a non-empty str, got {cls.name!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"cspkv.register_policy: the name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_policies() -> Tuple[str, ...]:
    """Names usable in ``CSPConfig(policy=...)``, in registration order."""
    return tuple(_REGISTRY)


def resolve_policy(policy) -> Policy:
    """A `Policy` instance from a registered name or an instance (returned as is)."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        cls = _REGISTRY.get(policy)
        if cls is None:
            raise ValueError(f"CSPConfig.policy must be one of {', '.join(map(repr, _REGISTRY))} or a cspkv.Policy "
                             f"instance, got {policy!r}")
        return cls()
    raise TypeError(f"CSPConfig.policy must be a policy name or a cspkv.Policy instance, got {type(policy).__name__}")


def check_int(policy: Policy, field: str, low: int) -> None:
    """Raise unless `policy.field` is an int >= low (a bool is not an int here; a numpy
    integer is, and is stored as a plain int)."""
    value = as_int(getattr(policy, field))
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(policy).__name__}.{field} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{type(policy).__name__}.{field} must be an int >= {low}, got {value!r}")
    object.__setattr__(policy, field, value)  # policies are frozen dataclasses


def check_pool(policy: Policy) -> None:
    """`policy.pool`: an odd int >= 1 (1 = no pooling; pooling keeps the length), stored as a plain int."""
    value = as_int(policy.pool)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(policy).__name__}.pool must be an odd int >= 1, got {value!r}")
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{type(policy).__name__}.pool must be an odd int >= 1 (1 = no pooling; pooling keeps the "
                         f"length), got {value!r}")
    object.__setattr__(policy, "pool", value)
