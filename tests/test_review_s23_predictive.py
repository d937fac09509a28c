"""Review session 23 (predictive uncertainty and metrics, issue #3): regression tests.

Every metric is compared with an independent brute-force computation written here (Python
floats, loops over examples and samples), not with the library's own helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bbb
from bbb import BayesLinear, predict
from bbb.predictive import ClassificationPrediction

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


def _log_mean_exp(values: list[float]) -> float:
    """log((1/n) sum_i exp(v_i)), by hand with the maximum factored out."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


# ------------------------------------------------------------ classification log_prob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_log_predictive_probability_of_an_underflowing_class_is_exact(
    dtype: torch.dtype,
) -> None:
    """log p(y|x) is the log of the sample-averaged probability. With a logit gap of a few
    hundred the softmax of the losing class underflows to 0 (float32 below 1e-45, float64
    below 1e-323), and log_prob returned the floor log(1e-30) = -69 nats for every such
    input: a confidently wrong prediction's NLL was capped, silently. Now it is the
    log-sum-exp of the samples' log-softmax, checked against a brute force in Python."""
    torch.manual_seed(0)
    model = nn.Sequential(BayesLinear(2, 3, rho_init=-3.0)).to(dtype).eval()
    with torch.no_grad():
        model[0].weight_mu.copy_(torch.tensor([[400.0, 0.0], [0.0, 0.0], [0.0, 300.0]]))
        model[0].bias_mu.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.4], [1e-3, 0.0]], dtype=dtype)
    num_samples = 6
    with bbb.sampling(model, "frozen"):  # the same weights for predict and for the reference
        pred = predict(model, x, num_samples=num_samples)
        logits = bbb.sample_outputs(model, x, num_samples)
    assert isinstance(pred, ClassificationPrediction)
    target = torch.tensor([1, 0, 2, 0])
    got = pred.log_prob(target)
    for b, c in enumerate(target.tolist()):
        per_sample = [_log_softmax(logits[s, b].tolist())[c] for s in range(num_samples)]
        want = _log_mean_exp(per_sample)
        # float32 logits of a few hundred carry ~3e-5 absolute rounding; the log-sum-exp adds
        # no more than a few ulp of the result
        tol = 1e-4 * max(1.0, abs(want)) if dtype == torch.float32 else 1e-9 * max(1.0, abs(want))
        assert got[b].item() == pytest.approx(want, abs=tol), (b, got[b].item(), want)
    assert got[0].item() < -500.0  # the case this is about: far below the old -69 floor
    # where nothing underflows the value is the log of probs, as before
    assert got[3].item() == pytest.approx(math.log(pred.probs[3, 0].item()), abs=1e-6)
    assert torch.allclose(pred.log_probs.exp(), pred.probs, atol=1e-6)


# ------------------------------------------------------------ regression log_prob, quantiles


def _regression_prediction(d: int = 1) -> bbb.RegressionPrediction:
    g = torch.Generator().manual_seed(3)
    means = torch.randn(5, 4, d, generator=g, dtype=torch.float64)
    variances = torch.rand(5, 4, d, generator=g, dtype=torch.float64) + 0.1
    return bbb.RegressionPrediction(means, variances)


