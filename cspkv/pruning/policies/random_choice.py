"""A uniform random choice among the candidates: with the recent window, the floor any
policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, ScoreInputs, Scores, check_int, register_policy


@register_policy
@dataclass(frozen=True)
class Random(Policy):
    """Uniform random ranking, reproducible: drawn on the CPU from a generator seeded
    with (`seed`, layer index), so every layer draws its own choice and a rerun keeps
    the same.

    Parameters
    ----------
    seed : int >= 0, default 0.
    """

    seed: int = 0

    name = "random"
    allocates = False  # its scores are no attention mass: nothing to spend a budget by

    def __post_init__(self) -> None:
        check_int(self, "seed", 0)

    def score(self, inputs: ScoreInputs) -> Scores:
        k_mod = inputs.k_mod
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + inputs.layer)
        ranking = torch.rand(k_mod.shape[0], inputs.keys.shape[1], k_mod.shape[1], generator=generator)
        return Scores(ranking.to(k_mod.device))
