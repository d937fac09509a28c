"""Tests for bbb.metrics: hand-computed cases, reference implementations, validation."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal

from bbb import metrics as M


def _probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _labels(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


# ------------------------------------------------------------------ accuracy / error / nll


def test_accuracy_and_error_hand_case() -> None:
    p = _probs([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    y = _labels([0, 1, 0, 1])  # correct, correct, wrong, wrong
    assert M.accuracy(p, y) == pytest.approx(0.5)
    assert M.error(p, y) == pytest.approx(0.5)
    y2 = _labels([0, 1, 2, 0])
    assert M.accuracy(p, y2) == pytest.approx(1.0)
    assert M.error(p, y2) == pytest.approx(0.0)


def test_nll_hand_case_and_clamp() -> None:
    p = _probs([[0.5, 0.5], [0.25, 0.75]])
    y = _labels([0, 1])
    assert M.nll(p, y) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    # zero probability on the true class is clamped to eps -> finite
    p0 = _probs([[1.0, 0.0]])
    assert M.nll(p0, _labels([1]), eps=1e-12) == pytest.approx(-math.log(1e-12))
    assert M.nll(p0, _labels([0])) == pytest.approx(0.0)
    # eps >= 1 clamped every probability (0.5 gave NLL -log 2 < 0 with eps = 2): refused
    for bad in (1.0, 2.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match=r"eps must lie in \(0, 1\)"):
            M.nll(p, y, eps=bad)


def test_float32_softmax_inputs_accepted() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 1000)
    p = torch.softmax(logits, dim=1)  # float32 rounding in row sums
    y = torch.randint(0, 1000, (64,))
    # the mean NLL of the probabilities is the cross-entropy of their logits (to float32)
    want = torch.nn.functional.cross_entropy(logits.double(), y).item()
    assert M.nll(p, y) == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------ brier


def test_brier_perfect_and_uniform() -> None:
    C = 4
    y = _labels([0, 1, 2, 3, 1])
    onehot = torch.nn.functional.one_hot(y, C).double()
    assert M.brier(onehot, y) == pytest.approx(0.0)
    uniform = torch.full((5, C), 1.0 / C, dtype=torch.float64)
    assert M.brier(uniform, y) == pytest.approx((C - 1) / C)


def test_brier_hand_case() -> None:
    p = _probs([[0.6, 0.4], [0.2, 0.8]])
    y = _labels([0, 0])
    # (0.4^2 + 0.4^2) = 0.32 ; (0.8^2 + 0.8^2) = 1.28 ; mean = 0.8
    assert M.brier(p, y) == pytest.approx(0.8)


# ------------------------------------------------------------------ ECE / reliability


def test_ece_constructed_case() -> None:
    # 4 examples at confidence 0.85 (3 correct) and 2 at confidence 0.65 (1 correct).
    p = _probs([[0.85, 0.15]] * 4 + [[0.65, 0.35]] * 2)
    y = _labels([0, 0, 0, 1, 0, 1])
    # bin (0.8, 0.9]: acc 0.75, conf 0.85 -> gap 0.10, weight 4/6
    # bin (0.6, 0.7]: acc 0.50, conf 0.65 -> gap 0.15, weight 2/6
    expected = 4 / 6 * 0.10 + 2 / 6 * 0.15
    assert M.expected_calibration_error(p, y, n_bins=10) == pytest.approx(expected)

    data = M.reliability_diagram_data(p, y, n_bins=10)
    assert data.n_bins == 10
    assert data.bin_edges.shape == (11,)
    assert data.bin_count.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 4, 0]
    assert data.bin_accuracy[8].item() == pytest.approx(0.75)
    assert data.bin_confidence[6].item() == pytest.approx(0.65)
    assert torch.isnan(data.bin_accuracy[0]) and torch.isnan(data.bin_confidence[0])


def test_ece_perfect_confident_predictions_is_zero() -> None:
    y = _labels([0, 2, 1])
    p = torch.nn.functional.one_hot(y, 3).double()
    assert M.expected_calibration_error(p, y) == pytest.approx(0.0)
    # confidence exactly 1 falls into the last bin
    assert M.reliability_diagram_data(p, y, n_bins=5).bin_count.tolist() == [0, 0, 0, 0, 3]


def _ece_reference(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        mask = (conf > lo) & (conf <= hi) if i > 0 else (conf <= hi)
        if mask.any():
            gap = abs(correct[mask].mean().item() - conf[mask].mean().item())
            total += mask.sum().item() / len(y) * gap
    return total


def test_ece_matches_loop_reference_on_random_data() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(500, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 5, (500,), generator=g)
    for n_bins in (1, 7, 15):
        assert M.expected_calibration_error(p, y, n_bins) == pytest.approx(
            _ece_reference(p, y, n_bins), abs=1e-12
        )
    data = M.reliability_diagram_data(p, y, n_bins=15)
    assert int(data.bin_count.sum()) == 500


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(2, 6),
    st.integers(1, 20),
    st.integers(0, 2**31 - 1),
    st.floats(0.1, 10.0),
)
def test_ece_in_unit_interval(
    n_examples: int, n_classes: int, n_bins: int, seed: int, temp: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(temp * torch.randn(n_examples, n_classes, generator=g), dim=1)
    y = torch.randint(0, n_classes, (n_examples,), generator=g)
    ece = M.expected_calibration_error(p, y, n_bins=n_bins)
    assert 0.0 <= ece <= 1.0
    assert 0.0 <= M.brier(p, y) <= 2.0


def test_plot_reliability_diagram_writes_png(tmp_path) -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(100, 3, generator=g), dim=1)
    y = torch.randint(0, 3, (100,), generator=g)
    out = M.plot_reliability_diagram(p, y, tmp_path / "sub" / "rel.png", n_bins=10, title="t")
    assert out.exists()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, bbb.metrics; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ regression


def test_rmse_hand_case_and_shapes() -> None:
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([1.0, 0.0, 3.0, 6.0])
    expected = math.sqrt((0 + 4 + 0 + 4) / 4)
    assert M.rmse(mean, target) == pytest.approx(expected)
    assert M.rmse(mean.unsqueeze(1), target) == pytest.approx(expected)
    assert M.rmse(mean, target.unsqueeze(1)) == pytest.approx(expected)
    assert M.rmse(mean.view(2, 2), target.view(2, 2)) == pytest.approx(expected)


def test_gaussian_log_likelihood_matches_torch_normal() -> None:
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(20, 3, generator=g, dtype=torch.float64)
    var = torch.rand(20, 3, generator=g, dtype=torch.float64) + 0.1
    target = torch.randn(20, 3, generator=g, dtype=torch.float64)
    ref = Normal(mean, var.sqrt()).log_prob(target).sum(dim=1).mean().item()
    assert M.gaussian_log_likelihood(mean, var, target) == pytest.approx(ref, rel=1e-12)
    # 1-D inputs
    ref1 = Normal(mean[:, 0], var[:, 0].sqrt()).log_prob(target[:, 0]).mean().item()
    assert M.gaussian_log_likelihood(mean[:, 0], var[:, 0], target[:, 0]) == pytest.approx(ref1)


def test_mixture_with_one_sample_equals_gaussian() -> None:
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(15, 2, generator=g, dtype=torch.float64)
    var = torch.rand(15, 2, generator=g, dtype=torch.float64) + 0.05
    target = torch.randn(15, 2, generator=g, dtype=torch.float64)
    mix = M.mixture_gaussian_log_likelihood(mean[None], var[None], target)
    assert mix == pytest.approx(M.gaussian_log_likelihood(mean, var, target), rel=1e-12)


def test_mixture_two_components_hand_case() -> None:
    means = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # (S=2, B=1)
    vars_ = torch.tensor([[1.0], [4.0]], dtype=torch.float64)
    target = torch.tensor([1.0], dtype=torch.float64)
    dens = 0.5 * (
        math.exp(-0.5) / math.sqrt(2 * math.pi) + math.exp(-1 / 8) / math.sqrt(8 * math.pi)
    )
    assert M.mixture_gaussian_log_likelihood(means, vars_, target) == pytest.approx(math.log(dens))


def test_mixture_is_stable_far_from_the_mean() -> None:
    means = torch.zeros(10, 4, 1, dtype=torch.float64)
    vars_ = torch.full((10, 4, 1), 1e-4, dtype=torch.float64)
    target = torch.full(
        (4,), 5.0, dtype=torch.float64
    )  # naive exp underflows to 0 -> log gives -inf
    ll = M.mixture_gaussian_log_likelihood(means, vars_, target)
    expected = -0.5 * (math.log(2 * math.pi * 1e-4) + 25.0 / 1e-4)
    assert math.isfinite(ll)
    assert ll == pytest.approx(expected, rel=1e-9)


def test_mixture_y_scale_equals_computation_in_original_units() -> None:
    g = torch.Generator().manual_seed(5)
    S, B, D = 8, 30, 2
    m = torch.tensor([3.0, -10.0], dtype=torch.float64)
    s = 7.5
    mu_n = torch.randn(S, B, D, generator=g, dtype=torch.float64)
    var_n = torch.rand(S, B, D, generator=g, dtype=torch.float64) + 0.1
    y_n = torch.randn(B, D, generator=g, dtype=torch.float64)
    ll_norm = M.mixture_gaussian_log_likelihood(mu_n, var_n, y_n, y_scale=s)
    ll_orig = M.mixture_gaussian_log_likelihood(m + s * mu_n, s**2 * var_n, m + s * y_n)
    assert ll_norm == pytest.approx(ll_orig, rel=1e-10)
    unscaled = M.mixture_gaussian_log_likelihood(mu_n, var_n, y_n)
    assert unscaled - ll_norm == pytest.approx(D * math.log(s))


def test_regression_report() -> None:
    g = torch.Generator().manual_seed(6)
    S, B = 5, 12
    s, m = 2.5, 1.0
    mu_n = torch.randn(S, B, 1, generator=g, dtype=torch.float64)
    var_n = torch.rand(S, B, 1, generator=g, dtype=torch.float64) + 0.2
    y_n = torch.randn(B, generator=g, dtype=torch.float64)
    rep = M.regression_report(mu_n, var_n, y_n, y_scale=s)
    assert set(rep) == {"rmse", "log_likelihood"}
    rmse_orig = M.rmse(m + s * mu_n.mean(0), m + s * y_n)
    assert rep["rmse"] == pytest.approx(rmse_orig)
    assert rep["log_likelihood"] == pytest.approx(
        M.mixture_gaussian_log_likelihood(m + s * mu_n, s**2 * var_n, m + s * y_n)
    )


# ------------------------------------------------------------------ AUROC


def test_auroc_separated_identical_and_reversed() -> None:
    neg = torch.tensor([0.1, 0.2, 0.3])
    pos = torch.tensor([0.5, 0.9])
    assert M.auroc(neg, pos) == pytest.approx(1.0)
    assert M.auroc(pos, neg) == pytest.approx(0.0)
    same = torch.tensor([0.4, 0.4, 0.7])
    assert M.auroc(same, same) == pytest.approx(0.5)
    assert M.auroc(torch.ones(4), torch.ones(6)) == pytest.approx(0.5)


def _auroc_bruteforce(neg: torch.Tensor, pos: torch.Tensor) -> float:
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().sum() + 0.5 * (diff == 0).double().sum()).item() / diff.numel()


def test_auroc_matches_pairwise_count_with_ties() -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        neg = torch.randint(0, 10, (57,), generator=g).float()  # many ties
        pos = torch.randint(2, 12, (43,), generator=g).float()
        assert M.auroc(neg, pos) == pytest.approx(_auroc_bruteforce(neg, pos), abs=1e-12)
    neg = torch.randn(200, generator=g)
    pos = torch.randn(150, generator=g) + 0.5
    assert M.auroc(neg, pos) == pytest.approx(_auroc_bruteforce(neg, pos), abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=25),
    st.lists(st.integers(-5, 5), min_size=1, max_size=25),
)
def test_auroc_antisymmetric(a: list[int], b: list[int]) -> None:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert M.auroc(ta, tb) == pytest.approx(1.0 - M.auroc(tb, ta), abs=1e-12)
    assert M.auroc(ta, tb) == pytest.approx(_auroc_bruteforce(ta, tb), abs=1e-12)


# ------------------------------------------------------------------ report


def test_classification_report_consistent() -> None:
    g = torch.Generator().manual_seed(8)
    p = torch.softmax(torch.randn(40, 4, generator=g), dim=1)
    y = torch.randint(0, 4, (40,), generator=g)
    rep = M.classification_report(p, y, n_bins=10)
    assert set(rep) == {"error", "accuracy", "nll", "ece", "brier"}
    assert rep["accuracy"] == pytest.approx(M.accuracy(p, y))
    assert rep["error"] == pytest.approx(1.0 - rep["accuracy"])
    assert rep["nll"] == pytest.approx(M.nll(p, y))
    assert rep["ece"] == pytest.approx(M.expected_calibration_error(p, y, n_bins=10))
    assert rep["brier"] == pytest.approx(M.brier(p, y))
    assert all(isinstance(v, float) for v in rep.values())


# ------------------------------------------------------------------ validation


def test_probs_wrong_shape_names_shape() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        M.accuracy(torch.rand(3, 4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        M.nll(torch.full((3, 2), 0.5), torch.zeros(2, dtype=torch.long))


def test_probs_validation_messages() -> None:
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="NaN"):
        M.brier(torch.tensor([[0.5, 0.5], [float("nan"), 0.5]]), y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.brier(torch.tensor([[1.5, -0.5], [0.5, 0.5]]), y)  # sums to 1 but negative entry
    with pytest.raises(ValueError, match="sum to 1"):
        M.expected_calibration_error(torch.tensor([[0.3, 0.3], [0.5, 0.5]]), y)
    with pytest.raises(ValueError, match="range"):
        M.accuracy(torch.full((2, 2), 0.5), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="range"):
        M.accuracy(torch.full((2, 2), 0.5), torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        M.accuracy(torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        M.accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        M.expected_calibration_error(torch.full((2, 2), 0.5), y, n_bins=0)


def test_regression_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        M.rmse(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        M.rmse(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        M.rmse(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="positive"):
        M.gaussian_log_likelihood(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        M.mixture_gaussian_log_likelihood(
            torch.zeros(4, 5, 2), torch.ones(4, 5, 2), torch.zeros(5, 3)
        )
    with pytest.raises(ValueError, match=r"\(4, 5, 1\)"):
        M.mixture_gaussian_log_likelihood(
            torch.zeros(4, 5, 2), torch.ones(4, 5, 1), torch.zeros(5, 2)
        )
    with pytest.raises(ValueError, match="positive"):
        M.mixture_gaussian_log_likelihood(
            torch.zeros(2, 3, 1), -torch.ones(2, 3, 1), torch.zeros(3)
        )
    with pytest.raises(ValueError, match="y_scale"):
        M.mixture_gaussian_log_likelihood(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3), 0.0)


def test_auroc_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        M.auroc(torch.zeros(2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        M.auroc(torch.zeros(0), torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(torch.zeros(2), torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        M.auroc([0.0, 1.0], torch.zeros(3))  # type: ignore[arg-type]


def test_numpy_scalars_are_accepted_where_numbers_are() -> None:
    """n_bins and y_scale of NumPy types (e.g. from a config or an array) are numbers; they
    were refused as "must be a positive integer / finite positive number, got np.int64(15)"."""
    np = pytest.importorskip("numpy")
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    assert M.expected_calibration_error(probs, labels, n_bins=np.int64(4)) == (
        M.expected_calibration_error(probs, labels, n_bins=4)
    )
    mu = torch.zeros(2, 3, dtype=torch.float64)
    var = torch.ones(2, 3, dtype=torch.float64)
    y = torch.ones(3, dtype=torch.float64)
    assert M.mixture_gaussian_log_likelihood(mu, var, y, y_scale=np.float32(2.0)) == (
        M.mixture_gaussian_log_likelihood(mu, var, y, y_scale=2.0)
    )
    with pytest.raises(ValueError, match="n_bins must be a positive integer, got True"):
        M.expected_calibration_error(probs, labels, n_bins=True)
    with pytest.raises(ValueError, match="y_scale must be a finite positive number, got True"):
        M.mixture_gaussian_log_likelihood(mu, var, y, y_scale=True)
