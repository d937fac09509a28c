"""``BayesLinear``: a fully connected layer with a factorised Gaussian posterior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..priors import Prior
from .module import BayesModule, positive_int
from .stacking import identical_blocks

__all__ = ["BayesLinear"]


class BayesLinear(BayesModule):
    """Bayesian ``nn.Linear``: ``y = x W^T + b`` with W ~ N(weight_mu, softplus(weight_rho)^2).

    Args:
        in_features, out_features, bias: as ``torch.nn.Linear``.
        prior: a :class:`bbb.GaussianPrior`, :class:`bbb.ScaleMixturePrior` or
            :class:`bbb.LaplacePrior` (default ``GaussianPrior(1.0)``).
        estimator: ``"reparam"`` (weight-space sampling, the paper's algorithm), ``"local"``
            (local reparameterisation: exact for (N, in) inputs, lowest variance) or
            ``"flipout"``. For (N, *, in) inputs (sequences, tokens) ``"reparam"`` and
            ``"flipout"`` give each example one weight sample shared by its positions;
            ``"local"`` draws independent noise per position, which matches each output's mean
            and variance but not the correlation between positions of one example (an
            approximation there, as for convolutions).
        kl: ``"auto"`` (closed form when the prior has one, else Monte Carlo),
            ``"closed_form"`` or ``"mc"``. See :meth:`BayesModule.kl` for how the weight sample of
            the Monte Carlo KL is obtained for each estimator.
        mu_init: ``"paper"`` (default here: mu ~ U(-0.2, 0.2)), ``"fan_in"``
            (U(-1/sqrt(in), 1/sqrt(in)), like ``nn.Linear``) or a ``(low, high)`` range.
            :meth:`reset_parameters` without arguments re-applies it.
        rho_init: constant or ``(low, high)`` uniform range for rho (default (-5, -4)).

    Shapes: input (N, *, in_features) -> output (N, *, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        prior: Prior | None = None,
        estimator: str = "reparam",
        kl: str = "auto",
        mu_init: str | tuple[float, float] = "paper",
        rho_init: float | tuple[float, float] = (-5.0, -4.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_features = positive_int("BayesLinear", "in_features", in_features)
        out_features = positive_int("BayesLinear", "out_features", out_features)
        self.in_features = in_features
        self.out_features = out_features
        self._init_posterior(
            (out_features, in_features),
            bias,
            prior=prior,
            estimator=estimator,
            kl=kl,
            mu_init=mu_init,
            rho_init=rho_init,
            fan_in=in_features,
            device=device,
            dtype=dtype,
        )

    def _check_input(self, x: Tensor) -> None:
        s = self.num_samples
        n = self.in_features
        if x.dim() == 1 and s > 1:
            # nn.Linear's unbatched (in,) has no dimension to stack the S samples along
            # (bbb.predict on such an input repeats it into (S * in,))
            # the user's vector: one block of repeat_samples' S copies (bbb.predict, bbb.ELBO),
            # else the tensor as received
            per = x.shape[0] // s if identical_blocks(x) == s else x.shape[0]
            given = f" (your input: {(per,)})" if per != x.shape[0] else ""
            raise ValueError(
                f"{type(self).__name__}: a 1-D (unbatched) input cannot hold the {s} Monte "
                "Carlo samples of bbb.vectorized_samples (used by bbb.predict and bbb.ELBO), "
                f"which are stacked along dim 0 (received {tuple(x.shape)}){given}; "
                + self._one_d_advice(per)
            )
        if x.dim() == 1 and x.shape[0] != n:
            raise self._shape_error(
                x,
                f"(N, ..., {n})",
                f"the last dimension must be in_features={n}, got {x.shape[0]}; "
                + self._one_d_advice(x.shape[0]),
            )
        if x.dim() < 1 or x.shape[-1] != n:
            problem = (
                "a 0-d input has no feature dimension"
                if x.dim() < 1
                else f"the last dimension must be in_features={n}, got {x.shape[-1]}"
            )
            raise self._shape_error(x, f"(N, ..., {n})", problem)

    def _one_d_advice(self, length: int) -> str:
        """How to shape a 1-D input of ``length`` values for this layer."""
        n = self.in_features
        if n == 1:
            # 1-D regression: a vector of N scalar inputs is N examples of one feature
            return "for N examples of one feature give shape (N, 1): x.unsqueeze(-1)"
        if length == n:
            return f"for one example of {n} features give shape (1, {n}): x.unsqueeze(0)"
        return (
            f"give shape (N, {n}): x.unsqueeze(0) for one example of {n} features, "
            f"x.reshape(-1, {n}) for N examples"
        )

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        # x: (S*B, *, in) -> (S, B*, in); w: (S, out, in); b: (S, out)
        lead = x.shape[:-1]
        xs = x.reshape(num_samples, -1, self.in_features)
        wt = w.transpose(1, 2)
        y = torch.bmm(xs, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xs, wt)
        return y.reshape(*lead, self.out_features)

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        # One sign per example and feature. For (N, *, in) inputs the positions of an example
        # share its signs (they share its weight sample): each example's outputs then have
        # exactly the joint distribution of weight-space sampling, as for convolutions.
        if x.dim() == 1:  # an unbatched input (in,), as nn.Linear takes: one example
            return (x.shape[0],), (y_shape[0],)
        ones = (1,) * (x.dim() - 2)
        return (x.shape[0], *ones, x.shape[-1]), (y_shape[0], *ones, y_shape[-1])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias_mu is not None}, " + super().extra_repr()
        )
