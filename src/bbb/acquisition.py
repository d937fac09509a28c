"""Acquisition functions for active learning: which unlabelled inputs to label next.

Per-input scores (larger = more worth labelling), from a :class:`bbb.ClassificationPrediction`
or a :class:`bbb.RegressionPrediction` (:func:`acquisition_scores`):

- classification (S weight samples, C classes, nats where a unit applies):

  * ``"bald"``: the mutual information I[y; w | x] = H[p(y|x)] - E_w H[p(y|x, w)] (Houlsby et
    al. 2011; Gal et al. 2017), ``ClassificationPrediction.epistemic``;
  * ``"entropy"``: the predictive entropy H[p(y|x)] (max entropy);
  * ``"variation_ratios"``: 1 - max_c p(c|x), in [0, 1 - 1/C];
  * ``"margin"``: -(p_(1) - p_(2)), minus the gap between the two largest class probabilities,
    in [-1, 0] (0: a tie between the two best classes);
  * ``"mean_std"``: the mean over classes of the standard deviation over samples of
    p_s(c|x) (population std, 1/S; Kendall et al. 2015);
  * ``"random"``: uniform [0, 1) scores (a random subset: the baseline).

- regression (D outputs; summed over D, squared output units):

  * ``"variance"``: the total predictive variance, aleatoric + epistemic;
  * ``"epistemic"``: the variance over samples of the predicted means (1/S);
  * ``"random"``.

and one joint criterion, ``"batch_bald"`` (:func:`batch_bald`; Kirsch, van Amersfoort and Gal,
NeurIPS 2019): a batch of k inputs chosen greedily to maximise the joint mutual information
I[y_1, ..., y_k; w], which does not pick the same (or a near-identical) informative input twice
as the top k BALD scores do.

:func:`select` turns scores into the k chosen indices (ties to the lowest index; NaN refused),
and :func:`acquire` scores a whole pool (a tensor or a DataLoader) in chunks through
:func:`bbb.predict` and selects from it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from .likelihoods import Categorical, Gaussian
from .nn.module import _is_int, bayes_modules, shared_weight_samples
from .predictive import ClassificationPrediction, RegressionPrediction, predict

__all__ = [
    "ACQUISITION_FUNCTIONS",
    "CLASSIFICATION_ACQUISITIONS",
    "REGRESSION_ACQUISITIONS",
    "Acquisition",
    "BatchBALD",
    "Selection",
    "acquire",
    "acquisition_scores",
    "batch_bald",
    "joint_mutual_information",
    "select",
]

#: Per-input scores for classification (:func:`acquisition_scores`).
CLASSIFICATION_ACQUISITIONS: tuple[str, ...] = (
    "bald",
    "entropy",
    "variation_ratios",
    "margin",
    "mean_std",
    "random",
)
#: Per-input scores for regression (:func:`acquisition_scores`).
REGRESSION_ACQUISITIONS: tuple[str, ...] = ("variance", "epistemic", "random")
#: Every acquisition function :func:`acquire` accepts: the per-input scores of both kinds and
#: the joint ``"batch_bald"`` (classification).
ACQUISITION_FUNCTIONS: tuple[str, ...] = (
    *CLASSIFICATION_ACQUISITIONS,
    *(m for m in REGRESSION_ACQUISITIONS if m not in CLASSIFICATION_ACQUISITIONS),
    "batch_bald",
)

# Default number of label configurations of the chosen set over which BatchBALD's joint entropy
# is summed: exactly while C^n is at most this, by Monte Carlo over this many sampled beyond.
_DEFAULT_CONFIGURATIONS = 1000
# elements of float64 per intermediate (chunk of candidates x configurations x classes)
_CHUNK_ELEMENTS = 1 << 22


def _check_method(method: object, who: str) -> str:
    if not isinstance(method, str) or method not in ACQUISITION_FUNCTIONS:
        raise ValueError(
            f"{who}: unknown acquisition function {method!r}; accepted values: "
            f"{', '.join(ACQUISITION_FUNCTIONS)}"
        )
    return method


def _check_k(k: object, n: float, who: str) -> int:
    if not _is_int(k) or int(k) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{who}: k must be a positive integer, got {k!r}")
    if int(k) > n:  # type: ignore[call-overload]
        raise ValueError(f"{who}: k = {k} exceeds the pool size {n}; ask for at most {n} inputs")
    return int(k)  # type: ignore[call-overload]


def _random_scores(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(n, generator=generator, device=device, dtype=like.dtype).to(like.device)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _at_least_float32(
    prediction: ClassificationPrediction | RegressionPrediction,
) -> ClassificationPrediction | RegressionPrediction:
    """``prediction`` with float16/bfloat16 tensors in float32 (others unchanged).

    As :func:`bbb.predict` computes low-precision models' probabilities: in float16 the
    entropy's clamp 1e-30 underflows to 0, so a confident (one-hot) input scored 0 * log 0 =
    NaN, refused by :func:`select` as a diverged model's; and 8 (bfloat16) or 11 (float16)
    bits of scores tie many inputs (about 1000 distinct bfloat16 values in [0, 1)), which
    :func:`select` breaks to the lowest index: the top ``"random"`` scores of a large pool
    were its first inputs among the tied, and the ranks of the others were coarsened.
    """

    def up(t: Tensor) -> Tensor:
        return t.float() if t.dtype in _LOW_PRECISION else t

    if isinstance(prediction, ClassificationPrediction):
        parts = (prediction.probs, prediction.sample_probs)
        if not any(t.dtype in _LOW_PRECISION for t in parts):
            return prediction
        log_probs = prediction.log_probs
        return ClassificationPrediction(
            up(parts[0]), up(parts[1]), None if log_probs is None else up(log_probs)
        )
    parts = (prediction.sample_means, prediction.sample_variances)
    if not any(t.dtype in _LOW_PRECISION for t in parts):
        return prediction
    return RegressionPrediction(up(parts[0]), up(parts[1]))


def acquisition_scores(
    prediction: ClassificationPrediction | RegressionPrediction,
    method: str,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-input acquisition scores (B,) of ``prediction`` (larger = label it first).

    Args:
        prediction: a :class:`bbb.ClassificationPrediction` (probs (B, C), sample_probs
            (S, B, C)) or a :class:`bbb.RegressionPrediction` (sample_means and
            sample_variances (S, B, D)), e.g. from :func:`bbb.predict`.
        method: one of :data:`CLASSIFICATION_ACQUISITIONS` (``"bald"``, ``"entropy"``,
            ``"variation_ratios"``, ``"margin"``, ``"mean_std"``, ``"random"``) for a
            classification prediction, or :data:`REGRESSION_ACQUISITIONS` (``"variance"``,
            ``"epistemic"``, ``"random"``) for a regression one (see the module docstring
            for the definitions and units). ``"batch_bald"`` is a joint criterion, not a
            per-input score: use :func:`batch_bald`.
        generator: the random numbers of ``"random"`` (others draw nothing).

    Returns:
        scores (B,), on the prediction's device, in its dtype, or in float32 for a float16 or
        bfloat16 prediction (computed there: in half precision a confident input's entropy
        was NaN, and many scores tied). NaN predictions give NaN scores (a diverged model);
        :func:`select` refuses them.
    """
    if isinstance(prediction, ClassificationPrediction):
        accepted, kind = CLASSIFICATION_ACQUISITIONS, "classification"
    elif isinstance(prediction, RegressionPrediction):
        accepted, kind = REGRESSION_ACQUISITIONS, "regression"
    else:
        raise TypeError(
            "acquisition_scores needs a bbb.ClassificationPrediction or a "
            f"bbb.RegressionPrediction (from bbb.predict), got {type(prediction).__name__}"
        )
    _check_method(method, "acquisition_scores")
    if method == "batch_bald":
        raise ValueError(
            "acquisition_scores: 'batch_bald' scores a batch jointly, not each input: use "
            "bbb.batch_bald(prediction, k) or bbb.acquire(model, pool, k, method='batch_bald')"
        )
    if method not in accepted:
        raise ValueError(
            f"acquisition_scores: {method!r} does not apply to a {kind} prediction; accepted "
            f"for {kind}: {', '.join(accepted)}"
        )
    prediction = _at_least_float32(prediction)
    if isinstance(prediction, ClassificationPrediction):
        probs = prediction.probs
        if method == "bald":
            return prediction.epistemic
        if method == "entropy":
            return prediction.entropy
        if method == "variation_ratios":
            return 1.0 - probs.max(-1).values
        if method == "margin":
            if probs.shape[-1] < 2:
                # (bbb.predict refuses one class; a hand-built prediction reached topk's
                # "selected index k out of range")
                raise ValueError(
                    "acquisition_scores: 'margin' is the gap between the two most probable "
                    f"classes and needs C >= 2 classes, got probs of shape {tuple(probs.shape)}; "
                    "use 'entropy' or 'bald', or give the prediction its classes"
                )
            top = probs.topk(2, dim=-1).values
            return top[:, 1] - top[:, 0]
        if method == "mean_std":
            return prediction.sample_probs.std(0, correction=0).mean(-1)
        return _random_scores(probs.shape[0], probs, generator)
    if method == "variance":
        return prediction.variance.sum(-1)
    if method == "epistemic":
        return prediction.epistemic.sum(-1)
    return _random_scores(prediction.sample_means.shape[1], prediction.sample_means, generator)


