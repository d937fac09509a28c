"""Session 29 review of the predictive-uncertainty metrics (issue #3) and of the
signal-to-noise pruning (issue #5): regression tests of the defects found."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import bbb
from bbb import metrics
from bbb.nn.module import BayesModule

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


# --------------------------------------------------------------------------------------
# pruning: bad arguments and corrupt or value-less models are refused before any change
# --------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(bbb.BayesLinear(5, 8), nn.ReLU(), bbb.BayesLinear(8, 3))


def _masks(model: nn.Module) -> list[torch.Tensor | None]:
    return [
        None if m.weight_mask is None else m.weight_mask.clone()
        for m in model.modules()
        if isinstance(m, BayesModule)
    ]


@pytest.mark.parametrize(
    ("bad", "shown"), [("0.5", "'0.5' (str)"), (None, "None (NoneType)"), (True, "True (bool)")]
)
def test_prune_fraction_that_is_not_a_number_is_refused(bad: object, shown: str) -> None:
    # was: "0.5" pruned half silently, None a TypeError from float() naming no argument, True
    # reported as "got 1.0"
    model = _mlp()
    with pytest.raises(ValueError, match=re.escape("fraction must be a number in [0, 1) ")):
        bbb.prune_by_snr(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(f"got {shown}")):
        bbb.prune_by_snr(model, bad)  # type: ignore[arg-type]
    assert _masks(model) == [None, None]


@pytest.mark.parametrize("fraction", [np.float64(0.5), np.float32(0.5), torch.tensor(0.5)])
def test_prune_fraction_numpy_and_tensor_numbers_still_accepted(fraction: object) -> None:
    model = _mlp()
    result = bbb.prune_by_snr(model, fraction)  # type: ignore[arg-type]
    assert result.removed == (5 * 8 + 8 * 3) // 2 and result.fraction == 0.5


def test_prune_per_layer_that_is_not_a_bool_is_refused() -> None:
    # was: per_layer="no" (truthy) pruned each layer separately, silently
    with pytest.raises(ValueError, match=r"per_layer must be True or False, got 'no'"):
        bbb.prune_by_snr(_mlp(), 0.5, per_layer="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("param", ["weight_mu", "weight_rho"])
def test_prune_nan_parameter_is_refused_and_masks_kept(param: str) -> None:
    model = _mlp()
    bbb.prune_by_snr(model, 0.5)
    before = _masks(model)
    with torch.no_grad():
        getattr(model[2], param)[1, 4] = float("nan")
    # was: the NaN SNR sorted above every other, so the weight was kept, silently
    with pytest.raises(
        ValueError, match=r"layer '2' has 1 of 24 weights whose SNR \|mu\| / sigma is NaN"
    ):
        bbb.prune_by_snr(model, 0.75)
    after = _masks(model)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # type: ignore[arg-type]


def test_prune_meta_model_is_refused_by_layer() -> None:
    model = nn.Sequential(bbb.BayesLinear(5, 8, device="meta"))
    # was: RuntimeError "Tensor.item() cannot be called on meta tensors"
    with pytest.raises(ValueError, match=r"layer '0' is on the meta device \(shapes, no values\)"):
        bbb.prune_by_snr(model, 0.5)
    assert model[0].weight_mask is None
