"""Review session 25, issue #3: deploying a trained Bayesian model (export, conversion to a
plain network, compact export and reloading)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

import bbb


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(bbb.BayesLinear(4, 8), nn.ReLU(), bbb.BayesLinear(8, 3))


def _mean_output(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad(), bbb.sampling(model, "mean"):
        return model(x)


def test_to_deterministic_of_a_compiled_model_is_the_plain_network() -> None:
    model = _mlp()
    x = torch.randn(5, 4)
    compiled = torch.compile(model)
    det = bbb.to_deterministic(compiled)
    # the plain network (was: a copy of the torch.compile wrapper)
    assert isinstance(det, nn.Sequential)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    # its keys are the plain architecture's (were "_orig_mod.0.weight", ...: a RuntimeError)
    plain.load_state_dict(det.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), _mean_output(model, x), rtol=0, atol=0)
    # TorchScript takes it (was: "module, class, method, ... was expected, got Sequential")
    scripted = torch.jit.script(det)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), _mean_output(model, x), rtol=0, atol=0)


class _Scaled(bbb.BayesLinear):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class _Tempered(bbb.BayesLinear):
    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return super().op(x, w, b) / 3


class _Defaults(bbb.BayesLinear):
    """A subclass that only changes the constructor's defaults: the same function."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, rho_init=-6.0)


@pytest.mark.parametrize(
    ("cls", "method"), [(_Scaled, "forward() of BayesLinear"), (_Tempered, "op() of BayesLinear")]
)
def test_to_deterministic_refuses_a_subclass_that_computes_another_function(
    cls: type[bbb.BayesLinear], method: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cls(3, 2))
    # was: a plain nn.Linear, whose outputs differed from the mean network's
    with pytest.raises(
        TypeError, match=rf"{cls.__name__}: it overrides {re.escape(method)}.*sampling"
    ):
        bbb.to_deterministic(model)
    with pytest.raises(TypeError, match=cls.__name__):
        bbb.to_deterministic(model[0])


def test_to_deterministic_converts_a_subclass_that_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Defaults(3, 2), nn.ReLU())
    x = torch.randn(4, 3)
    det = bbb.to_deterministic(model)
    assert type(det[0]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(det(x), _mean_output(model, x), rtol=0, atol=0)
