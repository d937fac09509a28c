"""Gradient estimators, written once for every layer that is linear in its weights.

A layer supplies its operation ``op(x, w, b)`` (``F.linear`` or ``F.convNd`` with its stride,
padding, ...) and a batched variant ``op_batched(x, w, b, S)`` that applies S different weights
to the S blocks of a sample-folded batch. Shapes below: ``N`` rows in the batch (the sample
dimension, when present, folded in front: ``N = S * B``), ``W`` the weight shape, ``O`` the
number of outputs (out features / out channels).

- :func:`reparam` (weight-space sampling, Blundell et al. 2015): ``w = mu + sigma * eps``,
  one weight sample per Monte Carlo sample, shared by the rows of that sample.
- :func:`local` (local reparameterisation, Kingma et al. 2015): sample pre-activations from
  N(op(x, mu) + mu_b, op(x^2, sigma^2) + sigma_b^2) with independent noise per row and output.
  Exact for linear layers on (N, in) inputs. For convolutions, and for linear layers on
  (N, *, in) inputs, it matches the mean and variance of each output but not the correlation
  between output positions that share a weight: an approximation there.
- :func:`flipout` (Wen et al. 2018): one shared perturbation ``dW = sigma * eps`` per Monte Carlo
  sample, decorrelated across examples by random signs: ``op(x, mu) + op(x * s_in, dW) *
  s_out``, the signs shared by the positions of one example (exact for every layer).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from . import noise as _noise
from .stacking import identical_blocks

__all__ = ["ESTIMATORS", "Posterior", "LayerOps", "reparam", "local", "flipout", "rademacher"]

ESTIMATORS = ("reparam", "local", "flipout")


class Posterior(NamedTuple):
    """Mean and standard deviation of the weight (shape W) and bias (shape (O,)) posteriors."""

    w_mu: Tensor
    w_sigma: Tensor
    b_mu: Tensor | None
    b_sigma: Tensor | None


class LayerOps(Protocol):
    """What an estimator needs from a layer."""

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """Apply one weight ``w`` (shape W) and bias ``b`` (shape (O,)) to ``x`` (N, ...)."""
        ...

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        """Apply weights ``w`` (S, *W) and biases ``b`` (S, O) to the S blocks of ``x`` (S*B, ...)."""
        ...

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of flipout's input and output sign tensors (broadcastable to x and y)."""
        ...


