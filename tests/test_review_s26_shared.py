"""Review of ``shared_prefix`` (issue #3) and of the per-step learning-rate plan (issue #4).

``vectorized_samples(model, S, batch_size=B)`` (``ELBO(shared_prefix=True)``,
``predict(..., shared_prefix=True)``): the model is called on its B inputs and each Bayesian
layer makes the S copies of what it receives.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bbb


def _ensemble_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), bbb.BayesLinearEnsemble(3, 4, 2))


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_ensemble_layer_makes_the_copies_of_its_members(estimator: str) -> None:
    # A BayesLinearEnsemble's input is (K, N, in): dim 0 holds the K members, so its "batch"
    # is K. Its input check ran before the copies were made and refused the K rows
    # ("dimension 0 must be 2 x members = 6, got 3") on every shared_prefix pass.
    model = _ensemble_model()
    for layer in bbb.bayes_modules(model):
        layer.estimator = estimator
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with bbb.vectorized_samples(model, 2):
        plain = model(bbb.repeat_samples(x, 2))
    torch.manual_seed(2)
    with bbb.vectorized_samples(model, 2, batch_size=3):
        shared = model(x)
    assert shared.shape == (6, 5, 2)
    # the body's Linear on 3 rows instead of 6 copies: float32 rounding of another blocking
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-6)
    torch.manual_seed(2)
    outs = bbb.sample_outputs(model, x, 2, shared_prefix=True)
    torch.testing.assert_close(outs.reshape(6, 5, 2), plain, rtol=1e-6, atol=1e-6)


def test_input_errors_inside_a_shared_pass_name_the_users_shape() -> None:
    # the input checks see the S copies, as on the ordinary path: the same message
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), bbb.BayesLinear(4, 2))
    x = torch.randn(3, 5)
    messages = []
    for batch_size, given in ((None, bbb.repeat_samples(x, 2)), (3, x)):
        with (
            pytest.raises(ValueError, match="in_features=4, got 5") as info,
            bbb.vectorized_samples(model, 2, batch_size=batch_size),
        ):
            model(given)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "got (3, 5)" in messages[1]


class _FlattenTokens(nn.Module):
    """(B, T, d) -> (B * T, d): a sequence model's tokens flattened into the rows."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])


def test_rows_the_model_made_itself_are_not_taken_for_the_copies() -> None:
    # T == S: the flattened tokens are exactly S * B rows, which the layer took for the S
    # copies of the batch; the tokens of different examples were mixed into "samples"
    model = nn.Sequential(_FlattenTokens(), bbb.BayesLinear(4, 2))
    x = torch.randn(3, 2, 4)
    with (
        pytest.raises(ValueError, match=r"received 6 = 2 x 3 rows .* before any Bayesian layer"),
        bbb.vectorized_samples(model, 2, batch_size=3),
    ):
        model(x)
    assert model[1]._prefix_rows is None and model[1]._prefix_copied is None
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=30, num_samples=2, shared_prefix=True)
    with pytest.raises(ValueError, match="before any Bayesian layer"):
        elbo(model, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="before any Bayesian layer"):
        bbb.predict(model, x, num_samples=2, shared_prefix=True)
    # without batch_size the copies are made at the input, before the flattening, as before
    with bbb.vectorized_samples(model, 2):
        assert model(bbb.repeat_samples(x, 2)).shape == (12, 2)


class _TwoHeads(nn.Module):
    """A body, then a Bayesian layer feeding a second one, and a Bayesian branch on the body."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.a = bbb.BayesLinear(6, 6)
        self.b = bbb.BayesLinear(6, 3)
        self.c = bbb.BayesLinear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        # b receives a's S * B rows (the copies made by a); c repeats the body's B rows itself
        return self.b(torch.relu(self.a(h))) + self.c(h)


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_layers_after_the_copies_and_parallel_branches(estimator: str) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(4))
    results = []
    for shared in (False, True):
        torch.manual_seed(0)
        model = _TwoHeads()
        for layer in bbb.bayes_modules(model):
            layer.estimator = estimator
        elbo = bbb.ELBO(bbb.Categorical(), dataset_size=50, num_samples=3, shared_prefix=shared)
        torch.manual_seed(1)
        out = elbo(model, x, y)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))  # type: ignore[union-attr]
        # the pass leaves every layer as it was
        assert all(m._prefix_rows is None and m.num_samples == 1 for m in bbb.bayes_modules(model))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _elbo_pass(model: nn.Module, x: Tensor, y: Tensor, shared: bool) -> tuple[Tensor, list[Tensor]]:
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=40, num_samples=3, shared_prefix=shared)
    torch.manual_seed(1)
    out = elbo(model, x, y)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    return out.loss.detach(), grads


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_a_model_whose_first_layer_is_bayesian_is_unchanged_bit_for_bit(estimator: str) -> None:
    # nothing to share: the first layer makes the copies the ELBO made before, marked as
    # identical blocks in the same way, so the same floating-point operations run
    torch.manual_seed(0)
    model = nn.Sequential(
        bbb.BayesLinear(4, 6, estimator=estimator), nn.Tanh(), bbb.BayesLinear(6, 3)
    )
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(3))
    (l0, g0), (l1, g1) = (_elbo_pass(model, x, y, s) for s in (False, True))
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = bbb.BayesLinear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.head(h) + h  # a skip connection around the first Bayesian layer


def test_a_skip_around_the_first_bayesian_layer_at_one_example() -> None:
    # B = 1: the body's one row broadcasts against the head's S rows instead of failing;
    # it is the same row for every sample, so the loss and gradients are those of the copies
    torch.manual_seed(0)
    model = _Skip()
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2])
    (l0, g0), (l1, g1) = (_elbo_pass(model, x, y, s) for s in (False, True))
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # B > 1: a shape error (documented), not a wrong result
    with pytest.raises(RuntimeError, match="must match the size"):
        _elbo_pass(model, torch.randn(2, 4), torch.tensor([0, 1]), True)
