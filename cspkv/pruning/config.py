"""`CSPConfig`: what a patched model keeps, validated once when it is built.

Sizes (`budget`, `window`, `recent`) are given either as a fraction of each
prompt's real length (a float) or as a token count (an int);
`cspkv.pruning.budget` turns them into per-row counts. Which tokens win is the
policy's choice (`cspkv.pruning.policies`), with its own fields. Every bad
value raises a ValueError (or a TypeError for a wrong type) that names the field.
Numbers may be numpy scalars: they are stored as plain Python ints and floats
(`cspkv.ops.checks.as_int` / `as_real`), so a config compares, hashes and prints
the same whichever was given.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ..ops.checks import as_int, as_real
from .policies import Policy, resolve_policy

Size = Union[float, int]

#: What a later prompt chunk on a pruned layer does (`CSPConfig.later_prefill`).
LATER_PREFILL = ("chunk", "total", "off")
#: How a budget is spread over KV heads and layers (`CSPConfig.head_allocation`, `layer_allocation`).
ALLOCATIONS = ("uniform", "adaptive")


def _fail(field: str, message: str, kind: type = ValueError) -> None:
    raise kind(f"CSPConfig.{field} {message}")


def _check_size(field: str, value, *, allow_zero: bool):
    """A fraction (float in (0, 1], or [0, 1] with allow_zero) or a count (int >= 1, or >= 0);
    returns it as a plain Python number."""
    value = as_real(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"must be a float fraction or an int token count, got {value!r}", TypeError)
    if isinstance(value, float):
        low_ok = value >= 0.0 if allow_zero else value > 0.0
        if not (math.isfinite(value) and low_ok and value <= 1.0):
            interval = "[0, 1]" if allow_zero else "(0, 1]"
            _fail(field, f"as a float is a fraction of the prompt and must lie in {interval}, got {value!r} "
                  "(give an int for a token count)")
    elif value < (0 if allow_zero else 1):
        _fail(field, f"as an int is a token count and must be >= {0 if allow_zero else 1}, got {value!r}")
    return value


def _check_non_negative(field: str, value):
    value = as_real(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"must be a number >= 0, got {value!r}", TypeError)
    if not (math.isfinite(value) and value >= 0):
        _fail(field, f"must be a finite number >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class CSPConfig:
    """Settings of a patched model (see docs/method.md for the method).

    Parameters
    ----------
    budget : float in (0, 1] or int >= 1, default 0.2
        Tokens kept per row and KV head, recent ones included: a fraction of the
        row's real prompt length (rounded to the nearest count, at least 1) or a
        count. ``1.0`` keeps everything (and must reproduce the unpatched model);
        the int ``1`` keeps one token.
    window : float in (0, 1], int >= 1 or None, default None
        Observation window: the last `window` prompt positions score the keys.
        None: 10% of the prompt, at most 64 tokens
        (`cspkv.pruning.budget.DEFAULT_WINDOW`). The cap keeps the recent
        window (below) to a small share of a long prompt's budget: with a
        plain 10% (the earlier default) half of a 20% budget went to it, and
        all of a 10% one (benchmarks/results/quality.md compares both).
    recent : float in [0, 1], int >= 0 or None, default None (= `window`)
        The last `recent` prompt tokens are always kept (capped at the budget).
    decode_n : float >= 0, default 0.0
        n-softmax constant of the attention over a pruned cache (0 = softmax);
        1 did not help on the quality benchmark.
    min_prompt : int >= 1, default 32
        Rows with fewer real prompt tokens are not pruned (logged at debug level).
    layers : sequence of int or None, default None (= every prunable layer)
        Decoder layer indices to prune.
    policy : str or cspkv.Policy, default "csp"
        Which tokens to keep: a registered name (``"csp"``, ``"snapkv"``,
        ``"h2o"``, ``"streaming"``, ``"random"``, see `registered_policies`) or a
        policy instance such as ``cspkv.CSP(cross_ratio=0.5)``; stored as an
        instance. Every policy runs on the same budget plans, selection, cache
        and kernels.
    prefill_lse : bool, default True
        For policies that score with window attention (`Policy.uses_prefill_lse`):
        score the window in one pass, normalising each window row by the
        log-sum-exp that the layer's prefill attention computed, when that
        attention is torch's scaled_dot_product_attention on a flash backend
        (or cuDNN, without a mask) with the causal + padding mask the scores
        assume (see `cspkv.hf.prefill_lse`); otherwise, or with False, the
        scoring kernels compute it in a first pass over the keys. The scores
        agree up to float rounding; `PatchHandle.stats()` names per layer which
        way ran.
    overlap_pruning : bool, default False
        CUDA: score, select and compact a layer's cache on a side stream (one
        per device), so that it overlaps the prefill of the layers after it;
        the model's forward call returns with its stream waiting for that
        work, so whatever runs next on it sees the pruned cache. The result is
        the same either way; False prunes on the layer's own stream. No effect
        on a CPU, or when an attention module is called outside its model.
        Off by default: it did not shorten the time to first token on the GPU
        run of benchmarks/results/gpu-check-h200.md.
    later_prefill : "chunk", "total" or "off", default "chunk"
        A later prompt chunk of at least `min_prompt` tokens on a pruned layer (a
        second chat turn with a new document or image) is pruned too, scored by
        its own observation window (the chunk's last `window` tokens) over the
        whole stored cache. ``"chunk"``: the chunk keeps `budget` of its own
        length and the earlier cache stays as it was; ``"total"``: the whole
        cache is selected again down to `budget` of its total length;
        ``"off"``: only the first prefill is pruned. Modality ids come from the
        chunk's own input ids (or `cspkv.modalities` ids of the chunk's shape).
    decode_budget : int >= 1 or None, default None (off)
        Compression during generation: when a pruned layer stores
        `decode_budget + decode_interval` slots per row and KV head, it selects
        `decode_budget` of them again, with the latest `decode_window` decoded
        tokens' queries as the window (they are kept as its recent tokens), and
        compacts in place. Stored length stays below `decode_budget +
        decode_interval` however long the generation.
    decode_interval : int >= 1, default 64
        Tokens a layer may grow past `decode_budget` before it is compacted.
    decode_window : int >= 1, default 16
        Latest decoded tokens whose queries score the cache at a decode-time
        compression (at most `decode_budget`).
    head_allocation : "uniform" or "adaptive", default "uniform"
        ``"adaptive"`` (Ada-KV, arXiv 2407.11550): a row's layer budget, `Hkv`
        times its per-head budget K, goes to the best scores of all its KV heads
        ranked together (``primary + cross``: attention mass), above a floor per
        head of ``max(recent, ceil(allocation_floor * K), 1)`` tokens; a head
        keeps at most its row's real tokens. For a policy that splits cross and
        self scores (CSP), each head's cross share is the row's cross ratio
        scaled by the head's share of cross mass over the row's mean (clamped to
        [0, 1]; see `cspkv.pruning.allocation.head_budgets`). Selection then runs
        per (row, head), and heads below the layer's largest budget store dead
        slots. Reads the budgets on the host (one sync per layer).
    layer_allocation : "uniform" or "adaptive", default "uniform"
        ``"adaptive"``: each row's model-wide budget, (pruned layers) x K per KV
        head, is spread over the layers by their window scores: the slots above
        each layer's floor (``max(recent, ceil(allocation_floor * K), 1)``) go to
        the best values of all layers' gain curves (each layer's per-rank mean
        over heads of its sorted scores) ranked together, so a layer whose top keys
        hold most of its mass keeps fewer. Every layer's scores are needed before
        any layer selects, so selection and compaction wait for the end of the
        model's forward call: the prefill holds every layer's full cache until
        then (the peak memory of the unpatched prefill), and pruning does not
        overlap the prefill (`overlap_pruning` has no effect on it). With both
        allocations adaptive, a layer's budget is then spread over its heads.
    allocation_floor : float in [0, 1], default 0.2
        Fraction of K every head (``head_allocation``) and every layer
        (``layer_allocation``) keeps at least.

        Both allocations need scores that are attention mass (`Policy.allocates`:
        CSP, SnapKV, H2O; not StreamingLLM nor Random), and apply to the first
        prefill's pruning only: later prompt chunks and decode-time compression
        keep one budget per head and layer.
    **policy_fields
        Shorthand for the policy's own fields: ``CSPConfig(cross_ratio=0.5)`` is
        ``CSPConfig(policy=CSP(cross_ratio=0.5))``.

    Example
    -------
    >>> CSPConfig(budget=0.3, cross_ratio="auto").policy
    CSP(cross_ratio='auto', n=1.0, pool=15)
    """

    budget: Size = 0.2
    window: Optional[Size] = None
    recent: Optional[Size] = None
    decode_n: float = 0.0
    min_prompt: int = 32
    layers: Optional[Tuple[int, ...]] = None
    policy: Union[str, Policy] = "csp"
    prefill_lse: bool = True
    overlap_pruning: bool = False
    later_prefill: str = "chunk"
    decode_budget: Optional[int] = None
    decode_interval: int = 64
    decode_window: int = 16
    head_allocation: str = "uniform"
    layer_allocation: str = "uniform"
    allocation_floor: float = 0.2

    def __post_init__(self) -> None:
        # Frozen: normalised values are stored with object.__setattr__.
        object.__setattr__(self, "budget", _check_size("budget", self.budget, allow_zero=False))
        if self.window is not None:
            object.__setattr__(self, "window", _check_size("window", self.window, allow_zero=False))
        if self.recent is not None:
            object.__setattr__(self, "recent", _check_size("recent", self.recent, allow_zero=True))
        object.__setattr__(self, "decode_n", _check_non_negative("decode_n", self.decode_n))
        min_prompt = as_int(self.min_prompt)
        if isinstance(min_prompt, bool) or not isinstance(min_prompt, int):
            _fail("min_prompt", f"must be an int >= 1, got {min_prompt!r}", TypeError)
        if min_prompt < 1:
            _fail("min_prompt", f"must be an int >= 1, got {min_prompt!r}")
        object.__setattr__(self, "min_prompt", min_prompt)
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                _fail("layers", f"must be a sequence of layer indices or None, got {layers!r}", TypeError)
            layers = tuple(as_int(idx) for idx in layers)
            for idx in layers:
                if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                    _fail("layers", f"must hold ints >= 0, got {idx!r} in {layers!r}")
            if len(set(layers)) != len(layers):
                _fail("layers", f"must not repeat a layer, got {layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "policy", resolve_policy(self.policy))
        for field in ("prefill_lse", "overlap_pruning"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, f"must be a bool, got {getattr(self, field)!r}", TypeError)
        if self.later_prefill not in LATER_PREFILL:
            _fail("later_prefill", f"must be one of {', '.join(map(repr, LATER_PREFILL))}, got {self.later_prefill!r}")
        for field in ("decode_budget", "decode_interval", "decode_window"):
            value = as_int(getattr(self, field))
            object.__setattr__(self, field, value)
            if value is None and field == "decode_budget":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(field, f"must be an int >= 1{' or None' if field == 'decode_budget' else ''}, got {value!r}", TypeError)
            if value < 1:
                _fail(field, f"must be an int >= 1, got {value!r}")
        if self.decode_budget is not None and self.decode_window > self.decode_budget:
            _fail("decode_window", f"must be at most decode_budget={self.decode_budget} (the window's tokens are kept), "
                  f"got {self.decode_window}")
        for field in ("head_allocation", "layer_allocation"):
            value = getattr(self, field)
            if value not in ALLOCATIONS:
                _fail(field, f"must be one of {', '.join(map(repr, ALLOCATIONS))}, got {value!r}")
            if value == "adaptive" and not self.policy.allocates:
                _fail(field, f"is 'adaptive', which spends the budget by attention mass, but policy "
                      f"{type(self.policy).__name__} scores no attention (its allocates is False); use 'uniform' or a "
                      "policy that does (csp, snapkv, h2o)")
        floor = as_real(self.allocation_floor)
        if isinstance(floor, bool) or not isinstance(floor, (int, float)):
            _fail("allocation_floor", f"must be a number in [0, 1], got {floor!r}", TypeError)
        if not (math.isfinite(floor) and 0.0 <= floor <= 1.0):
            _fail("allocation_floor", f"must be a number in [0, 1], got {floor!r}")
        object.__setattr__(self, "allocation_floor", float(floor))

    def replace(self, **overrides) -> "CSPConfig":
        """A copy with `overrides` applied (validated again): fields of the config or, as in the
        constructor, of its policy; a name that is neither raises TypeError."""
        return CSPConfig(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **overrides})


_FIELDS = frozenset(f.name for f in dataclasses.fields(CSPConfig))


def _with_policy_fields(init):
    """The dataclass's __init__, taking the policy's fields as keywords too (see `CSPConfig`)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        policy_fields = {name: kwargs.pop(name) for name in list(kwargs) if name not in _FIELDS}
        init(self, *args, **kwargs)
        if policy_fields:
            try:
                policy = self.policy.replace(**policy_fields)
            except TypeError as exc:
                raise TypeError(f"CSPConfig has no field {', '.join(map(repr, sorted(policy_fields)))}, and {exc}; "
                                f"its fields are {', '.join(sorted(_FIELDS))}") from None
            object.__setattr__(self, "policy", policy)

    return __init__


CSPConfig.__init__ = _with_policy_fields(CSPConfig.__init__)


def resolve(config: Optional[CSPConfig], overrides: dict) -> CSPConfig:
    """`config` (default CSPConfig()) with keyword `overrides` applied."""
    if config is None:
        config = CSPConfig()
    elif not isinstance(config, CSPConfig):
        raise TypeError(f"cspkv: config must be a cspkv.CSPConfig or None, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config
