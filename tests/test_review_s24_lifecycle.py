"""Session 24 review of saving, loading and the model lifecycle (#3, #4).

Behaviour that already worked and was not tested: state-dict round trips of every layer type,
estimator, prior and kernel backend (mean network, KL at the same noise); loading into a model
built on the meta device; a checkpoint of one estimator in another's model; a float64
checkpoint in a float32 model; kl() after load_state_dict; frozen samples through deepcopy,
pickle and torch.save; a prior of another type named by the strict load; the Trainer's best.pt
read back through the public API.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb import _native

PRIORS: dict[str, Callable[[], bbb.Prior]] = {
    "gaussian": lambda: bbb.GaussianPrior(0.5),
    "mixture": lambda: bbb.ScaleMixturePrior(0.3, 1.5, 0.01),
    "laplace": lambda: bbb.LaplacePrior(0.7),
}

# (layer factory, input shape)
LAYERS: dict[str, tuple[Callable[..., bbb.BayesModule], tuple[int, ...]]] = {
    "linear": (lambda **kw: bbb.BayesLinear(4, 3, **kw), (5, 4)),
    "conv1d": (lambda **kw: bbb.BayesConv1d(2, 3, 3, **kw), (5, 2, 7)),
    "conv2d": (lambda **kw: bbb.BayesConv2d(2, 3, 3, **kw), (3, 2, 5, 5)),
    "conv3d": (lambda **kw: bbb.BayesConv3d(2, 3, 2, **kw), (2, 2, 3, 3, 3)),
    "ensemble": (lambda **kw: bbb.BayesLinearEnsemble(3, 4, 2, **kw), (3, 5, 4)),
}


@pytest.fixture
def _eager_after() -> object:
    yield
    bbb.set_kernels("eager")


def _mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), bbb.sampling(model, "mean"):
        return model(x)


def _kl_at(model: nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """KL of a sampling pass at a fixed seed (the Monte Carlo KL at that pass's noise)."""
    torch.manual_seed(seed)
    model(x)
    return bbb.kl_divergence(model).detach()


@pytest.mark.usefixtures("_eager_after")
@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_state_dict_round_trip_gives_the_same_mean_network_kl_and_posterior(
    layer: str, estimator: str, prior: str, backend: str
) -> None:
    if backend == "native" and not _native.available():
        pytest.skip("the native kernels cannot be built here")
    bbb.set_kernels(backend)
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    src = make(estimator=estimator, prior=PRIORS[prior](), rho_init=(-3.0, -1.0))
    # another initialisation and another prior's values: everything must come from the file
    dst = make(estimator=estimator, prior=type(src.prior)(), rho_init=0.0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(shape)
    assert torch.equal(_mean(dst, x), _mean(src, x))
    assert torch.equal(dst.weight_sigma, src.weight_sigma)
    assert repr(dst.prior) == repr(src.prior)
    # same noise, same parameters and prior: the same KL to the last bit
    assert torch.equal(_kl_at(dst, x), _kl_at(src, x))


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_a_model_built_on_the_meta_device_loads_a_pruned_checkpoint(how: str) -> None:
    torch.manual_seed(0)

    def net(prior: bbb.Prior) -> nn.Module:
        return nn.Sequential(
            bbb.BayesLinear(4, 8, prior=prior, kl="mc"), nn.ReLU(), bbb.BayesLinear(8, 2)
        )

    src = net(bbb.ScaleMixturePrior(0.25, 1.0, 0.05))
    bbb.prune_by_snr(src, 0.5)
    with torch.device("meta"):
        dst = net(bbb.ScaleMixturePrior(0.5, 2.0, 0.1))  # other values: the file's win
    if how == "to_empty":
        dst.to_empty(device="cpu")
        dst.load_state_dict(src.state_dict())
    else:
        dst.load_state_dict(src.state_dict(), assign=True)
    assert not any(t.is_meta for t in (*dst.parameters(), *dst.buffers()))
    assert torch.equal(dst[0].weight_mask, src[0].weight_mask)
    assert repr(dst[0].prior) == repr(src[0].prior)
    x = torch.randn(6, 4)
    assert torch.equal(_mean(dst, x), _mean(src, x))
    assert torch.equal(_kl_at(dst, x), _kl_at(src, x))


@pytest.mark.usefixtures("_eager_after")
@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_kl_after_load_state_dict_is_that_of_the_loaded_parameters(
    estimator: str, assign: bool, backend: str
) -> None:
    # a forward pass leaves its softplus (and, with native kernels, its KL) for kl(); a
    # load_state_dict after it must not let kl() return the old parameters' KL
    if backend == "native" and not _native.available():
        pytest.skip("the native kernels cannot be built here")
    bbb.set_kernels(backend)
    torch.manual_seed(0)
    layer = bbb.BayesLinear(4, 3, estimator=estimator, prior=bbb.GaussianPrior(0.5))
    other = bbb.BayesLinear(4, 3, estimator=estimator, prior=bbb.GaussianPrior(0.5))
    with torch.no_grad():
        other.weight_rho.fill_(-1.0)  # a KL far from the layer's
    x = torch.randn(5, 4)
    layer(x)
    before = layer.kl().item()
    layer.load_state_dict(other.state_dict(), assign=assign)
    after = layer.kl().item()
    with bbb.use_kernels("eager"):
        expected = other.kl().item()  # no forward pass: the closed form of its state
    assert after != pytest.approx(before, rel=1e-2)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=0)


def test_a_checkpoint_of_one_estimator_loads_into_another_estimators_model() -> None:
    torch.manual_seed(0)
    src = nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, 2))
    x = torch.randn(6, 4)
    for estimator in ("local", "flipout"):
        dst = nn.Sequential(
            bbb.BayesLinear(4, 8, estimator=estimator),
            nn.ReLU(),
            bbb.BayesLinear(8, 2, estimator=estimator),
        )
        dst.load_state_dict(src.state_dict())  # the posterior does not depend on the estimator
        assert torch.equal(_mean(dst, x), _mean(src, x))
        assert dst[0].estimator == estimator  # the model's own estimator is kept


