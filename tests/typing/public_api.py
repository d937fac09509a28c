"""Static checks of bbb's public types, as a user's type checker sees them.

Not a pytest module (no ``test_`` prefix): ``make test`` runs mypy over it (pyproject's
``[tool.mypy] files``), and each ``assert_type`` fails the type check if the inferred type
differs. Running it also works: ``python tests/typing/public_api.py`` executes every line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import bbb

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:

    def assert_type(value: object, _type: object) -> object:
        return value


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        bbb.BayesLinear(4, 8, prior=bbb.ScaleMixturePrior(0.5, 1.0, 0.0025)),
        nn.ReLU(),
        bbb.BayesLinear(8, 3, estimator="local"),
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=1000, num_samples=2)
    result = elbo(model, x, y)
    assert_type(result, bbb.ELBOResult)
    assert_type(result.loss, Tensor)
    result.loss.backward()
    assert_type(bbb.kl_divergence(model), Tensor)

    # predict's return type follows the likelihood
    cls = bbb.predict(model, x, num_samples=4)
    assert_type(cls, bbb.ClassificationPrediction)
    assert_type(cls.probs, Tensor)
    assert_type(bbb.metrics.expected_calibration_error(cls.probs, y), float)
    reg_model = nn.Sequential(bbb.BayesLinear(4, 1))
    reg = bbb.predict(reg_model, x, likelihood=bbb.Gaussian(sigma=0.1), num_samples=4)
    assert_type(reg, bbb.RegressionPrediction)
    assert_type(reg.mean, Tensor)
    lik: bbb.Likelihood = bbb.Categorical()
    either = bbb.predict(model, x, likelihood=lik, num_samples=4)
    assert_type(either, bbb.ClassificationPrediction | bbb.RegressionPrediction)

    assert_type(bbb.prune_by_snr(model, 0.5), bbb.PruneResult)
    assert_type(bbb.to_deterministic(model), nn.Module)
    assert_type(bbb.bayesianize(nn.Linear(3, 2)), nn.Module)
    assert_type(bbb.make_prior("gaussian", sigma=1.0), bbb.Prior)


if __name__ == "__main__":
    main()
    print("ok")
