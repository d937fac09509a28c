"""Acquisition functions for active learning (issue #3): ``bbb.acquisition``.

Closed-form scores on hand-made predictions, the relations between them, BatchBALD (exact
against its Monte-Carlo estimate, and the duplicates it avoids where top-k BALD takes them),
``acquire`` over a pool in chunks and from a DataLoader, and the inputs each refuses.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bbb
from bbb.acquisition import (
    CLASSIFICATION_ACQUISITIONS,
    REGRESSION_ACQUISITIONS,
    select,
)

LOG2 = math.log(2.0)


def _pred(sample_probs: torch.Tensor) -> bbb.ClassificationPrediction:
    return bbb.ClassificationPrediction(sample_probs.mean(0), sample_probs)


def _random_probs(s: int, b: int, c: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(s, b, c, generator=g, dtype=torch.float64), -1)


def _h(p: float) -> float:
    """Binary entropy, nats."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# --------------------------------------------------------------------- per-input scores


def test_scores_of_two_samples_that_disagree_completely_and_of_agreeing_samples() -> None:
    # input 0: sample 1 says class 0, sample 2 class 1 (MI = log 2); input 1: both say
    # (0.7, 0.3) (MI = 0, all uncertainty aleatoric)
    sp = torch.tensor([[[1.0, 0.0], [0.7, 0.3]], [[0.0, 1.0], [0.7, 0.3]]], dtype=torch.float64)
    pred = _pred(sp)
    score = {m: bbb.acquisition_scores(pred, m) for m in CLASSIFICATION_ACQUISITIONS}
    torch.testing.assert_close(score["bald"], torch.tensor([LOG2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(score["entropy"], torch.tensor([LOG2, _h(0.3)], dtype=torch.float64))
    torch.testing.assert_close(
        score["variation_ratios"], torch.tensor([0.5, 0.3], dtype=torch.float64)
    )
    torch.testing.assert_close(score["margin"], torch.tensor([0.0, -0.4], dtype=torch.float64))
    # std over the two samples of (1, 0) and (0, 1): 0.5 for each class
    torch.testing.assert_close(score["mean_std"], torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert score["random"].shape == (2,)


def test_score_relations_on_random_predictions() -> None:
    for seed, (s, b, c) in enumerate([(5, 40, 3), (20, 30, 10), (2, 25, 2)]):
        pred = _pred(_random_probs(s, b, c, seed).float())
        bald = bbb.acquisition_scores(pred, "bald")
        entropy = bbb.acquisition_scores(pred, "entropy")
        torch.testing.assert_close(bald, entropy - pred.aleatoric, atol=2e-6, rtol=0)
        assert bool((bald >= 0).all()) and bool((bald <= entropy + 1e-6).all())
        assert bool((entropy <= math.log(c) + 1e-6).all())
        vr = bbb.acquisition_scores(pred, "variation_ratios")
        assert bool((vr >= 0).all()) and bool((vr <= 1 - 1 / c + 1e-6).all())
        margin = bbb.acquisition_scores(pred, "margin")
        assert bool((margin >= -1).all()) and bool((margin <= 0).all())
        # a larger top-1 probability (smaller variation ratio) never has a... smaller gap
        # check against the definition directly
        top = pred.probs.sort(-1, descending=True).values
        torch.testing.assert_close(margin, top[:, 1] - top[:, 0])
        ms = bbb.acquisition_scores(pred, "mean_std")
        assert bool((ms >= 0).all()) and bool((ms <= 0.5).all())
        for scores in (bald, entropy, vr, margin, ms):
            assert scores.shape == (b,) and scores.dtype == torch.float32


def test_random_scores_follow_the_generator() -> None:
    pred = _pred(_random_probs(3, 50, 4, 0))
    a = bbb.acquisition_scores(pred, "random", generator=torch.Generator().manual_seed(1))
    b = bbb.acquisition_scores(pred, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and bool(((a >= 0) & (a < 1)).all())
    assert a.unique().numel() == 50


def test_regression_scores() -> None:
    # input 0: sample means 0 and 2 (epistemic variance 1), noise variances 1 and 3 (mean 2)
    means = torch.tensor([[[0.0, 1.0], [5.0, 5.0]], [[2.0, 1.0], [5.0, 5.0]]])
    variances = torch.tensor([[[1.0, 0.5], [0.1, 0.1]], [[3.0, 0.5], [0.1, 0.1]]])
    pred = bbb.RegressionPrediction(means, variances)
    # summed over the D = 2 outputs
    torch.testing.assert_close(bbb.acquisition_scores(pred, "epistemic"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(
        bbb.acquisition_scores(pred, "variance"), torch.tensor([1.0 + 2.0 + 0.5, 0.2])
    )
    assert bbb.acquisition_scores(pred, "random").shape == (2,)
    # a hand-built prediction of mismatched shapes (a (B, B) "variance" by broadcasting) or
    # negative variances (log-variances passed) is refused by its constructor
    with pytest.raises(ValueError, match=r"both be \(S, B, D\).*got \(2, 2, 2\) and \(2, 2\)"):
        bbb.RegressionPrediction(means, variances[..., 0])
    with pytest.raises(ValueError, match="must be variances .*log-variances"):
        bbb.RegressionPrediction(means, -variances)
    with pytest.raises(TypeError, match="sample_variances must be a tensor, got list"):
        bbb.RegressionPrediction(means, [1.0])  # type: ignore[arg-type]


def test_a_method_that_does_not_fit_the_prediction_is_refused_naming_those_that_do() -> None:
    cls = _pred(_random_probs(3, 4, 3, 0))
    reg = bbb.RegressionPrediction(torch.zeros(3, 4, 1), torch.ones(3, 4, 1))
    with pytest.raises(ValueError, match="accepted for regression: variance, epistemic, random"):
        bbb.acquisition_scores(reg, "bald")
    with pytest.raises(ValueError, match="accepted for classification: bald, entropy, "):
        bbb.acquisition_scores(cls, "variance")
    with pytest.raises(
        ValueError, match="accepted values: " + ", ".join(bbb.ACQUISITION_FUNCTIONS)
    ):
        bbb.acquisition_scores(cls, "BALD")
    with pytest.raises(ValueError, match=r"bbb.batch_bald\(prediction, k\)"):
        bbb.acquisition_scores(cls, "batch_bald")
    with pytest.raises(TypeError, match="ClassificationPrediction or a bbb.RegressionPrediction"):
        bbb.acquisition_scores(cls.sample_probs, "bald")  # type: ignore[arg-type]
    assert set(CLASSIFICATION_ACQUISITIONS) | set(REGRESSION_ACQUISITIONS) | {"batch_bald"} == set(
        bbb.ACQUISITION_FUNCTIONS
    )


# -------------------------------------------------------------------------- select


def test_select_is_descending_with_ties_to_the_lowest_index() -> None:
    scores = torch.tensor([0.5, 2.0, 0.5, 2.0, -math.inf, math.inf, 0.5])
    chosen = select(scores, 5)
    assert chosen.indices.tolist() == [5, 1, 3, 0, 2]
    assert chosen.scores.tolist() == [math.inf, 2.0, 2.0, 0.5, 0.5]
    assert select(scores, 7).indices.tolist() == [5, 1, 3, 0, 2, 6, 4]
    assert select(torch.tensor([3, 1, 3]), 2).indices.tolist() == [0, 2]  # integer scores


def test_select_refuses_nan_and_bad_k_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"2 of 4 scores are NaN \(the first at index 1\)"):
        select(torch.tensor([0.1, math.nan, 0.3, math.nan]), 1)
    scores = torch.rand(5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="k = 6 exceeds the pool size 5"):
        select(scores, 6)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            select(scores, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor \(N,\), got shape \(5, 1\)"):
        select(scores[:, None], 1)
    with pytest.raises(ValueError, match="non-empty"):
        select(torch.zeros(0), 1)
    with pytest.raises(TypeError, match="must be a tensor"):
        select([0.1, 0.2], 1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- BatchBALD


def _duplicates_pool() -> torch.Tensor:
    """S = 4 weight samples, C = 2. Input 0 and its copy 1 split the samples {0, 1} | {2, 3}
    with certainty (MI log 2); input 2 splits {0, 2} | {1, 3} with probability 0.99 (MI
    log 2 - h(0.01)); input 3 is the same for every sample (MI 0)."""
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([0.99, 0.01, 0.99, 0.01])
    c = torch.tensor([0.5, 0.5, 0.5, 0.5])
    p0 = torch.stack([a, a, b, c], dim=1)  # (S, B): p_s(y = 0)
    return torch.stack([p0, 1 - p0], dim=-1).double()


def test_batch_bald_takes_the_second_view_where_top_k_bald_takes_the_copy() -> None:
    sp = _duplicates_pool()
    top2 = select(bbb.acquisition_scores(_pred(sp), "bald"), 2).indices
    assert top2.tolist() == [0, 1]  # top-k BALD: the input and its copy
    result = bbb.batch_bald(sp, 2)
    assert result.indices.tolist() == [0, 2]
    # I[y_0; w] = log 2; with input 2: H[y_0, y_2] = 2 log 2, E_w H = 0 + h(0.01)
    expected = torch.tensor([LOG2, 2 * LOG2 - _h(0.01)], dtype=torch.float64)
    torch.testing.assert_close(result.mutual_information, expected)
    assert result.exact.tolist() == [True, True]
    # the copy adds nothing to what input 0 says about w
    assert bbb.joint_mutual_information(sp, [0, 1]) == pytest.approx(LOG2, abs=1e-12)
    # k = B: every input once, the joint MI non-decreasing
    full = bbb.batch_bald(sp, 4)
    assert sorted(full.indices.tolist()) == [0, 1, 2, 3]
    assert bool((full.mutual_information.diff() >= -1e-12).all())


def test_batch_bald_k1_is_bald_s_top_pick_and_matches_joint_mutual_information() -> None:
    sp = _random_probs(10, 60, 4, 3)
    bald = bbb.acquisition_scores(_pred(sp), "bald")
    one = bbb.batch_bald(_pred(sp), 1)
    assert one.indices.tolist() == [int(bald.argmax())]
    torch.testing.assert_close(one.mutual_information, bald.max().reshape(1))
    chosen = bbb.batch_bald(sp, 4, num_configurations=10**4)
    assert chosen.exact.all() and len(set(chosen.indices.tolist())) == 4
    again = bbb.joint_mutual_information(sp, chosen.indices, num_configurations=10**4)
    assert again == pytest.approx(float(chosen.mutual_information[-1]), abs=1e-10)
    # greedy: each pick's joint MI is at least that of any other input in its place
    prefix = chosen.indices[:2].tolist()
    best = float(chosen.mutual_information[2])
    others = [i for i in range(60) if i not in prefix][:15]
    for i in others:
        assert bbb.joint_mutual_information(sp, [*prefix, i]) <= best + 1e-10
    # the joint MI never exceeds the sum of the BALD scores (I is subadditive here)
    assert float(chosen.mutual_information[-1]) <= float(bald[chosen.indices].sum()) + 1e-10


def test_exact_joint_mutual_information_equals_a_brute_force_sum() -> None:
    """H[y_A] - sum_j E_w H[y_j | w] by enumerating the C^n configurations directly; and the
    joint MI of many inputs is bounded by H[w] = log S (S equally likely weight samples)."""
    sp = _random_probs(7, 5, 3, 11)
    idx = [3, 0, 4]
    joint = 0.0
    for labels in itertools.product(range(3), repeat=3):
        p = torch.ones(7, dtype=torch.float64)
        for i, y in zip(idx, labels, strict=True):
            p = p * sp[:, i, y]
        joint -= float(p.mean()) * math.log(float(p.mean()))
    cond = sum(float(-torch.special.xlogy(sp[:, i], sp[:, i]).sum(-1).mean()) for i in idx)
    assert bbb.joint_mutual_information(sp, idx) == pytest.approx(joint - cond, abs=1e-12)
    # (seeded: the picks past 1000 configurations are Monte Carlo estimates, which may exceed
    # log S by their error, so the bound is asserted on the exact picks only)
    many = bbb.batch_bald(
        _random_probs(4, 40, 5, 12, scale=4.0), 12, generator=torch.Generator().manual_seed(0)
    )
    assert bool(many.exact[0]) and not bool(many.exact.all())  # 5^5 > 1000: sampled at the end
    assert float(many.mutual_information[many.exact].max()) <= math.log(4) + 1e-9


@settings(max_examples=25, deadline=None)
@given(
    s=st.integers(1, 6),
    b=st.integers(1, 7),
    c=st.integers(2, 4),
    seed=st.integers(0, 2**31 - 1),
    limit=st.sampled_from([1, 4, 1000]),
)
def test_batch_bald_properties(s: int, b: int, c: int, seed: int, limit: int) -> None:
    """Any predictions, any threshold: distinct picks, BALD's top pick first, a joint MI that
    is non-decreasing; exact, at most the sum of the picks' BALD scores and H[w] = log S."""
    sp = _random_probs(s, b, c, seed, scale=3.0)
    k = b
    res = bbb.batch_bald(sp, k, num_configurations=limit, generator=torch.Generator())
    bald = bbb.acquisition_scores(_pred(sp), "bald")
    assert sorted(res.indices.tolist()) == list(range(b))
    assert float(bald[res.indices[0]]) == pytest.approx(float(bald.max()), abs=1e-12)
    mi = res.mutual_information
    assert bool((mi.diff() >= -1e-12).all()) and float(mi[0]) >= 0
    if bool(res.exact.all()):
        # exact: at most H[w], and subadditive (the labels are independent given w); a
        # Monte-Carlo estimate (from one sampled configuration, say) may exceed either
        assert float(mi[-1]) <= math.log(s) + 1e-9
        assert float(mi[-1]) <= float(bald.sum()) + 1e-9


def test_monte_carlo_joint_mutual_information_agrees_with_the_exact_sum() -> None:
    sp = _random_probs(12, 6, 3, 7, scale=1.5)
    idx = [0, 1, 2, 3, 4, 5]
    exact = bbb.joint_mutual_information(sp, idx, num_configurations=3**5)
    # 40 configurations: exact over the 27 of the first three inputs, sampled from the 4th on
    runs = torch.tensor(
        [
            bbb.joint_mutual_information(
                sp, idx, num_configurations=40, generator=torch.Generator().manual_seed(r)
            )
            for r in range(30)
        ],
        dtype=torch.float64,
    )
    sd = float(runs.std())
    assert sd > 1e-4  # really sampled (a noiseless "estimate" would make the test vacuous)
    # unbiased estimator: the mean of 30 independent runs within 4 standard errors
    assert abs(float(runs.mean()) - exact) < 4 * sd / math.sqrt(30)
    # and batch_bald's MC picks carry the same estimator: its joint MI within 4 sd of exact
    mc = bbb.batch_bald(sp, 6, num_configurations=40, generator=torch.Generator().manual_seed(0))
    assert mc.exact.tolist() == [True, True, True, True, False, False]
    order = mc.indices.tolist()
    exact_of_order = bbb.joint_mutual_information(sp, order, num_configurations=3**5)
    assert abs(float(mc.mutual_information[-1]) - exact_of_order) < 4 * sd


def test_batch_bald_refuses_bad_inputs() -> None:
    sp = _random_probs(4, 5, 3, 0)
    with pytest.raises(ValueError, match="k = 6 exceeds the pool size 5"):
        bbb.batch_bald(sp, 6)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        bbb.batch_bald(sp, 0)
    with pytest.raises(ValueError, match=r"\(S, B, C\).*got shape \(5, 3\)"):
        bbb.batch_bald(sp[0], 1)
    bad = sp.clone()
    bad[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        bbb.batch_bald(bad, 1)
    with pytest.raises(ValueError, match=r"torch.softmax\(logits"):
        bbb.batch_bald(torch.log(sp), 1)
    with pytest.raises(ValueError, match="num_configurations must be a positive integer"):
        bbb.batch_bald(sp, 2, num_configurations=0)
    with pytest.raises(ValueError, match=r"distinct and lie in \[0, 5\)"):
        bbb.joint_mutual_information(sp, [1, 1])
    with pytest.raises(ValueError, match=r"distinct and lie in \[0, 5\)"):
        bbb.joint_mutual_information(sp, [7])


# ------------------------------------------------------------------------- acquire


def _model(estimator: str, out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        bbb.BayesLinear(4, 8, estimator=estimator),
        nn.ReLU(),
        bbb.BayesLinear(8, out, estimator=estimator),
    )
    for layer in bbb.bayes_modules(model):  # wide posteriors: the scores differ
        layer.weight_rho.data.fill_(0.0)
    return model.eval()


def _pool(n: int = 30) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def test_acquire_in_chunks_equals_one_pass_and_a_dataloader() -> None:
    model, pool = _model("reparam"), _pool()
    torch.manual_seed(3)
    whole = bbb.acquire(model, pool, 5, num_samples=16)
    torch.manual_seed(3)
    chunked = bbb.acquire(model, pool, 5, num_samples=16, batch_size=7)
    # a DataLoader draws its base seed from torch's global stream as it starts, unless it has
    # a generator of its own: with one, the weight samples are the tensor pool's
    loader = DataLoader(
        TensorDataset(pool, torch.zeros(30)),
        batch_size=8,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),
    )
    torch.manual_seed(3)
    loaded = bbb.acquire(model, loader, 5, num_samples=16, batch_size=3)
    for other in (chunked, loaded):
        torch.testing.assert_close(other.pool_scores, whole.pool_scores, atol=1e-6, rtol=1e-5)
        assert other.indices.tolist() == whole.indices.tolist()
    assert whole.pool_scores.shape == (30,)
    assert torch.equal(whole.scores, whole.pool_scores[whole.indices])
    assert whole.scores.tolist() == sorted(whole.scores.tolist(), reverse=True)


def test_acquire_is_bald_of_predict_with_the_same_draws() -> None:
    """What examples/active_learning.py relies on: acquire(method="bald") over a tensor pool
    in one chunk draws what bbb.predict draws and ranks by its epistemic part."""
    model, pool = _model("local"), _pool()
    torch.manual_seed(4)
    got = bbb.acquire(model, pool, 6, num_samples=10)
    torch.manual_seed(4)
    mi = bbb.predict(model, pool, num_samples=10).epistemic
    assert torch.equal(got.pool_scores, mi)
    assert got.indices.tolist() == torch.topk(mi, 6).indices.tolist()
    for method in ("entropy", "variation_ratios", "margin", "mean_std", "random"):
        res = bbb.acquire(model, pool, 3, method=method, num_samples=4)
        assert res.indices.shape == (3,) and len(set(res.indices.tolist())) == 3


def test_acquire_batch_bald_uses_one_network_per_sample_and_restores_the_model() -> None:
    model, pool = _model("local"), _pool(12)
    torch.manual_seed(5)
    res = bbb.acquire(
        model, pool, 4, method="batch_bald", num_samples=8, batch_size=5,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(set(res.indices.tolist())) == 4
    assert bool((res.scores.diff() >= -1e-12).all()) and res.scores.dtype == torch.float64
    assert res.pool_scores.shape == (12,)
    assert res.indices[0] == res.pool_scores.argmax()  # the first pick is BALD's
    for layer in bbb.bayes_modules(model):
        assert layer.mode == "sample" and layer._frozen is None and layer.estimator == "local"
    # with the same global seed, the same picks (the frozen draws come from torch's stream)
    torch.manual_seed(5)
    again = bbb.acquire(
        model, pool, 4, method="batch_bald", num_samples=8,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert again.indices.tolist() == res.indices.tolist()


def test_acquire_regression() -> None:
    model, pool = _model("reparam", out=1), _pool(20)
    gaussian = bbb.Gaussian(sigma=0.5)
    torch.manual_seed(6)
    epistemic = bbb.acquire(model, pool, 3, method="epistemic", likelihood=gaussian)
    torch.manual_seed(6)  # the same draws: the total adds the fixed noise variance 0.25
    total = bbb.acquire(model, pool, 3, method="variance", likelihood=gaussian)
    torch.testing.assert_close(total.pool_scores, epistemic.pool_scores + 0.25)
    assert total.indices.tolist() == epistemic.indices.tolist()
    assert float(epistemic.scores.min()) > 0
    with pytest.raises(ValueError, match="accepted: variance, epistemic, random"):
        bbb.acquire(model, pool, 3, method="bald", likelihood=bbb.Gaussian())
    with pytest.raises(ValueError, match="accepted: bald, entropy, .*mean_std, random, batch_bald"):
        bbb.acquire(model, pool, 3, method="variance")


def test_acquire_refuses_bad_inputs_before_running_the_model() -> None:
    model, pool = _model("reparam"), _pool(10)
    with pytest.raises(ValueError, match="k = 11 exceeds the pool size 10"):
        bbb.acquire(model, pool, 11)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        bbb.acquire(model, pool, 0)
    with pytest.raises(ValueError, match="accepted values: bald, entropy, variation_ratios"):
        bbb.acquire(model, pool, 2, method="max_entropy")
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None"):
        bbb.acquire(model, pool, 2, batch_size=0)
    with pytest.raises(ValueError, match="shuffle=False"):
        bbb.acquire(model, DataLoader(TensorDataset(pool), batch_size=4, shuffle=True), 2)
    with pytest.raises(ValueError, match="k = 11 exceeds the pool size 10"):
        bbb.acquire(model, DataLoader(TensorDataset(pool), batch_size=4), 11)
    with pytest.raises(ValueError, match="k = 9 exceeds the pool size 8"):  # 2 dropped
        bbb.acquire(model, DataLoader(TensorDataset(pool), batch_size=4, drop_last=True), 9)
    with pytest.raises(ValueError, match="batch_size=None, so it yields single inputs"):
        bbb.acquire(model, DataLoader(TensorDataset(pool), batch_size=None), 2)
    with pytest.raises(ValueError, match="empty"):
        bbb.acquire(model, pool[:0], 1)
    dropout = nn.Sequential(bbb.BayesLinear(4, 3), nn.Dropout(0.5)).train()
    with pytest.raises(ValueError, match=r"dropout '1' is in training mode.*model.eval\(\)"):
        bbb.acquire(dropout, pool, 2, method="batch_bald")
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    with pytest.raises(ValueError, match="scores are NaN"):
        bbb.acquire(model, pool, 2, num_samples=2)


# ------------------------------------------------------------- the example's --strategy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "active_learning.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_active_learning_acq", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_acquires_with_each_library_strategy() -> None:
    module = _example()
    torch.manual_seed(0)
    model = module.bayesian_mlp(8, bbb.GaussianPrior(1.0)).eval()
    for layer in bbb.bayes_modules(model):
        layer.weight_rho.data.fill_(0.0)
    pool = torch.randn(30, 784, generator=torch.Generator().manual_seed(1))
    unlabelled = torch.arange(0, 30, 3)
    for strategy in module.ACQUISITIONS:
        torch.manual_seed(5)
        chosen, scores = module.acquire(
            strategy, model, pool, unlabelled, 3, 6, torch.Generator().manual_seed(0)
        )
        assert set(chosen.tolist()) <= set(unlabelled.tolist()) and len(set(chosen.tolist())) == 3
        assert scores.shape == (3,) and not bool(torch.isnan(scores).any())
        if strategy == "batch_bald":  # the joint MI after each pick grows
            assert bool((scores.diff() >= 0).all())
        else:  # the others: highest score first
            assert scores.tolist() == sorted(scores.tolist(), reverse=True)


def test_the_example_resumes_a_report_written_before_strategy_existed(tmp_path: Path) -> None:
    module = _example()
    args = module.parse_args(["--rounds", "2", "--pool-subset", "500"])
    settings = {k: getattr(args, k) for k in module.RUN_SETTINGS if k != "strategy"}
    rows = [{"round": 0, "acquired": [1, 2]}]
    report = {"settings": settings, "results": {"bald": rows, "random": rows}, "finished": False}
    path = tmp_path / "active_learning.json"
    path.write_text(json.dumps(report))
    assert module.load_previous(path, args)["results"]["bald"] == rows
    other = module.parse_args(["--rounds", "2", "--pool-subset", "500", "--strategy", "margin"])
    with pytest.raises(module.UsageError, match="was started with --strategy bald"):
        module.load_previous(path, other)
    assert isinstance(args, argparse.Namespace)
