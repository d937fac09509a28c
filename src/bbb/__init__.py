"""bbb: Bayes by Backprop for PyTorch.

Variational Bayesian layers with a factorised Gaussian posterior (Blundell et al. 2015),
three gradient estimators, priors with closed-form or Monte Carlo KL, a correctly scaled
minibatch ELBO, and predictive uncertainty tools. Everything public is re-exported here.
"""

from . import acquisition, data, metrics, train
from .acquisition import (
    ACQUISITION_FUNCTIONS,
    Acquisition,
    BatchBALD,
    acquire,
    acquisition_scores,
    batch_bald,
    joint_mutual_information,
)
from .allocator import tune_allocator
from .convert import bayesianize, convertible_layers, to_deterministic
from .elbo import ELBO, KL_WEIGHTINGS, ELBOResult, blundell_weight, linear_annealing
from .kernels import KERNEL_BACKENDS, get_kernels, set_kernels, use_kernels
from .kl import KL_MODES, closed_form_kl, has_closed_form
from .likelihoods import NOISE_MODELS, Categorical, Gaussian, Likelihood
from .nn import (
    ESTIMATORS,
    SAMPLING_MODES,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesEmbedding,
    BayesGRU,
    BayesLinear,
    BayesLSTM,
    BayesModule,
    bayes_modules,
    kl_divergence,
    repeat_samples,
    resample,
    sampling,
    set_sampling,
    shared_weight_samples,
    vectorized_samples,
)
from .nn.ensemble import BayesLinearEnsemble
from .predictive import (
    ClassificationPrediction,
    Prediction,
    RegressionPrediction,
    predict,
    sample_outputs,
)
from .priors import GaussianPrior, LaplacePrior, Prior, ScaleMixturePrior, make_prior
from .pruning import PruneResult, load_compact, prune_by_snr, remove_pruning, save_compact, snr
from .runs import load_run

__version__ = "0.1.0"

__all__ = [
    "ACQUISITION_FUNCTIONS",
    "Acquisition",
    "BatchBALD",
    "acquire",
    "acquisition",
    "acquisition_scores",
    "batch_bald",
    "joint_mutual_information",
    "ELBO",
    "ESTIMATORS",
    "KERNEL_BACKENDS",
    "KL_MODES",
    "KL_WEIGHTINGS",
    "NOISE_MODELS",
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
    "BayesLinearEnsemble",
    "BayesModule",
    "Categorical",
    "ClassificationPrediction",
    "ELBOResult",
    "Gaussian",
    "GaussianPrior",
    "LaplacePrior",
    "Likelihood",
    "Prediction",
    "Prior",
    "PruneResult",
    "RegressionPrediction",
    "ScaleMixturePrior",
    "__version__",
    "bayes_modules",
    "bayesianize",
    "blundell_weight",
    "closed_form_kl",
    "convertible_layers",
    "data",
    "get_kernels",
    "has_closed_form",
    "kl_divergence",
    "linear_annealing",
    "load_run",
    "make_prior",
    "metrics",
    "predict",
    "prune_by_snr",
    "remove_pruning",
    "save_compact",
    "load_compact",
    "repeat_samples",
    "resample",
    "sample_outputs",
    "sampling",
    "set_kernels",
    "set_sampling",
    "shared_weight_samples",
    "snr",
    "to_deterministic",
    "train",
    "use_kernels",
    "tune_allocator",
    "vectorized_samples",
]
