"""`CSPConfig`: what Cross-Self Pruning keeps, validated once when it is built.

Sizes (`budget`, `window`, `recent`) are given either as a fraction of each
prompt's real length (a float) or as a token count (an int); `cspkv.policy`
turns them into per-row counts. Every bad value raises a ValueError (or a
TypeError for a wrong type) that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

Size = Union[float, int]

#: Selection policies: CSP and the baselines of `cspkv.baselines`.
POLICIES = ("csp", "snapkv", "h2o", "streaming", "random")

#: `CSPConfig.pool` = None resolves to these widths; policies not listed do not pool.
#: csp: max-pool, 15 = the best width of benchmarks/results/quality.md; snapkv:
#: average pool, 7 as in SnapKV's paper.
POOL_DEFAULTS = {"csp": 15, "snapkv": 7}


def _fail(field: str, message: str, kind: type = ValueError) -> None:
    raise kind(f"CSPConfig.{field} {message}")


def _check_size(field: str, value, *, allow_zero: bool) -> None:
    """A fraction (float in (0, 1], or [0, 1] with allow_zero) or a count (int >= 1, or >= 0)."""
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


def _check_non_negative(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"must be a number >= 0, got {value!r}", TypeError)
    if not (math.isfinite(value) and value >= 0):
        _fail(field, f"must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class CSPConfig:
    """Settings of Cross-Self Pruning (see CSP_SPEC.md).

    Parameters
    ----------
    budget : float in (0, 1] or int >= 1, default 0.2
        Tokens kept per row and KV head, recent ones included: a fraction of the
        row's real prompt length (rounded to the nearest count, at least 1) or a
        count. ``1.0`` keeps everything (and must reproduce the unpatched model);
        the int ``1`` keeps one token.
    window : float in (0, 1] or int >= 1, default 0.1
        Observation window: the last `window` prompt positions score the keys.
    recent : float in [0, 1], int >= 0 or None, default None (= `window`)
        The last `recent` prompt tokens are always kept (capped at the budget).
    cross_ratio : float in [0, 1] or "auto", default 0.9
        Share of the heavy-hitter slots (budget - recent) chosen by cross-modality
        score; the rest go to the self-modality score. ``"auto"`` uses the share
        of cross-modal (query, key) pairs in the window. A row whose prompt holds
        a single modality has no cross attention to rank and uses 0. The default
        ranked best over the grid of benchmarks/results/quality.md (the paper's
        default is 0.5).
    n : float >= 0, default 1.0
        n-softmax constant of the scoring pass (0 = plain softmax). 0 and 1 scored
        alike on the quality benchmark; 1 as in the paper.
    decode_n : float >= 0, default 0.0
        n-softmax constant of the attention over a pruned cache (0 = softmax);
        1 did not help on the quality benchmark.
    min_prompt : int >= 1, default 32
        Rows with fewer real prompt tokens are not pruned (logged at debug level).
    layers : sequence of int or None, default None (= every prunable layer)
        Decoder layer indices to prune.
    policy : str, default "csp"
        Which tokens to keep: ``"csp"`` (Cross-Self Pruning) or a baseline on
        the same ops and cache machinery (see `cspkv.baselines`): ``"snapkv"``,
        ``"h2o"``, ``"streaming"``, ``"random"``. Baselines rank all tokens
        with one score (`cross_ratio` and `n` do not apply to them).
    pool : odd int >= 1 or None, default None (= the policy's default)
        Width of the 1-D pooling of the scores along the keys (stride 1, the
        length kept; 1 = no pooling), so the neighbours of a strongly attended
        token rank with it. ``None`` takes the policy's default (see
        `pool_width`): ``"csp"`` max-pools both scores over 15 keys (not part of
        CSP as published; on the quality benchmark it lifts task A accuracy at
        a 20% budget from 26% to 81%, the full cache's, see
        benchmarks/results/quality.md: a multi-token fact otherwise keeps only
        its first token); ``"snapkv"`` average-pools its window scores over 7
        keys (SnapKV's paper). The other baselines do not pool: a `pool` other
        than None raises a ValueError for them.
    sinks : int >= 0, default 4
        ``"streaming"`` only: the first `sinks` real tokens are always kept; the
        rest of the budget is the recent window.
    seed : int >= 0, default 0
        ``"random"`` only: seed of the uniform choice (combined with the layer index).
    prefill_lse : bool, default True
        ``"csp"`` and ``"snapkv"``: score the window in one pass, normalising each
        window row by the log-sum-exp that the layer's prefill attention computed,
        when that attention is torch's scaled_dot_product_attention on a flash
        backend (or cuDNN, without a mask) with the causal + padding mask the
        scores assume (see
        `cspkv.prefill_lse`); otherwise, or with False, the scoring kernels
        compute it in a first pass over the keys. The scores agree up to float
        rounding; `PatchHandle.stats()` names per layer which way ran.
    overlap_pruning : bool, default False
        CUDA: score, select and compact a layer's cache on a side stream (one
        per device), so that it overlaps the prefill of the layers after it;
        the model's forward call returns with its stream waiting for that
        work, so whatever runs next on it sees the pruned cache. The result is
        the same either way; False prunes on the layer's own stream. No effect
        on a CPU, or when an attention module is called outside its model.
        Off by default: on an H200 (7B shape, 4k tokens) it did not shorten
        the time to first token (133 ms against 134 in line), likely as the
        prefill's own kernels fill the GPU (not measured apart).

    Example
    -------
    >>> CSPConfig(budget=0.3, cross_ratio="auto").recent is None
    True
    """

    budget: Size = 0.2
    window: Size = 0.1
    recent: Optional[Size] = None
    cross_ratio: Union[float, str] = 0.9
    n: float = 1.0
    decode_n: float = 0.0
    min_prompt: int = 32
    layers: Optional[Tuple[int, ...]] = None
    policy: str = "csp"
    pool: Optional[int] = None
    sinks: int = 4
    seed: int = 0
    prefill_lse: bool = True
    overlap_pruning: bool = False

    def __post_init__(self) -> None:
        _check_size("budget", self.budget, allow_zero=False)
        _check_size("window", self.window, allow_zero=False)
        if self.recent is not None:
            _check_size("recent", self.recent, allow_zero=True)
        if isinstance(self.cross_ratio, str):
            if self.cross_ratio != "auto":
                _fail("cross_ratio", f"must be a number in [0, 1] or 'auto', got {self.cross_ratio!r}")
        elif isinstance(self.cross_ratio, bool) or not isinstance(self.cross_ratio, (int, float)):
            _fail("cross_ratio", f"must be a number in [0, 1] or 'auto', got {self.cross_ratio!r}", TypeError)
        elif not (math.isfinite(self.cross_ratio) and 0.0 <= self.cross_ratio <= 1.0):
            _fail("cross_ratio", f"must be a number in [0, 1] or 'auto', got {self.cross_ratio!r}")
        _check_non_negative("n", self.n)
        _check_non_negative("decode_n", self.decode_n)
        if isinstance(self.min_prompt, bool) or not isinstance(self.min_prompt, int):
            _fail("min_prompt", f"must be an int >= 1, got {self.min_prompt!r}", TypeError)
        if self.min_prompt < 1:
            _fail("min_prompt", f"must be an int >= 1, got {self.min_prompt!r}")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                _fail("layers", f"must be a sequence of layer indices or None, got {layers!r}", TypeError)
            layers = tuple(layers)
            for idx in layers:
                if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                    _fail("layers", f"must hold ints >= 0, got {idx!r} in {layers!r}")
            if len(set(layers)) != len(layers):
                _fail("layers", f"must not repeat a layer, got {layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.policy not in POLICIES:
            _fail("policy", f"must be one of {', '.join(map(repr, POLICIES))}, got {self.policy!r}")
        for field, low in (("sinks", 0), ("seed", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                _fail(field, f"must be an int >= {low}, got {value!r}", TypeError)
            if value < low:
                _fail(field, f"must be an int >= {low}, got {value!r}")
        for field in ("prefill_lse", "overlap_pruning"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, f"must be a bool, got {getattr(self, field)!r}", TypeError)
        if self.pool is not None:
            if isinstance(self.pool, bool) or not isinstance(self.pool, int):
                _fail("pool", f"must be an odd int >= 1 or None, got {self.pool!r}", TypeError)
            if self.pool < 1 or self.pool % 2 == 0:
                _fail("pool", f"must be an odd int >= 1 (1 = no pooling; pooling keeps the length) or None, "
                      f"got {self.pool!r}")
            if self.policy not in POOL_DEFAULTS:
                _fail("pool", f"does not apply to policy {self.policy!r} (it does not pool its scores); "
                      f"leave it None (pooling policies: {', '.join(map(repr, POOL_DEFAULTS))}), got {self.pool!r}")

    @property
    def pool_width(self) -> int:
        """The pooling width in effect: `pool`, or the policy's default when None (1 = no pooling)."""
        return self.pool if self.pool is not None else POOL_DEFAULTS.get(self.policy, 1)

    def replace(self, **overrides) -> "CSPConfig":
        """A copy with `overrides` applied (validated again); unknown names raise TypeError."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"CSPConfig has no field {', '.join(map(repr, unknown))}; fields are {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **overrides)


def resolve(config: Optional[CSPConfig], overrides: dict) -> CSPConfig:
    """`config` (default CSPConfig()) with keyword `overrides` applied."""
    if config is None:
        config = CSPConfig()
    elif not isinstance(config, CSPConfig):
        raise TypeError(f"cspkv: config must be a cspkv.CSPConfig or None, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config
