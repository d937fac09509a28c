"""Review s29 (#3): one rule for the Bayesian layers' on/off arguments (``bias`` and the
like), and a shared prior's two values in a state dict refused whichever key differs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import bbb
from bbb.nn.module import bayes_modules

# each layer with its bias argument; the name its error message gives
_LAYERS: dict[str, Callable[[object], nn.Module]] = {
    "BayesLinear": lambda b: bbb.BayesLinear(3, 2, bias=b),  # type: ignore[arg-type]
    "BayesConv1d": lambda b: bbb.BayesConv1d(2, 3, 3, bias=b),  # type: ignore[arg-type]
    "BayesConv2d": lambda b: bbb.BayesConv2d(2, 3, 3, bias=b),  # type: ignore[arg-type]
    "BayesConv3d": lambda b: bbb.BayesConv3d(2, 3, 3, bias=b),  # type: ignore[arg-type]
    "BayesConvTranspose2d": lambda b: bbb.BayesConvTranspose2d(
        2,
        3,
        3,
        bias=b,  # type: ignore[arg-type]
    ),
    "BayesLinearEnsemble": lambda b: bbb.BayesLinearEnsemble(
        2,
        3,
        2,
        bias=b,  # type: ignore[arg-type]
    ),
    "BayesLSTM": lambda b: bbb.BayesLSTM(3, 2, bias=b),  # type: ignore[arg-type]
    "BayesGRU": lambda b: bbb.BayesGRU(3, 2, bias=b),  # type: ignore[arg-type]
}


def _has_bias(layer: nn.Module) -> bool:
    """Whether every Bayesian layer inside ``layer`` learns a bias."""
    flags = {m.bias_mu is not None for m in bayes_modules(layer)}
    assert len(flags) == 1
    return flags.pop()


@pytest.mark.parametrize("name", sorted(_LAYERS))
@pytest.mark.parametrize("bad", ["no", 2, 0, None, 1.0])
def test_every_layer_refuses_a_non_bool_bias_by_name(name: str, bad: object) -> None:
    # Before: BayesLinear and BayesConv*d took any value by its truth (bias="no" gave the
    # layer a bias), while the transposed convolutions, the ensemble and the recurrent layers
    # refused it: now one helper refuses it everywhere, naming the layer, the value, its type
    # and what is accepted
    expected = (
        f"{name} bias must be True or False, got {bad!r} of type {type(bad).__name__} "
        "(accepted: a bool or a numpy.bool_)"
    )
    with pytest.raises(ValueError) as info:
        _LAYERS[name](bad)
    assert str(info.value) == expected


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_every_layer_takes_numpy_bools_as_bools(name: str) -> None:
    # Before: np.True_ was refused by the layers that checked (isinstance(bias, bool)) and
    # taken by its truth by the others; now a numpy.bool_ is a bool everywhere, as in torch
    assert _has_bias(_LAYERS[name](np.True_)) is True
    assert _has_bias(_LAYERS[name](np.False_)) is False
    assert _has_bias(_LAYERS[name](True)) is True
    assert _has_bias(_LAYERS[name](False)) is False


def test_recurrent_flags_are_stored_as_python_bools() -> None:
    # torch.lstm takes a Python bool: a numpy.bool_ is converted when the layer is built
    torch.manual_seed(0)
    layer = bbb.BayesLSTM(3, 2, bias=np.True_, batch_first=np.True_, bidirectional=np.False_)  # type: ignore[arg-type]
    assert (type(layer.bias), type(layer.batch_first), type(layer.bidirectional)) == (
        bool,
        bool,
        bool,
    )
    assert layer(torch.randn(4, 5, 3))[0].shape == (4, 5, 2)  # batch first: (N, L, H)
    with pytest.raises(ValueError, match=r"^BayesGRU batch_first must be True or False, got 'no'"):
        bbb.BayesGRU(3, 2, batch_first="no")  # type: ignore[arg-type]


def test_embedding_flags_follow_the_same_rule() -> None:
    layer = bbb.BayesEmbedding(5, 3, scale_grad_by_freq=np.True_, sparse=np.False_)  # type: ignore[arg-type]
    assert layer.scale_grad_by_freq is True
    with pytest.raises(
        ValueError, match=r"^BayesEmbedding scale_grad_by_freq must be True or False, got 1 of"
    ):
        bbb.BayesEmbedding(5, 3, scale_grad_by_freq=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^BayesEmbedding sparse must be True or False, got 'no'"):
        bbb.BayesEmbedding(5, 3, sparse="no")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"does not support sparse=np.True_; accepted value: False"
    ):
        bbb.BayesEmbedding(5, 3, sparse=np.True_)  # type: ignore[arg-type]


def _shared_prior_mlp() -> tuple[nn.Module, bbb.GaussianPrior, list[str]]:
    """A (4 -> 8 -> 2) Bayesian MLP whose two layers share one GaussianPrior(1.0), and the
    two state-dict keys of its sigma."""
    torch.manual_seed(0)
    prior = bbb.GaussianPrior(1.0)
    model = bbb.models.bayes_mlp(4, [8], 2, prior=prior)
    keys = [k for k in model.state_dict() if k.endswith("prior.sigma")]
    assert keys == ["0.prior.sigma", "2.prior.sigma"]
    return model, prior, keys


@pytest.mark.parametrize("which", [0, 1])
def test_shared_prior_key_replaced_in_the_models_own_state_dict_is_refused(which: int) -> None:
    # The model's own state_dict() holds the prior's buffer (detached, same memory) under both
    # keys. Before: replacing the FIRST key by another tensor was accepted, the replaced value
    # winning silently (the first layer's copy wrote through to the second key, which then
    # read as equal); replacing the second was refused. Now both are refused, naming both keys
    # and values, and the prior keeps its value.
    model, prior, keys = _shared_prior_mlp()
    sd = dict(model.state_dict())
    sd[keys[which]] = torch.tensor(0.25)
    values = {keys[which]: 0.25, keys[1 - which]: 1.0}
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    message = str(info.value)
    assert "GaussianPrior is shared by several layers (0.prior.* and 2.prior.*)" in message
    assert (
        f"gives its sigma two values: 0.prior.sigma = {values['0.prior.sigma']!r}, "
        f"2.prior.sigma = {values['2.prior.sigma']!r}"
    ) in message
    assert float(prior.sigma) == 1.0
    assert prior.distribution().scale.item() == 1.0


def test_shared_prior_key_edited_in_place_is_the_shared_prior() -> None:
    # Decision pinned: editing one key of the model's own state_dict() in place edits the
    # shared prior itself (the key is its buffer, as torch's state-dict tensors are the
    # parameters): both keys read the new value before any load, the dict does not give two
    # values, and loading it back is accepted. One prior object, one value.
    model, prior, keys = _shared_prior_mlp()
    sd = model.state_dict()
    sd[keys[0]].fill_(0.5)
    assert float(prior.sigma) == 0.5  # no load yet: the model already has it
    assert [float(sd[k]) for k in keys] == [0.5, 0.5]
    model.load_state_dict(sd)
    assert [float(m.prior.sigma) for m in bayes_modules(model)] == [0.5, 0.5]
    assert all(m.prior is prior for m in bayes_modules(model))


def test_shared_prior_checkpoint_with_one_key_replaced_is_refused() -> None:
    # A saved checkpoint (torch.save keeps the two keys one tensor, apart from the model):
    # replacing either key is refused, and loading it unchanged is accepted
    import io

    model, prior, keys = _shared_prior_mlp()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    for key in keys:
        buffer.seek(0)
        sd = torch.load(buffer)
        sd[key] = torch.tensor(0.25)
        with pytest.raises(RuntimeError, match="gives its sigma two values"):
            model.load_state_dict(sd)
        assert float(prior.sigma) == 1.0
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer))
    assert float(prior.sigma) == 1.0
