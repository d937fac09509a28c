"""Review session 29, follow-ups: loading a pruning mask (#3), the Trainer's progress option
(#4), recurrent layers on the meta device (#3), the regression metrics' input checks (#3)."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
import bbb.metrics as M
from bbb.nn import BayesGRU, BayesLinear, BayesLSTM
from bbb.train import Trainer


# ------------------------------------------------------------------ 1. the pruning mask on load
def _pruned_layer(seed: int) -> BayesLinear:
    torch.manual_seed(seed)
    layer = BayesLinear(4, 3)
    bbb.prune_by_snr(nn.Sequential(layer), 0.5)
    assert layer.weight_mask is not None
    return layer


def test_a_none_under_the_mask_key_fails_the_load_and_keeps_the_mask() -> None:
    # Before: the layer dropped its mask (taken as an unpruned state), then torch failed the
    # load on the key as unexpected: the failed load had lost the mask.
    layer = _pruned_layer(0)
    mask = layer.weight_mask.clone()
    state: dict[str, Tensor | None] = dict(layer.state_dict())
    state["weight_mask"] = None
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="weight_mask.*expected torch.Tensor.*NoneType"):
            layer.load_state_dict(state, strict=strict)
        assert layer.weight_mask is not None and torch.equal(layer.weight_mask, mask)


def test_a_none_under_the_mask_key_of_an_unpruned_layer_is_the_same_error() -> None:
    layer = BayesLinear(4, 3)
    state: dict[str, Tensor | None] = dict(layer.state_dict())
    state["weight_mask"] = None
    with pytest.raises(RuntimeError, match="weight_mask.*expected torch.Tensor.*NoneType"):
        layer.load_state_dict(state, strict=False)
    assert layer.weight_mask is None


def test_a_mask_loaded_from_an_earlier_shard_survives_the_weights_shard() -> None:
    # Two load_state_dict(strict=False) calls with disjoint keys: the mask with weight_rho,
    # then weight_mu and the bias. Before: the second call dropped the mask (weight_mu present,
    # mask absent: read as an unpruned state).
    source = _pruned_layer(0)
    full = source.state_dict()
    first = ("weight_mask", "weight_rho")
    target = BayesLinear(4, 3)
    target.load_state_dict({k: full[k] for k in first}, strict=False)
    target.load_state_dict({k: v for k, v in full.items() if k not in first}, strict=False)
    assert target.weight_mask is not None and torch.equal(target.weight_mask, full["weight_mask"])
    x = torch.randn(5, 4)
    with bbb.sampling(source, "mean"), bbb.sampling(target, "mean"):
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_a_partial_state_with_weight_mu_keeps_the_mask_and_a_whole_one_drops_it() -> None:
    layer = _pruned_layer(0)
    mask = layer.weight_mask.clone()
    unpruned = BayesLinear(4, 3).state_dict()
    layer.load_state_dict({"weight_mu": unpruned["weight_mu"]}, strict=False)
    assert layer.weight_mask is not None and torch.equal(layer.weight_mask, mask)
    # every key of the layer's own but the mask: an unpruned state (the documented rule)
    own = {k: v for k, v in unpruned.items() if not k.startswith("prior.")}
    layer.load_state_dict(own, strict=False)
    assert layer.weight_mask is None


def test_a_strict_load_missing_a_key_keeps_the_mask() -> None:
    layer = _pruned_layer(0)
    state = {k: v for k, v in BayesLinear(4, 3).state_dict().items() if k != "bias_rho"}
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "bias_rho"'):
        layer.load_state_dict(state)
    assert layer.weight_mask is not None


# ------------------------------------------------------------------ 2. Trainer(progress=...)
def _trainer(progress: object) -> Trainer:
    """A Trainer of one Bayesian layer on four toy points, with the given ``progress``."""
    torch.manual_seed(0)
    model = BayesLinear(1, 1)
    data = TensorDataset(torch.zeros(4, 1), torch.zeros(4, 1))
    elbo = bbb.ELBO(bbb.Gaussian(sigma=0.5), len(data))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(data, batch_size=2)
    return Trainer(model, elbo, optimizer, loader, epochs=1, log=None, progress=progress)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["no", "False", None, 0, 1, np.bool_(False)])
def test_a_progress_that_is_not_a_bool_is_refused_by_name(value: object) -> None:
    # Before: any value was taken for its truth (progress="no" drew the bar; None hid it).
    match = r"progress must be True \(a progress bar per epoch\) or False, got " + re.escape(
        repr(value)
    )
    with pytest.raises(ValueError, match=match):
        _trainer(value)


@pytest.mark.parametrize("value", [True, False])
def test_progress_true_or_false_is_kept(value: bool) -> None:
    assert _trainer(value).progress is value


# ------------------------------------------------------------------ 3. layers on "meta"
_META_LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    # name: (constructor, input shape, output shape)
    "linear": (lambda: BayesLinear(4, 3), (2, 4), (2, 3)),
    "lstm": (lambda: BayesLSTM(4, 3, batch_first=True), (2, 5, 4), (2, 5, 3)),
    "gru": (lambda: BayesGRU(4, 3), (5, 2, 4), (5, 2, 3)),
}


@pytest.mark.parametrize("kind", sorted(_META_LAYERS))
def test_a_meta_layer_infers_shapes_and_names_an_input_of_another_dtype(kind: str) -> None:
    # Before: an input of another dtype than the parameters' on the "meta" device failed in
    # torch.is_autocast_enabled ("unknown device type for autocast") instead of the layer's
    # own error; a recurrent layer and BayesLinear alike.
    make, in_shape, out_shape = _META_LAYERS[kind]
    with torch.device("meta"):
        layer = make()
    out = layer(torch.empty(in_shape, device="meta"))
    out = out[0] if isinstance(out, tuple) else out
    assert out.device.type == "meta" and tuple(out.shape) == out_shape
    name = type(layer).__name__
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{name} expected a torch.float32 input (the dtype of its parameters), got "
            "torch.float64; convert the input (x.to(torch.float32)) or the model"
        ),
    ):
        layer(torch.empty(in_shape, device="meta", dtype=torch.float64))


# ------------------------------------------------------------------ 4. regression metrics' inputs
def _mixture(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Means and variances of S=3 weight samples for B=5 examples, D=2 outputs; targets."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 5, 2, generator=g)
    return means, torch.rand(3, 5, 2, generator=g) + 0.1, torch.randn(5, 2, generator=g)


_MIXTURE_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], object]] = {
    "regression_report": M.regression_report,
    "mixture_gaussian_log_likelihood": M.mixture_gaussian_log_likelihood,
    "pit_values": M.pit_values,
    "interval_coverage": M.interval_coverage,
    "crps": M.crps,
    "regression_calibration_data": M.regression_calibration_data,
    "regression_calibration_report": M.regression_calibration_report,
}


@pytest.mark.parametrize("fn", sorted(_MIXTURE_FUNCTIONS))
def test_every_mixture_metric_takes_its_targets_through_the_one_device_rule(
    fn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: regression_report and mixture_gaussian_log_likelihood skipped the device rule
    # of pit_values, crps and interval_coverage (targets moved to the predictions' device,
    # vars on another device refused naming the function): targets on the CPU with
    # predictions on a GPU failed there in torch's words. No GPU here: the rule is seen
    # taken first under the function's name (regression_calibration_report then calls the
    # other calibration metrics, each checking again; the rule itself: the next test).
    seen: list[str] = []
    rule = M._on_predictions_device

    def spy(mu: Tensor, var: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
        seen.append(name)
        return rule(mu, var, y, name)

    monkeypatch.setattr(M, "_on_predictions_device", spy)
    _MIXTURE_FUNCTIONS[fn](*_mixture())
    assert seen[0] == fn


def test_the_device_rule_refuses_vars_on_another_device_naming_the_function() -> None:
    # "meta" stands for a second device on a machine without a GPU
    means, variances, target = _mixture()
    with pytest.raises(ValueError, match=r"^crps: vars is on meta but means is on cpu$"):
        M._on_predictions_device(means, variances.to("meta"), target, "crps")
    mu, var, y = M._on_predictions_device(means, variances, target.double(), "crps")
    assert mu is means and var is variances and y.device == means.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (not run in session 29)")
def test_cpu_targets_with_gpu_predictions_give_the_cpu_numbers() -> None:
    means, variances, target = _mixture()
    expected = M.regression_report(means, variances, target)
    assert M.regression_report(means.cuda(), variances.cuda(), target) == pytest.approx(expected)
    assert M.mixture_gaussian_log_likelihood(
        means.cuda(), variances.cuda(), target
    ) == pytest.approx(expected["log_likelihood"])