def test_a_float64_checkpoint_loads_into_a_float32_model_in_its_dtype() -> None:
    torch.manual_seed(0)
    src = bbb.BayesLinear(4, 3, prior=bbb.LaplacePrior(0.3), dtype=torch.float64)
    dst = bbb.BayesLinear(4, 3, prior=bbb.LaplacePrior(1.0))
    dst.load_state_dict(src.state_dict())
    assert dst.weight_mu.dtype == dst.prior.scale.dtype == torch.float32
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(_mean(dst, x.float()), _mean(src, x).float())
    assert float(dst.prior.scale) == pytest.approx(0.3, rel=1e-7)


def test_a_checkpoint_with_another_prior_type_names_the_prior_keys() -> None:
    src = bbb.BayesLinear(4, 3, prior=bbb.ScaleMixturePrior())
    dst = bbb.BayesLinear(4, 3, prior=bbb.GaussianPrior(1.0))
    with pytest.raises(RuntimeError, match=r"prior\.sigma.*\n.*prior\.pi"):
        dst.load_state_dict(src.state_dict())
    result = dst.load_state_dict(src.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["prior.mean", "prior.sigma"]
    assert sorted(result.unexpected_keys) == ["prior.pi", "prior.sigma1", "prior.sigma2"]
    assert torch.equal(dst.weight_mu, src.weight_mu)  # the posterior was loaded
    assert isinstance(dst.prior, bbb.GaussianPrior)


def _torch_round_trip(module: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a whole module: a trusted pickle


@pytest.mark.parametrize(
    "how",
    {
        "deepcopy": copy.deepcopy,
        "pickle": lambda m: pickle.loads(pickle.dumps(m)),
        "torch.save": _torch_round_trip,
    }.items(),
    ids=lambda kv: kv[0],
)
@pytest.mark.parametrize("inference", [False, True])
def test_a_frozen_sample_is_kept_by_deepcopy_pickle_and_torch_save(
    how: tuple[str, Callable[[nn.Module], nn.Module]], inference: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, 2))
    bbb.set_sampling(model, "frozen")
    x = torch.randn(6, 4)
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        y = model(x)  # draws the frozen sample (and leaves a record of the pass)
    clone = how[1](model)
    assert clone[0].mode == "frozen" and clone[0]._record is None
    with torch.no_grad():
        assert torch.equal(clone(x), y)  # the same network, sample for sample
    bbb.resample(clone)  # the copy's sample is its own: the original keeps its sample
    with torch.no_grad():
        assert not torch.equal(clone(x), y)
        assert torch.equal(model(x), y)


def test_a_whole_model_saved_with_torch_save_needs_weights_only_false() -> None:
    # torch >= 2.6 loads with weights_only=True by default, which refuses bbb's classes: the
    # state dict is the portable form (weights_only loading works, see the tests above)
    model = bbb.BayesLinear(4, 3)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch.load(buf, weights_only=True)


def test_the_trainers_best_pt_loads_through_the_public_api(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    def build() -> tuple[nn.Module, bbb.ELBO]:
        model = nn.Sequential(bbb.BayesLinear(3, 8), nn.ReLU(), bbb.BayesLinear(8, 1))
        return model, bbb.ELBO(bbb.Gaussian(noise="learned"), dataset_size=64)

    model, elbo = build()
    opt = torch.optim.Adam([*model.parameters(), *elbo.parameters()], lr=1e-2)
    trainer = bbb.train.Trainer(
        model, elbo, opt, loader, val_loader=loader, epochs=3, out_dir=tmp_path, log=None
    )
    trainer.fit()
    trainer.load_best()
    state, path = bbb.train.load_checkpoint(tmp_path / "best.pt")
    assert path == tmp_path / "best.pt" and int(state["epoch"]) == trainer.best_epoch
    fresh, fresh_elbo = build()
    fresh.load_state_dict(state["model"])
    fresh_elbo.load_state_dict(state["elbo"])
    assert torch.equal(_mean(fresh, x), _mean(model, x))
    assert torch.equal(fresh_elbo.likelihood.sigma, elbo.likelihood.sigma)
    # the newest epoch checkpoint (the end of training) through the same call
    last, last_path = bbb.train.load_checkpoint(tmp_path / "checkpoints")
    assert last["format"] == "bbb-checkpoint-1" and int(last["epoch"]) == 3
    assert last_path.name == "checkpoint-00003.pt"
