"""Review session 29: the Bayesian layers' base class, its save/load paths (issue #3)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbb
from bbb.nn import BayesConv2d, BayesLinear, BayesModule, sampling

# (checkpoint dtype, layer dtype): down and up in precision
_DTYPE_PAIRS = [
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
]


def _layer(kind: str, dtype: torch.dtype) -> BayesModule:
    if kind == "linear":
        return BayesLinear(4, 3, dtype=dtype)
    return BayesConv2d(2, 3, 3, dtype=dtype)


def _input(kind: str, dtype: torch.dtype) -> Tensor:
    shape = (2, 4) if kind == "linear" else (2, 2, 5, 5)
    return torch.randn(shape, dtype=dtype)


def _mean_output(layer: BayesModule, x: Tensor) -> Tensor:
    """The mean network's output computed by hand: (mu * mask) applied as the layer's op."""
    w = layer.weight_mu if layer.weight_mask is None else layer.weight_mu * layer.weight_mask
    if isinstance(layer, BayesLinear):
        return F.linear(x, w, layer.bias_mu)
    return F.conv2d(x, w, layer.bias_mu)


# ------------------------------------------------------------------ 1. masks under assign=True
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize(("saved", "target"), _DTYPE_PAIRS)
@pytest.mark.parametrize("assign", [True, False])
@pytest.mark.parametrize("pruned", [True, False])
def test_a_loaded_mask_follows_the_loaded_weights_dtype(
    kind: str, saved: torch.dtype, target: torch.dtype, assign: bool, pruned: bool
) -> None:
    # A checkpoint whose mu and rho were cast to the layer's dtype but whose mask was not (as
    # torch's assign=True keeps every tensor's dtype): the mask follows the weights. Before,
    # assign=True kept the checkpoint's mask dtype and every forward failed ("self and mat2
    # must have the same dtype, but got BFloat16 and Float").
    source = nn.Sequential(_layer(kind, saved))
    if pruned:
        bbb.prune_by_snr(source, 0.5)
    state = {
        k: v.to(target) if k.endswith(("_mu", "_rho")) else v
        for k, v in source.state_dict().items()
    }
    model = nn.Sequential(_layer(kind, target))
    model.load_state_dict(state, assign=assign)
    layer = model[0]
    assert isinstance(layer, BayesModule)
    assert layer.weight_mu.dtype == target
    if pruned:
        assert layer.weight_mask is not None
        assert layer.weight_mask.dtype == target
        # 0/1 values: exact in every float dtype
        assert torch.equal(layer.weight_mask, state["0.weight_mask"].to(target))
    else:
        assert layer.weight_mask is None
    x = _input(kind, target)
    with sampling(model, "mean"):
        y = model(x)
    # the same op on the same tensors: equal up to the op's own rounding (a bfloat16 ulp)
    torch.testing.assert_close(y, _mean_output(layer, x))
    for mode in ("sample", "frozen"):
        with sampling(model, mode):
            out = model(x)
        assert out.dtype == target
        assert torch.isfinite(out).all()
        assert torch.isfinite(bbb.kl_divergence(model))


@pytest.mark.parametrize(("saved", "target"), _DTYPE_PAIRS)
def test_assign_of_a_whole_checkpoint_takes_its_dtype_mask_included(
    saved: torch.dtype, target: torch.dtype
) -> None:
    # torch's rule for assign=True (nn.Linear too): the layer takes the state's dtype. A pruned
    # layer already holding a mask of the old dtype gets the state's mask, in that dtype.
    source = nn.Sequential(BayesLinear(4, 3, dtype=saved))
    bbb.prune_by_snr(source, 0.5)
    model = nn.Sequential(BayesLinear(4, 3, dtype=target))
    bbb.prune_by_snr(model, 0.25)
    model.load_state_dict(source.state_dict(), assign=True)
    layer = model[0]
    assert isinstance(layer, BayesLinear)
    assert layer.weight_mu.dtype == saved
    assert layer.weight_mask is not None
    assert layer.weight_mask.dtype == saved
    assert torch.equal(layer.weight_mask, source.state_dict()["0.weight_mask"])
    x = _input("linear", saved)
    with sampling(model, "mean"), sampling(source, "mean"):
        assert torch.equal(model(x), source(x))  # the same tensors, the same op


def test_a_layers_own_load_state_dict_with_assign_casts_the_mask() -> None:
    # the reported call: the layer's own load_state_dict (prefix ""), not a model's
    source = BayesLinear(4, 3)
    bbb.prune_by_snr(source, 0.5)
    layer = BayesLinear(4, 3, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) if k.endswith(("_mu", "_rho")) else v
             for k, v in source.state_dict().items()}  # fmt: skip
    layer.load_state_dict(state, assign=True)
    assert layer.weight_mask is not None
    assert layer.weight_mask.dtype == torch.bfloat16
    assert layer(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_mask_loaded_before_meta_weights_keeps_its_values() -> None:
    # deferred initialisation: a partial assign=True load of the mask onto a layer built on
    # "meta" keeps the mask's values (it is not moved onto the meta weights' device)
    source = BayesLinear(4, 3)
    bbb.prune_by_snr(source, 0.5)
    assert source.weight_mask is not None
    layer = BayesLinear(4, 3, device="meta")
    layer.load_state_dict({"weight_mask": source.weight_mask}, strict=False, assign=True)
    assert layer.weight_mask is not None
    assert not layer.weight_mask.is_meta
    assert torch.equal(layer.weight_mask, source.weight_mask)


# ------------------------------------------------------------------ 2. frozen samples and state_dict
def _frozen_net() -> nn.Sequential:
    return nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 2))


def test_the_state_dict_holds_the_posterior_not_the_frozen_sample() -> None:
    # documented contract (README "model.state_dict() is the portable form"): mu, rho, the
    # mask if pruned and the prior's hyper-parameters; the frozen sample is not saved, so a
    # checkpoint of a model in frozen mode loads into any model built the same way (strict)
    model = _frozen_net()
    bbb.set_sampling(model, "frozen")
    x = torch.randn(5, 4)
    with torch.no_grad():
        model(x)  # draws and keeps the frozen sample
    keys = set(model.state_dict())
    fresh = _frozen_net()
    assert keys == set(fresh.state_dict())
    assert not any("frozen" in k or "eps" in k for k in keys)
    fresh.load_state_dict(model.state_dict())  # strict: no missing or unexpected key


def test_a_reloaded_model_redraws_its_frozen_sample_the_same_under_the_same_seed() -> None:
    # the documented way to get the frozen network back from a state dict: the first frozen
    # pass draws the sample from torch's global generator, so the same seed gives the same one
    x = torch.randn(5, 4)
    model = _frozen_net()
    bbb.set_sampling(model, "frozen")
    torch.manual_seed(123)
    with torch.no_grad():
        y = model(x)
    fresh = _frozen_net()
    fresh.load_state_dict(model.state_dict())
    bbb.set_sampling(fresh, "frozen")  # the mode is not in the state dict either
    torch.manual_seed(7)
    with torch.no_grad():
        assert not torch.equal(fresh(x), y)  # another seed: another sample
    bbb.resample(fresh)
    torch.manual_seed(123)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_a_layer_keeps_its_frozen_noise_across_load_state_dict() -> None:
    # the frozen sample is the noise eps of w = mu + sigma * eps (kept until resample, as
    # Thompson sampling needs): loading a state changes mu and sigma, not the noise, as an
    # optimizer step does; loading the first state back gives the first network again
    x = torch.randn(5, 4)
    model = _frozen_net()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    bbb.set_sampling(model, "frozen")
    with torch.no_grad():
        y = model(x)
        model.load_state_dict(_frozen_net().state_dict())  # another posterior
        assert not torch.equal(model(x), y)
        model.load_state_dict(first)
        assert torch.equal(model(x), y)


# ------------------------------------------------------------------ 3. save/load paths
@pytest.mark.parametrize("as_type", ["list", "numpy"])
@pytest.mark.parametrize("pruned", [False, True])
def test_a_mask_that_is_not_a_tensor_is_named_as_torch_names_it(as_type: str, pruned: bool) -> None:
    # an unpruned layer failed with "'list' object has no attribute 'shape'" or a TypeError of
    # empty_like, naming neither the key nor the problem; a pruned one got torch's message
    source = nn.Sequential(BayesLinear(4, 3))
    bbb.prune_by_snr(source, 0.5)
    state: dict[str, object] = dict(source.state_dict())
    mask = state["0.weight_mask"]
    assert isinstance(mask, Tensor)
    state["0.weight_mask"] = mask.tolist() if as_type == "list" else mask.numpy()
    model = nn.Sequential(BayesLinear(4, 3))
    if pruned:
        bbb.prune_by_snr(model, 0.25)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    msg = str(info.value)
    assert 'While copying the parameter named "0.weight_mask"' in msg
    assert "expected torch.Tensor" in msg
    assert ("list" if as_type == "list" else "numpy.ndarray") in msg
    assert "Unexpected key" not in msg  # reported once, as the wrong type


def _torch_round_trip(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded: nn.Module = torch.load(buf, weights_only=False)  # our own module: a trusted pickle
    return loaded


_COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_round_trip,
}


@pytest.mark.parametrize("how", list(_COPIES))
@pytest.mark.parametrize("batch_size", [None, 6])
def test_a_copy_made_inside_vectorized_samples_is_outside_it(
    how: str, batch_size: int | None
) -> None:
    # the context's state is the original's, restored on exit; a copy kept num_samples=S
    # (and the context's batch_size) for good: its forward of 6 rows then failed as not a
    # multiple of S=4
    model = nn.Sequential(BayesLinear(4, 3), nn.ReLU(), BayesLinear(3, 1))
    x = torch.randn(6, 4)
    with bbb.vectorized_samples(model, 4, batch_size=batch_size):
        clone = _COPIES[how](model)
    for layer in bbb.bayes_modules(clone):
        assert (layer.num_samples, layer._prefix_rows, layer._prefix_copied) == (1, None, None)
    with sampling(clone, "mean"), sampling(model, "mean"):
        assert torch.equal(clone(x), model(x))
    assert clone(x).shape == (6, 1)
    # and the copy enters a context of its own as the original does
    pred = bbb.predict(clone, x, likelihood=bbb.Gaussian(), num_samples=5)
    assert torch.isfinite(pred.mean).all()
