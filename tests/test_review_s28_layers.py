"""Session 28 review of the layers added in session 27: BayesConvTranspose*d, BayesEmbedding,
BayesLSTM / BayesGRU (issue #3)."""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings

import pytest
import torch
from torch import nn

import bbb
from bbb import BayesEmbedding, BayesGRU, BayesLSTM

DT = torch.float64


# --------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_embedding_runs_under_vmap_as_nn_embedding_and_still_checks_its_indices(
    estimator: str,
) -> None:
    # the index check read a number from vmap's batched tensor: "vmap: It looks like you're
    # calling .item() on a Tensor", where nn.Embedding runs
    torch.manual_seed(0)
    layer = BayesEmbedding(7, 3, padding_idx=2, estimator=estimator, dtype=DT)
    plain = bbb.to_deterministic(layer)
    idx = torch.tensor([[1, 2, 2, 6], [2, 5, 0, 1]])
    with bbb.sampling(layer, "mean"):
        got = torch.func.vmap(layer)(idx)
        assert torch.equal(got, torch.func.vmap(plain)(idx))
        assert torch.equal(got, layer(idx))
        with pytest.raises(ValueError, match=r"got index 9, outside \[0, 7\)"):
            torch.func.vmap(layer)(torch.tensor([[1, 9]]))
    # per-example gradients (vmap of grad) of the mean network: nn.Embedding's
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p: dict[str, torch.Tensor], i: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, p, (i,)).pow(2).sum()

    with bbb.sampling(layer, "mean"):
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, idx)
    for n in range(idx.shape[0]):
        plain.zero_grad()
        plain(idx[n]).pow(2).sum().backward()
        assert plain.weight.grad is not None
        assert torch.equal(grads["weight_mu"][n], plain.weight.grad)
    # sampling under vmap draws per example with randomness="different"
    y = torch.func.vmap(layer, randomness="different")(idx)
    assert y.shape == (2, 4, 3)


def test_bayesianize_names_an_embedding_whose_padding_row_is_not_zero() -> None:
    # nn.Embedding.from_pretrained(table, padding_idx=0) keeps the table's row 0, which
    # nn.Embedding returns at padding positions; BayesEmbedding returns zeros there, so the
    # converted model silently computed another function at those positions
    torch.manual_seed(0)
    table = torch.randn(5, 3)
    model = nn.Sequential(nn.Embedding.from_pretrained(table, padding_idx=0, freeze=False))
    with pytest.warns(UserWarning, match=r"padding row that is not zero: '0' \(padding_idx=0\)"):
        bayes = bbb.bayesianize(model, embeddings=True, init_from_weights=True)
    idx = torch.tensor([[0, 1, 4]])
    with bbb.sampling(bayes, "mean"):
        y = bayes(idx)
    assert torch.equal(y[0, 1:], model(idx)[0, 1:])  # every other position is exact
    assert torch.equal(y[0, 0], torch.zeros(3))  # the documented zero, now announced
    # a zero padding row (nn.Embedding's own initialisation), or no init_from_weights: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = nn.Sequential(nn.Embedding(5, 3, padding_idx=0))
        exact = bbb.bayesianize(fresh, embeddings=True, init_from_weights=True)
        bbb.bayesianize(model, embeddings=True)
    with bbb.sampling(exact, "mean"):
        assert torch.equal(exact(idx), fresh(idx))


# --------------------------------------------------------------------------- recurrent


