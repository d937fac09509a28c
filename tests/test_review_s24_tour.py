"""Session 24 review, a researcher's tour of the public API (#3): behaviour a paper's script
relies on that worked and had no test of its own.

- Thompson sampling by hand: a frozen weight sample outlives the ``bbb.sampling(model,
  "frozen")`` context until ``bbb.resample``, and after an optimizer step the same noise is
  used with the new mu and sigma; an online ELBO whose ``dataset_size`` grows every step
  weighs the (unchanged) KL by 1 / N;
- variational continual learning with a per-weight Gaussian prior written as a ``bbb.Prior``
  subclass (on a bias-free layer): the closed-form KL is the sum of the per-weight Gaussian
  KLs, zero at the prior's own posterior, with the hand formula's gradient, and the Monte
  Carlo KL is an unbiased estimate of it;
- the Trainer's ``metrics.jsonl`` rows: ``loss`` is ``nll + kl / N`` for the uniform KL
  weighting (epoch means weighted by the minibatch sizes, a short last minibatch included).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import distributions as D
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bbb


class _PosteriorPrior(bbb.Prior):
    """A per-weight Gaussian prior N(loc_j, scale_j^2): an earlier task's posterior (VCL)."""

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    def distribution(self) -> D.Normal:
        return D.Normal(self.loc, self.scale, validate_args=False)


def _gaussian_kl(m1, s1, m0, s0):  # type: ignore[no-untyped-def]
    """sum_j KL(N(m1_j, s1_j^2) || N(m0_j, s0_j^2)), the textbook formula."""
    return (torch.log(s0 / s1) + (s1**2 + (m1 - m0) ** 2) / (2 * s0**2) - 0.5).sum()


def test_a_frozen_sample_outlives_its_context_until_resample_and_follows_the_parameters() -> None:
    torch.manual_seed(0)
    dt = torch.float64
    model = nn.Sequential(
        bbb.BayesLinear(4, 6, rho_init=-2.0, dtype=dt), nn.ReLU(), bbb.BayesLinear(6, 1, dtype=dt)
    )
    x = torch.randn(3, 4, dtype=dt)
    bbb.resample(model)
    with bbb.sampling(model, "frozen"), torch.no_grad():
        first = model(x)
    assert all(m.mode == "sample" for m in bbb.bayes_modules(model))  # mode restored
    with bbb.sampling(model, "frozen"), torch.no_grad():
        again = model(x)
    assert torch.equal(first, again)  # the same decision network in the next context
    # an optimizer step: the same noise with the new mu and sigma
    layer = model[0]
    eps = layer._frozen.eps_w[0].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elbo = bbb.ELBO(bbb.Gaussian(sigma=0.5), dataset_size=10)
    out = elbo(model, x, torch.zeros(3, 1, dtype=dt))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    with bbb.sampling(model, "frozen"), torch.no_grad():
        model(x)
        w = layer.weight_mu + layer.weight_sigma * eps
        assert torch.equal(layer._frozen.eps_w[0], eps)
        h = torch.relu(
            nn.functional.linear(x, w, layer.bias_mu + layer.bias_sigma * layer._frozen.eps_b[0])
        )
        second = model[2]
        w2 = second.weight_mu + second.weight_sigma * second._frozen.eps_w[0]
        b2 = second.bias_mu + second.bias_sigma * second._frozen.eps_b[0]
        torch.testing.assert_close(
            model(x), nn.functional.linear(h, w2, b2), rtol=1e-12, atol=1e-12
        )
    bbb.resample(model)
    with bbb.sampling(model, "frozen"), torch.no_grad():
        layer(x)
        assert not torch.equal(layer._frozen.eps_w[0], eps)  # a new sample


def test_an_online_elbo_weighs_the_same_kl_by_one_over_the_growing_n() -> None:
    torch.manual_seed(0)
    dt = torch.float64
    model = nn.Sequential(
        bbb.BayesLinear(3, 5, dtype=dt), nn.Tanh(), bbb.BayesLinear(5, 1, dtype=dt)
    )
    elbo = bbb.ELBO(bbb.Gaussian(sigma=0.3), dataset_size=1)
    x, y = torch.randn(8, 3, dtype=dt), torch.randn(8, 1, dtype=dt)
    kls = []
    for n in range(1, 9):
        elbo.dataset_size = n
        out = elbo(model, x[:n], y[:n])
        assert out.kl_weight == 1.0 / n
        torch.testing.assert_close(out.loss.detach(), out.nll + out.kl / n, rtol=1e-12, atol=0)
        kls.append(float(out.kl))
    # closed form, parameters unchanged: the KL itself does not depend on N
    assert max(kls) - min(kls) <= 1e-12 * abs(kls[0])


