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

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _native
from . import kernels as _kernels
from .config import changed_settings
from .likelihoods import Gaussian
from .nn.ensemble import BayesLinearEnsemble
from .nn.module import kl_divergence, resample, sampling, vectorized_samples
from .nn.noise import randn as _randn
from .priors import GaussianPrior, Prior, make_prior
from .train.checkpoint import (
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .train.optim import adam

__all__ = [
    "AGENTS",
    "BanditConfig",
    "expected_regret",
    "realized_rewards",
    "environment_step",
    "run_bandit",
    "ensemble_mlp",
]

AGENTS = ("bbb-thompson", "greedy-0", "greedy-0.01", "greedy-0.05")
#: the late-regret window of the issue's target (per-step regret over the last 10000 steps)
LATE_WINDOW = 10000
BAYES_AGENT = AGENTS[0]
# settings only the Bayesian agent reads
BAYES_ONLY_SETTINGS = (
    "thompson_samples",
    "estimator",
    "prior",
    "prior_sigma",
    "prior_pi",
    "prior_sigma1",
    "prior_sigma2",
    "noise_sigma",
    "rho_init",
    "kl_data_size",
    "kernels",
    "prior_update",
)
#: accepted values of ``BanditConfig.kl_data_size`` (the N of the Bayesian agent's KL / N)
KL_DATA_SIZES = ("buffer", "seen", "capacity")
#: accepted values of ``BanditConfig.kernels`` (bbb.kernels backends the bandit uses)
BANDIT_KERNELS = ("eager", "native")
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


@dataclass
class BanditConfig:
    """Settings of a bandit run (saved as ``config.json``)."""

    agents: list[str] = field(default_factory=lambda: list(AGENTS))
    steps: int = 50000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    hidden: int = 100
    updates_per_step: int = 64
    batch_size: int = 64
    buffer_size: int = 4096
    lr: float = 1e-3
    # Adam's eps (torch's default). Larger values damp the steps of parameters whose gradient
    # is tiny: under Adam's normalisation a weight that only the KL pulls (its data left the
    # buffer) moves to the prior at ~lr per update however small the KL's weight. 1e-2 lowered
    # the first 4000 steps' regret but not the later rate (docs/RESULTS.md, session 13)
    adam_eps: float = 1e-8
    thompson_samples: int = 2
    # BBB training steps: weight-space sampling (the paper's algorithm; the fused update)
    estimator: str = "reparam"
    # Prior, likelihood noise and initial rho: chosen on short runs (1500 steps, 16 updates per
    # step, seeds 0-2; docs/RESULTS.md, bandit section): the scale mixture (pi 1/2, e^0, e^-6)
    # stayed near the always-pass policy for ~600 steps (regret 3465 against 1428 for these).
    # Likelihood noise 0.1 (was 0.5), from 10000-step runs (64 updates per step, seeds 0-2,
    # session 3): cumulative regret 4098 +- 154 against 5303 +- 639, lower on every seed, and
    # 0.19 regret per step over steps 8001-10000 against 0.33 (noise 1: 8317, 0.45).
    prior: str = "gaussian"
    prior_sigma: float = 1.0  # gaussian / laplace
    prior_pi: float = 0.5
    prior_sigma1: float = 1.0
    prior_sigma2: float = math.exp(-6)
    noise_sigma: float = 0.1  # Gaussian likelihood of the BBB agent's reward model
    rho_init: float = -3.0
    # The ELBO's data-set size N (the loss is mean NLL + KL / N): "buffer", the buffer's current
    # size (the protocol of issue 6, at most buffer_size), or "seen", every interaction so far
    # (the buffer then stands for the whole history, as a minibatch stands for a data set; a
    # variant, not the paper's agent), or "capacity", buffer_size from the first step (the KL
    # weight of a full buffer throughout; a variant: the protocol's N = 1, 2, ... weighs the
    # KL thousands of times more than the data in the first steps)
    kl_data_size: str = "buffer"
    # Every this many steps the Bayesian agent's prior becomes its posterior of that moment (a
    # Gaussian per weight, its mean and sigma, fixed until the next update), as in variational
    # continual learning (Nguyen, Li, Bui and Turner, ICLR 2018): what left the buffer stays in
    # the prior instead of the KL pulling it back to N(0, prior_sigma^2). 0: never (the
    # protocol). A variant, not the paper's agent; Gaussian prior and the fused (reparam)
    # update only (with kernels "native", the noise and the sample are native, the per-weight
    # KL gradient eager: the native kernels take one prior for all weights).
    prior_update: int = 0
    # bbb.kernels backend of the Bayesian agent's update: eager, or native (C noise and the
    # fused sample / closed-form KL gradients, float32 on CPU with the Gaussian prior; the noise
    # has torch.randn's distribution but other numbers, so a run keeps its backend)
    kernels: str = "eager"
    checkpoint_every: int = 500
    data_dir: str | None = None

    def validate(self) -> BanditConfig:
        unknown = [a for a in self.agents if a not in AGENTS]
        if unknown or not self.agents:
            raise ValueError(f"unknown agent(s) {unknown}; accepted values: {', '.join(AGENTS)}")
        if len(set(self.agents)) != len(self.agents):
            raise ValueError(f"agents must be distinct, got {self.agents!r}")
        for key in (
            "steps",
            "hidden",
            "updates_per_step",
            "batch_size",
            "buffer_size",
            "thompson_samples",
            "checkpoint_every",
        ):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        from .nn.estimators import ESTIMATORS
        from .priors import PRIOR_NAMES

        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {self.estimator!r}; accepted values: {', '.join(ESTIMATORS)}"
            )
        if self.prior not in PRIOR_NAMES:
            raise ValueError(
                f"unknown prior {self.prior!r}; accepted values: {', '.join(PRIOR_NAMES)}"
            )
        for key in ("lr", "noise_sigma", "adam_eps"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{key} must be a finite positive number, got {v!r}")
        if self.kl_data_size not in KL_DATA_SIZES:
            raise ValueError(
                f"unknown kl_data_size {self.kl_data_size!r}; accepted values: "
                f"{', '.join(KL_DATA_SIZES)}"
            )
        if self.kernels not in BANDIT_KERNELS:
            raise ValueError(
                f"unknown kernels {self.kernels!r}; accepted values: {', '.join(BANDIT_KERNELS)}"
            )
        pu = self.prior_update
        if isinstance(pu, bool) or not isinstance(pu, int) or pu < 0:
            raise ValueError(f"prior_update must be a non-negative integer (0: never), got {pu!r}")
        if pu and (self.prior != "gaussian" or self.estimator != "reparam"):
            raise ValueError(
                "prior_update needs prior 'gaussian' and estimator 'reparam' (the fused "
                f"update's closed-form KL), got prior {self.prior!r}, estimator {self.estimator!r}"
            )
        if not math.isfinite(self.rho_init):
            raise ValueError(f"rho_init must be finite, got {self.rho_init!r}")
        make_prior_from(self)  # the prior's own checks (sigma > 0, pi in (0, 1), ...)
        return self


def ensemble_mlp(
    members: int,
    in_features: int,
    hidden: int,
    *,
    prior: Prior | None = None,
    estimator: str = "local",
    rho_init: float = -5.0,
) -> nn.Sequential:
    """K independent MLPs in_features -> hidden -> hidden -> 1 (ReLU), as ensemble layers."""
    # KL: closed form for the Gaussian prior, Monte Carlo otherwise (what the fused update of
    # run_bandit implements; the same as kl="auto" except for the Laplace prior)
    kl = "closed_form" if prior is None or isinstance(prior, GaussianPrior) else "mc"
    kw: dict[str, Any] = {"prior": prior, "estimator": estimator, "rho_init": rho_init, "kl": kl}
    return nn.Sequential(
        BayesLinearEnsemble(members, in_features, hidden, **kw),
        nn.ReLU(),
        BayesLinearEnsemble(members, hidden, hidden, **kw),
        nn.ReLU(),
        BayesLinearEnsemble(members, hidden, 1, **kw),
    )


def _epsilon(agent: str) -> float:
    return float(agent.split("-", 1)[1])


class _Buffers:
    """Per-member ring buffers of (network input = context + one-hot action, reward).

    The input row is stored ready for the network (K, capacity, D + 2), so a minibatch is one
    ``index_select`` (issue 6: the bandit's 3.2 million updates leave no room for per-update
    concatenation).
    """

    def __init__(self, members: int, capacity: int, dim: int) -> None:
        self.inp = torch.zeros(members, capacity, dim + 2)
        self.r = torch.zeros(members, capacity)
        self.capacity = capacity
        self.size = 0
        self.pos = 0
        self.seen = 0  # interactions added so far (size is min(seen, capacity))
        self._offsets = (torch.arange(members) * capacity).unsqueeze(1)  # (K, 1)

    def add(self, x: Tensor, a: Tensor, r: Tensor) -> None:
        """Append contexts (K, D), actions (K,) and rewards (K,), overwriting the oldest."""
        self.inp[:, self.pos] = _with_action(x, a)
        self.r[:, self.pos] = r
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.seen += 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(K, B, D + 2) inputs and (K, B) rewards, drawn uniformly with replacement."""
        k, cap, width = self.inp.shape
        idx = (torch.randint(0, self.size, (k, batch), generator=generator) + self._offsets).view(
            -1
        )
        inp = self.inp.view(k * cap, width).index_select(0, idx).view(k, batch, width)
        return inp, self.r.view(-1).index_select(0, idx).view(k, batch)

    def state(self) -> dict[str, Any]:
        return {
            "inp": self.inp,
            "r": self.r,
            "size": self.size,
            "pos": self.pos,
            "seen": self.seen,
        }

    def load(self, s: dict[str, Any], seen: int) -> None:
        """Restore :meth:`state`; ``seen`` (the run's steps done: one interaction per step) is
        used for checkpoints written before the count was stored."""
        if s["inp"].shape != self.inp.shape:
            raise ValueError(
                f"checkpoint buffer has shape {tuple(s['inp'].shape)}, this run needs "
                f"{tuple(self.inp.shape)}"
            )
        self.inp, self.r = s["inp"].contiguous(), s["r"].contiguous()
        self.size, self.pos = int(s["size"]), int(s["pos"])
        self.seen = int(s.get("seen", seen))


def _with_action(x: Tensor, a: Tensor) -> Tensor:
    """Concatenate contexts (..., D) with one-hot actions (...) -> (..., D + 2)."""
    return torch.cat([x, nn.functional.one_hot(a, 2).to(x.dtype)], dim=-1)


class _Population:
    """All networks of one kind (Bayesian or greedy), for every (agent, seed) member."""

    def __init__(
        self, cfg: BanditConfig, names: list[str], seeds: list[int], bayes: bool, dim: int
    ) -> None:
        self.names = names  # agent name of each member
        self.seeds = seeds  # seed index of each member
        self.bayes = bayes
        k = len(names)
        prior = make_prior_from(cfg) if bayes else None
        self.prior = prior
        self.model = ensemble_mlp(
            k, dim + 2, cfg.hidden, prior=prior, estimator=cfg.estimator, rho_init=cfg.rho_init
        )
        self.likelihood = Gaussian("fixed", sigma=cfg.noise_sigma)
        self.buffers = _Buffers(k, cfg.buffer_size, dim)
        self.thompson_samples = cfg.thompson_samples
        self.kl_data_size = cfg.kl_data_size
        # per-weight Gaussian prior over the flat means' entries (BanditConfig.prior_update):
        # (means, inverse variances); None: the prior above for every weight
        self.weight_prior: tuple[Tensor, Tensor] | None = None
        self.batch_size = cfg.batch_size
        self.eps = torch.tensor([0.0 if bayes else _epsilon(n) for n in names])
        # All trainable tensors live in one flat parameter (the layers' parameters become views
        # of it): the optimiser steps one tensor, and the fused update computes the KL
        # gradient of every layer in one pass. Order: all means, then all rhos (Bayesian).
        params = self.trainable()
        mus = [q for n, q in self.model.named_parameters() if n.endswith("_mu")]
        rhos = [q for n, q in self.model.named_parameters() if n.endswith("_rho")]
        ordered = mus + rhos if bayes else mus
        assert {id(q) for q in ordered} == {id(q) for q in params}
        self.flat = nn.Parameter(torch.cat([q.detach().reshape(-1) for q in ordered]))
        self.flat.grad = torch.zeros_like(self.flat)
        self.n_mu = sum(q.numel() for q in mus)
        offset = 0
        self.views: list[tuple[nn.Parameter, Tensor]] = []  # (layer parameter, its grad view)
        for q in ordered:
            n = q.numel()
            q.data = self.flat.data[offset : offset + n].view_as(q)
            self.views.append((q, self.flat.grad[offset : offset + n].view_as(q)))
            offset += n

    @property
    def kl_n(self) -> int:
        """The ELBO's data-set size N now (``BanditConfig.kl_data_size``)."""
        if self.kl_data_size == "seen":
            return self.buffers.seen
        if self.kl_data_size == "capacity":
            return self.buffers.capacity
        return self.buffers.size

    @torch.no_grad()
    def posterior_as_prior(self) -> None:
        """Make the current posterior the prior of every weight (``BanditConfig.prior_update``)."""
        n = self.n_mu
        flat = self.flat.detach()
        self.weight_prior = (flat[:n].clone(), torch.nn.functional.softplus(flat[n:]).pow_(-2))

    def prior_state(self) -> dict[str, Tensor] | None:
        """The per-weight prior for a checkpoint (None: the configured prior)."""
        if self.weight_prior is None:
            return None
        return {"loc": self.weight_prior[0], "inv_var": self.weight_prior[1]}

    def load_prior_state(self, s: dict[str, Tensor] | None) -> None:
        self.weight_prior = (
            None if s is None else (s["loc"].contiguous(), s["inv_var"].contiguous())
        )

    def gather_grads(self) -> None:
        """Copy the layers' ``.grad`` (from autograd) into the flat parameter's gradient."""
        for q, g in self.views:
            if q.grad is None:
                g.zero_()
            else:
                g.copy_(q.grad)
                q.grad = None

    @torch.no_grad()
    def act(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Actions (K,) for contexts (K, D)."""
        k = x.shape[0]
        both = torch.stack(
            [_with_action(x, torch.full((k,), PASS)), _with_action(x, torch.full((k,), EAT))], 1
        )
        if self.bayes:
            s = self.thompson_samples
            resample(self.model)
            with sampling(self.model, "frozen"), vectorized_samples(self.model, s):
                value = self.model(both.repeat(s, 1, 1)).reshape(s, k, 2).mean(0)
            return value.argmax(-1)
        with sampling(self.model, "mean"):
            value = self.model(both)[..., 0]
        greedy = value.argmax(-1)
        explore = torch.rand(k, generator=generator) < self.eps
        random_action = torch.randint(0, 2, (k,), generator=generator)
        return torch.where(explore, random_action, greedy)

    def loss(self, generator: torch.Generator) -> Tensor:
        """The training loss of one minibatch from each member's buffer, summed over members.

        Bayesian members: sum_k (mean NLL_k + KL_k / N), N = :attr:`kl_n` (members
        are independent networks, so the sum trains each on its own ELBO). Greedy members: sum
        of the members' mean squared errors.
        """
        inp, r = self.buffers.sample(self.batch_size, generator)
        if self.bayes:
            out = self.model(inp)  # (K, B, 1), estimator noise per row
            nll = -self.likelihood.log_prob(out.reshape(1, -1, 1), r.reshape(-1))
            return (
                nll.reshape(len(self.names), -1).mean(1).sum()
                + kl_divergence(self.model) / self.kl_n
            )
        with sampling(self.model, "mean"):
            out = self.model(inp)[..., 0]
        return ((out - r) ** 2).mean(1).sum()

    @property
    def layers(self) -> list[BayesLinearEnsemble]:
        return [m for m in self.model if isinstance(m, BayesLinearEnsemble)]

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (greedy members: the means only)."""
        return [p for n, p in self.model.named_parameters() if self.bayes or n.endswith("_mu")]


@torch.no_grad()
def fused_update(
    pops: Sequence[_Population], generator: torch.Generator, eps: Tensor | None = None
) -> Tensor | None:
    """Set ``.grad`` of every trainable parameter for one update of all networks at once.

    The gradients are those of :meth:`_Population.loss` summed over the populations (for the
    ``reparam`` estimator), written by hand: the weights of all members, Bayesian samples
    ``w = mu + softplus(rho) * eps`` and greedy means, are stacked into one (K, out, in) tensor
    per layer, so the forward and backward passes of all 20 networks are 3 + 5 batched matrix
    products, and the Bayesian members' KL enters through its closed-form gradients:

    - Gaussian prior (closed form): dKL/dmu = (mu - m) / s^2, dKL/dsigma = sigma / s^2 - 1/sigma;
    - other priors (Monte Carlo at the same sample w): dKL/dmu = -p'(w)/p(w),
      dKL/dsigma = -p'(w)/p(w) eps - 1/sigma;

    then d/drho = d/dsigma * sigmoid(rho). The autograd path costs ~600 small operations per
    update (about 3x this, issue 6); :func:`tests.test_bandit` checks both agree.

    Args:
        pops: at most one Bayesian and one greedy population.
        generator: draws the minibatch indices.
        eps: the Bayesian members' standard normal noise, one flat tensor of all their weights
            and biases (layer by layer: weight, bias); drawn here when None (tests pass it).

    Returns:
        The Bayesian members' noise used (None without a Bayesian population). With the
        kernels backend ``"native"`` (``BanditConfig.kernels``), a Gaussian prior, float32 on
        CPU and ``eps`` None, the noise, sample and KL gradients come from the native kernels
        (:mod:`bbb._native`; the same formulas, the KL's with the layers' rho < -20 switch);
        with a per-weight prior (``BanditConfig.prior_update``) the noise and sample only.
    """
    bayes = next((p for p in pops if p.bayes), None)
    greedy = next((p for p in pops if not p.bayes), None)
    xs, rs, scales = [], [], []
    for p in (bayes, greedy):
        if p is None:
            continue
        inp, r = p.buffers.sample(p.batch_size, generator)
        xs.append(inp)
        rs.append(r)
        k, b = r.shape
        # d/dout of the mean Gaussian NLL: (out - r) / (sigma_n^2 B); of the mean squared
        # error: 2 (out - r) / B
        c = 1.0 / (float(p.likelihood.sigma[0]) ** 2 * b) if p.bayes else 2.0 / b
        scales.append(torch.full((k, 1, 1), c, dtype=inp.dtype, device=inp.device))
    x = xs[0] if len(xs) == 1 else torch.cat(xs)
    r = rs[0] if len(rs) == 1 else torch.cat(rs)
    scale = scales[0] if len(scales) == 1 else torch.cat(scales)
    kb = 0 if bayes is None else len(bayes.names)
    n_layers = len((bayes or greedy).layers)  # type: ignore[union-attr]

    # --- weights of every member: Bayesian samples (all layers in one flat pass), then means
    w_views: list[tuple[Tensor, Tensor]] = []
    native = False
    if bayes is not None:
        n = bayes.n_mu
        mu_all, rho_all = bayes.flat[:n], bayes.flat[n:]
        prior = bayes.prior
        # with a per-weight prior (BanditConfig.prior_update) the native pass draws the noise
        # and the sample only (its KL is the configured prior's, unused); the KL gradient
        # below is eager
        native = (
            eps is None
            and isinstance(prior, GaussianPrior)
            and _kernels.native_ready()
            and _native.supports(bayes.flat)
        )
        if native:
            # the noise, softplus and sample in one native pass (bbb.kernels "native")
            assert isinstance(prior, GaussianPrior)
            loc, inv_var = prior._value("mean"), 1.0 / prior._value("sigma") ** 2
            spec = ("gaussian", loc, inv_var)
            w_all, _, sig_all, eps_n = _native.sample_kl_fwd(
                "reparam", mu_all.detach(), rho_all.detach(), spec
            )
            assert eps_n is not None
            eps_all = eps = eps_n
        else:
            if eps is None:
                eps = _randn((n,), dtype=x.dtype, device=x.device)
            eps_all = eps
            sig_all = torch.nn.functional.softplus(rho_all)
            w_all = torch.addcmul(mu_all, sig_all, eps_all)
        offset = 0
        shapes = [q.shape for q, _ in bayes.views[: len(bayes.views) // 2]]
        flat_w = []
        for shape in shapes:
            k = math.prod(shape)
            flat_w.append(w_all[offset : offset + k].view(shape))
            offset += k
        w_views = [(flat_w[2 * i], flat_w[2 * i + 1]) for i in range(n_layers)]
    weights, biases = [], []
    for i in range(n_layers):
        parts_w, parts_b = [], []
        if bayes is not None:
            parts_w.append(w_views[i][0])
            parts_b.append(w_views[i][1])
        if greedy is not None:
            layer = greedy.layers[i]
            parts_w.append(layer.weight_mu)
            parts_b.append(layer.bias_mu)
        weights.append(parts_w[0] if len(parts_w) == 1 else torch.cat(parts_w))
        biases.append(parts_b[0] if len(parts_b) == 1 else torch.cat(parts_b))

    # --- forward: (K, B, in) -> (K, B, 1), keeping every layer's input
    acts = [x]
    h = x
    for i in range(n_layers):
        h = torch.baddbmm(biases[i].unsqueeze(1), h, weights[i].transpose(1, 2))
        if i < n_layers - 1:
            h = torch.relu(h)
        acts.append(h)
    # --- backward of the summed per-member mean losses
    d = (h - r.unsqueeze(-1)).mul_(scale)
    grads: list[tuple[Tensor, Tensor]] = []
    for i in reversed(range(n_layers)):
        gw = torch.bmm(d.transpose(1, 2), acts[i])
        gb = d.sum(1)
        grads.append((gw, gb))
        if i > 0:
            d = torch.ops.aten.threshold_backward(torch.bmm(d, weights[i]), acts[i], 0.0)
    grads.reverse()

    # --- greedy members: the mean's gradient (into the flat gradient's views)
    if greedy is not None:
        views = iter(greedy.views)
        for gw, gb in grads:
            next(views)[1].copy_(gw[kb:])
            next(views)[1].copy_(gb[kb:])
    # --- Bayesian members: data term through w, plus the KL / N term in closed form, for all
    # layers at once on the flat (means..., rhos...) parameter
    if bayes is not None:
        n = bayes.n_mu
        grad = bayes.flat.grad
        assert grad is not None
        g_mu, g_rho = grad[:n], grad[n:]
        views = iter(bayes.views)
        for gw, gb in grads:  # data gradient w.r.t. the sampled w, in the order of the means
            next(views)[1].copy_(gw[:kb])
            next(views)[1].copy_(gb[:kb])
        inv_n = 1.0 / bayes.kl_n
        if native and bayes.weight_prior is None:  # closed-form KL, both gradients natively
            gm, gr = _native.sample_kl_bwd(
                "reparam", mu_all.detach(), rho_all.detach(), sig_all, eps_all, g_mu, inv_n, spec
            )
            g_mu.copy_(gm)
            g_rho.copy_(gr)
            return eps
        if bayes.weight_prior is not None:
            # closed-form KL to a per-weight Gaussian N(m_i, 1 / p_i) (BanditConfig.prior_update):
            # dKL/dmu = (mu - m) p, dKL/dsigma = sigma p - 1 / sigma
            m_all, p_all = bayes.weight_prior
            kl_sigma = torch.reciprocal(sig_all).neg_().addcmul_(sig_all, p_all)
            g_rho.copy_(g_mu).mul_(eps_all).add_(kl_sigma, alpha=inv_n)
            g_mu.addcmul_(mu_all - m_all, p_all, value=inv_n)
        elif isinstance(prior, GaussianPrior):  # closed-form KL
            m, s2 = prior._value("mean"), prior._value("sigma") ** 2
            # dKL/dsigma = sigma / s^2 - 1 / sigma
            kl_sigma = torch.reciprocal(sig_all).neg_().add_(sig_all, alpha=1.0 / s2)
            g_rho.copy_(g_mu).mul_(eps_all).add_(kl_sigma, alpha=inv_n)
            g_mu.add_(mu_all if m == 0.0 else mu_all - m, alpha=inv_n / s2)
        else:  # Monte Carlo KL at the same sample: dKL/dw = -p'(w) / p(w)
            g_mu.add_(prior.grad_log_prob(w_all), alpha=-inv_n)
            g_rho.copy_(g_mu).mul_(eps_all).sub_(torch.reciprocal(sig_all), alpha=inv_n)
        g_rho.mul_(torch.sigmoid(rho_all))
    return eps


def make_prior_from(cfg: BanditConfig) -> Prior:
    if cfg.prior == "scale_mixture":
        return make_prior(
            "scale_mixture", pi=cfg.prior_pi, sigma1=cfg.prior_sigma1, sigma2=cfg.prior_sigma2
        )
    if cfg.prior == "laplace":
        return make_prior("laplace", scale=cfg.prior_sigma)
    return make_prior(cfg.prior, sigma=cfg.prior_sigma)


def run_bandit(
    cfg: BanditConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Any = print,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) the bandit; writes regret CSV, metrics.json, the plot and checkpoints.

    ``max_seconds`` stops cleanly when the time is up (checked after every step; the step
    reached is checkpointed), so a long run can span sessions with ``resume=True``. A
    directory that already holds a run is an error unless ``resume`` (continue it) or
    ``overwrite`` (delete its checkpoints and results first). The run uses the kernels
    backend ``cfg.kernels`` (restored afterwards).
    """
    with _kernels.use_kernels(cfg.validate().kernels):
        return _run_bandit(
            cfg,
            out_dir,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            log=log,
            max_seconds=max_seconds,
        )


def _run_bandit(
    cfg: BanditConfig,
    out_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    log: Any,
    max_seconds: float | None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from .data.mushroom import load_mushroom

    cfg.validate()
    if resume and overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: --resume continues the run in --out, "
            "--overwrite deletes it and starts over"
        )
    out = Path(out_dir)
    # A directory holds a run once it has a checkpoint or results; a config.json alone is a
    # run stopped before its first checkpoint, which a new start replaces.
    previous = [
        *list_checkpoints(out / "checkpoints"),
        *(p for p in (out / "metrics.json", out / "regret.csv") if p.is_file()),
    ]
    if not resume and previous and not overwrite:
        raise FileExistsError(
            f"{out} already holds a bandit run ({', '.join(p.name for p in previous)}); "
            "continue it with --resume, start it over with --overwrite, or choose another --out"
        )
    data = load_mushroom(cfg.data_dir)  # before anything is deleted: a bad --data-dir loses nothing
    contexts, edible = data.contexts, data.edible
    n_rows, dim = contexts.shape
    n_seeds = len(cfg.seeds)
    torch.manual_seed(cfg.seeds[0])
    pops: list[_Population] = []
    bayes_names = [a for a in cfg.agents if a == "bbb-thompson"]
    greedy_names = [a for a in cfg.agents if a != "bbb-thompson"]
    for names, bayes in ((bayes_names, True), (greedy_names, False)):
        if names:
            members = [a for a in names for _ in range(n_seeds)]
            seeds = [i for _ in names for i in range(n_seeds)]
            pops.append(_Population(cfg, members, seeds, bayes, dim))
    # per-seed environment streams: the same mushrooms and coins for every agent of a seed
    env_gens = [torch.Generator().manual_seed(10_000 + s) for s in cfg.seeds]
    agent_gen = torch.Generator().manual_seed(20_000 + cfg.seeds[0])
    # One optimiser and one backward pass for all populations per update (the members are
    # independent, and Adam's state is per parameter, so this equals separate optimisers).
    # fused where available: 4x faster here than foreach for the bandit's ~0.5M parameters
    optimizer = adam([p.flat for p in pops], cfg.lr, eps=cfg.adam_eps)
    # hand-written gradients for all networks (weight-space sampling); autograd otherwise
    fused = cfg.estimator == "reparam"
    member_order = [(p, i) for p in pops for i in range(len(p.names))]
    columns = [f"{p.names[i]}/seed{cfg.seeds[p.seeds[i]]}" for p, i in member_order]
    steps = cfg.steps
    regret = torch.zeros(steps, len(columns))
    realized = torch.zeros(steps, len(columns))
    start_step = 0
    ckpt_dir = out / "checkpoints"
    if not resume:  # the old run's higher step numbers would win the next resume
        for p in (*previous, out / "cumulative_regret.png", out / "config.json"):
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_same_config(out / "config.json", cfg)
        state, path = load_checkpoint(ckpt_dir)
        if state.get("columns") != columns:
            raise ValueError(
                f"cannot resume {path}: it was written for members {state.get('columns')}"
            )
        start_step = int(state["step"])
        if start_step > steps:
            raise ValueError(
                f"cannot resume {path} with --steps {steps}: it is at step {start_step} "
                f"already (--steps must be at least {start_step})"
            )
        for p, s in zip(pops, state["pops"], strict=True):
            p.model.load_state_dict(s["model"])
            p.buffers.load(s["buffers"], seen=start_step)
            p.load_prior_state(s.get("prior"))
        optimizer.load_state_dict(state["optimizer"])
        for g, s in zip(env_gens, state["env_gens"], strict=True):
            g.set_state(s)
        agent_gen.set_state(state["agent_gen"])
        set_rng_state(state["rng"])
        n_done = min(start_step, state["regret"].shape[0])
        regret[:n_done] = state["regret"][:n_done]
        realized[:n_done] = state["realized"][:n_done]
        if log:
            log(f"resumed from {path} at step {start_step}")
    # on resume too: the run's settings as now run (steps, checkpoint_every may have changed)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_dir,
            step,
            {
                "step": step,
                "columns": columns,
                "pops": [
                    {
                        "model": p.model.state_dict(),
                        "buffers": p.buffers.state(),
                        "prior": p.prior_state(),
                    }
                    for p in pops
                ],
                "optimizer": optimizer.state_dict(),
                "env_gens": [g.get_state() for g in env_gens],
                "agent_gen": agent_gen.get_state(),
                "rng": rng_state(),
                "regret": regret[:step].clone(),
                "realized": realized[:step].clone(),
            },
        )

    t0 = time.perf_counter()
    bar = tqdm(
        total=steps, initial=start_step, disable=not progress, desc="bandit", dynamic_ncols=True
    )
    step = start_step
    stopped = False
    while step < steps:
        idx, lucky = environment_step(env_gens, n_rows)
        col = 0
        for p in pops:
            seed_idx = torch.tensor(p.seeds)
            x = contexts[idx[seed_idx]]
            e = edible[idx[seed_idx]]
            a = p.act(x, agent_gen)
            r = realized_rewards(e, a, lucky[seed_idx])
            k = len(p.names)
            regret[step, col : col + k] = expected_regret(e, a)
            realized[step, col : col + k] = oracle_rewards(e) - r
            p.buffers.add(x, a, r)
            col += k
        for _ in range(cfg.updates_per_step):
            # every update overwrites the whole flat gradient (no zero_grad: it would detach
            # the layers' gradient views)
            if fused:
                fused_update(pops, agent_gen)
            else:
                loss = sum((p.loss(agent_gen) for p in pops), torch.zeros(()))
                loss.backward()
                for p in pops:
                    p.gather_grads()
            optimizer.step()
        step += 1
        bar.update(1)
        if cfg.prior_update and step % cfg.prior_update == 0:
            for p in pops:
                if p.bayes:
                    p.posterior_as_prior()
        # the time limit is checked after every step: when it is reached, this step's
        # checkpoint (an extra one, off the checkpoint_every grid) lets --resume continue here
        out_of_time = (
            max_seconds is not None and step < steps and time.perf_counter() - t0 >= max_seconds
        )
        if step % cfg.checkpoint_every == 0 or step == steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            stopped = True
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    done = step
    summary = _write_results(
        out, cfg, columns, regret[:done], realized[:done], done, elapsed, start_step
    )
    summary["complete"] = not stopped and done == steps
    if log:
        rate = (done - start_step) / max(elapsed, 1e-9)
        log(
            f"{done}/{steps} steps ({rate:.2f} steps/s for {len(columns)} networks); results in {out}"
        )
    return summary


# settings a resumed run may change: how long it runs and where it reads and saves
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "data_dir")


#: settings added after runs were made, with the value those runs used (their config.json
#: lacks the key)
_LEGACY_SETTINGS = {
    "kl_data_size": "buffer",
    "kernels": "eager",
    "adam_eps": 1e-8,
    "prior_update": 0,
}


def _check_same_config(path: Path, cfg: BanditConfig) -> None:
    """Refuse to resume a run with settings other than those it was started with."""
    if not path.is_file():
        raise ValueError(f"cannot resume: {path} does not exist (was the run started here?)")
    saved = {**_LEGACY_SETTINGS, **json.loads(path.read_text())}
    diff = changed_settings(saved, asdict(cfg), _RESUMABLE_CHANGES)
    if diff:
        raise ValueError(
            f"cannot resume {path.parent} with other settings ({'; '.join(diff)}); pass the "
            "run's own settings (see its config.json) or start a new --out"
        )


def _write_results(
    out: Path,
    cfg: BanditConfig,
    columns: list[str],
    regret: Tensor,
    realized: Tensor,
    done: int,
    elapsed: float,
    start_step: int,
) -> dict[str, Any]:
    cum = regret.cumsum(0)
    with open(out / "regret.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["step", *[f"{c}:expected" for c in columns], *[f"{c}:realized" for c in columns]]
        )
        for t in range(done):
            w.writerow(
                [
                    t + 1,
                    *[f"{v:g}" for v in regret[t].tolist()],
                    *[f"{v:g}" for v in realized[t].tolist()],
                ]
            )
    Path(out / "regret.csv.tmp").replace(out / "regret.csv")
    agents: dict[str, Any] = {}
    # the late per-step regret of the target: the last 10000 steps, or every step of a
    # shorter run (the key keeps its name; "per_step_regret_window" says how many steps)
    window = min(LATE_WINDOW, done)
    for agent in cfg.agents:
        cols = [i for i, c in enumerate(columns) if c.split("/")[0] == agent]
        final = cum[-1, cols] if done else torch.zeros(len(cols))
        last = regret[done - window :, cols].mean(0) if done else torch.zeros(len(cols))
        agents[agent] = {
            "cumulative_regret_mean": float(final.mean()),
            "cumulative_regret_std": float(final.std(correction=1)) if len(cols) > 1 else 0.0,
            "per_step_regret_last_10000_mean": float(last.mean()),
            "cumulative_regret_per_seed": final.tolist(),
        }
    metrics = {
        "steps_done": done,
        "steps": cfg.steps,
        "per_step_regret_window": window,
        "agents": agents,
        "seconds_this_session": elapsed,
        "steps_per_second_this_session": (done - start_step) / max(elapsed, 1e-9),
        "networks": len(columns),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if done:
        _plot(out / "cumulative_regret.png", cfg.agents, columns, cum)
    return metrics


def _read_regret_csv(path: Path) -> tuple[list[str], Tensor, Tensor]:
    """``(columns, expected (T, M), realized (T, M))`` from a run's ``regret.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][0] != "step":
        raise ValueError(f"{path}: not a bandit regret.csv (no 'step' header)")
    header = rows[0][1:]
    m = len(header) // 2
    columns = [h.removesuffix(":expected") for h in header[:m]]
    if header != [f"{c}:expected" for c in columns] + [f"{c}:realized" for c in columns]:
        raise ValueError(f"{path}: unexpected columns {header}")
    values = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]]).reshape(-1, 2 * m)
    return columns, values[:, :m], values[:, m:]


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Combine runs of disjoint agents (same settings, seeds and steps) into one result.

    The agents of a seed see the same mushrooms and coins whichever run they are in (the
    environment streams are seeded per seed), so the Bayesian and the greedy agents can run
    as separate processes, one thread each, and be reported together (measured here, one
    update per member on a quiet machine: the 5 Bayesian networks alone reach 5.4 steps/s and
    the 15 greedy ones 4.0, against 3.06 steps/s for all 20 in one process on two threads). Writes ``regret.csv``, ``metrics.json``,
    ``config.json`` and the plot to ``out_dir``; the runs must have the same number of steps
    done.
    """
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ValueError("merge needs at least two run directories")
    cfgs, parts = [], []
    for d in dirs:
        for name in ("config.json", "regret.csv", "metrics.json"):
            if not (d / name).is_file():
                raise ValueError(f"cannot merge {d}: {d / name} does not exist")
        cfgs.append(BanditConfig(**json.loads((d / "config.json").read_text())))
        parts.append(_read_regret_csv(d / "regret.csv"))
    # the Bayesian agent's settings are taken from the run that has it: the greedy agents
    # never read them (a test checks their runs do not change with them)
    has_bayes = [BAYES_AGENT in c.agents for c in cfgs]
    ref = has_bayes.index(True) if any(has_bayes) else 0
    base = asdict(cfgs[ref])
    ignore = {"agents", "steps", "checkpoint_every", "data_dir"}
    for d, c, bayes in zip(dirs, cfgs, has_bayes, strict=True):
        skip = ignore if bayes else ignore | set(BAYES_ONLY_SETTINGS)
        diff = [k for k, v in asdict(c).items() if k not in skip and v != base[k]]
        if diff:
            raise ValueError(f"cannot merge {d} with {dirs[ref]}: settings differ in {diff}")
    agents = [a for c in cfgs for a in c.agents]
    if len(set(agents)) != len(agents):
        raise ValueError(f"cannot merge: an agent appears in more than one run ({agents})")
    done = {int(p[1].shape[0]) for p in parts}
    if len(done) != 1:
        raise ValueError(f"cannot merge runs with different numbers of steps done: {sorted(done)}")
    cfg = BanditConfig(**{**base, "agents": [a for a in AGENTS if a in agents]})
    columns = [c for p in parts for c in p[0]]
    regret = torch.cat([p[1] for p in parts], 1)
    realized = torch.cat([p[2] for p in parts], 1)
    order = sorted(range(len(columns)), key=lambda i: cfg.agents.index(columns[i].split("/")[0]))
    columns = [columns[i] for i in order]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    n = done.pop()
    summary = _write_results(out, cfg, columns, regret[:, order], realized[:, order], n, 0.0, 0)
    summary["merged_from"] = [str(d) for d in dirs]
    # wall time is in each run's own metrics.json (runs may span sessions)
    summary.pop("seconds_this_session")
    summary.pop("steps_per_second_this_session")
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(path: Path, agents: Sequence[str], columns: list[str], cum: Tensor) -> None:
    from .plots import figure

    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = torch.arange(1, cum.shape[0] + 1).numpy()
    for i, agent in enumerate(agents):
        cols = [j for j, c in enumerate(columns) if c.split("/")[0] == agent]
        m = cum[:, cols].mean(1)
        lo, hi = cum[:, cols].min(1).values, cum[:, cols].max(1).values
        ax.plot(steps, m.clamp_min(1).numpy(), color=f"C{i}", label=agent)
        ax.fill_between(
            steps, lo.clamp_min(1).numpy(), hi.clamp_min(1).numpy(), color=f"C{i}", alpha=0.2
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative expected regret")
    ax.set_title("Mushroom bandit (mean over seeds, band: min-max)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_parser(sub: Any) -> None:
    """Register ``bbb bandit`` on the CLI's subparsers."""
    from .cli import HelpFormatter

    p = sub.add_parser(
        "bandit",
        help="the Mushroom contextual bandit (paper section 5.3), resumable",
        formatter_class=HelpFormatter,
    )
    d = BanditConfig()
    p.add_argument("--agents", nargs="+", default=d.agents, help=f"any of {', '.join(AGENTS)}")
    p.add_argument("--steps", type=int, default=d.steps, help="environment steps")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=d.seeds, help="seeds (one data stream each)"
    )
    p.add_argument(
        "--updates-per-step",
        type=int,
        default=d.updates_per_step,
        help="minibatch updates after each step",
    )
    p.add_argument("--hidden", type=int, default=d.hidden, help="units in each of 2 hidden layers")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    p.add_argument(
        "--buffer-size", type=int, default=d.buffer_size, help="replay buffer (last interactions)"
    )
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument(
        "--adam-eps",
        type=float,
        default=d.adam_eps,
        help="Adam's eps (all agents; larger damps the KL-only drift of data-less weights)",
    )
    p.add_argument(
        "--thompson-samples",
        type=int,
        default=d.thompson_samples,
        help="weight samples averaged per decision",
    )
    p.add_argument("--estimator", default=d.estimator, help="BBB training estimator")
    p.add_argument("--prior", default=d.prior, help="BBB prior: gaussian, scale_mixture or laplace")
    p.add_argument(
        "--prior-pi", type=float, default=d.prior_pi, help="scale mixture: weight of sigma1"
    )
    p.add_argument(
        "--prior-sigma1", type=float, default=d.prior_sigma1, help="scale mixture: wide sigma"
    )
    p.add_argument(
        "--prior-sigma2", type=float, default=d.prior_sigma2, help="scale mixture: narrow sigma"
    )
    p.add_argument(
        "--prior-sigma", type=float, default=d.prior_sigma, help="gaussian sigma / laplace scale"
    )
    p.add_argument(
        "--noise-sigma",
        type=float,
        default=d.noise_sigma,
        help="BBB agent's Gaussian reward-noise sd (likelihood)",
    )
    p.add_argument(
        "--rho-init", type=float, default=d.rho_init, help="initial rho (sigma = softplus(rho))"
    )
    p.add_argument(
        "--kl-data-size",
        default=d.kl_data_size,
        choices=KL_DATA_SIZES,
        help="BBB ELBO's N: the buffer's current size (the protocol), all interactions seen, "
        "or the buffer's capacity from the first step (the KL never outweighs a near-empty buffer)",
    )
    p.add_argument(
        "--prior-update",
        type=int,
        default=d.prior_update,
        metavar="STEPS",
        help="every STEPS steps the BBB agent's prior becomes its current posterior "
        "(variational continual learning; a variant, not the paper's agent; 0: never)",
    )
    p.add_argument(
        "--kernels",
        default=d.kernels,
        choices=BANDIT_KERNELS,
        help="the Bayesian agent's update: eager PyTorch, or native (C noise and fused "
        "gradients; float32 CPU, Gaussian prior; built on first use, eager with a warning "
        "where it cannot be)",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="data root holding mushroom/ (default: $BBB_DATA_DIR, ../shared/data)",
    )
    p.add_argument("--out", default="runs/bandit", help="run directory")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that already holds a run (its checkpoints and results are "
        "deleted first)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes (checked every step; the step reached is "
        "checkpointed, continue with --resume) (default: no limit)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN_DIR",
        default=None,
        help="instead of running: combine finished runs of disjoint agents into --out",
    )


def main_bandit(args: Any) -> int:
    """Run ``bbb bandit`` from parsed arguments."""
    from dataclasses import fields

    # every BanditConfig field has a flag of the same name (argparse dest)
    cfg = BanditConfig(**{f.name: getattr(args, f.name) for f in fields(BanditConfig)})
    if args.max_minutes is not None and not (
        math.isfinite(args.max_minutes) and args.max_minutes > 0
    ):
        raise ValueError(
            f"--max-minutes must be a positive number of minutes, got {args.max_minutes}"
        )
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    if args.merge:
        summary = merge_runs(args.merge, args.out)
    else:
        summary = run_bandit(
            cfg,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
            max_seconds=max_seconds,
        )
    window = summary.get("per_step_regret_window", LATE_WINDOW)
    for agent, v in summary["agents"].items():
        # a standard deviation over one seed is not 0 but undefined: not printed
        n_seeds = len(v.get("cumulative_regret_per_seed", []))
        spread = (
            f" +- {v['cumulative_regret_std']:.1f} (sd over {n_seeds} seeds)"
            if n_seeds > 1
            else " (one seed: sd n/a)"
        )
        print(
            f"{agent:14s} cumulative regret {v['cumulative_regret_mean']:.1f}{spread} "
            f"(per step, last {window} steps: {v['per_step_regret_last_10000_mean']:.3f})"
        )
    if summary.get("complete") is False:
        print(
            f"stopped at step {summary['steps_done']} of {summary['steps']} (--max-minutes); "
            "continue with the same flags and --resume"
        )
    return 0
