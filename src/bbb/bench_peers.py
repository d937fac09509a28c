"""Adapters that build one training step of the benchmark networks with peer libraries.

Each peer is optional (``pip install 'bbb[bench]'``, or ``make bench``) and never a runtime
dependency of bbb. Every adapter uses the library as its documentation shows:

- bayesian-torch (Intel Labs): ``LinearReparameterization`` / ``LinearFlipout`` and the conv
  counterparts; each layer's ``forward`` returns ``(output, kl)`` with the closed-form Gaussian
  KL (``prior_variance`` is used as the prior's standard deviation; 1 here either way), which
  bayesian-torch 0.5 averages over the layer's weights (``kl.mean()``) rather than sums: the
  same work, a smaller value; ``loss = cross_entropy + kl / batch_size`` (their MNIST example
  scales the KL by the batch size; we use 1 / dataset_size like bbb: the same work). Monte Carlo samples are a
  Python loop over forward passes, as in their example.
- blitz-bayesian-pytorch: ``@variational_estimator`` model of ``BayesianLinear`` /
  ``BayesianConv2d``; ``loss = model.sample_elbo(inputs, labels, criterion, sample_nbr,
  complexity_cost_weight=1 / N)``. Blitz always uses a Monte Carlo KL against its scale-mixture
  prior (``prior_pi=1``, its default, makes it Gaussian; it still evaluates the second
  component's density, as blitz does by default).
- torchbnn: ``BayesLinear(prior_mu, prior_sigma, in, out)`` / ``BayesConv2d``;
  ``cost = ce + kl_weight * BKLLoss(reduction="mean", last_layer_only=False)(model)``. Its KL
  is closed form but averaged over parameters (``reduction="mean"``), not summed.
- Pyro: ``pyro.contrib.bnn.HiddenLayer(X, A_mean, A_scale, ...)`` (local reparameterisation,
  MLP only), sampled with ``rsample()`` and its ``KL`` (what its ``log_prob`` returns inside
  SVI), in a plain PyTorch loop: this leaves out Pyro's SVI bookkeeping (in Pyro's favour). It
  materialises a (batch, in + 1, out) tensor per layer, so it is skipped when the largest
  (:func:`pyro_elements`) exceeds :data:`PYRO_MAX_ELEMENTS`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PEERS",
    "PEER_ESTIMATORS",
    "PYRO_MAX_ELEMENTS",
    "available_peers",
    "build_peer_step",
    "pyro_elements",
]

#: peer name -> importable module
PEERS = {
    "bayesian-torch": "bayesian_torch",
    "blitz": "blitz",
    "torchbnn": "torchbnn",
    "pyro": "pyro",
}
#: estimators each peer offers (bbb's names)
PEER_ESTIMATORS = {
    "bayesian-torch": ("reparam", "flipout"),
    "blitz": ("reparam",),
    "torchbnn": ("reparam",),
    "pyro": ("local",),
}
#: Pyro's HiddenLayer builds a (batch, in, out) tensor; skip configurations above this size.
PYRO_MAX_ELEMENTS = 60_000_000

Step = Callable[[], float]
_SCALE_MIXTURE = (0.5, 1.0, math.exp(-6))  # pi, sigma1, sigma2: bbb's ScaleMixturePrior default


def available_peers() -> list[str]:
    """The peers importable in this environment."""
    return [name for name, mod in PEERS.items() if importlib.util.find_spec(mod) is not None]


def _optimizer_step(
    model: nn.Module, loss_fn: Callable[[], Tensor], lr: float, device: torch.device | None = None
) -> Step:
    """An Adam step of ``model`` (moved to ``device`` first) on ``loss_fn``; returns the loss.

    The returned float waits for the device, so a timed call covers the whole step on CUDA.
    """
    if device is not None:
        model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------- bayesian-torch
class _BTNet(nn.Module):
    """A chain of bayesian-torch layers; each returns (out, kl) and the KLs are summed."""

    def __init__(self, layers: list[nn.Module], conv: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.conv = conv

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kl_total: Tensor | None = None
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            if self.conv and i == n - 1:
                x = torch.flatten(x, 1)
            x, kl = layer(x)
            kl_total = kl if kl_total is None else kl_total + kl
            if i < n - 1:
                x = F.relu(x)
                if self.conv:
                    x = F.max_pool2d(x, 2)
        assert kl_total is not None
        return x, kl_total


def _bayesian_torch(
    net: str, hidden: int, estimator: str, prior: str, num_samples: int
) -> nn.Module | None:
    if prior != "gaussian":
        return None  # closed-form Gaussian prior only
    from bayesian_torch.layers import (
        Conv2dFlipout,
        Conv2dReparameterization,
        LinearFlipout,
        LinearReparameterization,
    )

    kw = {"prior_mean": 0.0, "prior_variance": 1.0, "posterior_mu_init": 0.0}
    kw["posterior_rho_init"] = -3.0
    lin = LinearReparameterization if estimator == "reparam" else LinearFlipout
    if net == "mlp":
        sizes = [784, hidden, hidden, 10]
        layers = [lin(a, b, **kw) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        return _BTNet(layers, conv=False)
    conv = Conv2dReparameterization if estimator == "reparam" else Conv2dFlipout
    layers = [
        conv(1, 16, 3, padding=1, **kw),
        conv(16, 32, 3, padding=1, **kw),
        lin(32 * 7 * 7, 10, **kw),
    ]
    return _BTNet(layers, conv=True)


# --------------------------------------------------------------------------- blitz
def _blitz(net: str, hidden: int, estimator: str, prior: str, num_samples: int) -> nn.Module:
    from blitz.modules import BayesianConv2d, BayesianLinear
    from blitz.utils import variational_estimator

    if prior == "gaussian":
        pk = {"prior_sigma_1": 1.0, "prior_sigma_2": 1.0, "prior_pi": 1.0}
    else:
        pi, s1, s2 = _SCALE_MIXTURE
        pk = {"prior_sigma_1": s1, "prior_sigma_2": s2, "prior_pi": pi}

    @variational_estimator
    class BlitzMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = BayesianLinear(784, hidden, **pk)
            self.l2 = BayesianLinear(hidden, hidden, **pk)
            self.l3 = BayesianLinear(hidden, 10, **pk)

        def forward(self, x: Tensor) -> Tensor:
            return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))

    @variational_estimator
    class BlitzConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = BayesianConv2d(1, 16, (3, 3), padding=1, **pk)
            self.c2 = BayesianConv2d(16, 32, (3, 3), padding=1, **pk)
            self.fc = BayesianLinear(32 * 7 * 7, 10, **pk)

        def forward(self, x: Tensor) -> Tensor:
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2)
            return self.fc(torch.flatten(x, 1))

    return BlitzMLP() if net == "mlp" else BlitzConv()


# --------------------------------------------------------------------------- torchbnn
def _torchbnn(
    net: str, hidden: int, estimator: str, prior: str, num_samples: int
) -> nn.Module | None:
    if prior != "gaussian":
        return None
    import torchbnn as bnn

    pk = {"prior_mu": 0.0, "prior_sigma": 1.0}
    if net == "mlp":
        return nn.Sequential(
            bnn.BayesLinear(in_features=784, out_features=hidden, **pk),
            nn.ReLU(),
            bnn.BayesLinear(in_features=hidden, out_features=hidden, **pk),
            nn.ReLU(),
            bnn.BayesLinear(in_features=hidden, out_features=10, **pk),
        )
    return nn.Sequential(
        bnn.BayesConv2d(in_channels=1, out_channels=16, kernel_size=3, padding=1, **pk),
        nn.ReLU(),
        nn.MaxPool2d(2),
        bnn.BayesConv2d(in_channels=16, out_channels=32, kernel_size=3, padding=1, **pk),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        bnn.BayesLinear(in_features=32 * 7 * 7, out_features=10, **pk),
    )


# --------------------------------------------------------------------------- pyro
def pyro_elements(batch: int, hidden: int) -> int:
    """Elements of the largest (batch, in + 1, out) tensor Pyro's HiddenLayer builds in the
    784-H-H-10 MLP: the first layer's (batch, 785, H), or the second's (batch, H + 1, H) once
    H exceeds 784."""
    sizes = [784, hidden, hidden, 10]
    return max(batch * (a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


class _PyroMLP(nn.Module):
    """784-H-H-10 of pyro.contrib.bnn.HiddenLayer (A_mean: (in + 1, out) with the bias row)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        sizes = [784, hidden, hidden, 10]
        self.means = nn.ParameterList()
        self.rhos = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            self.means.append(nn.Parameter(torch.empty(a + 1, b).uniform_(-0.2, 0.2)))
            self.rhos.append(nn.Parameter(torch.full((a + 1, b), -5.0)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        from pyro.contrib.bnn import HiddenLayer
        from pyro.contrib.bnn.utils import adjoin_ones_vector

        h = adjoin_ones_vector(x)
        kl: Tensor | None = None
        n = len(self.means)
        for i, (mean, rho) in enumerate(zip(self.means, self.rhos, strict=True)):
            last = i == n - 1
            layer = HiddenLayer(
                h,
                mean,
                F.softplus(rho),
                non_linearity=(lambda t: t) if last else F.relu,
                include_hidden_bias=not last,
            )
            h = layer.rsample()
            kl = layer.KL if kl is None else kl + layer.KL
        assert kl is not None
        return h, kl


# --------------------------------------------------------------------------- dispatcher
def build_peer_step(
    peer: str,
    net: str,
    hidden: int,
    estimator: str,
    prior: str,
    num_samples: int,
    x: Tensor,
    y: Tensor,
    dataset_size: int,
    lr: float = 1e-3,
) -> Step | None:
    """One training step (forward, KL, loss, backward, Adam step) of ``peer``, or None where
    the peer does not offer this configuration (estimator, prior, conv layer, size)."""
    if estimator not in PEER_ESTIMATORS[peer]:
        return None
    s = num_samples
    if peer == "bayesian-torch":
        model = _bayesian_torch(net, hidden, estimator, prior, s)
        if model is None:
            return None
        m = model

        def loss_bt() -> Tensor:
            nll = x.new_zeros(())
            kl = x.new_zeros(())
            for _ in range(s):
                out, k = m(x)
                nll = nll + F.cross_entropy(out, y)
                kl = kl + k
            return nll / s + kl / s / dataset_size

        return _optimizer_step(m, loss_bt, lr, x.device)
    if peer == "blitz":
        model_b = _blitz(net, hidden, estimator, prior, s)
        crit = nn.CrossEntropyLoss()

        def loss_blitz() -> Tensor:
            return model_b.sample_elbo(  # type: ignore[operator]
                inputs=x,
                labels=y,
                criterion=crit,
                sample_nbr=s,
                complexity_cost_weight=1.0 / dataset_size,
            )

        return _optimizer_step(model_b, loss_blitz, lr, x.device)
    if peer == "torchbnn":
        model_t = _torchbnn(net, hidden, estimator, prior, s)
        if model_t is None:
            return None
        import torchbnn as bnn

        kl_loss = bnn.BKLLoss(reduction="mean", last_layer_only=False)
        mt = model_t

        def loss_tb() -> Tensor:
            nll = sum(F.cross_entropy(mt(x), y) for _ in range(s)) / s
            return nll + kl_loss(mt) / dataset_size

        return _optimizer_step(mt, loss_tb, lr, x.device)
    if peer == "pyro":
        if net != "mlp" or prior != "gaussian":
            return None
        if pyro_elements(x.shape[0], hidden) > PYRO_MAX_ELEMENTS:
            return None
        model_p = _PyroMLP(hidden)

        def loss_pyro() -> Tensor:
            nll = x.new_zeros(())
            kl = x.new_zeros(())
            for _ in range(s):
                out, k = model_p(x)
                nll = nll + F.cross_entropy(out, y)
                kl = kl + k
            return nll / s + kl / s / dataset_size

        return _optimizer_step(model_p, loss_pyro, lr, x.device)
    raise ValueError(f"unknown peer {peer!r}; accepted values: {', '.join(PEERS)}")
