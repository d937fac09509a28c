"""bbb.kernels: the compile backend computes what the eager layers compute, and falls back.

The fast tests replace ``torch.compile`` by the identity, so that the "compile" backend runs
its fused code paths (one autograd node for sample + KL, the fused Monte Carlo gradients)
with the kernels' plain PyTorch bodies: they must give the eager layers' loss and gradients
to float64 rounding. A slow test compiles for real (inductor; needs a C++ compiler).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

import bbb
from bbb import kernels as K
from bbb.config import ConfigError, TrainConfig
from bbb.models import bayes_mlp


@pytest.fixture(autouse=True)
def _fresh_kernels() -> Iterator[None]:
    def reset() -> None:
        for k in K._ALL:
            k._compiled, k.failed = None, None
        K.set_kernels("eager")

    reset()
    yield
    reset()


@pytest.fixture
def identity_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def _loss_and_grads(
    backend: str, estimator: str, prior: bbb.Prior, kl: str, samples: int, rho: object
) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = bayes_mlp(
        6,
        [7, 5],
        3,
        prior=prior,
        estimator=estimator,
        kl=kl,
        rho_init=rho,  # type: ignore[arg-type]
    ).double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    elbo = bbb.ELBO(bbb.Categorical(), 50, num_samples=samples)
    with bbb.use_kernels(backend):
        torch.manual_seed(1)  # the same noise in both backends
        res = elbo(model, x, y)
        res.loss.backward()
    return [res.loss.detach(), res.kl.detach()] + [p.grad.clone() for p in model.parameters()]


CASES = [
    (bbb.GaussianPrior(0.5), "closed_form"),  # the fused sample + KL node
    (bbb.GaussianPrior(0.5), "mc"),
    (bbb.ScaleMixturePrior(0.25, 1.0, 0.01), "mc"),
    (bbb.LaplacePrior(0.3), "mc"),
]


@pytest.mark.parametrize("estimator", bbb.ESTIMATORS)
@pytest.mark.parametrize(("prior", "kl"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("rho", [(-5.0, -4.0), (-25.0, 1.0)], ids=["rho-usual", "rho-below-20"])
def test_compile_backend_matches_eager(
    identity_compile: None,
    estimator: str,
    prior: bbb.Prior,
    kl: str,
    samples: int,
    rho: tuple[float, float],
) -> None:
    eager = _loss_and_grads("eager", estimator, prior, kl, samples, rho)
    fused = _loss_and_grads("compile", estimator, prior, kl, samples, rho)
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert K.failures() == {}


def test_fused_node_is_used_and_its_kl_is_the_closed_form(identity_compile: None) -> None:
    torch.manual_seed(0)
    layer = bbb.BayesLinear(4, 3, prior=bbb.GaussianPrior(0.7), estimator="reparam")
    with bbb.use_kernels("compile"):
        layer(torch.randn(2, 4))
    rec = layer._record
    assert rec is not None and rec.kl_w is not None
    mu, sigma = layer.weight_mu, layer.weight_sigma
    expected = bbb.closed_form_kl(mu, sigma, layer.prior).sum()
    torch.testing.assert_close(rec.kl_w, expected)
    # after an optimizer-like in-place change of rho the stored KL is stale: kl() recomputes
    with torch.no_grad():
        layer.weight_rho.add_(0.5)
    fresh = bbb.closed_form_kl(layer.weight_mu, layer.weight_sigma, layer.prior).sum()
    fresh = fresh + bbb.closed_form_kl(layer.bias_mu, layer.bias_sigma, layer.prior).sum()
    torch.testing.assert_close(layer.kl(), fresh)


def test_pruned_layer_takes_the_masked_path(identity_compile: None) -> None:
    torch.manual_seed(0)
    model = bayes_mlp(4, [6], 2, prior=bbb.GaussianPrior(1.0), kl="closed_form")
    bbb.prune_by_snr(model, 0.5)
    x = torch.randn(3, 4)
    with bbb.use_kernels("compile"):
        model(x)
        kl_c = bbb.kl_divergence(model)
    model(x)
    torch.testing.assert_close(kl_c, bbb.kl_divergence(model))
    assert all(m._record is not None and m._record.kl_w is None for m in bbb.bayes_modules(model))


def test_compile_failure_falls_back_once_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, **kw: object) -> object:
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    eager = _loss_and_grads("eager", "reparam", bbb.GaussianPrior(0.5), "closed_form", 1, -5.0)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        got = _loss_and_grads("compile", "reparam", bbb.GaussianPrior(0.5), "closed_form", 1, -5.0)
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(b, a)
    failed = K.failures()
    assert failed and all("no C++ compiler here" in why for why in failed.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second use does not warn again
        _loss_and_grads("compile", "reparam", bbb.GaussianPrior(0.5), "closed_form", 1, -5.0)


def test_backend_names_are_validated_and_restored() -> None:
    with pytest.raises(ValueError, match="accepted values: eager, compile"):
        bbb.set_kernels("fast")
    with bbb.use_kernels("compile"):
        assert bbb.get_kernels() == "compile"
    assert bbb.get_kernels() == "eager"
    with pytest.raises(ConfigError, match="kernels"):
        TrainConfig(kernels="jit").validate()
    with pytest.raises(ValueError, match="accepted values: reparam, flipout, local"):
        K.sample_and_kl("nope", torch.zeros(2), torch.zeros(2), None, bbb.GaussianPrior())


@pytest.mark.slow
def test_really_compiled_kernels_match_eager() -> None:
    """inductor-compiled kernels (float32, as users train) against the eager layers."""
    for estimator in bbb.ESTIMATORS:
        for prior, kl in CASES[:3]:
            torch.manual_seed(0)
            model = bayes_mlp(30, [40], 4, prior=prior, estimator=estimator, kl=kl)
            x, y = torch.randn(16, 30), torch.randint(0, 4, (16,))
            elbo = bbb.ELBO(bbb.Categorical(), 100)
            out = []
            for backend in ("eager", "compile"):
                model.zero_grad()
                with bbb.use_kernels(backend):
                    torch.manual_seed(1)
                    elbo(model, x, y).loss.backward()
                out.append([p.grad.clone() for p in model.parameters()])
            if K.failures():
                pytest.skip(f"torch.compile unavailable here: {K.failures()}")
            for a, b in zip(*out, strict=True):
                # float32: one fused loop against several rounded passes
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
