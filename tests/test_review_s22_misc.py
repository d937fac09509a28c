"""Regression tests for fixes made in session 22 outside the helpers' areas."""

from __future__ import annotations

import pytest

from bbb.bandit.config import SEED_LIMIT, BanditConfig


def test_bandit_seeds_that_would_share_a_generator_are_refused() -> None:
    # seed 10000's environment stream was seeded like the agents' noise of a run starting at
    # seed 0 (20000 + 0 = 10000 + 10000): such seeds are refused with the reason
    with pytest.raises(ValueError, match=r"below 10000.*collide"):
        BanditConfig(seeds=[0, SEED_LIMIT]).validate()
    assert BanditConfig(seeds=[0, SEED_LIMIT - 1]).validate().seeds == [0, SEED_LIMIT - 1]
