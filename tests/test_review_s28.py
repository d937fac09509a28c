"""Defects found in session 28, each with the test that failed before its fix.

1. An integer device (an accelerator's index, as ``torch.device(0)`` reads it) on a machine
   without an accelerator was reported as "not a torch device (e.g. cpu, cuda, cuda:1)".
"""

from __future__ import annotations

import pytest
import torch

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
