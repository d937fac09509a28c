"""Session 29 review of the predictive-uncertainty metrics (issue #3) and of the
signal-to-noise pruning (issue #5): regression tests of the defects found."""

from __future__ import annotations

import pytest
import torch

from bbb import metrics

# --------------------------------------------------------------------------------------
# metrics: meta tensors (a shape, no values) get a clear refusal
# --------------------------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: metrics.accuracy(_meta(4, 2), torch.zeros(4, dtype=torch.long)), "probs"),
        (
            lambda: metrics.expected_calibration_error(
                torch.full((4, 2), 0.5), _meta(4, dtype=torch.long)
            ),
            "labels",
        ),
        (lambda: metrics.rmse(_meta(3), torch.zeros(3)), "mean"),
        (lambda: metrics.pit_values(_meta(2, 3), _meta(2, 3), _meta(3)), "means"),
        (lambda: metrics.crps(torch.zeros(2, 3), torch.ones(2, 3), _meta(3)), "target"),
        (lambda: metrics.auroc(torch.zeros(3), _meta(3)), "scores_positive"),
        (
            lambda: metrics.interval_coverage(
                torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3), levels=_meta(2)
            ),
            "levels",
        ),
    ],
    ids=["accuracy", "ece", "rmse", "pit", "crps", "auroc", "coverage_levels"],
)
def test_meta_tensor_is_refused_by_name(call, name: str) -> None:
    # was: RuntimeError "Tensor.item() cannot be called on meta tensors" from deep inside
    with pytest.raises(ValueError, match=rf"^{name} is a meta tensor .*no values.*real device"):
        call()


def test_classification_report_meta_log_probs_refused() -> None:
    probs = torch.full((3, 2), 0.5)
    labels = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"^log_probs is a meta tensor \(shape \(3, 2\)"):
        metrics.classification_report(probs, labels, log_probs=_meta(3, 2))