def test_the_regression_log_prob_matches_a_brute_force_mixture_density() -> None:
    """log (1/S) sum_s prod_d N(y_d; mu_sd, var_sd), by hand, D = 2."""
    pred = _regression_prediction(d=2)
    y = torch.tensor([[0.1, -0.3], [2.0, 1.0], [-5.0, 0.0], [0.0, 30.0]], dtype=torch.float64)
    got = pred.log_prob(y)
    m, v = pred.sample_means, pred.sample_variances
    for b in range(4):
        comps = []
        for s in range(5):
            lp = 0.0
            for k in range(2):
                var = v[s, b, k].item()
                lp += -0.5 * math.log(2 * math.pi * var) - (
                    y[b, k].item() - m[s, b, k].item()
                ) ** 2 / (2 * var)
            comps.append(lp)
        assert got[b].item() == pytest.approx(_log_mean_exp(comps), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_regression_log_prob_refuses_non_finite_targets(bad: float) -> None:
    """A NaN target gave a NaN log-density for that example, silently (the classification
    log_prob and Gaussian.log_prob refuse them)."""
    pred = _regression_prediction()
    y = torch.zeros(4, dtype=torch.float64)
    y[2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        pred.log_prob(y)


def test_the_regression_log_prob_names_the_shape_it_was_given() -> None:
    """Targets (B,) against D = 2 outputs: the message named only (B, 1), a shape the user
    never passed. It now also names the given shape, and the accepted ones."""
    pred = _regression_prediction(d=2)
    with pytest.raises(ValueError, match=r"\(4, 1\) \(given as \(4,\)\) do not match .*\(4, 2\)"):
        pred.log_prob(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(3, 1\).*\(4, 1\) or \(4,\)"):
        _regression_prediction(d=1).log_prob(torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="tensor"):
        pred.log_prob([[0.0, 0.0]] * 4)  # type: ignore[arg-type]


def test_quantiles_accept_a_tensor_of_probabilities() -> None:
    """``q`` as a tensor (the form torch.quantile takes) was refused: a 1-d tensor as "not
    probabilities", a 0-d one with "iteration over a 0-d tensor". It now gives what the same
    numbers as a list give."""
    pred = _regression_prediction()
    levels = [0.05, 0.5, 0.95]
    want = pred.quantiles(levels, include_noise=False)
    f64 = torch.float64  # the same numbers exactly (a float32 0.05 is 0.05000000075)
    assert torch.equal(pred.quantiles(torch.tensor(levels, dtype=f64), include_noise=False), want)
    assert torch.equal(pred.quantiles(torch.tensor(0.5), include_noise=False), want[1])
    got32 = pred.quantiles(torch.tensor(levels), include_noise=False)
    assert torch.allclose(got32, want, rtol=0, atol=1e-6)
    noisy = pred.quantiles(levels, generator=torch.Generator().manual_seed(1))
    noisy_t = pred.quantiles(
        torch.tensor(levels, dtype=f64), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(noisy, noisy_t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pred.quantiles(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        pred.quantiles(torch.full((2, 2), 0.5))


def test_predict_checks_the_likelihood_before_running_the_model() -> None:
    """A wrong likelihood (the class itself, or a torch loss) was reported only after the
    model had run all S samples of every input; now before any forward pass, and passing
    the class says to pass an instance."""
    calls = []
    model = nn.Sequential(BayesLinear(2, 1))
    model.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(8, 2)
    with pytest.raises(TypeError, match=r"Gaussian \(the class\); pass an instance"):
        predict(model, x, likelihood=bbb.Gaussian, num_samples=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got MSELoss"):
        predict(model, x, likelihood=nn.MSELoss(), num_samples=3)  # type: ignore[arg-type]
    assert calls == []


# ------------------------------------------------------------ metrics against brute force


def _pairwise_auroc(neg: list, pos: list) -> float:
    """P(pos > neg) + P(pos == neg) / 2 over all pairs, counted one pair at a time (Python
    numbers: integers compare exactly)."""
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(neg) * len(pos))


def test_auroc_ranks_integer_scores_beyond_2_to_the_53_exactly() -> None:
    """Integer scores were converted to float64 before ranking: above 2**53 neighbours
    collapse into ties (2**60 and 2**60 + 1 both become 2**60), and perfectly separated sets
    scored 0.5. Integer scores are now ranked as integers."""
    base = 2**60
    neg = torch.tensor([base + 0, base + 2, base + 4], dtype=torch.int64)
    pos = torch.tensor([base + 1, base + 3, base + 5, base + 7], dtype=torch.int64)
    assert bbb.metrics.auroc(neg, pos) == pytest.approx(_pairwise_auroc(neg.tolist(), pos.tolist()))
    assert bbb.metrics.auroc(neg, pos) == pytest.approx(9 / 12)
    # separated sets, one of them int32
    assert bbb.metrics.auroc(torch.tensor([base]), torch.tensor([base + 1])) == 1.0
    assert bbb.metrics.auroc(torch.tensor([3], dtype=torch.int32), torch.tensor([base])) == 1.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
def test_auroc_matches_a_pairwise_count_with_many_ties(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    neg = torch.randint(0, 6, (120,), generator=g).to(dtype)
    pos = torch.randint(1, 8, (90,), generator=g).to(dtype)
    want = _pairwise_auroc(neg.tolist(), pos.tolist())
    assert bbb.metrics.auroc(neg, pos) == pytest.approx(want, abs=1e-12)
    assert bbb.metrics.auroc(pos, neg) == pytest.approx(1.0 - want, abs=1e-12)
    # a single class of scores (every pair tied) is chance, not an error
    assert bbb.metrics.auroc(torch.ones(5, dtype=dtype), torch.ones(3, dtype=dtype)) == 0.5


def _ece_by_hand(rows: list[list[float]], labels: list[int], n_bins: int) -> tuple[float, list]:
    """Bins (i/n, (i+1)/n], bin 0 also holding 0; returns the ECE and the per-bin counts."""
    members: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for row, y in zip(rows, labels, strict=True):
        conf = max(row)
        pred = row.index(conf)
        i = 0
        while i < n_bins - 1 and conf > (i + 1) / n_bins:
            i += 1
        members[i].append((conf, pred == y))
    ece = 0.0
    for m in members:
        if m:
            acc = sum(ok for _, ok in m) / len(m)
            conf = sum(c for c, _ in m) / len(m)
            ece += len(m) / len(rows) * abs(acc - conf)
    return ece, [len(m) for m in members]


def test_ece_and_nll_match_a_brute_force_with_edges_and_empty_bins() -> None:
    """Confidences exactly on 1.0 and on inner edges, empty bins, ties; n_bins 1, 4, 15."""
    rows = [
        [1.0, 0.0, 0.0],  # exactly 1.0: last bin
        [0.0, 1.0, 0.0],
        [0.5, 0.5, 0.0],  # tie: arg-max is class 0; on the edge 0.5 (bin (0.25, 0.5])
        [0.25, 0.5, 0.25],
        [0.75, 0.125, 0.125],  # on the edge 0.75
        [0.4, 0.35, 0.25],
        [1 / 3, 1 / 3, 1 / 3],
    ]
    labels = [0, 0, 1, 1, 0, 2, 2]
    p = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(labels)
    for n_bins in (1, 4, 15):
        want, counts = _ece_by_hand(rows, labels, n_bins)
        data = bbb.metrics.reliability_diagram_data(p, y, n_bins=n_bins)
        assert data.bin_count.tolist() == counts
        assert bbb.metrics.expected_calibration_error(p, y, n_bins=n_bins) == pytest.approx(
            want, abs=1e-12
        )
    nll = -sum(math.log(max(r[c], 1e-12)) for r, c in zip(rows, labels, strict=True)) / 7
    assert bbb.metrics.nll(p, y) == pytest.approx(nll, abs=1e-12)


# ------------------------------------------------------------ plots


def test_regression_band_refuses_a_classification_likelihood_with_a_reason(tmp_path) -> None:
    """It was an ``assert`` (no message; skipped under ``python -O``)."""
    model = nn.Sequential(BayesLinear(1, 2))
    train = torch.utils.data.TensorDataset(torch.randn(5, 1), torch.randn(5, 1))
    with pytest.raises(TypeError, match="must be a bbb.Gaussian, got Categorical"):
        bbb.plots.regression_band(model, bbb.Categorical(), train, tmp_path / "band.png")


def test_learning_curves_of_an_empty_history_say_so(tmp_path) -> None:
    """An empty history raised ``IndexError: list index out of range``."""
    with pytest.raises(ValueError, match="history is empty"):
        bbb.plots.learning_curves([], tmp_path / "curves.png")


# ------------------------------------------------------------ the split, batching, dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_the_classification_split_matches_a_brute_force_from_the_logits(
    dtype: torch.dtype,
) -> None:
    """entropy = H[mean_s p_s], aleatoric = mean_s H[p_s], epistemic = their difference,
    each >= 0, computed here in Python floats from the very logits predict averaged."""
    torch.manual_seed(1)
    model = nn.Sequential(
        BayesLinear(3, 8, rho_init=-1.0), nn.ReLU(), BayesLinear(8, 4, rho_init=-1.0)
    )
    model = model.to(dtype).eval()
    x = torch.randn(12, 3).to(dtype)
    num_samples = 5
    with bbb.sampling(model, "frozen"):
        pred = predict(model, x, num_samples=num_samples)
        logits = bbb.sample_outputs(model, x, num_samples)
    assert isinstance(pred, ClassificationPrediction)
    # float16 logits are averaged in float32 (rounding ~1e-7 per term); float64 in float64
    tol = 1e-6 if dtype == torch.float16 else 1e-12
    for b in range(12):
        ps = [[math.exp(v) for v in _log_softmax(logits[s, b].tolist())] for s in range(5)]
        mean = [sum(p[c] for p in ps) / 5 for c in range(4)]
        total = -sum(q * math.log(q) for q in mean if q > 0)
        alea = sum(-sum(q * math.log(q) for q in p if q > 0) for p in ps) / 5
        assert pred.entropy[b].item() == pytest.approx(total, abs=tol)
        assert pred.aleatoric[b].item() == pytest.approx(alea, abs=tol)
        assert pred.epistemic[b].item() == pytest.approx(total - alea, abs=tol)
        assert pred.epistemic[b].item() >= 0.0 and pred.aleatoric[b].item() >= 0.0
        for c in range(4):
            assert pred.probs[b, c].item() == pytest.approx(mean[c], abs=tol)


def test_chunked_prediction_is_one_big_batch_in_sample_mode() -> None:
    """max_rows splits the inputs into chunks; in ``reparam`` sample mode the chunks share the
    S weight samples, so from the same seed the result is the single pass's (up to the
    float32 rounding of a different matmul shape) and the global RNG ends in the same state."""
    model = nn.Sequential(BayesLinear(3, 8), nn.ReLU(), BayesLinear(8, 4)).eval()
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    one = predict(model, x, num_samples=10)
    state_one = torch.get_rng_state()
    torch.manual_seed(7)
    chunked = predict(model, x, num_samples=10, max_rows=30)  # 3 inputs per pass
    assert torch.equal(torch.get_rng_state(), state_one)
    assert torch.allclose(chunked.sample_probs, one.sample_probs, rtol=0, atol=1e-6)
    assert torch.allclose(chunked.log_probs, one.log_probs, rtol=0, atol=1e-5)


def test_the_plots_create_their_directories(tmp_path) -> None:
    """plot_reliability_diagram creates the parent directories of its path; learning_curves
    and regression_band raised FileNotFoundError (regression_band after all its sampling)."""
    history = [{"epoch": 1, "loss": 1.0, "nll": 0.5, "kl": 2.0, "val_rmse": 0.3}]
    out = bbb.plots.learning_curves(history, tmp_path / "a" / "b" / "curves.png")
    assert out.is_file()
    model = nn.Sequential(BayesLinear(1, 4), nn.Tanh(), BayesLinear(4, 1)).eval()
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(
        torch.rand(10, 1, generator=g), torch.rand(10, 1, generator=g)
    )
    torch.manual_seed(0)
    path = tmp_path / "c" / "band.png"
    bbb.plots.regression_band(model, bbb.Gaussian(), train, path, num_samples=5)
    assert path.is_file()
