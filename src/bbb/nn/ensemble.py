"""``BayesLinearEnsemble``: K independent Bayesian linear layers evaluated as one batched op.

Used to advance many independent networks (agents x seeds in the bandit experiment) in one
tensor operation: the weight has a leading member dimension (K, out, in) and the input is
(K, N, in). Every estimator, prior, KL mode and sampling mode of :class:`BayesModule` applies
unchanged, because the estimators are written over ``op`` (here a batched matrix product), and
members share nothing: the KL is the sum of the members' KLs, and the gradient of a sum of
per-member losses reaches each member's parameters only from its own loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..priors import Prior
from .module import BayesModule, _Record, check_flag, positive_int
from .stacking import identical_blocks

__all__ = ["BayesLinearEnsemble"]


class BayesLinearEnsemble(BayesModule):
    """K independent ``BayesLinear(in_features, out_features)`` layers.

    Shapes: input (K, N, in_features) -> output (K, N, out_features); inside
    :func:`bbb.vectorized_samples` with S samples the input is (S * K, N, in_features), the S
    blocks of K members stacked in front.

    Args:
        members: K, the number of independent members.
        in_features, out_features, bias, prior, estimator, kl, rho_init, device, dtype: as
            :class:`bbb.BayesLinear`.
        mu_init: as :class:`bbb.BayesLinear`, but the default here is ``"fan_in"``
            (mu ~ U(-1/sqrt(in_features), 1/sqrt(in_features))), not ``"paper"``: the bandit
            experiment's networks (:func:`bbb.bandit.ensemble_mlp`) are built with it.
            :meth:`reset_parameters` without arguments re-applies it.
    """

    def __init__(
        self,
        members: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        prior: Prior | None = None,
        estimator: str = "reparam",
        kl: str = "auto",
        mu_init: str | tuple[float, float] = "fan_in",
        rho_init: float | tuple[float, float] = (-5.0, -4.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        members = positive_int("BayesLinearEnsemble", "members", members)
        in_features = positive_int("BayesLinearEnsemble", "in_features", in_features)
        out_features = positive_int("BayesLinearEnsemble", "out_features", out_features)
        # a truthy string ("no", "False") gave the members a bias silently
        bias = check_flag("BayesLinearEnsemble", "bias", bias)
        self.members = members
        self.in_features = in_features
        self.out_features = out_features
        self._init_posterior(
            (members, out_features, in_features),
            False,
            prior=prior,
            estimator=estimator,
            kl=kl,
            mu_init=mu_init,
            rho_init=rho_init,
            fan_in=in_features,
            device=device,
            dtype=dtype,
        )
        # The bias of member k is a (K, out) tensor: built here rather than by the base class
        # (whose bias is (out,)), with the same initialisation. This initialises the weights a
        # second time, and _noise below draws an (S, K) bias noise it replaces: both draws are
        # kept on purpose, so that every documented bandit run (docs/RESULTS.md, README's
        # excerpt) is reproduced bit for bit by its command (tests/test_review_s23_misc.py).
        if bias:
            self.bias_mu = torch.nn.Parameter(
                torch.empty(members, out_features, device=device, dtype=dtype)
            )
            self.bias_rho = torch.nn.Parameter(
                torch.empty(members, out_features, device=device, dtype=dtype)
            )
            self.reset_parameters()  # the constructor's mu_init and rho_init

    def _noise(self, num_samples: int, like: Tensor) -> _Record:
        record = super()._noise(num_samples, like)
        if self.bias_mu is not None:
            record.eps_b = torch.randn(
                (num_samples, *self.bias_mu.shape), dtype=like.dtype, device=like.device
            )
        return record

    def forward(self, x: Tensor) -> Tensor:
        """Apply the K members to ``x`` (K, N, in_features) -> (K, N, out_features); inside
        :func:`bbb.vectorized_samples` with S samples, (S * K, N, in) -> (S * K, N, out).

        Input rows are members: S identical blocks of rows (:func:`bbb.nn.repeat_samples`)
        let the local and flipout estimators compute the mean path once per block only when
        each block holds whole sets of K members. Blocks that split the members (one
        member's input repeated for all K, ``repeat_samples(x[:1], K)``) are applied row by
        row as any input: the shared path failed in torch's reshape
        ("shape '[0, K, N, in]' is invalid")."""
        blocks = identical_blocks(x)
        if blocks > 1 and (x.shape[0] // blocks) % self.members:
            x = x.view_as(x)  # the same rows, without repeat_samples' mark
        return super().forward(x)

    def _check_input(self, x: Tensor) -> None:
        s, k, n = self.num_samples, self.members, self.in_features
        if x.dim() != 3 or x.shape[-1] != n or x.shape[0] != s * k:
            if x.dim() != 3:
                problem = f"a 3-D input (members, N, in_features) is needed, got {x.dim()}-D"
            elif x.shape[0] != s * k:
                rows = x.shape[0] // s if x.shape[0] % s == 0 else x.shape[0]
                problem = f"dimension 0 must be members={k}, got {rows}"
                if s > 1 and x.shape[0] % s != 0:
                    problem = f"dimension 0 must be {s} x members = {s * k}, got {x.shape[0]}"
            else:
                problem = f"the last dimension must be in_features={n}, got {x.shape[-1]}"
            raise self._shape_error(x, f"({k}, N, {n})", problem)

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        # x: (K, N, in) or, with S stacked samples sharing these weights (the mean network,
        # the mean part of local and flipout), (S * K, N, in); w: (K, out, in), b: (K, out)
        k = w.shape[0]
        if x.shape[0] != k:
            s = x.shape[0] // k
            y = torch.matmul(x.reshape(s, k, *x.shape[1:]), w.transpose(1, 2))
            if b is not None:
                y = y + b.unsqueeze(1)
            return y.reshape(s * k, *y.shape[2:])
        wt = w.transpose(1, 2)
        if b is None:
            return torch.bmm(x, wt)
        return torch.baddbmm(b.unsqueeze(1), x, wt)

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        # x: (S*K, N, in), w: (S, K, out, in), b: (S, K, out): fold S into the member dimension
        sk = num_samples * self.members
        wf = w.reshape(sk, self.out_features, self.in_features)
        bf = None if b is None else b.reshape(sk, self.out_features)
        return self.op(x, wf, bf)

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(x.shape), tuple(y_shape)

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias_mu is not None}, "
            + super().extra_repr()
        )