class Selection(NamedTuple):
    """The k chosen inputs: ``indices`` (k,) int64, best first, and their ``scores`` (k,)."""

    indices: Tensor
    scores: Tensor


def select(scores: Tensor, k: int) -> Selection:
    """The ``k`` inputs of largest score, best first; equal scores go to the lowest index.

    Args:
        scores: (N,) real scores (e.g. from :func:`acquisition_scores`); +-inf are ordered as
            usual, NaN is refused (a ValueError naming how many and the first index).
        k: how many to choose, 1 <= k <= N.

    Returns:
        :class:`Selection` (indices (k,) int64 into ``scores``, scores (k,)), in decreasing
        order of score: a deterministic choice (``torch.topk`` leaves the order of ties to
        the implementation).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"select: scores must be a tensor (N,), got {type(scores).__name__}")
    if scores.dim() != 1 or scores.shape[0] == 0:
        raise ValueError(
            f"select: scores must be a non-empty 1-D tensor (N,), got shape {tuple(scores.shape)}"
        )
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"select: scores must be real numbers, got {scores.dtype}")
    k = _check_k(k, scores.shape[0], "select")
    if scores.is_floating_point():
        nan = torch.isnan(scores)
        if bool(nan.any()):
            first = int(torch.nonzero(nan)[0, 0])
            raise ValueError(
                f"select: {int(nan.sum())} of {scores.shape[0]} scores are NaN (the first at "
                f"index {first}): the model's predictions are NaN there (diverged training, "
                "or NaN inputs); fix them or drop those inputs before selecting"
            )
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return Selection(order, scores[order])


# --------------------------------------------------------------------------- BatchBALD


class BatchBALD(NamedTuple):
    """The result of :func:`batch_bald`.

    ``indices`` (k,) int64: the chosen inputs, in the order picked. ``mutual_information``
    (k,) float64, nats: the joint I[y_1, ..., y_n; w] of the first n picks (non-decreasing).
    ``exact`` (k,) bool: whether pick n's joint entropy was summed over every label
    configuration (True) or estimated from sampled ones (False).
    """

    indices: Tensor
    mutual_information: Tensor
    exact: Tensor


def _sample_probs(value: object, who: str) -> Tensor:
    """``value`` (a ClassificationPrediction or (S, B, C) probabilities), checked, float64."""
    if isinstance(value, ClassificationPrediction):
        value = value.sample_probs
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{who}: needs sample_probs (S, B, C) as a tensor or a bbb.ClassificationPrediction, "
            f"got {type(value).__name__}"
        )
    if value.dim() != 3 or min(value.shape) == 0 or value.shape[2] < 2:
        raise ValueError(
            f"{who}: sample_probs must be (S, B, C) per-sample class probabilities with S, B "
            f">= 1 and C >= 2, got shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{who}: sample_probs must be floating point, got {value.dtype}")
    sp = value.detach().to(torch.float64)
    if not bool(torch.isfinite(sp).all()):
        raise ValueError(
            f"{who}: sample_probs hold NaN or Inf (a diverged model's predictions); no batch "
            "can be chosen from them"
        )
    # rows of float16/bfloat16 probabilities sum to 1 only to within their rounding (a
    # bfloat16 softmax's by up to ~1e-2; refused before as not probabilities): the tolerance
    # follows the dtype, and such rows are renormalised in float64
    tol = max(1e-3, 4 * torch.finfo(value.dtype).eps)
    sums = sp.sum(-1)
    if bool(((sp < 0) | (sp > 1.0 + tol)).any()) or not bool(
        torch.allclose(sums, torch.ones((), dtype=sp.dtype), atol=tol, rtol=0.0)
    ):
        raise ValueError(
            f"{who}: sample_probs must be probabilities in [0, 1] summing to 1 over the last "
            f"(class) dimension (to within {tol:.2g} in {value.dtype}), got sums from "
            f"{float(sums.min()):.6g} to {float(sums.max()):.6g}; for logits pass "
            "torch.softmax(logits, dim=-1)"
        )
    if value.dtype in _LOW_PRECISION:
        sp = sp / sums.unsqueeze(-1)
    return sp


def _check_configurations(num_configurations: object, who: str) -> int:
    if not _is_int(num_configurations) or int(num_configurations) < 1:  # type: ignore[call-overload]
        raise ValueError(
            f"{who}: num_configurations must be a positive integer, got {num_configurations!r}"
        )
    return int(num_configurations)  # type: ignore[call-overload]


class _Configurations:
    """The label configurations y_A of a chosen set A, for the joint entropy.

    Row k holds ``weights[k]`` (S,): the posterior over the S weight samples given y_A = y^k,
    w_k(s) = P_s(y^k) / sum_s' P_s'(y^k), and ``mass[k]``: its weight in the expectation
    over y_A (p(y^k) when every configuration is enumerated, ``exact``; 1/m for m sampled
    ones). Then H[y_A, y_i] = H[y_A] + sum_k mass_k H[r_k], r_k = sum_s w_k(s) p_s(y_i), and the
    gain of adding i, I[y_i; w | y_A] = sum_k mass_k (H[r_k] - sum_s w_k(s) H[p_s(y_i)]).
    """

    def __init__(self, num_samples: int, limit: int, generator: torch.Generator | None) -> None:
        self.weights = torch.full((1, num_samples), 1.0 / num_samples, dtype=torch.float64)
        self.mass = torch.ones(1, dtype=torch.float64)
        self.exact = True
        self.limit = limit
        self.generator = generator

    def to(self, device: torch.device) -> _Configurations:
        self.weights = self.weights.to(device)
        self.mass = self.mass.to(device)
        return self

    def gains(self, sp: Tensor, sample_entropy: Tensor) -> Tensor:
        """I[y_i; w | y_A] (B,) for every input i, from sp (S, B, C), sample_entropy (S, B)."""
        s, b, c = sp.shape
        m = self.weights.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // (m * c))
        flat = sp.reshape(s, b * c)
        out = []
        for start in range(0, b, chunk):
            stop = min(b, start + chunk)
            r = (self.weights @ flat[:, start * c : stop * c]).reshape(m, stop - start, c)
            h = -torch.special.xlogy(r, r).sum(-1)  # (m, chunk): H[r_k]
            out.append(self.mass @ h)
        expected_h = torch.cat(out)
        # sum_k mass_k sum_s w_k(s) H[p_s(y_i)] = (mass^T W) @ H_s
        expected_cond = (self.mass @ self.weights) @ sample_entropy
        return (expected_h - expected_cond).clamp_min(0.0)

    def add(self, p: Tensor) -> None:
        """Extend the configurations by the label of a chosen input, p (S, C) = p_s(y_j)."""
        m, c = self.weights.shape[0], p.shape[1]
        joint = self.weights.unsqueeze(-1) * p.unsqueeze(0)  # (m, S, C): w_k(s) p_s(c)
        r = joint.sum(1)  # (m, C): p(y_j = c | y^k)
        if self.exact and m * c <= self.limit:
            mass = (self.mass.unsqueeze(-1) * r).reshape(-1)
            weights = (joint / r.clamp_min(1e-300).unsqueeze(1)).permute(0, 2, 1)
            weights = weights.reshape(m * c, -1)
            keep = mass > 0  # configurations of probability 0 add nothing (and 0/0 weights)
            self.mass, self.weights = mass[keep], weights[keep]
            return
        if self.exact:
            # beyond the limit: ``limit`` configurations drawn from p(y_A) (the enumerated
            # ones by their probability), Monte Carlo from here on
            draw = torch.multinomial(
                self.mass.to(_gen_device(self.generator, self.mass)),
                self.limit,
                replacement=True,
                generator=self.generator,
            ).to(self.mass.device)
            joint, r = joint[draw], r[draw]
            self.exact = False
            m = self.limit
        # each sampled y^k extended by y_j ~ p(y_j | y^k) = r_k: a sample of p(y_A, y_j)
        label = torch.multinomial(
            r.to(_gen_device(self.generator, r)), 1, generator=self.generator
        ).to(r.device)
        picked = joint.gather(2, label.view(m, 1, 1).expand(m, joint.shape[1], 1)).squeeze(2)
        self.weights = picked / picked.sum(1, keepdim=True)
        self.mass = torch.full((m,), 1.0 / m, dtype=torch.float64, device=r.device)


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def _bald64(sp: Tensor) -> Tensor:
    """I[y; w | x] (B,) in float64, as ClassificationPrediction.epistemic computes it, from
    ``sp`` (S, B, C) in any floating dtype. Inputs are independent, so it runs over chunks of
    inputs of at most _CHUNK_ELEMENTS values each, and its float64 temporaries stay small
    whatever B (a pool of 50000 inputs, S = 100, C = 10 made three of 400 MB). Up to that
    size it is one pass; beyond, the numbers of one pass up to float64 rounding (a reduction
    over another layout may sum in another order)."""
    s, b, c = sp.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, s * c))
    out = []
    for i in range(0, b, step):
        p = sp[:, i : i + step].to(torch.float64)
        mean = p.mean(0)
        mi = (torch.special.xlogy(p, p) - torch.special.xlogy(p, mean)).sum(-1).mean(0)
        out.append(mi.clamp_min(0.0))
    return torch.cat(out) if out else sp.new_zeros(0, dtype=torch.float64)


def batch_bald(
    sample_probs: Tensor | ClassificationPrediction,
    k: int,
    *,
    num_configurations: int = _DEFAULT_CONFIGURATIONS,
    generator: torch.Generator | None = None,
) -> BatchBALD:
    """BatchBALD: k inputs chosen greedily to maximise the joint I[y_1, ..., y_k; w].

    Kirsch, van Amersfoort and Gal (NeurIPS 2019). Pick n adds the input i maximising
    I[y_A, y_i; w] = H[y_A, y_i] - sum_{j in A + i} E_w H[y_j | w] over the inputs A picked
    before it (the labels are independent given the weights, so the second term is a sum of
    per-input expected entropies). Pick 1 is BALD's top input; later picks discount what the
    batch already says about w: a copy of a chosen input gains only I[y'; w | y], nothing
    where each sample's prediction is certain, where the k top BALD scores would take every
    copy. (Where the samples' own predictions are soft, a large expected entropy, one label
    says little about w and a second label of the same input is worth nearly as much: the
    joint MI is then almost additive and BatchBALD may rightly take copies.)

    Joint entropy: the C^n label configurations y_A of the n picked inputs A are enumerated
    while their number (C^n, less those of probability 0) is at most ``num_configurations``
    (exact, up to float64 rounding); beyond that, from then on,
    ``num_configurations`` configurations y^1..y^m are sampled from p(y_A) (each extended by
    a draw of the new label at every pick, an exact sample of the joint), and a candidate's
    gain I[y_i; w | y_A] = E_{y_A}[H[p(y_i | y_A)] - E_{w | y_A} H[p(y_i | w)]] is the average
    of the bracket over them: an unbiased Monte-Carlo estimate for each candidate, whose
    standard error falls as 1/sqrt(m) (the same configurations score every candidate, so
    their comparison is less noisy than each estimate; the reported gain of the candidate
    picked, the largest of several noisy estimates, leans high). Cost per pick:
    O(B * S * M * C) time for M = min(C^n, m) configurations, and O(chunk * M * C) memory
    (chunks of candidates of at most 2^22 float64 values each).

    The samples must be one network per weight sample across all B inputs (sample s of every
    input from the same weights w_s): weight-space sampling, as :func:`acquire` arranges. The
    per-row noise of the ``local`` and ``flipout`` estimators (or of dropout) gives no joint
    distribution over inputs.

    Args:
        sample_probs: (S, B, C) per-sample class probabilities p_s(y_i = c), or a
            :class:`bbb.ClassificationPrediction` (its ``sample_probs``).
        k: batch size, 1 <= k <= B.
        num_configurations: m, the exact/Monte-Carlo threshold and sample size above.
        generator: the random numbers of the sampled configurations (none are drawn while
            the sum is exact).

    Returns:
        :class:`BatchBALD`: indices (k,), the joint mutual information (k,) after each pick
        (nats, float64), and whether each pick's was exact (k,).
    """
    sp = _sample_probs(sample_probs, "batch_bald")
    s, b, c = sp.shape
    k = _check_k(k, b, "batch_bald")
    limit = _check_configurations(num_configurations, "batch_bald")
    sample_entropy = -torch.special.xlogy(sp, sp).sum(-1)  # (S, B)
    configs = _Configurations(s, limit, generator).to(sp.device)
    chosen = torch.zeros(b, dtype=torch.bool, device=sp.device)
    indices: list[int] = []
    total = 0.0
    mutual_information: list[float] = []
    exact: list[bool] = []
    for n in range(k):
        gains = _bald64(sp) if n == 0 else configs.gains(sp, sample_entropy)
        gains = gains.masked_fill(chosen, -math.inf)
        i = int(torch.argmax(gains))  # the first of equal gains
        exact.append(configs.exact)
        total += float(gains[i])
        mutual_information.append(total)
        indices.append(i)
        chosen[i] = True
        if n + 1 < k:
            configs.add(sp[:, i, :])
    return BatchBALD(
        torch.tensor(indices, dtype=torch.long, device=sp.device),
        torch.tensor(mutual_information, dtype=torch.float64, device=sp.device),
        torch.tensor(exact, dtype=torch.bool, device=sp.device),
    )


def joint_mutual_information(
    sample_probs: Tensor | ClassificationPrediction,
    indices: Tensor | list[int],
    *,
    num_configurations: int = _DEFAULT_CONFIGURATIONS,
    generator: torch.Generator | None = None,
) -> float:
    """The joint mutual information I[y_{i_1}, ..., y_{i_n}; w] (nats) of given inputs.

    The batch's value under BatchBALD's criterion (:func:`batch_bald`, the same estimator:
    exact while C^n' <= ``num_configurations`` for the first n' inputs, Monte Carlo over
    ``num_configurations`` sampled configurations beyond), e.g. to compare a batch chosen by
    another rule. ``indices`` (n,): distinct input indices into the B of sample_probs
    (S, B, C).
    """
    sp = _sample_probs(sample_probs, "joint_mutual_information")
    s, b, _ = sp.shape
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(
            "joint_mutual_information: indices must be a non-empty 1-D list or tensor of "
            f"integers, got {indices!r}"
        )
    given = idx.tolist()
    # distinct once the negative ones (counted from the end) are resolved: [0, -B] named
    # input 0 twice, and was scored as two labels of it
    picked = [i % b for i in given]
    in_range = min(given) >= -b and max(given) < b
    if not in_range or len(set(picked)) != len(picked):
        raise ValueError(
            f"joint_mutual_information: indices must be distinct and lie in [0, {b}) (or "
            f"[-{b}, 0), counted from the end), got {given}"
            + (f", inputs {picked}" if in_range and picked != given else "")
        )
    limit = _check_configurations(num_configurations, "joint_mutual_information")
    sample_entropy = -torch.special.xlogy(sp, sp).sum(-1)
    configs = _Configurations(s, limit, generator).to(sp.device)
    total = 0.0
    for n, i in enumerate(picked):
        if n == 0:
            total += float(_bald64(sp[:, i : i + 1, :])[0])
        else:
            total += float(configs.gains(sp[:, i : i + 1, :], sample_entropy[:, i : i + 1])[0])
        if n + 1 < len(picked):
            configs.add(sp[:, i, :])
    return total


# --------------------------------------------------------------------------- acquire


class Acquisition(NamedTuple):
    """The result of :func:`acquire`.

    ``indices`` (k,) int64: positions in the pool (its rows, or the order a DataLoader gives
    them), best first. ``scores`` (k,): their scores (for ``"batch_bald"``: the joint mutual
    information of the first n picks, float64 nats). ``pool_scores`` (N,): every pool input's
    score (for ``"batch_bald"``: each input's BALD score, float64). All on the CPU.
    """

    indices: Tensor
    scores: Tensor
    pool_scores: Tensor


def _random_sampler(sampler: object, depth: int = 0) -> str | None:
    """The name of a sampler drawing at random in ``sampler`` (itself, or a sampler it wraps:
    a BatchSampler's), None if there is none: a ``DataLoader(batch_sampler=
    BatchSampler(RandomSampler(...)))`` keeps the default SequentialSampler as its
    ``sampler``, and a ``DistributedSampler`` shuffles by default (``shuffle=True``); both
    were taken for a fixed order."""
    if sampler is None or depth > 8:
        return None
    if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
        return type(sampler).__name__
    if getattr(sampler, "shuffle", False) is True:
        return f"{type(sampler).__name__}(shuffle=True)"
    inner = _random_sampler(getattr(sampler, "sampler", None), depth + 1)
    return None if inner is None else f"{type(sampler).__name__} over {inner}"


def _batches(pool: Tensor | Iterable[object], batch_size: int | None) -> Iterator[Tensor]:
    """The pool's inputs in chunks of at most ``batch_size`` rows (one chunk if None)."""
    if isinstance(pool, Tensor):
        if pool.dim() < 1 or pool.shape[0] == 0:
            raise ValueError(f"acquire: the pool is empty or 0-d, shape {tuple(pool.shape)}")
        step = pool.shape[0] if batch_size is None else batch_size
        for start in range(0, pool.shape[0], step):
            yield pool[start : start + step]
        return
    for item in pool:
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, Tensor):
            hint = (
                f" with keys {sorted(map(str, x))}: pass (batch[key] for batch in loader) "
                "to name the inputs"
                if isinstance(x, dict)
                else ""
            )
            raise TypeError(
                "acquire: a DataLoader pool must yield input tensors, or (inputs, ...) "
                f"tuples, got {type(x).__name__}{hint}"
            )
        if x.dim() < 1:
            raise ValueError(f"acquire: a pool batch must be (b, ...), got shape {tuple(x.shape)}")
        step = max(1, x.shape[0]) if batch_size is None else batch_size
        for start in range(0, x.shape[0], step):
            yield x[start : start + step]


@contextlib.contextmanager
def _one_network_per_sample(model: nn.Module) -> Iterator[None]:
    """Every Bayesian layer in ``"sample"`` mode (any estimator) draws S weight samples once
    and keeps them until the context exits, so that sample s is one network for every input
    (``local``/``flipout`` noise is per row). The modes and frozen samples are restored."""
    layers = [m for m in bayes_modules(model) if m.mode == "sample"]
    saved = [(m.mode, m._frozen) for m in layers]
    try:
        for m in layers:
            m._frozen = None
            m.mode = "frozen"
        yield
    finally:
        for m, (mode, frozen) in zip(layers, saved, strict=True):
            m.mode, m._frozen = mode, frozen


def acquire(
    model: nn.Module,
    pool: Tensor | DataLoader | Iterable[object],
    k: int,
    *,
    method: str = "bald",
    num_samples: int = 100,
    batch_size: int | None = None,
    likelihood: Categorical | Gaussian | None = None,
    max_rows: int | None = None,
    shared_prefix: bool = False,
    num_configurations: int = _DEFAULT_CONFIGURATIONS,
    generator: torch.Generator | None = None,
) -> Acquisition:
    """Score an unlabelled pool with ``model`` and choose the ``k`` inputs to label next.

    The pool is run through :func:`bbb.predict` in chunks of ``batch_size`` inputs (each
    chunk's scores are kept, its predictions dropped, so memory is bounded by the chunk), and
    :func:`select` picks the k largest scores (ties to the lowest pool index; NaN scores, from
    a diverged model, are refused, and so are infinite ones, a variance beyond the dtype's
    range). ``"batch_bald"`` keeps every input's sample probabilities (S * N * C values, in
    the predictions' dtype) and picks with :func:`batch_bald`; for it every Bayesian layer
    draws weight-space samples held fixed across the chunks (one network per sample,
    whatever its estimator), and dropout or batch normalisation in training mode is refused
    (masks drawn per row; inputs normalised by their chunk's statistics).

    The model runs as it is (call ``model.eval()`` first); weight samples come from torch's
    global random stream, as in :func:`bbb.predict`. With ``reparam`` layers the S weight
    samples are shared by all chunks (:func:`bbb.shared_weight_samples`), so the chunk size
    does not change the scores; ``local``/``flipout`` layers draw per-row noise either way.

    Args:
        model: the network (Bayesian layers; the model's outputs are logits for
            classification, or what ``likelihood`` reads for regression).
        pool: unlabelled inputs (N, ...), or a DataLoader (or any iterable) yielding input
            tensors or (inputs, ...) tuples, in a fixed order (a shuffling DataLoader is
            refused: a random sampler, a batch sampler over one, or a ``shuffle=True``
            sampler such as DistributedSampler's default; the indices could not name its
            inputs). Chunks are moved to the device
            of the model's parameters. A DataLoader without a ``generator`` of its own draws
            its base seed from torch's global stream as it starts, so its weight samples
            differ from those of the same pool as a tensor (give it ``generator=``).
        k: how many to choose, 1 <= k <= N.
        method: one of :data:`ACQUISITION_FUNCTIONS` that fits the likelihood (see
            :func:`acquisition_scores`, and ``"batch_bald"`` for classification).
        num_samples: S, weight samples per input.
        batch_size: inputs per :func:`bbb.predict` call (memory); ``None``: the whole tensor
            pool, or each DataLoader batch, in one call.
        likelihood: ``None`` or :class:`bbb.Categorical` (classification) or
            :class:`bbb.Gaussian` (regression).
        max_rows, shared_prefix: passed to :func:`bbb.predict`.
        num_configurations: BatchBALD's configurations (see :func:`batch_bald`).
        generator: random numbers of ``"random"`` and of BatchBALD's sampled configurations.

    Returns:
        :class:`Acquisition` (indices (k,), scores (k,), pool_scores (N,)), on the CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"acquire: model must be a torch.nn.Module, got {type(model).__name__}")
    if likelihood is not None and not isinstance(likelihood, (Categorical, Gaussian)):
        raise TypeError(
            "acquire: likelihood must be None, a bbb.Categorical or a bbb.Gaussian instance, "
            f"got {likelihood!r}"
        )
    regression = isinstance(likelihood, Gaussian)
    accepted = (
        REGRESSION_ACQUISITIONS if regression else (*CLASSIFICATION_ACQUISITIONS, "batch_bald")
    )
    _check_method(method, "acquire")
    if method not in accepted:
        kind = "regression (a Gaussian likelihood)" if regression else "classification"
        raise ValueError(
            f"acquire: {method!r} does not apply to {kind}; accepted: {', '.join(accepted)}"
        )
    if batch_size is not None and (not _is_int(batch_size) or int(batch_size) < 1):
        raise ValueError(
            f"acquire: batch_size must be a positive integer or None, got {batch_size!r}"
        )
    batch_size = None if batch_size is None else int(batch_size)
    if not _is_int(num_samples) or int(num_samples) < 1:
        raise ValueError(f"acquire: num_samples must be a positive integer, got {num_samples!r}")
    if method == "batch_bald":
        _check_configurations(num_configurations, "acquire")
        # dropout draws its masks per row, and batch normalisation in training mode
        # normalises each input by its chunk's statistics (and updates its running ones with
        # the pool's): neither is one network per weight sample
        per_row = [
            (name, kind)
            for name, m in model.named_modules()
            for kind, cls in (
                ("dropout", nn.modules.dropout._DropoutNd),
                ("batch normalisation", nn.modules.batchnorm._BatchNorm),
            )
            if isinstance(m, cls) and m.training
        ]
        if per_row:
            name, kind = per_row[0]
            what = (
                "masks drawn per row"
                if kind == "dropout"
                else "each input normalised by its chunk's statistics"
            )
            raise ValueError(
                f"acquire: 'batch_bald' needs one network per weight sample across the pool, "
                f"but {kind} {name!r} is in training mode ({what}): call model.eval() first"
            )
    _check_k(k, math.inf, "acquire")  # its type; the pool's size is checked once known
    if isinstance(pool, Tensor):
        if pool.dim() >= 1 and pool.shape[0] > 0:
            _check_k(k, pool.shape[0], "acquire")
    elif isinstance(pool, DataLoader):
        shuffler = _random_sampler(pool.sampler) or _random_sampler(pool.batch_sampler)
        if shuffler is not None:
            raise ValueError(
                f"acquire: the DataLoader draws its inputs at random ({shuffler}), so pool "
                "indices would not name them; pass shuffle=False, a sequential sampler (or "
                "the pool tensor)"
            )
        if pool.batch_size is None and pool.batch_sampler is None:
            raise ValueError(
                "acquire: the DataLoader has batch_size=None, so it yields single inputs "
                "without their batch dimension; give it a batch_size (e.g. 256)"
            )
        batches = pool.batch_sampler
        every_input = batches is None or (
            type(batches) is BatchSampler and batches.sampler is pool.sampler
        )
        if every_input and not pool.drop_last and type(pool.sampler) is SequentialSampler:
            _check_k(k, len(pool.sampler), "acquire")  # before the model runs on the pool
    elif not isinstance(pool, Iterable):
        raise TypeError(
            f"acquire: pool must be a tensor (N, ...) or a DataLoader, got {type(pool).__name__}"
        )
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else None
    scores: list[Tensor] = []
    probs: list[Tensor] = []
    joint = method == "batch_bald"
    context = _one_network_per_sample(model) if joint else shared_weight_samples(model)
    with context:
        for x in _batches(pool, batch_size):
            if x.shape[0] == 0:
                continue
            if device is not None:
                x = x.to(device)
            pred = predict(
                model,
                x,
                likelihood=likelihood,
                num_samples=num_samples,
                max_rows=max_rows,
                shared_prefix=shared_prefix,
            )
            if joint:
                assert isinstance(pred, ClassificationPrediction)
                probs.append(pred.sample_probs)
            else:
                scores.append(acquisition_scores(pred, method, generator=generator).cpu())
    if joint:
        if not probs:
            raise ValueError("acquire: the pool is empty")
        sp = torch.cat(probs, dim=1)
        _check_k(k, sp.shape[1], "acquire")
        result = batch_bald(sp, k, num_configurations=num_configurations, generator=generator)
        return Acquisition(
            result.indices.cpu(),
            result.mutual_information.cpu(),
            _bald64(sp).cpu(),
        )
    if not scores:
        raise ValueError("acquire: the pool is empty")
    pool_scores = torch.cat(scores)
    _check_k(k, pool_scores.shape[0], "acquire")
    infinite = torch.isinf(pool_scores)
    if bool(infinite.any()):
        # an infinite score (a variance beyond the dtype's range: sample means of a model
        # that is diverging) was ranked first, silently, and equal infinite ones to the
        # lowest index
        first = int(torch.nonzero(infinite)[0, 0])
        raise ValueError(
            f"acquire: {int(infinite.sum())} of {pool_scores.shape[0]} {method!r} scores are "
            f"infinite (the first at pool index {first}): the predictions' variance overflows "
            f"{pool_scores.dtype} there (a diverging model?); fix the model, or run it in "
            "float64 (model.double() and a float64 pool), before acquiring"
        )
    chosen = select(pool_scores, k)
    return Acquisition(chosen.indices, chosen.scores, pool_scores)
