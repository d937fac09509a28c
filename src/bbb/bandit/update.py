"""One update of every network at once, with hand-written gradients (``fused_update``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _native
from .. import kernels as _kernels
from ..nn.noise import randn as _randn
from ..priors import GaussianPrior
from .agents import _Population


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
    first = bayes if bayes is not None else greedy
    assert first is not None  # no population: torch.cat([]) above raised already
    n_layers = len(first.layers)

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
            # the bandit's ensembles have biases (ensemble_mlp)
            assert layer.bias_mu is not None
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
            assert prior is not None  # a Bayesian population's prior (make_prior_from)
            g_mu.add_(prior.grad_log_prob(w_all), alpha=-inv_n)
            g_rho.copy_(g_mu).mul_(eps_all).sub_(torch.reciprocal(sig_all), alpha=inv_n)
        g_rho.mul_(torch.sigmoid(rho_all))
    return eps