def rademacher(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Independent random signs (+1/-1) of the given shape, dtype and device of ``like``.

    Drawn 63 per generator call from random bits (:func:`bbb.nn.noise.rademacher`): ~40x
    cheaper on CPU than ``torch.randint(0, 2, ...)``, which made flipout's signs cost more than
    its matrix products (issue 8).
    """
    return _noise.rademacher(shape, like)


def reparam(
    ops: LayerOps,
    x: Tensor,
    post: Posterior,
    eps_w: Tensor,
    eps_b: Tensor | None,
    w1: Tensor | None = None,
    b1: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weight-space sampling. ``eps_w``: (S, *W), ``eps_b``: (S, O) standard normal noise.

    Returns ``(y, w, b)``: the output (N, O, ...) and the sampled weights (S, *W) and biases
    (S, O), kept for a Monte Carlo KL from the same sample. ``w1``: the weight sample
    ``mu + sigma * eps_w[0]`` already built (S = 1; :func:`bbb.kernels.sample_and_kl`), in
    which case ``post.w_sigma`` is not used; ``b1`` likewise for the bias (``post.b_sigma``
    then not used). ``w1`` and ``b1`` shaped like ``eps_w`` and ``eps_b`` are all S samples.
    """
    num_samples = eps_w.shape[0]
    if w1 is not None and w1.dim() == eps_w.dim():
        # several samples already built, (S, *W) and (S, O) (bbb.kernels.native_sample_and_kl)
        return ops.op_batched(x, w1, b1, num_samples), w1, b1
    if num_samples == 1 or w1 is not None:
        # One sample: build the W-shaped weight from eps_w[0] (the noise needs no gradient) and
        # hand the (1, *W) view back. Broadcasting mu (W) against eps (1, *W) and selecting
        # w[0] for the op made autograd zero-fill and reduce three full weight-sized tensors per
        # layer in the backward (select_backward, and the sum of addcmul's broadcast gradient
        # for mu and sigma): a reparam step at H = 1200 took 5% less time without (issue 8).
        if w1 is None:
            w1 = torch.addcmul(post.w_mu, post.w_sigma, eps_w[0])
        if b1 is None and post.b_mu is not None and eps_b is not None:
            assert post.b_sigma is not None
            b1 = torch.addcmul(post.b_mu, post.b_sigma, eps_b[0])
        return ops.op(x, w1, b1), w1.unsqueeze(0), None if b1 is None else b1.unsqueeze(0)
    w = torch.addcmul(post.w_mu, post.w_sigma, eps_w)
    b = None
    if post.b_mu is not None and eps_b is not None:
        assert post.b_sigma is not None
        b = torch.addcmul(post.b_mu, post.b_sigma, eps_b)
    return ops.op_batched(x, w, b, num_samples), w, b


def _min_variance(dtype: torch.dtype) -> float:
    # the smallest normal number: sqrt stays finite with a finite gradient, and no variance a
    # network can have is distorted (a floor of 1e-16 turned sigma ~ 5e-10 into 1e-8)
    return torch.finfo(dtype).tiny


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` (False for a device type autocast does
    not know, such as ``meta``, for which torch raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _float16_variance(x: Tensor) -> bool:
    """Whether local's variance path ``op(x^2, sigma^2)`` would run in float16: a float16
    input, or a float32 one under an autocast to float16 (float64 is not cast by autocast)."""
    if x.dtype == torch.float16:
        return True
    dev = x.device.type
    return (
        x.dtype == torch.float32
        and _autocast_on(dev)
        and torch.get_autocast_dtype(dev) == torch.float16
    )


def _std(var: Tensor) -> Tensor:
    """sqrt(var) where var > 0, 0 where var <= 0, NaN where var is NaN; the clamp keeps the
    square root's gradient finite and passes none below the floor (see :func:`local`).

    A NaN variance (a NaN sigma: a diverged parameter) stays NaN, as it does in the other
    estimators' outputs; ``where(var > 0, ...)`` had turned it into 0, a finite output
    equal to the mean, so a broken layer predicted with no uncertainty and no sign of error.
    """
    return torch.where(var <= 0, 0.0, var.clamp_min(_min_variance(var.dtype)).sqrt())


def local(
    ops: LayerOps,
    x: Tensor,
    post: Posterior,
    w_var: Tensor | None = None,
    b_var: Tensor | None = None,
) -> Tensor:
    """Local reparameterisation: independent Gaussian pre-activations per row and output.

    ``w_var``: the weights' variance ``sigma^2`` already computed (shape W;
    :func:`bbb.kernels.sample_and_kl`), in which case ``post.w_sigma`` is not used; ``b_var``
    likewise for the bias (``post.b_sigma`` then not used). The variance is floored at the
    smallest normal number of the dtype before the square root, so an all-zero input row with
    ``bias=False`` gives a noise-free output without a NaN gradient (the floor passes no
    gradient). For a float16 input (or a float32 one under an autocast to float16) the
    variance ``op(x^2, sigma^2)`` and its square root are computed in float32 and the standard
    deviation cast back: in float16, an input above 256 made it overflow, a sigma below
    2.4e-4 underflow, and the floor (6.1e-5) raised every smaller variance to it.
    """
    # S identical blocks of input rows (bbb.nn.stacking.repeat_samples: a multi-sample pass
    # straight into this layer): the pre-activations' mean and variance are computed on one
    # block and shared; each block still gets its own noise, so the output is distributed
    # exactly as before (S times fewer matrix products for this layer).
    s = identical_blocks(x)
    if s > 1:
        x = x[: x.shape[0] // s]
    mean = ops.op(x, post.w_mu, post.b_mu)
    if _float16_variance(x):
        # A float16 sum of squares overflows for an input above 256 (the output was +-inf
        # where the other estimators' was finite) and sigma^2 underflows below sigma = 2.4e-4
        # (no noise at all): the variance path in float32, as autocast does for its own sums
        # of squares (pow, norm, layer_norm), then the standard deviation cast back.
        dev = x.device.type
        off = torch.autocast(dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext()
        with off:
            x32 = x.float()
            w32 = post.w_sigma.float().square() if w_var is None else w_var.float()
            b32 = None
            if b_var is not None:
                b32 = b_var.float()
            elif post.b_sigma is not None:
                b32 = post.b_sigma.float().square()
            var = ops.op(x32 * x32, w32, b32)
        std = _std(var).to(mean.dtype)
    else:
        if b_var is None and post.b_sigma is not None:
            b_var = post.b_sigma * post.b_sigma
        var = ops.op(x * x, post.w_sigma * post.w_sigma if w_var is None else w_var, b_var)
        # Zero variance (a fully pruned unit, an all-zero input with bias=False) gives exactly
        # the mean; the clamp keeps the square root's gradient finite and passes none below
        # the floor.
        std = _std(var)
    # bbb.nn.noise.randn: multi-threaded on CPU for large outputs (conv feature maps)
    if s == 1:
        noise = _noise.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        return torch.addcmul(mean, std, noise)
    noise = _noise.randn((s, *mean.shape), dtype=mean.dtype, device=mean.device)
    return torch.addcmul(mean, std, noise).reshape(s * mean.shape[0], *mean.shape[1:])


def flipout(
    ops: LayerOps,
    x: Tensor,
    post: Posterior,
    eps_w: Tensor,
    eps_b: Tensor | None,
    dw1: Tensor | None = None,
    db1: Tensor | None = None,
) -> Tensor:
    """Flipout. ``eps_w``: (S, *W) shared perturbation noise, ``eps_b``: (S, O).

    ``y = op(x, mu_w, mu_b) + op_S(x * s_in, sigma_w * eps_w, sigma_b * eps_b) * s_out`` with
    independent random signs per example and feature/channel, shared by the positions of an
    example (conv maps, sequence positions). Each example's outputs have exactly the joint
    distribution of weight-space sampling; examples are decorrelated by the signs.
    The underlying weight sample is ``w = mu + sigma * eps_w``: a Monte Carlo KL uses it.
    ``dw1``: the perturbation ``sigma * eps_w[0]`` already built (S = 1;
    :func:`bbb.kernels.sample_and_kl`), in which case ``post.w_sigma`` is not used; ``db1``
    likewise for the bias (``post.b_sigma`` then not used).
    """
    num_samples = eps_w.shape[0]
    # k identical blocks of input rows (bbb.nn.stacking): the mean path is computed on one
    # block and shared, as in `local`; the perturbation path differs per row and sample.
    k = identical_blocks(x)
    mean = ops.op(x[: x.shape[0] // k] if k > 1 else x, post.w_mu, post.b_mu)
    # One sample: a W-shaped perturbation given to the plain op (selecting from a (1, *W)
    # tensor costs a zero-filled weight-sized gradient in the backward; see reparam).
    one = num_samples == 1
    # dw1 / db1: W-shaped (one sample) or (S, *W) / (S, O) (bbb.kernels.native_sample_and_kl)
    dw = dw1 if dw1 is not None else post.w_sigma * (eps_w[0] if one else eps_w)
    db = db1
    if db is None and post.b_sigma is not None and eps_b is not None:
        db = post.b_sigma * (eps_b[0] if one else eps_b)
    y_shape = mean.shape if k == 1 else torch.Size((x.shape[0], *mean.shape[1:]))
    s_in_shape, s_out_shape = ops.sign_shapes(x, y_shape)
    xs = x * rademacher(s_in_shape, x)
    pert = ops.op(xs, dw, db) if one else ops.op_batched(xs, dw, db, num_samples)
    signs = rademacher(s_out_shape, pert)
    if k == 1:
        return torch.addcmul(mean, pert, signs)
    blocks = (k, mean.shape[0])
    out = torch.addcmul(
        mean, pert.reshape(*blocks, *pert.shape[1:]), signs.reshape(*blocks, *signs.shape[1:])
    )
    return out.reshape(y_shape)
