"""The pair the probes compare: the deterministic MLP 784-1200-1200-10 and bbb's (Gaussian
prior, closed-form KL, S=1) on one synthetic MNIST-shaped batch of 128, allocator tuned."""

from torch import Tensor, nn

import bbb
from bbb.bench import DATASET_SIZE, make_bbb_model, make_data


def pair(estimator: str) -> tuple[Tensor, Tensor, nn.Module, nn.Module, bbb.ELBO]:
    """(x, y, deterministic network, Bayesian network, the Bayesian network's ELBO)."""
    bbb.tune_allocator()
    x, y = make_data("mlp")
    det = nn.Sequential(
        nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10)
    )
    bay = make_bbb_model("mlp", 1200, estimator, "gaussian")
    return x, y, det, bay, bbb.ELBO(bbb.Categorical(), DATASET_SIZE)
