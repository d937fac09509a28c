"""Bayesian layers and the helpers that act on every Bayesian layer of a model."""

from .conv import BayesConv1d, BayesConv2d, BayesConv3d
from .conv_transpose import BayesConvTranspose1d, BayesConvTranspose2d, BayesConvTranspose3d
from .embedding import BayesEmbedding
from .estimators import ESTIMATORS
from .linear import BayesLinear
from .module import (
    SAMPLING_MODES,
    BayesModule,
    bayes_modules,
    kl_divergence,
    resample,
    sampling,
    set_sampling,
    shared_weight_samples,
    vectorized_samples,
)
from .recurrent import BayesGRU, BayesLSTM, BayesRecurrentWeights
from .stacking import repeat_samples

__all__ = [
    "ESTIMATORS",
    "SAMPLING_MODES",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "BayesEmbedding",
    "BayesGRU",
    "BayesLSTM",
    "BayesLinear",
    "BayesModule",
    "BayesRecurrentWeights",
    "bayes_modules",
    "kl_divergence",
    "repeat_samples",
    "resample",
    "sampling",
    "set_sampling",
    "shared_weight_samples",
    "vectorized_samples",
]
