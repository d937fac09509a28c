"""Review session 22, a user's programs: ELBO with batch norm, kl_scale schedules, exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bbb


def _bias_noise_bn_model() -> nn.Sequential:
    """y = BN(w x + b) with w ~ 1 (almost no noise) and a very noisy bias: a BN layer that
    normalises each weight sample by its own batch statistics removes b entirely."""
    lin = bbb.BayesLinear(1, 1, estimator="reparam")
    with torch.no_grad():
        lin.weight_mu.fill_(1.0)
        lin.bias_mu.fill_(0.0)
        lin.weight_rho.fill_(-10.0)  # sigma_w = 4.5e-5
        lin.bias_rho.fill_(1.0)  # sigma_b = 1.31
    return nn.Sequential(lin, nn.BatchNorm1d(1, affine=False))


def _standardised(n: int) -> torch.Tensor:
    x = torch.randn(n, 1)
    return (x - x.mean()) / x.std(correction=0)


def test_elbo_batchnorm_normalises_each_sample_by_its_own_statistics() -> None:
    # Before: the S samples ran as one (S * B)-row pass, so BatchNorm pooled their statistics:
    # the bias noise of each sample survived and the mean NLL was 1.60 for S = 8 against
    # 0.226 for S = 1 (the same model and data); now each sample is its own pass.
    torch.manual_seed(0)
    model = _bias_noise_bn_model()
    x = _standardised(64)
    lik = bbb.Gaussian(sigma=0.5)
    nll1 = bbb.ELBO(lik, 64, num_samples=1)(model, x, x).nll
    result = bbb.ELBO(lik, 64, num_samples=8)(model, x, x)
    assert result.output.shape == (8, 64, 1)
    # every sample's block is normalised by its own mean and variance (BN's eps = 1e-5)
    means = result.output.mean(dim=(1, 2))
    assert torch.allclose(means, torch.zeros(8), atol=1e-5)
    # deterministic up to sigma_w = 4.5e-5: the output is x * (1 +- 1e-4)
    assert abs(float(result.nll) - float(nll1)) < 1e-3


def test_elbo_batchnorm_running_stats_updated_once_per_sample_and_grads_flow() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        bbb.BayesLinear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), bbb.BayesLinear(4, 2)
    )
    elbo = bbb.ELBO(bbb.Categorical(), 100, num_samples=3)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    result = elbo(model, x, y)
    assert int(model[1].num_batches_tracked) == 3
    result.loss.backward()
    assert model[0].weight_rho.grad is not None and model[1].weight.grad is not None
    # the closed-form KL is the model's, once (not S times)
    assert torch.allclose(result.kl, bbb.kl_divergence(model).detach())


def test_elbo_batchnorm_in_eval_mode_keeps_the_vectorized_pass() -> None:
    # running statistics do not mix the rows: the one vectorized pass is exact there
    torch.manual_seed(2)
    model = nn.Sequential(bbb.BayesLinear(3, 4), nn.BatchNorm1d(4), bbb.BayesLinear(4, 2))
    model.eval()
    elbo = bbb.ELBO(bbb.Categorical(), 100, num_samples=4)
    elbo(model, torch.randn(6, 3), torch.randint(0, 2, (6,)))
    assert int(model[1].num_batches_tracked) == 0


@pytest.mark.parametrize(
    "value",
    [torch.tensor(0.5), torch.tensor(0.5, requires_grad=True), np.float32(0.5), 0.5],
    ids=["tensor", "tensor-grad", "numpy", "float"],
)
def test_kl_scale_schedule_result_is_a_float(value: object) -> None:
    # Before: a schedule returning a tensor made ELBOResult.kl_weight a tensor (annotated
    # float), one requiring grad backpropagated into it.
    torch.manual_seed(3)
    model = bbb.BayesLinear(2, 2)
    elbo = bbb.ELBO(bbb.Categorical(), 8, kl_scale=lambda step: value)
    result = elbo(model, torch.randn(4, 2), torch.randint(0, 2, (4,)))
    assert type(result.kl_weight) is float and result.kl_weight == 0.5 / 8


@pytest.mark.parametrize("value", [None, "1", True, float("nan"), -1.0, torch.ones(2)])
def test_kl_scale_schedule_bad_result_is_a_value_error(value: object) -> None:
    # Before: None or a string gave TypeError "must be real number, not NoneType"
    model = bbb.BayesLinear(2, 2)
    elbo = bbb.ELBO(bbb.Categorical(), 8, kl_scale=lambda step: value)
    with pytest.raises(ValueError, match=r"kl_scale\(0\) returned"):
        elbo(model, torch.randn(4, 2), torch.randint(0, 2, (4,)))


def test_prediction_alias_is_reexported() -> None:
    # bbb.predictive.__all__ lists Prediction; bbb re-exports everything public
    assert bbb.Prediction is bbb.predictive.Prediction
    assert "Prediction" in bbb.__all__


class _ReturnsTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = bbb.BayesLinear(2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(x), x


def test_model_output_that_is_not_a_tensor_is_a_clear_type_error() -> None:
    # Before: AttributeError: 'tuple' object has no attribute 'reshape'
    torch.manual_seed(4)
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    with pytest.raises(TypeError, match="must return a tensor.*got tuple"):
        bbb.ELBO(bbb.Categorical(), 8)(_ReturnsTuple(), x, y)
    with pytest.raises(TypeError, match="must return a tensor.*got tuple"):
        bbb.predict(_ReturnsTuple(), x, num_samples=2)


def test_model_output_without_the_batch_dimension_is_refused() -> None:
    # Before: a model flattening its (S * B, C) output reshaped to (S, B, C) by chance of the
    # element count, or failed with "shape '[2, 4]' is invalid for input of size 24"
    torch.manual_seed(5)
    model = nn.Sequential(bbb.BayesLinear(2, 3), nn.Flatten(0))
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"returned shape \(24,\) for an input of 8 rows"):
        bbb.ELBO(bbb.Categorical(), 8, num_samples=2)(model, x, y)
    with pytest.raises(ValueError, match=r"returned shape \(12,\) for an input of 4 rows"):
        bbb.predict(model, x, num_samples=1)


def test_inputs_that_are_not_tensors_are_a_clear_type_error() -> None:
    # Before: AttributeError: 'tuple' object has no attribute 'dim' (ELBO), 'list' object has
    # no attribute 'is_floating_point' (predict); a 0-d y: IndexError
    model = bbb.BayesLinear(2, 3)
    x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
    with pytest.raises(TypeError, match="ELBO needs x as one tensor"):
        bbb.ELBO(bbb.Categorical(), 8)(model, (x, x), y)
    with pytest.raises(TypeError, match="ELBO needs y as one tensor"):
        bbb.ELBO(bbb.Categorical(), 8)(model, x, y.tolist())
    with pytest.raises(ValueError, match="x has 4 examples but y has 0"):
        bbb.ELBO(bbb.Categorical(), 8)(model, x, torch.tensor(1))
    with pytest.raises(TypeError, match="predict needs the inputs as one tensor"):
        bbb.predict(model, [x])
