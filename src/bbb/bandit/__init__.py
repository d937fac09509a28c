"""The Mushroom contextual bandit of Blundell et al. (2015), section 5.3.

Environment: each step a mushroom is drawn uniformly at random; the agent sees its one-hot
attributes (117 columns, see :func:`bbb.data.load_mushroom`) and eats or passes. Rewards:
eating an edible mushroom +5; eating a poisonous one +5 or -35 with probability 1/2 each;
passing 0. The oracle eats exactly the edible ones, so the expected regret of a step is 5 for
passing an edible mushroom, 15 for eating a poisonous one (its expected reward is -15), else 0;
the realised regret (oracle's realised reward minus the agent's) is logged too.

Agents (every one a network: input context + one-hot action (119), two hidden layers of 100
ReLU units, output the expected reward; after each step, 64 updates on minibatches of 64 drawn
from a buffer of the last 4096 interactions):

- ``bbb-thompson``: Bayes by Backprop; acts by Thompson sampling: one weight sample drawn per
  decision (``"frozen"`` mode, the same weights for both actions), by default the average of 2
  samples as in the paper; trained on the ELBO with the buffer's current size as ``N``.
- ``greedy-0``, ``greedy-0.01``, ``greedy-0.05``: epsilon-greedy agents trained by Adam on the
  squared error.

All agents and seeds advance together: the networks of all (agent, seed) pairs are the members
of :class:`bbb.nn.ensemble.BayesLinearEnsemble` layers (greedy members run in ``"mean"``
mode, a deterministic network), so a step is a handful of batched matrix products. Every seed
has its own stream of mushrooms and coin flips, shared by all agents of that seed.
"""

from .agents import _Buffers as _Buffers
from .agents import _Population as _Population
from .agents import _with_action as _with_action
from .agents import ensemble_mlp
from .cli import add_parser, main_bandit
from .config import (
    BANDIT_KERNELS,
    BAYES_ONLY_SETTINGS,
    KL_DATA_SIZES,
    BanditConfig,
    make_prior_from,
)
from .env import (
    AGENTS,
    BAYES_AGENT,
    EAT,
    LATE_WINDOW,
    PASS,
    REWARD_EDIBLE,
    REWARD_POISON_BAD,
    REWARD_POISON_GOOD,
    environment_step,
    expected_regret,
    oracle_rewards,
    realized_rewards,
)
from .results import merge_runs
from .run import run_bandit
from .update import fused_update

__all__ = [
    "AGENTS",
    "BANDIT_KERNELS",
    "BAYES_AGENT",
    "BAYES_ONLY_SETTINGS",
    "EAT",
    "KL_DATA_SIZES",
    "LATE_WINDOW",
    "PASS",
    "REWARD_EDIBLE",
    "REWARD_POISON_BAD",
    "REWARD_POISON_GOOD",
    "BanditConfig",
    "add_parser",
    "ensemble_mlp",
    "environment_step",
    "expected_regret",
    "fused_update",
    "main_bandit",
    "make_prior_from",
    "merge_runs",
    "oracle_rewards",
    "realized_rewards",
    "run_bandit",
]