@pytest.mark.parametrize("cls", [BayesLSTM, BayesGRU])
def test_recurrent_layer_options_set_on_the_layer_reach_every_cell(
    cls: type[BayesLSTM] | type[BayesGRU],
) -> None:
    # lstm.estimator = "flipout" and lstm.mode = "mean" set unused attributes silently (the
    # cells kept theirs), and lstm.prior = p registered a stray "prior" submodule whose keys
    # joined the state dict while every cell kept its own prior
    torch.manual_seed(0)
    m = cls(2, 3, num_layers=2, bidirectional=True)
    cells = [c for _, c in m.cells()]
    m.estimator = "flipout"
    assert all(c.estimator == "flipout" for c in cells) and m.estimator == "flipout"
    m.mode = "mean"
    assert all(c.mode == "mean" for c in cells) and m.mode == "mean"
    x = torch.randn(4, 2, 2)
    assert torch.equal(m(x)[0], m.to_torch()(x)[0])  # the mean network, as set
    prior = bbb.ScaleMixturePrior(0.5, 1.0, 0.01)
    m.prior = prior
    assert all(c.prior is prior and c.kl_mode == "mc" for c in cells)  # kl="auto" re-resolved
    assert m.kl_mode == "mc"
    assert not any(k.startswith("prior.") for k in m.state_dict())
    fresh = cls(2, 3, num_layers=2, bidirectional=True, prior=copy.deepcopy(prior))
    fresh.load_state_dict(m.state_dict())  # strict: the same keys
    # a bad value is refused by the first cell, before any changes, naming what is accepted
    with pytest.raises(ValueError, match="Accepted values: 'reparam', 'flipout'"):
        m.estimator = "local"
    with pytest.raises(ValueError, match="accepted values: sample, mean, frozen"):
        m.mode = "average"
    assert all(c.estimator == "flipout" and c.mode == "mean" for c in cells)
    # cells set apart: reading the layer's option says so
    m.l0.mode = "frozen"
    with pytest.raises(ValueError, match="its layers differ"):
        _ = m.mode
    # copies keep the forwarding
    clone = pickle.loads(pickle.dumps(copy.deepcopy(m)))
    clone.mode = "sample"
    assert all(c.mode == "sample" for _, c in clone.cells())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_mean_mode_is_the_torch_layer_for_every_option_and_input_form(
    kind: str,
) -> None:
    """num_layers, batch_first, bidirectional, bias; given h0 (c0), unbatched inputs with
    unbatched states, empty batches: bit for bit the nn.LSTM / nn.GRU of the same weights."""
    torch.manual_seed(1)
    torch_cls = nn.LSTM if kind == "LSTM" else nn.GRU
    for layers, batch_first, bidir, bias in itertools.product([1, 2], *[[False, True]] * 3):
        plain = torch_cls(3, 4, layers, bias, batch_first, 0.0, bidir)
        model = bbb.bayesianize(nn.Sequential(plain), recurrent=True, init_from_weights=True)
        bayes = model[0]
        assert isinstance(bayes, BayesLSTM if kind == "LSTM" else BayesGRU)
        n_h = layers * (2 if bidir else 1)
        x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
        one = x[0] if batch_first else x[:, 0]
        empty = x[:0] if batch_first else x[:, :0]
        h, c = torch.randn(n_h, 2, 4), torch.randn(n_h, 2, 4)
        hx = (h, c) if kind == "LSTM" else h
        hx1 = (h[:, 0], c[:, 0]) if kind == "LSTM" else h[:, 0]
        calls = [(x,), (x, hx), (one,), (one, hx1), (empty,)]
        with bbb.sampling(bayes, "mean"):
            for args in calls:
                got, want = _leaves(bayes(*args)), _leaves(plain(*args))
                assert len(got) == len(want) == (3 if kind == "LSTM" else 2)
                for g, w in zip(got, want, strict=True):
                    assert g.shape == w.shape and torch.equal(g, w)


def _leaves(out: object) -> list[torch.Tensor]:
    """The tensors of a recurrent layer's output, (output, h_n) or (output, (h_n, c_n))."""
    if isinstance(out, torch.Tensor):
        return [out]
    assert isinstance(out, tuple)
    return [t for part in out for t in _leaves(part)]


# --------------------------------------------------------------------------- conv transpose


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, "float32"])
def test_conv_transpose_refuses_a_dtype_that_is_not_floating_naming_the_accepted_ones(
    dtype: object,
) -> None:
    # complex64 built a posterior with complex sigma = softplus(rho) silently; the others
    # failed inside nn.Module.to without naming the layer
    with pytest.raises(ValueError, match=r"BayesConvTranspose2d dtype must be a floating-point"):
        bbb.BayesConvTranspose2d(2, 3, 3, dtype=dtype)  # type: ignore[arg-type]
    for ok in (torch.float64, torch.bfloat16):
        layer = bbb.BayesConvTranspose1d(2, 3, 3, dtype=ok)
        assert layer.weight_mu.dtype == layer.bias_rho.dtype == ok  # type: ignore[union-attr]
