"""BayesEmbedding: a Bayesian nn.Embedding (issue #3).

Statistical checks use tolerances of Z = 5 standard errors (tests/conftest.py), each derived
in a comment next to it; seeds are fixed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import bbb
from bbb import BayesEmbedding, GaussianPrior
from bbb.nn import estimators as est

Z = 5.0
DT = torch.float64
ESTIMATORS = ("reparam", "local", "flipout")


def _layer(estimator: str = "reparam", **kw: object) -> BayesEmbedding:
    kw.setdefault("dtype", DT)
    return BayesEmbedding(7, 3, estimator=estimator, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the function computed
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_mean_mode_and_vanishing_sigma_equal_nn_embedding(estimator: str) -> None:
    torch.manual_seed(0)
    layer = _layer(estimator, rho_init=-60.0)  # sigma = softplus(-60) ~ 9e-27
    ref = nn.Embedding(7, 3, dtype=DT)
    with torch.no_grad():
        ref.weight.copy_(layer.weight_mu)
    for x in (
        torch.tensor([[0, 6, 2], [2, 2, 5]]),
        torch.tensor(4),
        torch.randint(0, 7, (2, 2, 3)),
    ):
        with bbb.sampling(layer, "mean"):
            assert torch.equal(layer(x), ref(x))
        y = layer(x)  # sampling: mu + sigma * eps with sigma ~ 1e-26
        assert y.shape == (*x.shape, 3) and y.dtype == DT
        torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-20)
    with bbb.vectorized_samples(layer, 3):
        x = torch.tensor([[1, 3], [6, 0]])
        y = layer(bbb.repeat_samples(x, 3))
    torch.testing.assert_close(y, ref(x).repeat(3, 1, 1), rtol=0, atol=1e-20)


def test_local_lookups_have_the_posterior_mean_and_variance_and_are_independent() -> None:
    torch.manual_seed(1)
    layer = _layer("local")
    with torch.no_grad():
        layer.weight_mu[4] = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
        layer.weight_rho[4] = torch.tensor([-1.0, 0.0, 0.7], dtype=DT)
    mu, sigma = layer.weight_mu[4].detach(), layer.weight_sigma[4].detach()
    n = 4000
    with torch.no_grad():
        y = layer(torch.full((n, 2), 4))  # two lookups of row 4 per example
    a, b = y[:, 0], y[:, 1]
    # mean: SE = sigma / sqrt(n); variance: SE = sigma^2 sqrt(2 / (n - 1)) for a normal sample
    assert ((a.mean(0) - mu).abs() < Z * sigma / math.sqrt(n)).all()
    se_var = sigma**2 * math.sqrt(2 / (n - 1))
    assert ((a.var(0) - sigma**2).abs() < Z * se_var).all()
    # independent lookups of one row: the correlation of (a, b) has SE 1 / sqrt(n) under 0
    za, zb = (a - mu) / sigma, (b - mu) / sigma
    corr = (za * zb).mean(0)
    assert (corr.abs() < Z / math.sqrt(n)).all()
    assert not torch.equal(a, b)


def test_reparam_lookups_of_one_row_share_the_sample_and_flipout_only_its_magnitude() -> None:
    torch.manual_seed(2)
    x = torch.tensor([[3, 3, 1], [3, 5, 3]])
    layer = _layer("reparam", rho_init=0.0)
    y = layer(x)
    # one table sample per pass: every lookup of row 3, in both examples, is the same row
    assert torch.equal(y[0, 0], y[0, 1]) and torch.equal(y[0, 0], y[1, 0])
    assert not torch.equal(y[0, 0], y[0, 2])
    flip = _layer("flipout", rho_init=0.0)
    mu = flip.weight_mu[3].detach()
    with torch.no_grad():
        y = flip(x)
    # within an example the positions share the signs (one weight sample per example);
    # across examples the perturbation of row 3 differs only by its signs
    assert torch.equal(y[0, 0], y[0, 1]) and torch.equal(y[1, 0], y[1, 2])
    torch.testing.assert_close((y[0, 0] - mu).abs(), (y[1, 0] - mu).abs(), rtol=1e-12, atol=0)


def test_flipout_lookups_have_the_posterior_variance_and_examples_are_uncorrelated() -> None:
    torch.manual_seed(3)
    layer = _layer("flipout", rho_init=0.3)
    mu, sigma = layer.weight_mu[2].detach(), layer.weight_sigma[2].detach()
    n = 4000
    with torch.no_grad():
        ys = torch.stack([layer(torch.full((2,), 2)) for _ in range(n)])  # (n, 2 examples, D)
    z = (ys - mu) / sigma
    # per example: mean 0 (SE 1 / sqrt(n)), variance 1 (SE sqrt(2 / (n - 1)))
    assert (z.mean(0).abs() < Z / math.sqrt(n)).all()
    assert ((z.var(0) - 1).abs() < Z * math.sqrt(2 / (n - 1))).all()
    # two examples' perturbations of one row: eps^2 * r1 * r2, mean 0, variance E[eps^4] = 3
    assert ((z[:, 0] * z[:, 1]).mean(0).abs() < Z * math.sqrt(3 / n)).all()


@pytest.mark.parametrize("kl", ["closed_form", "mc"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_kl_is_the_closed_form_over_the_rows_padding_excluded(
    kl: str, padding_idx: int | None
) -> None:
    torch.manual_seed(4)
    prior = GaussianPrior(0.7)
    layer = _layer("reparam", prior=prior, kl=kl, padding_idx=padding_idx, rho_init=(-2.0, 0.0))
    layer(torch.tensor([1, 2, 3]))
    mu, s, sp = layer.weight_mu.detach(), layer.weight_sigma.detach(), 0.7
    terms = torch.log(sp / s) + (s**2 + mu**2) / (2 * sp**2) - 0.5
    rows = [i for i in range(7) if i != padding_idx]
    expected = terms[rows].sum()
    if kl == "closed_form":
        torch.testing.assert_close(layer.kl().detach(), expected, rtol=1e-12, atol=0)
    else:
        # the Monte Carlo KL at the pass's sample w: log q(w) - log p(w) summed over the rows
        rec = layer._record
        assert rec is not None and rec.w is not None
        w = rec.w[0]
        # (the 0.5 log(2 pi) terms cancel)
        log_q = -torch.log(s) - 0.5 * ((w - mu) / s) ** 2
        log_p = -math.log(sp) - 0.5 * (w / sp) ** 2
        torch.testing.assert_close(
            layer.kl().detach(), (log_q - log_p)[rows].sum(), rtol=1e-10, atol=1e-10
        )
    # and the KL's gradient never reaches the padding row
    layer.kl().backward()
    if padding_idx is not None:
        assert layer.weight_mu.grad is not None and layer.weight_rho.grad is not None
        assert layer.weight_mu.grad[padding_idx].abs().max() == 0
        assert layer.weight_rho.grad[padding_idx].abs().max() == 0


# ------------------------------------------------------------------ several samples at once
def test_vectorized_frozen_and_reparam_blocks_are_separate_table_samples() -> None:
    torch.manual_seed(5)
    x = torch.tensor([[0, 4, 4], [6, 1, 0]])
    s, n = 3, 2
    layer = _layer("reparam", rho_init=0.0, scale_grad_by_freq=True)
    with bbb.vectorized_samples(layer, s):
        y = layer(bbb.repeat_samples(x, s))
    rec = layer._record
    assert rec is not None and rec.eps_w is not None
    frozen = _layer("reparam", rho_init=0.0)
    frozen.set_sampling("frozen")
    with bbb.vectorized_samples(frozen, s):
        yf = frozen(bbb.repeat_samples(x, s))
    assert frozen._frozen is not None and frozen._frozen.eps_w is not None
    with torch.no_grad():
        for i in range(s):  # a loop over the samples, each a plain lookup of its table
            w = layer.weight_mu + layer.weight_sigma * rec.eps_w[i]
            torch.testing.assert_close(y[i * n : (i + 1) * n], w[x], rtol=1e-14, atol=1e-15)
            wf = frozen.weight_mu + frozen.weight_sigma * frozen._frozen.eps_w[i]
            torch.testing.assert_close(yf[i * n : (i + 1) * n], wf[x], rtol=1e-14, atol=1e-15)
    assert not torch.equal(y[:n], y[n : 2 * n])
    with bbb.sampling(frozen, "frozen"), bbb.vectorized_samples(frozen, s):
        assert torch.equal(frozen(bbb.repeat_samples(x, s)), yf)  # kept until resample


def test_vectorized_flipout_with_unit_signs_is_weight_space_sampling(monkeypatch) -> None:
    monkeypatch.setattr(est, "rademacher", lambda shape, like: torch.ones(shape, dtype=like.dtype))
    torch.manual_seed(6)
    x = torch.tensor([[2, 5], [5, 5]])
    layer = _layer("flipout", rho_init=0.0)
    with bbb.vectorized_samples(layer, 2):
        y = layer(bbb.repeat_samples(x, 2))
    rec = layer._record
    assert rec is not None and rec.eps_w is not None
    with torch.no_grad():
        for i in range(2):
            w = layer.weight_mu + layer.weight_sigma * rec.eps_w[i]
            torch.testing.assert_close(y[2 * i : 2 * i + 2], w[x], rtol=1e-12, atol=1e-14)


def test_local_blocks_of_repeated_indices_get_their_own_noise() -> None:
    torch.manual_seed(7)
    layer = _layer("local", rho_init=0.0)
    x = torch.tensor([[1, 2], [3, 1]])
    with bbb.vectorized_samples(layer, 3, batch_size=2):
        y = layer(x)  # the layer makes the 3 copies itself
    assert y.shape == (6, 2, 3)
    assert not torch.equal(y[:2], y[2:4]) and not torch.equal(y[2:4], y[4:])


# ------------------------------------------------------------------ padding, gradients
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_padding_rows_output_zero_and_get_no_gradient(estimator: str) -> None:
    torch.manual_seed(8)
    layer = _layer(estimator, padding_idx=-1, rho_init=0.0)
    assert layer.padding_idx == 6 and torch.equal(layer.weight_mu[6], torch.zeros(3, dtype=DT))
    x = torch.tensor([[6, 1, 6], [2, 6, 3]])
    for mode in ("sample", "mean", "frozen"):
        with bbb.sampling(layer, mode):
            y = layer(x)
        assert (y[x == 6] == 0).all() and (y[x != 6] != 0).all()
    with bbb.vectorized_samples(layer, 2):
        y = layer(bbb.repeat_samples(x, 2))
    assert (y[x.repeat(2, 1) == 6] == 0).all()
    (y.square().sum() + layer.kl()).backward()
    assert layer.weight_mu.grad is not None and layer.weight_rho.grad is not None
    assert layer.weight_mu.grad[6].abs().max() == 0 and layer.weight_rho.grad[6].abs().max() == 0
    assert layer.weight_mu.grad[1].abs().max() > 0


def test_scale_grad_by_freq_divides_each_rows_data_gradient_by_its_count() -> None:
    for scale, expected in ((False, 3.0), (True, 1.0)):
        layer = _layer(scale_grad_by_freq=scale)
        with bbb.sampling(layer, "mean"):
            layer(torch.tensor([[4, 4], [4, 0]])).sum().backward()
        assert layer.weight_mu.grad is not None
        assert torch.equal(layer.weight_mu.grad[4], torch.full((3,), expected, dtype=DT))
        assert torch.equal(layer.weight_mu.grad[0], torch.ones(3, dtype=DT))


# ------------------------------------------------------------------ training end to end
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_tiny_text_classifier_trains_with_the_elbo(estimator: str) -> None:
    """Bag of embeddings: the label is whether token 1 occurs before any token 2."""
    torch.manual_seed(9)
    n, length, vocab = 64, 5, 10
    x = torch.randint(3, vocab, (n, length))
    y = torch.randint(0, 2, (n,))
    x[torch.arange(n), torch.randint(0, length, (n,))] = 1 + y  # class c holds token c + 1
    x[:8, -1] = 0  # some padding

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = BayesEmbedding(vocab, 4, padding_idx=0, estimator=estimator)
            self.head = bbb.BayesLinear(4, 2)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(self.emb(tokens).sum(1))

    model = Bag()
    elbo = bbb.ELBO(bbb.Categorical(), n, num_samples=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        res = elbo(model, x, y)
        res.loss.backward()
        opt.step()
        losses.append(float(res.nll))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    pred = bbb.predict(model, x, num_samples=8)
    assert (pred.probs.argmax(-1) == y).float().mean() > 0.9
    shared = bbb.predict(model, x, num_samples=8, shared_prefix=True)
    assert shared.probs.shape == (n, 2)


# ------------------------------------------------------------------ model-level tools
def test_prune_compact_round_trip_and_to_deterministic(tmp_path: Path) -> None:
    torch.manual_seed(10)
    model = nn.Sequential(BayesEmbedding(9, 4, padding_idx=0), nn.Flatten(), bbb.BayesLinear(8, 2))
    x = torch.tensor([[0, 3], [5, 8]])
    result = bbb.prune_by_snr(model, 0.5)
    assert result.removed > 0 and model[0].weight_mask is not None
    # the padding row's SNR is 0: it goes first, and changes no output
    assert (model[0].weight_mask[0] == 0).all()
    path = tmp_path / "m.pt"
    bbb.save_compact(model, path)
    other = nn.Sequential(BayesEmbedding(9, 4, padding_idx=0), nn.Flatten(), bbb.BayesLinear(8, 2))
    bbb.load_compact(other, path)
    with bbb.sampling(model, "mean"), bbb.sampling(other, "mean"):
        expected = model(x)
        assert torch.equal(other(x), expected)
    plain = bbb.to_deterministic(model)
    assert type(plain[0]) is nn.Embedding and plain[0].padding_idx == 0
    assert torch.equal(plain(x), expected)
    assert torch.isfinite(model[0].kl())


def test_bayesianize_converts_embeddings_on_request_only() -> None:
    torch.manual_seed(11)
    net = nn.Sequential(nn.Embedding(6, 3, padding_idx=1), nn.Flatten(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"0 \(Embedding\).*embeddings=True converts"):
        kept = bbb.bayesianize(net)
    assert type(kept[0]) is nn.Embedding
    assert bbb.convertible_layers(net, embeddings=True) == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnet = bbb.bayesianize(net, embeddings=True, init_from_weights=True)
    emb = bnet[0]
    assert isinstance(emb, BayesEmbedding) and emb.padding_idx == 1
    x = torch.tensor([[1, 4], [5, 0]])
    with bbb.sampling(bnet, "mean"):
        torch.testing.assert_close(bnet(x), net(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"0 \(max_norm=1\.0\).*exclude"):
        bbb.bayesianize(nn.Sequential(nn.Embedding(4, 2, max_norm=1.0)), embeddings=True)
    with pytest.raises(ValueError, match="pass embeddings=True"):
        bbb.bayesianize(net, include="0")


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_embeddings": 0}, "num_embeddings must be a positive integer"),
        ({"embedding_dim": True}, "embedding_dim must be a positive integer"),
        ({"padding_idx": 7}, r"padding_idx must be None or an integer in \[-7, 7\)"),
        ({"padding_idx": 1.0}, "padding_idx must be None or an integer"),
        ({"max_norm": 1.0}, "does not support max_norm.*accepted value: None"),
        ({"norm_type": 0.0}, "norm_type must be a finite number above 0"),
        ({"scale_grad_by_freq": 1}, "scale_grad_by_freq must be True or False"),
        ({"sparse": True}, "does not support sparse=True; accepted value: False"),
        ({"estimator": "lrt"}, "unknown estimator 'lrt'; accepted values: reparam, local, flipout"),
        ({"dtype": torch.long}, "dtype must be a floating-point"),
        ({"mu_init": "normal"}, "unknown mu_init 'normal'; accepted values: paper, fan_in"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_embeddings": 7, "embedding_dim": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        BayesEmbedding(**args)  # type: ignore[arg-type]


def test_bad_inputs_are_refused_with_the_fix() -> None:
    layer = _layer()
    with pytest.raises(ValueError, match=r"integer indices .* got torch\.float64.*x\.long\(\)"):
        layer(torch.tensor([1.0, 2.0], dtype=DT))
    with pytest.raises(ValueError, match=r"got torch\.bool"):
        layer(torch.tensor([True]))
    with pytest.raises(ValueError, match=r"got index 7, outside \[0, 7\)"):
        layer(torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match=r"got index -1, outside \[0, 7\)"):
        layer(torch.tensor([-1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="tensor of integer indices"):
        layer([1, 2])  # type: ignore[arg-type]
    with bbb.vectorized_samples(layer, 2), pytest.raises(ValueError, match="0-d input"):
        layer(torch.tensor(3))
    assert layer(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 3)
    assert layer(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4, 3)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_native_fused_kernels_give_the_same_kl_and_gradients(estimator: str) -> None:
    """float32 on CPU with the native backend: sample and KL from one fused node."""
    torch.manual_seed(12)
    x = torch.tensor([[1, 2], [3, 1]])
    layer = BayesEmbedding(7, 3, estimator=estimator, rho_init=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (no C compiler: eager kernels)
        with bbb.use_kernels("native"), bbb.vectorized_samples(layer, 2):
            y = layer(bbb.repeat_samples(x, 2))
            kl = layer.kl()
    mu, s = layer.weight_mu.detach(), layer.weight_sigma.detach()
    expected = (-torch.log(s) + (s**2 + mu**2) / 2 - 0.5).sum()
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-5, atol=1e-5)
    assert y.shape == (4, 2, 3)
    (y.sum() + kl).backward()
    assert layer.weight_mu.grad is not None and torch.isfinite(layer.weight_mu.grad).all()
    with bbb.sampling(layer, "mean"):
        assert torch.equal(layer(x), mu[x])
