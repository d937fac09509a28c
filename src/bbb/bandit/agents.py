"""The agents' networks: all (agent, seed) members stacked, their replay buffers, acting."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..likelihoods import Gaussian
from ..nn.ensemble import BayesLinearEnsemble
from ..nn.module import kl_divergence, resample, sampling, vectorized_samples
from ..priors import GaussianPrior, Prior
from .config import BanditConfig, make_prior_from
from .env import EAT, PASS


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
