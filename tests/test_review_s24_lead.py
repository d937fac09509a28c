"""Session 24: the lead's fixes of defects noticed in earlier reviews (issues #3, #4, #7, #9)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bbb


class _ConstantHead(nn.Module):
    """A (mean, log-variance) head whose log-variance is a fixed constant."""

    def __init__(self, log_var: float) -> None:
        super().__init__()
        self.layer = bbb.BayesLinear(2, 1)
        self.log_var = log_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.layer(x)
        return torch.cat([mean, torch.full_like(mean, self.log_var)], dim=-1)


def test_predict_warns_when_the_heteroscedastic_variance_overflows() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 2)
    lik = bbb.Gaussian(noise="heteroscedastic")
    with pytest.warns(RuntimeWarning, match=r"overflows torch.float32.*5 of 5 examples"):
        pred = bbb.predict(_ConstantHead(100.0), x, likelihood=lik, num_samples=3)
    assert torch.isinf(pred.variance).all()
    # in float64 the same log-variance is finite, and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred64 = bbb.predict(
            _ConstantHead(100.0).double(), x.double(), likelihood=lik, num_samples=3
        )
    assert torch.isfinite(pred64.variance).all()
    # an ordinary log-variance: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bbb.predict(_ConstantHead(1.0), x, likelihood=lik, num_samples=3)


def test_a_bad_value_in_a_config_file_names_the_file(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bbb.cli import main

    cfg = tmp_path / "bad.toml"
    cfg.write_text("lr = -1.0\nepochs = 1\n")
    code = main(["train", "--config", str(cfg), "--dataset", "toy", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{cfg}: lr must be a finite positive number, got -1.0" in err
    assert not (tmp_path / "r").exists()
    # the same bad value given as a flag (overriding the file) is not blamed on the file
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--lr",
            "-2",
            "--dataset",
            "toy",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "lr must be a finite positive number, got -2.0" in err
    assert str(cfg) not in err
