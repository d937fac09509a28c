"""Review session 21 (predictive uncertainty, calibration metrics): regression tests."""

from __future__ import annotations

import pytest
import torch

from bbb import metrics as M

# ------------------------------------------------------------ calibration: ties at bin edges


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_a_confidence_on_a_bin_edge_falls_in_the_same_bin_in_every_dtype(
    dtype: torch.dtype,
) -> None:
    """Bins are (i/n, (i+1)/n]: a confidence of exactly 0.6 (n = 10) is in bin 5. In float32
    0.6 is stored as 0.6000000238..., and compared with the float64 edge 0.6 it fell in bin 6
    (0.6, 0.7] (also 0.2, 0.4, 0.8): the bins and the ECE depended on the probabilities' dtype."""
    rows = [[0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5], [0.25, 0.75]]
    labels = torch.tensor([0, 1, 0, 1, 0, 0])
    p = torch.tensor(rows, dtype=dtype)
    data = M.reliability_diagram_data(p, labels, n_bins=10)
    # confidences 0.6, 0.8, 0.7, 0.9, 0.5, 0.75: bins 5, 7, 6, 8, 4, 7
    assert data.bin_count.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 1, 0]
    ref = M.expected_calibration_error(torch.tensor(rows, dtype=torch.float64), labels, 10)
    assert M.expected_calibration_error(p, labels, n_bins=10) == pytest.approx(ref, abs=1e-3)
    # the report's ECE bins the same way as expected_calibration_error
    report = M.classification_report(p, labels, n_bins=10)
    assert report["ece"] == M.expected_calibration_error(p, labels, n_bins=10)
    # the reported edges stay the exact k / n
    assert torch.equal(data.bin_edges, torch.arange(11, dtype=torch.float64) / 10)


# ------------------------------------------------------------ low-precision probabilities


def test_the_metrics_accept_a_bfloat16_softmax_and_still_refuse_logits() -> None:
    """A bfloat16 softmax's rows sum to 1 only within ~2**-8 (values rounded to 8 significant
    bits): with the fixed tolerance 1e-3 every metric refused ~40% of the rows as "not
    probabilities". The tolerance is now the larger of 1e-3 and the dtype's epsilon."""
    g = torch.Generator().manual_seed(0)
    logits = (2.0 * torch.randn(1000, 10, generator=g)).bfloat16()
    p = torch.softmax(logits, dim=-1)
    y = torch.randint(0, 10, (1000,), generator=g)
    assert ((p.double().sum(1) - 1).abs() > 1e-3).any()  # the case this is about
    report = M.classification_report(p, y)
    ref = p.double()
    ref = ref / ref.sum(1, keepdim=True)  # renormalised: the metrics barely move
    assert report["nll"] == pytest.approx(M.nll(ref, y), abs=1e-2)
    assert report["brier"] == pytest.approx(M.brier(ref, y), abs=1e-2)
    assert report["accuracy"] == M.accuracy(ref, y)
    for f in (M.nll, M.brier, M.accuracy, M.expected_calibration_error):
        f(p, y)
        with pytest.raises(ValueError, match="sum to 1"):
            f(logits.softmax(-1) * 1.02, y)  # 2% off is not rounding
    # float32 keeps the 1e-3 tolerance
    with pytest.raises(ValueError, match="sum to 1"):
        M.nll(torch.tensor([[0.6, 0.402]]), torch.tensor([0]))