def test_a_per_weight_gaussian_prior_gives_the_closed_form_per_weight() -> None:
    torch.manual_seed(0)
    dt = torch.float64
    layer = bbb.BayesLinear(3, 4, bias=False, estimator="local", rho_init=-3.0, dtype=dt)
    x = torch.randn(5, 3, dtype=dt)
    layer.prior = _PosteriorPrior(layer.weight_mu, layer.weight_sigma)
    assert layer.kl_mode == "closed_form"
    layer(x)
    assert float(layer.kl().detach()) == 0.0  # the prior's own posterior
    with torch.no_grad():
        layer.weight_mu.add_(0.1 * torch.randn_like(layer.weight_mu))
        layer.weight_rho.add_(0.5 * torch.randn_like(layer.weight_rho))
    layer(x)
    kl = layer.kl()
    prior = layer.prior
    hand = _gaussian_kl(layer.weight_mu, layer.weight_sigma, prior.loc, prior.scale)
    torch.testing.assert_close(kl, hand, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(kl, (layer.weight_mu, layer.weight_rho))
    g_hand = torch.autograd.grad(hand, (layer.weight_mu, layer.weight_rho))
    for a, b in zip(g, g_hand, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the model-level sum and an ELBO see the same value
    torch.testing.assert_close(bbb.kl_divergence(layer), hand.detach(), rtol=1e-12, atol=1e-12)


def test_the_monte_carlo_kl_to_a_per_weight_prior_is_unbiased() -> None:
    torch.manual_seed(1)
    dt = torch.float64
    layer = bbb.BayesLinear(3, 4, bias=False, kl="mc", rho_init=-1.0, dtype=dt)
    prior = _PosteriorPrior(
        layer.weight_mu + 0.3 * torch.randn_like(layer.weight_mu),
        torch.full_like(layer.weight_mu, 0.5),
    )
    layer.prior = prior
    assert layer.kl_mode == "mc"
    x = torch.randn(2, 3, dtype=dt)
    draws = []
    with torch.no_grad():
        for _ in range(2000):
            layer(x)
            draws.append(float(layer.kl()))
    est = torch.tensor(draws, dtype=dt)
    exact = float(_gaussian_kl(layer.weight_mu, layer.weight_sigma, prior.loc, prior.scale))
    se = float(est.std()) / math.sqrt(est.numel())
    # unbiased: the mean of 2000 single-sample estimates lies within 4 standard errors
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)


def test_trainer_rows_loss_is_nll_plus_kl_over_n(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(37, 1)
    y = torch.sin(6 * x) + 0.05 * torch.randn_like(x)
    model = nn.Sequential(bbb.BayesLinear(1, 8), nn.ReLU(), bbb.BayesLinear(8, 1))
    lik = bbb.Gaussian(noise="learned", sigma=0.2)
    elbo = bbb.ELBO(lik, dataset_size=37, num_samples=2)
    opt = torch.optim.Adam([*model.parameters(), *lik.parameters()], lr=1e-2)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True, generator=g)  # 10,10,10,7
    steps: list[tuple[float, float, float, int]] = []
    elbo.register_forward_hook(
        lambda mod, args, out: steps.append(
            (float(out.loss), float(out.nll), float(out.kl), int(args[1].shape[0]))
        )
    )
    trainer = bbb.train.Trainer(
        model, elbo, opt, loader, epochs=2, out_dir=tmp_path, progress=False, log=None,
        loader_generator=g,
    )  # fmt: skip
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for e, row in enumerate(rows):
        assert {"loss", "nll", "kl"} <= set(row)
        assert math.isclose(row["loss"], row["nll"] + row["kl"] / 37, rel_tol=1e-6)
        # each a mean over the epoch's examples, minibatches weighted by their sizes
        epoch = steps[4 * e : 4 * e + 4]
        assert [b for *_, b in epoch] == [10, 10, 10, 7]
        for j, key in enumerate(("loss", "nll", "kl")):
            mean = sum(s[j] * s[3] for s in epoch) / 37
            assert math.isclose(row[key], mean, rel_tol=1e-9), (key, row[key], mean)
