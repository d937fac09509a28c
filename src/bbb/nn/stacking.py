"""The input of a vectorized multi-sample pass: S stacked copies of a batch.

Inside :func:`bbb.nn.module.vectorized_samples` a model is called on ``(S * B, ...)`` rows,
S copies of the same B examples, one block per weight sample. :func:`repeat_samples` builds
that tensor (for :class:`bbb.ELBO` and :func:`bbb.predict`) and marks it as S identical blocks;
a layer that receives the marked tensor unchanged may then compute what does not depend on
the weight sample once per example instead of S times (:func:`identical_blocks`). The
estimators do (:mod:`bbb.nn.estimators`): local reparameterisation computes its
pre-activations' mean and variance on one block (only the noise differs per sample), flipout
its mean path ``op(x, mu)`` (the perturbation path differs per sample).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

_MARK = "_bbb_identical_blocks"


def repeat_samples(x: Tensor, num_samples: int) -> Tensor:
    """``x`` (B, ...) stacked ``num_samples`` times along dim 0: (S * B, ...), block s = x.

    For S > 1 the result is marked as S identical blocks (see :func:`identical_blocks`);
    S = 1 returns ``x`` itself, unmarked. Under ``torch.inference_mode`` tensors keep no
    version counter, so an in-place change could not be detected: the result is left unmarked
    there (the layers then compute every block; ``torch.no_grad`` keeps the saving).
    """
    if (
        not isinstance(num_samples, numbers.Integral)
        or isinstance(num_samples, bool)
        or num_samples < 1
    ):
        # as bbb.vectorized_samples says it (0 gave an empty batch without a word; -1, 2.0
        # raised torch's errors about expand and shapes)
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    num_samples = int(num_samples)
    if num_samples == 1:
        return x
    if x.dim() == 0:
        raise ValueError("repeat_samples needs a tensor with a batch dimension, got a 0-d one")
    b = x.shape[0]
    rep = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(num_samples * b, *x.shape[1:])
    # not in a compiled region (a compiled training step or predict): there identical_blocks
    # says 1 anyway, and dynamo cannot trace is_inference (a graph break at every call)
    if not torch.compiler.is_compiling() and not rep.is_inference():
        setattr(rep, _MARK, (num_samples, rep._version))
    return rep


def identical_blocks(x: Tensor) -> int:
    """S where ``x`` is an output of :func:`repeat_samples` not modified in place since, so
    that its S blocks along dim 0 are known to be equal; 1 for every other tensor, and inside
    a ``torch.compile``d region (dynamo cannot trace the version check: each layer's check
    broke the graph in two, so a local/flipout model with S > 1 ran as several graphs)."""
    if torch.compiler.is_compiling():
        return 1
    mark = getattr(x, _MARK, None)
    if mark is None or mark[1] != x._version:
        return 1
    return int(mark[0])
