"""Session 27 review of this session's new code: BayesEmbedding, BayesConvTranspose*d,
bbb.acquisition (BatchBALD), the Trainer's resume bookkeeping. Each test here failed before
the fix it names (or pins a property checked against brute force)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import bbb
from bbb.nn.stacking import repeat_samples


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_embedding_scale_grad_by_freq_counts_per_sample_block_on_plain_copies(
    estimator: str,
) -> None:
    # Inside vectorized_samples(S) the S copies of the batch may reach the layer unmarked
    # (the model sliced or cast its token tensor, or the caller stacked with torch.cat). Each
    # block looks row 1 up once, so with scale_grad_by_freq the data gradient of row 1 is
    # the sum over the S blocks of 1 / 1: S, as on marked copies (repeat_samples). Before,
    # local's and flipout's mean path counted the lookups over all S * B rows (S of them)
    # and gave 1.
    s = 3
    grads = []
    for marked in (True, False):
        torch.manual_seed(0)
        layer = bbb.BayesEmbedding(
            4, 2, scale_grad_by_freq=True, estimator=estimator, dtype=torch.float64
        )
        idx = torch.tensor([[1, 2]])
        x = repeat_samples(idx, s) if marked else torch.cat([idx] * s)
        with bbb.vectorized_samples(layer, s):
            y = layer(x)
        # the gradient of sum(y) w.r.t. mu does not depend on the noise (y is mu + noise)
        y.sum().backward()
        assert layer.weight_mu.grad is not None
        grads.append(layer.weight_mu.grad.clone())
    expected = torch.zeros(4, 2, dtype=torch.float64)
    expected[1] = expected[2] = float(s)
    torch.testing.assert_close(grads[0], expected)
    torch.testing.assert_close(grads[1], expected)


def test_margin_of_a_one_class_prediction_is_refused_naming_the_need() -> None:
    # a hand-built prediction of one class (bbb.predict refuses it): before, topk's
    # "selected index k out of range"
    sp = torch.ones(3, 4, 1)
    pred = bbb.ClassificationPrediction(sp.mean(0), sp)
    with pytest.raises(ValueError, match=r"'margin'.*needs C >= 2"):
        bbb.acquisition.acquisition_scores(pred, "margin")
    # the other scores of one class are defined (and zero)
    for method in ("bald", "entropy", "variation_ratios", "mean_std"):
        scores = bbb.acquisition.acquisition_scores(pred, method)
        torch.testing.assert_close(scores, torch.zeros(4))


def test_conv_transpose_input_too_small_for_its_padding_names_the_smallest_input() -> None:
    # padding 4 removes more than a length-1 input produces ((1 - 1) * 2 - 8 + 2 + 1 + 1 =
    # -4): before, torch's RuntimeError "Output size is too small" (no padding, no remedy),
    # and inside vectorized_samples the same. The smallest input that works is 4, the
    # first n with (n - 1) * 2 - 8 + 2 + 1 + 1 >= 1, and it does work.
    torch.manual_seed(0)
    layer = bbb.BayesConvTranspose1d(1, 2, 3, stride=2, padding=4, output_padding=1)
    with pytest.raises(ValueError, match=r"spatial size \(1,\).*at least \(4,\).*padding"):
        layer(torch.randn(2, 1, 1))
    # also a RuntimeError, the type of torch's error that code may catch
    with pytest.raises(RuntimeError, match=r"at least \(4,\)"):
        layer(torch.randn(2, 1, 1))
    with pytest.raises(ValueError, match=r"output of size \(0,\).*at least \(4,\)"):
        layer(torch.randn(2, 1, 3))
    with bbb.vectorized_samples(layer, 2), pytest.raises(ValueError, match=r"at least \(4,\)"):
        layer(torch.randn(4, 1, 3))
    assert layer(torch.randn(2, 1, 4)).shape == (2, 2, 2)  # (4 - 1) * 2 - 8 + 4 = 2


def _fit_two_generator_loader(epochs: int, out: Path, resume: bool = False) -> torch.nn.Module:
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from bbb.train import Trainer

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(12, 3, generator=g), torch.randint(0, 2, (12,), generator=g))
    torch.manual_seed(1)
    model = torch.nn.Sequential(bbb.BayesLinear(3, 2))
    # the loader's own generator (the workers' base seed) and the sampler's (the shuffle)
    loader = DataLoader(
        ds,
        batch_size=4,
        sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(9)),
        generator=torch.Generator().manual_seed(5),
    )
    trainer = Trainer(
        model,
        bbb.ELBO(bbb.Categorical(), 12),
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        epochs=epochs,
        out_dir=out,
        progress=False,
        log=None,
    )
    trainer.fit(resume=resume)
    return model


def test_resume_restores_every_generator_the_training_loader_draws_from(tmp_path: Path) -> None:
    # DataLoader(generator=g) over RandomSampler(generator=g2): the checkpoints held g's
    # state only, so the resumed run reshuffled with g2 from its start: epoch 2's order was
    # epoch 1's, silently (no warning). The resumed fit must equal the uninterrupted one.
    full = _fit_two_generator_loader(2, tmp_path / "full")
    _fit_two_generator_loader(1, tmp_path / "cut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the same loader
        resumed = _fit_two_generator_loader(2, tmp_path / "cut", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _gradcheck_layer(layer: torch.nn.Module, x: torch.Tensor, num_samples: int) -> None:
    """torch.autograd.gradcheck of the layer's output and KL w.r.t. all its parameters (and
    a float input), at fixed noise: every call draws the same numbers (fork_rng + seed)."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    inputs: tuple[torch.Tensor, ...] = tuple(params)
    if x.is_floating_point():
        inputs = (x.detach().clone().requires_grad_(), *params)

    def f(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xin, ps = (args[0], args[1:]) if x.is_floating_point() else (x, args)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            with bbb.vectorized_samples(layer, num_samples):
                y = torch.func.functional_call(
                    layer, dict(zip(names, ps, strict=True)), (repeat_samples(xin, num_samples),)
                )
            return y, layer.kl()

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_gradcheck_conv_transpose_with_groups_dilation_output_padding(estimator: str) -> None:
    # the exact gradient (float64 finite differences) of output and Monte Carlo KL, through
    # the S = 2 sample folding into channel groups, for every estimator
    torch.manual_seed(0)  # (torch seeds its global generator at random per process)
    layer = bbb.BayesConvTranspose1d(
        4, 2, 2, stride=2, padding=1, output_padding=1, groups=2, dilation=2,
        estimator=estimator, kl="mc", rho_init=(-1.0, 0.0), dtype=torch.float64,
    )  # fmt: skip
    _gradcheck_layer(layer, torch.randn(1, 4, 3, dtype=torch.float64), 2)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_gradcheck_embedding_with_a_padding_row(estimator: str) -> None:
    # the padding row (index 2) gets an exactly zero gradient from output and KL alike
    torch.manual_seed(0)
    layer = bbb.BayesEmbedding(
        4, 2, padding_idx=2, estimator=estimator, kl="mc", rho_init=(-1.0, 0.0),
        dtype=torch.float64,
    )  # fmt: skip
    _gradcheck_layer(layer, torch.tensor([[0, 2, 3, 3]]), 2)
