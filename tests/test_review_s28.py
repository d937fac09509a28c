"""Defects found in session 28, each with the test that failed before its fix.

1. An integer device (an accelerator's index, as ``torch.device(0)`` reads it) on a machine
   without an accelerator was reported as "not a torch device (e.g. cpu, cuda, cuda:1)".
2. ``BayesLSTM.to_torch`` / ``to_deterministic`` refused a subclass overriding ``forward`` but
   converted one overriding a method ``forward`` computes with, into a plain layer computing
   another function.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bbb
from bbb.config import ConfigError
from bbb.runs import check_device


@pytest.mark.skipif(torch.accelerator.is_available(), reason="a machine without an accelerator")
@pytest.mark.parametrize("index", [0, 1])
def test_an_integer_device_without_an_accelerator_says_so(index: int) -> None:
    # before: "device '0' is not a torch device (e.g. cpu, cuda, cuda:1)", though 0 is one
    with pytest.raises(
        ConfigError,
        match=rf"device {index} \(an accelerator's index\) is not "
        r"available here: this machine has no accelerator .*; use device='cpu'",
    ):
        check_device(index)


def test_a_bool_device_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"device must be a string, an index or a torch.device"):
        check_device(True)  # type: ignore[arg-type]


def test_cpu_device_forms_are_accepted() -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")


class _ScaledLoop(bbb.BayesLSTM):
    def _torch_forward(self, *args: Any, **kwargs: Any) -> Any:
        out, hn, cn = super()._torch_forward(*args, **kwargs)
        return 2 * out, hn, cn


class _OwnForward(bbb.BayesGRU):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out, hn = super().forward(*args, **kwargs)
        return 2 * out, hn


@pytest.mark.parametrize(
    ("cls", "method"), [(_ScaledLoop, "_torch_forward"), (_OwnForward, "forward")]
)
def test_a_recurrent_subclass_computing_another_function_is_not_converted(
    cls: type, method: str
) -> None:
    layer = cls(3, 4)
    x = torch.randn(5, 2, 3)
    with bbb.sampling(layer, "mean"):
        out = layer(x)[0]
    plain = bbb.BayesLSTM(3, 4) if cls is _ScaledLoop else bbb.BayesGRU(3, 4)
    plain.load_state_dict(layer.state_dict())
    with bbb.sampling(plain, "mean"):
        assert not torch.allclose(out, plain(x)[0])  # the subclass computes another function
    # before: _ScaledLoop converted silently to an nn.LSTM computing half its mean output
    with pytest.raises(
        TypeError, match=rf"cannot convert {cls.__name__}: it overrides {method}\(\)"
    ):
        layer.to_torch()
    with pytest.raises(TypeError, match=rf"overrides {method}\(\)"):
        bbb.to_deterministic(torch.nn.Sequential(layer))
    assert isinstance(plain.to_torch(), torch.nn.RNNBase)  # the library's own classes convert
