"""``BayesEmbedding``: a lookup table with a factorised Gaussian posterior over its rows.

The Bayesian counterpart of ``torch.nn.Embedding``: the table ``W`` (num_embeddings,
embedding_dim) has the posterior N(weight_mu, softplus(weight_rho)^2), and a lookup of index
``i`` returns a sample of row ``W[i]``. A lookup is the linear map of a one-hot input
(``one_hot(i) @ W = W[i]``), so the three gradient estimators of :mod:`bbb.nn.estimators` have
an exact meaning here (see :class:`BayesEmbedding`), and the layer runs through the same
machinery as the other Bayesian layers: sampling modes, several Monte Carlo samples in one
vectorized pass, every prior and KL mode, pruning and compact export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..priors import Prior
from .module import (
    BayesModule,
    _is_int,
    _is_real,
    check_flag,
    check_float_dtype,
    positive_int,
)
from .stacking import identical_blocks, repeat_samples

__all__ = ["BayesEmbedding", "INDEX_DTYPES"]

INDEX_DTYPES = (torch.int64, torch.int32)
"""The index dtypes :class:`BayesEmbedding` accepts (those ``torch.nn.Embedding`` accepts)."""

_functorch = torch._C._functorch


def _unwrapped(t: Tensor) -> Tensor:
    """``t`` without the wrappers of ``torch.func`` transforms (vmap's batched tensors, grad's
    wrappers), whose values cannot be read as Python numbers; ``t`` itself otherwise."""
    while _functorch.is_functorch_wrapped_tensor(t) or _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return t


class BayesEmbedding(BayesModule):
    """Bayesian ``nn.Embedding``: ``y = W[input]`` with W ~ N(weight_mu, softplus(weight_rho)^2).

    Args:
        num_embeddings: the size of the table (vocabulary), a positive integer.
        embedding_dim: the size of each row, a positive integer.
        padding_idx: ``None`` or an index in ``[-num_embeddings, num_embeddings)`` (a negative
            one counts from the end, as in ``nn.Embedding``). As in ``nn.Embedding`` the
            padding row's output is zero and it gets no gradient from the data; here its
            output is exactly zero in every mode and for every estimator (not a sample of a
            row whose mean is zero), its ``weight_mu`` row starts at zero, and the row is
            left out of the KL: its posterior receives no gradient at all and stays as
            initialised (a weight that is never used has nothing to learn). Pruning
            (:func:`bbb.prune_by_snr`) sees its SNR as 0 and removes it first, which
            changes no output.
        max_norm: must be ``None``. ``nn.Embedding`` renormalises the looked-up rows of its
            weight in place to norm ``max_norm``; a posterior has no single weight to
            renormalise (renormalising ``weight_mu`` leaves samples above the bound,
            renormalising each sample changes the distribution that the KL is computed
            for), so it is refused rather than approximated.
        norm_type: the p of ``max_norm``'s p-norm; a finite number above 0 (default 2.0),
            accepted for ``nn.Embedding``'s signature and unused (``max_norm`` is ``None``).
        scale_grad_by_freq: as ``nn.Embedding``: the data term's gradient of each row is
            divided by the number of times the row is looked up in the batch (in each Monte
            Carlo sample's block, inside :func:`bbb.vectorized_samples`). The KL term's
            gradient is not scaled.
        sparse: must be ``False``: the KL term's gradient reaches every row of ``weight_mu``
            and ``weight_rho`` at every step, so the gradients are dense whatever the lookups.
        prior: a :class:`bbb.GaussianPrior`, :class:`bbb.ScaleMixturePrior` or
            :class:`bbb.LaplacePrior` (default ``GaussianPrior(1.0)``).
        estimator: how a sampling forward pass draws its rows:

            - ``"reparam"`` (default; weight-space sampling, the paper's algorithm): one
              sample ``W = mu + sigma * eps`` of the whole table per pass (per Monte Carlo
              sample inside :func:`bbb.vectorized_samples`); every lookup of a row in that
              pass returns the same sampled row. Draws num_embeddings x embedding_dim
              normals per sample, whatever the number of lookups.
            - ``"local"`` (local reparameterisation): every lookup gets its own noise,
              ``mu[i] + sigma[i] * eps`` with a fresh ``eps`` per lookup. For a one-hot input
              the pre-activation ``one_hot(i) @ W`` is the row ``W[i]``, whose mean is
              ``mu[i]`` and variance ``sigma[i]^2``: local reparameterisation samples exactly
              that, independently per lookup. Each lookup's marginal is exact; what it drops
              is the dependence between lookups of the same row that one table sample implies
              (two lookups of row i, in one sequence or in two examples, are independent here,
              identical under ``"reparam"``), as for :class:`bbb.BayesLinear` on (N, *, in)
              inputs. The cheapest in noise: embedding_dim normals per lookup, none for rows
              that are not looked up.
            - ``"flipout"``: flipout's perturbation ``(x * s_in) @ dW * s_out`` for a one-hot
              ``x`` of index i is ``s_in[i] * dW[i] * s_out``: the input-side sign is one
              scalar per lookup and folds into the output-side signs. So a lookup returns
              ``mu[i] + (sigma[i] * eps[i]) * r`` with ``eps`` one table sample per pass (as
              reparam) and ``r`` independent random signs per example (dim 0 of the input)
              and embedding coordinate, shared by the positions of one example. Each
              example's lookups have exactly the joint distribution of weight-space sampling;
              two examples that look up the same row get perturbations that are uncorrelated
              (not independent: equal magnitudes, independent signs).

        kl: ``"auto"`` (closed form when the prior has one, else Monte Carlo),
            ``"closed_form"`` or ``"mc"``: the KL of the whole table (every row, looked up
            or not; the padding row excluded), see :meth:`BayesModule.kl`.
        mu_init: ``"paper"`` (default: mu ~ U(-0.2, 0.2)), ``"fan_in"`` (U(-1, 1): a one-hot
            input has one active input) or a ``(low, high)`` range.
        rho_init: constant or ``(low, high)`` uniform range for rho (default (-5, -4): sigma
            of 0.007-0.018).
        device, dtype: of the parameters (a floating dtype).

    Shapes: input (*) of integer indices (``torch.long`` or ``torch.int``) in
    ``[0, num_embeddings)`` -> output (*, embedding_dim), in the parameters' dtype. A float
    input, another integer dtype, or an index out of range is a ``ValueError`` (checked at
    every call outside ``torch.compile``; a compiled model leaves it to ``F.embedding``).
    Inside :func:`bbb.vectorized_samples` (``bbb.ELBO``, ``bbb.predict``) dim 0 holds the S
    stacked copies of the batch, so a 0-d input is refused there. For the same reason a
    table looked up with indices that are not per example (positions: ``torch.arange(L)``)
    must be given them per row of the batch it joins, ``torch.arange(L).expand(x.shape[0],
    L)`` for a batch ``x`` of token indices: a plain (L,) input is read as L rows of S
    stacked copies (refused when S does not divide L; otherwise every copy gets the same
    positional rows, so the S samples share them and ``bbb.predict``'s spread omits their
    uncertainty).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
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
        num_embeddings = positive_int("BayesEmbedding", "num_embeddings", num_embeddings)
        embedding_dim = positive_int("BayesEmbedding", "embedding_dim", embedding_dim)
        if padding_idx is not None:
            if not _is_int(padding_idx):
                raise ValueError(
                    "BayesEmbedding padding_idx must be None or an integer in "
                    f"[-{num_embeddings}, {num_embeddings}), got {padding_idx!r}"
                )
            p = int(padding_idx)
            if not -num_embeddings <= p < num_embeddings:
                raise ValueError(
                    "BayesEmbedding padding_idx must be None or an integer in "
                    f"[-{num_embeddings}, {num_embeddings}) (num_embeddings={num_embeddings}), "
                    f"got {padding_idx!r}"
                )
            padding_idx = p + num_embeddings if p < 0 else p
        if max_norm is not None:
            raise ValueError(
                f"BayesEmbedding does not support max_norm (got {max_norm!r}); accepted value: "
                "None. nn.Embedding renormalises the looked-up rows of its weight in place; a "
                "posterior has no single weight to renormalise (renormalising weight_mu leaves "
                "samples above the bound, renormalising each sample changes the distribution "
                "the KL is computed for)"
            )
        if not _is_real(norm_type) or not 0 < float(norm_type) < float("inf"):
            raise ValueError(
                f"BayesEmbedding norm_type must be a finite number above 0, got {norm_type!r}"
            )
        scale_grad_by_freq = check_flag("BayesEmbedding", "scale_grad_by_freq", scale_grad_by_freq)
        if check_flag("BayesEmbedding", "sparse", sparse):
            raise ValueError(
                f"BayesEmbedding does not support sparse={sparse!r}; accepted value: False. The "
                "KL term's gradient reaches every row of weight_mu and weight_rho at every "
                "step, so the gradients are dense whatever the lookups"
            )
        check_float_dtype("BayesEmbedding", dtype, " (the parameters'; the indices are integers)")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx: int | None = padding_idx
        self.max_norm = None
        self.norm_type = float(norm_type)
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = False
        # the indices of the forward pass in progress, read by op / op_batched (the base
        # class's forward hands the estimators a carrier tensor of the indices' shape)
        self._indices: Tensor | None = None
        self._init_posterior(
            (num_embeddings, embedding_dim),
            False,
            prior=prior,
            estimator=estimator,
            kl=kl,
            mu_init=mu_init,
            rho_init=rho_init,
            fan_in=1,
            device=device,
            dtype=dtype,
        )

    # ----------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(
        self,
        mu_init: str | tuple[float, float] | None = None,
        rho_init: float | tuple[float, float] | None = None,
    ) -> None:
        """Initialise mu and rho as :meth:`BayesModule.reset_parameters` does, then set the
        padding row's ``weight_mu`` to zero (as ``nn.Embedding`` zeroes its padding row)."""
        super().reset_parameters(mu_init, rho_init)
        if self.padding_idx is not None:
            self.weight_mu[self.padding_idx].zero_()

    # ----------------------------------------------------------------- input
    def _checked_indices(self, input: Tensor) -> Tensor:
        """``input`` if it is a tensor of valid indices, else a ValueError saying what is
        wrong and how to fix it."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise ValueError(
                f"{name} expected a tensor of integer indices (torch.long or torch.int), got "
                f"{type(input).__name__}; use torch.as_tensor(indices, dtype=torch.long)"
            )
        if input.dtype not in INDEX_DTYPES:
            hint = (
                "; indices given as floats: round and convert them (x.long())"
                if input.is_floating_point()
                else "; convert them (x.long())"
            )
            raise ValueError(
                f"{name} expected integer indices of dtype torch.int64 (long) or torch.int32, "
                f"got {input.dtype}{hint}"
            )
        s = self.num_samples
        if input.dim() == 0 and s > 1:
            raise ValueError(
                f"{name}: a 0-d input (one index) cannot hold the {s} Monte Carlo samples of "
                "bbb.vectorized_samples (used by bbb.predict and bbb.ELBO), which are stacked "
                "along dim 0; give shape (1,) for one index: x.reshape(1)"
            )
        if (
            input.numel() > 0
            and not input.is_meta
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
        ):
            # under torch.func transforms (vmap) the indices are wrapped, and reading a
            # number from a wrapped tensor is refused ("calling .item() on a Tensor"): the
            # check reads the plain tensor underneath, which holds every index of the batch
            low, high = torch.aminmax(_unwrapped(input))
            lo, hi = int(low), int(high)
            if lo < 0 or hi >= self.num_embeddings:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name} got index {bad}, outside [0, {self.num_embeddings}) "
                    f"(num_embeddings={self.num_embeddings}; indices range from {lo} to {hi})"
                )
        return input

    def _check_input(self, x: Tensor) -> None:
        # the base class's forward checks the carrier (see forward): the indices themselves
        # were checked by _checked_indices
        pass

    # ----------------------------------------------------------------- forward
    def forward(self, input: Tensor) -> Tensor:
        """Look up ``input`` (*, integer indices): the sampled rows, (*, embedding_dim).

        Inside :func:`bbb.vectorized_samples` the input is the S stacked copies (S * B, ...)
        (or the B inputs themselves with its ``batch_size=B``: the copies are made here).
        """
        idx = self._checked_indices(input)
        rows, s = self._prefix_rows, self.num_samples
        if rows is not None and s > 1 and idx.dim() >= 1 and idx.shape[0] == rows:
            # vectorized_samples(..., batch_size=B) called on the B inputs: the S copies
            # start here (the base class would repeat the carrier, not the indices)
            idx = repeat_samples(idx, s)
            if self._prefix_copied is not None:
                self._prefix_copied[0] = True
        # The base class's forward (sampling modes, frozen samples, estimators, fused
        # kernels, the record for kl()) runs on a carrier: a tensor of the indices' shape in
        # the parameters' dtype, marked as identical blocks when the indices are. The ops
        # below read the indices themselves: the estimators' op(x, w) is the lookup w[idx],
        # which is what x @ w computes for the one-hot rows of idx (and op(x^2, sigma^2),
        # local reparameterisation's variance, is sigma[idx]^2).
        w = self.weight_mu
        carrier = torch.zeros((), dtype=w.dtype, device=w.device).expand(idx.shape)
        k = identical_blocks(idx)
        if k > 1:
            carrier = repeat_samples(carrier[: idx.shape[0] // k], k)
        self._indices = idx
        try:
            out = super().forward(carrier)
        finally:
            self._indices = None
        if self.padding_idx is not None:
            out = out.masked_fill((idx == self.padding_idx).unsqueeze(-1), 0.0)
        return out

    def _lookup(self, x: Tensor) -> Tensor:
        """The indices that the carrier ``x`` stands for: all of them, or the first block of
        identical ones (the estimators compute what the blocks share on ``x[:N // k]``)."""
        idx = self._indices
        if idx is None:
            raise RuntimeError(
                f"{type(self).__name__}.op is called by its forward pass only (it reads the "
                "indices of the pass in progress); call the layer on integer indices"
            )
        if x.dim() >= 1 and x.shape[0] != idx.shape[0]:
            idx = idx[: x.shape[0]]
        return idx

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The rows of ``w`` (num_embeddings, embedding_dim) at this pass's indices (the
        carrier ``x`` gives their number); ``b`` is always None (no bias)."""
        idx = self._lookup(x)
        blocks = self._sample_blocks(idx)
        if blocks > 1:
            # one table w for several Monte Carlo samples' blocks of rows (the mean path of
            # local and flipout, or the mean mode, inside vectorized_samples on copies that
            # are not marked identical): scale_grad_by_freq counts each block's lookups
            # apart, as op_batched and the one-block path do. F.embedding on all S * B rows
            # counted a row looked up once per example S times, so that path's data gradient
            # was S times smaller than on a marked input (repeat_samples) or with reparam.
            return self._lookup_blocks(idx, w.expand(blocks, *w.shape), blocks)
        return F.embedding(idx, w, scale_grad_by_freq=self.scale_grad_by_freq)

    def _sample_blocks(self, idx: Tensor) -> int:
        """How many Monte Carlo samples' blocks of rows ``idx`` (this pass's indices, or their
        first rows) spans when ``scale_grad_by_freq`` must count them apart; 1 otherwise
        (no scaling, one sample, or a 0-d input)."""
        full, s = self._indices, self.num_samples
        if not self.scale_grad_by_freq or s < 2 or full is None or idx.dim() == 0:
            return 1
        rows = full.shape[0] // s  # rows per sample (forward checked that S divides them)
        if rows == 0 or idx.shape[0] % rows:
            return 1
        return idx.shape[0] // rows

    def _lookup_blocks(self, idx: Tensor, w: Tensor, blocks: int) -> Tensor:
        """Block j of ``idx`` (blocks * B, *) looked up in table ``w[j]`` (w: (blocks,
        num_embeddings, embedding_dim)), with ``scale_grad_by_freq`` counting each block's
        lookups: (blocks * B, *, embedding_dim)."""
        v = self.num_embeddings
        flat = idx.reshape(blocks, -1)
        offset = torch.arange(blocks, device=idx.device, dtype=idx.dtype).unsqueeze(1) * v
        rows = F.embedding(
            flat + offset,
            w.reshape(blocks * v, w.shape[-1]),
            scale_grad_by_freq=self.scale_grad_by_freq,
        )
        return rows.reshape(*idx.shape, w.shape[-1])

    def op_batched(self, x: Tensor, w: Tensor, b: Tensor | None, num_samples: int) -> Tensor:
        """The S blocks of this pass's indices (S * B, *) looked up in the S tables of ``w``
        (S, num_embeddings, embedding_dim): (S * B, *, embedding_dim)."""
        return self._lookup_blocks(self._lookup(x), w, num_samples)

    def sign_shapes(
        self, x: Tensor, y_shape: torch.Size
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Flipout's signs: one per example (dim 0) on the input side (it folds into the
        output side's, see the class docstring) and one per example and embedding
        coordinate on the output side, shared by the positions of an example."""
        if x.dim() == 0:  # a single index: one example
            return (), (y_shape[-1],)
        ones = (1,) * (x.dim() - 1)
        return (x.shape[0], *ones), (x.shape[0], *ones, y_shape[-1])

    # ----------------------------------------------------------------- KL
    def _fusable(self, mode: str, num_samples: int) -> bool:
        # the fused kernels compute the KL of every row: not with a padding row to leave out
        return self.padding_idx is None and super()._fusable(mode, num_samples)

    def kl(self) -> Tensor:
        """KL(q || p) in nats of the table for the latest forward pass (see
        :meth:`BayesModule.kl`), the padding row (if any) left out: every other row counts,
        looked up or not."""
        if self.padding_idx is None:
            return super().kl()
        saved = self.weight_mask
        keep = torch.ones_like(self.weight_mu) if saved is None else saved.clone()
        keep[self.padding_idx] = 0
        # the padding row is treated as a pruned one for this computation
        self.weight_mask = keep
        try:
            return super().kl()
        finally:
            self.weight_mask = saved

    def extra_repr(self) -> str:
        extra = ""
        if self.padding_idx is not None:
            extra += f", padding_idx={self.padding_idx}"
        if self.scale_grad_by_freq:
            extra += ", scale_grad_by_freq=True"
        return f"{self.num_embeddings}, {self.embedding_dim}{extra}, " + super().extra_repr()
