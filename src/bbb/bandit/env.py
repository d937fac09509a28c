"""The Mushroom environment: rewards, regret, the per-seed streams of mushrooms and coins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

AGENTS = ("bbb-thompson", "greedy-0", "greedy-0.01", "greedy-0.05")
#: the late-regret window of the issue's target (per-step regret over the last 10000 steps)
LATE_WINDOW = 10000
BAYES_AGENT = AGENTS[0]
EAT, PASS = 1, 0
REWARD_EDIBLE = 5.0
REWARD_POISON_GOOD = 5.0
REWARD_POISON_BAD = -35.0


def expected_regret(edible: Tensor, action: Tensor) -> Tensor:
    """Expected regret of ``action`` (1 eat, 0 pass) for mushrooms ``edible`` (bool), same shape.

    Oracle: eat edible (+5), pass poisonous (0). Passing an edible one loses 5; eating a
    poisonous one has expected reward (5 - 35) / 2 = -15, so it loses 15.
    """
    eat = action.bool()
    return torch.where(edible, (~eat).to(torch.float32) * 5.0, eat.to(torch.float32) * 15.0)


def realized_rewards(edible: Tensor, action: Tensor, lucky: Tensor) -> Tensor:
    """Reward of ``action`` given edibility and the poison coin (``lucky``: +5 instead of -35)."""
    eat = action.bool()
    poison_reward = torch.where(lucky, REWARD_POISON_GOOD, REWARD_POISON_BAD)
    eaten = torch.where(edible, torch.full_like(poison_reward, REWARD_EDIBLE), poison_reward)
    return torch.where(eat, eaten, torch.zeros_like(eaten))


def environment_step(generators: Sequence[torch.Generator], n_rows: int) -> tuple[Tensor, Tensor]:
    """One step of every seed's stream: the mushroom drawn (S,), uniform over ``n_rows``, and
    the poison coin (S,) bool, True (+5 if a poisonous one is eaten) with probability 1/2.

    Each seed's generator alone decides its stream, so every agent of a seed sees the same
    mushrooms and coins whichever other agents or seeds share the run.
    """
    idx = torch.stack([torch.randint(0, n_rows, (1,), generator=g) for g in generators])[:, 0]
    lucky = torch.stack([torch.rand(1, generator=g) < 0.5 for g in generators])[:, 0]
    return idx, lucky


def oracle_rewards(edible: Tensor) -> Tensor:
    """Realised reward of the oracle (eats exactly the edible mushrooms)."""
    return torch.where(edible, REWARD_EDIBLE, 0.0)
