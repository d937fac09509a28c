"""BayesLSTM / BayesGRU: torch's interface and numbers, one weight sample per sequence pass,
flipout's per-example weights, the KL counted once, training, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bbb
from bbb.nn import recurrent as rec
from bbb.nn.recurrent import BayesGRU, BayesLSTM, BayesRecurrentWeights

CLASSES = [BayesLSTM, BayesGRU]


def _hx(cls: type, layers: int, batch: int, hidden: int, gen: torch.Generator):
    h = torch.randn(layers, batch, hidden, generator=gen)
    if cls is BayesLSTM:
        return (h, torch.randn(layers, batch, hidden, generator=gen))
    return h


def _torch_layer(
    m: rec._BayesRNNBase, weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
):
    """A plain nn.LSTM/nn.GRU built here (not by to_torch) with the given combined weight and
    bias per cell, split by torch's parameter names."""
    cls = nn.LSTM if isinstance(m, BayesLSTM) else nn.GRU
    layer = cls(
        m.input_size, m.hidden_size, m.num_layers, bias=m.bias, batch_first=m.batch_first,
        bidirectional=m.bidirectional,
    )  # fmt: skip
    g = m._gates * m.hidden_size
    state = {}
    for suffix, cell in m.cells():
        w, b = weights[suffix]
        state[f"weight_ih_{suffix}"] = w[:, : cell.input_size]
        state[f"weight_hh_{suffix}"] = w[:, cell.input_size :]
        if b is not None:
            state[f"bias_ih_{suffix}"] = b[:g]
            state[f"bias_hh_{suffix}"] = b[g:]
    layer.load_state_dict(state)
    return layer


# --------------------------------------------------------------------------- torch's numbers
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_mean_mode_equals_the_torch_layer_it_was_made_from(cls, batch_first) -> None:
    # a trained torch layer -> bayesianize(init_from_weights) -> mean mode: bit for bit
    # torch's output (several layers, both directions, a given h0), and to_deterministic
    # gives a torch layer with the same output
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    plain = (nn.LSTM if cls is BayesLSTM else nn.GRU)(
        3, 4, num_layers=2, batch_first=batch_first, bidirectional=True
    )
    bayes = bbb.bayesianize(plain, recurrent=True, init_from_weights=True)
    assert type(bayes) is cls
    x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3), generator=gen)
    hx = _hx(cls, 4, 2, 4, gen)
    want, want_state = plain(x, hx)
    with bbb.sampling(bayes, "mean"):
        got, state = bayes(x, hx)
    assert torch.equal(got, want)
    if cls is BayesLSTM:
        assert torch.equal(state[0], want_state[0]) and torch.equal(state[1], want_state[1])
    else:
        assert torch.equal(state, want_state)
    back = bbb.to_deterministic(bayes)
    assert type(back) is type(plain)
    assert torch.equal(back(x, hx)[0], want)
    # unbatched (2-D) input, as torch
    with bbb.sampling(bayes, "mean"):
        one, _ = bayes(x[0] if batch_first else x[:, 0])
    assert torch.equal(one, plain(x[0] if batch_first else x[:, 0])[0])


@pytest.mark.parametrize("cls", CLASSES)
def test_a_reparam_pass_uses_one_weight_sample_at_every_step(cls) -> None:
    # a sequence of identical inputs: the output is torch's layer run with the one sample
    # w = mu + sigma * eps the pass drew (a weight that changed between steps would not be)
    torch.manual_seed(2)
    m = cls(2, 3, num_layers=2, batch_first=True, rho_init=-1.0)
    x = torch.randn(3, 1, 2).expand(3, 6, 2)
    y, _ = m(x)
    weights = {}
    for suffix, cell in m.cells():
        r = cell._record
        w = cell.weight_mu + cell.weight_sigma * r.eps_w[0]
        b = cell.bias_mu + cell.bias_sigma * r.eps_b[0]
        weights[suffix] = (w.detach(), b.detach())
    assert torch.allclose(y, _torch_layer(m, weights)(x)[0], atol=1e-6)
    # and another pass draws another sample
    assert not torch.allclose(m(x)[0], y)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_vectorized_samples_give_each_block_its_own_weight_sample(cls, batch_first) -> None:
    # S = 3 weight samples in one pass (the Python loop with batched matrix products): each
    # block of the output is torch's layer with that block's sample, and h_0 given for the
    # B examples is shared by the S copies
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    m = cls(2, 3, num_layers=2, batch_first=batch_first, bidirectional=True, rho_init=-1.0)
    b, t, s = 2, 4, 3
    x = torch.randn((b, t, 2) if batch_first else (t, b, 2), generator=gen)
    hx = _hx(cls, 4, b, 3, gen)
    # the S copies in blocks of B along the batch dimension (dim 1 for batch_first=False)
    xs = bbb.repeat_samples(x, s) if batch_first else bbb.repeat_samples(x.transpose(0, 1), s)
    with bbb.vectorized_samples(m, s):
        y, state = m(xs if batch_first else xs.transpose(0, 1), hx)
    h_n = state[0] if cls is BayesLSTM else state
    assert h_n.shape == (4, s * b, 3)
    for k in range(s):
        weights = {}
        for suffix, cell in m.cells():
            r = cell._record
            w = cell.weight_mu + cell.weight_sigma * r.eps_w[k]
            bias = cell.bias_mu + cell.bias_sigma * r.eps_b[k]
            weights[suffix] = (w.detach(), bias.detach())
        want, want_state = _torch_layer(m, weights)(x, hx)
        rows = slice(k * b, (k + 1) * b)
        got = y[rows] if batch_first else y[:, rows]
        assert torch.allclose(got, want, atol=1e-6)
        want_h = want_state[0] if cls is BayesLSTM else want_state
        assert torch.allclose(h_n[:, k * b : (k + 1) * b], want_h, atol=1e-6)


# --------------------------------------------------------------------------- flipout
def test_flipout_gives_each_example_one_weight_fixed_across_time(monkeypatch) -> None:
    # with the signs a pass drew, example n's output is torch's layer run with
    # mu + (sigma * eps) * (s_n r_n^T): one weight sample per example, the same at every step
    torch.manual_seed(5)
    signs: list[torch.Tensor] = []
    real = rec.rademacher

    def recording(shape, like):
        out = real(shape, like)
        signs.append(out)
        return out

    monkeypatch.setattr(rec, "rademacher", recording)
    m = BayesGRU(2, 3, batch_first=True, estimator="flipout", rho_init=-1.0)
    x = torch.randn(4, 5, 2)
    y, _ = m(x)
    r, s = signs  # (N, in + H) and (N, 3H), drawn once for the sequence
    cell = m.l0
    dw = cell.weight_sigma * cell._record.eps_w[0]
    db = cell.bias_sigma * cell._record.eps_b[0]
    for n in range(4):
        w = cell.weight_mu + dw * torch.outer(s[n], r[n])
        b = cell.bias_mu + db * torch.cat([s[n], s[n]])
        plain = _torch_layer(m, {"l0": (w.detach(), b.detach())})
        assert torch.allclose(y[n], plain(x[n : n + 1])[0][0], atol=1e-6)
    # examples are decorrelated: two examples with the same input get different outputs
    y2, _ = m(x[:1].expand(2, 5, 2))
    assert not torch.allclose(y2[0], y2[1])


@pytest.mark.parametrize("cls", CLASSES)
def test_flipout_has_the_marginal_of_weight_space_sampling(cls) -> None:
    # N = 3000 independent draws of one example's output sequence under each estimator
    # (vectorized samples, one row each). Each statistic (the mean of every output and of
    # the product of the first and last step's, which a weight redrawn per step would
    # change) is compared by z = diff / SE, SE = sqrt(var_f / N + var_r / N); |z| < 4.5 for
    # each of the 18 statistics has a family-wise false-alarm rate below 1e-4.
    n = 3000
    torch.manual_seed(6)
    m = cls(2, 2, batch_first=True, mu_init="paper", rho_init=-0.5)
    x = torch.tensor([[[1.0, -0.5], [0.3, 0.8], [-1.0, 0.2], [0.5, 0.5]]])
    draws = {}
    for estimator in ("flipout", "reparam"):
        for cell in bbb.bayes_modules(m):
            cell.estimator = estimator
        with torch.no_grad(), bbb.vectorized_samples(m, n):
            y, _ = m(bbb.repeat_samples(x, n))
        flat = y.reshape(n, -1)
        draws[estimator] = torch.cat([flat, (y[:, 0] * y[:, -1])], dim=1).double()
    f, r = draws["flipout"], draws["reparam"]
    se = (f.var(0) / n + r.var(0) / n).sqrt()
    z = (f.mean(0) - r.mean(0)) / se
    assert z.abs().max() < 4.5, z


# --------------------------------------------------------------------------- KL, gradients
@pytest.mark.parametrize("kl", ["closed_form", "mc"])
def test_the_kl_is_counted_once_per_forward_pass(kl) -> None:
    # the KL does not grow with the sequence: closed form, the exact sum over every weight;
    # Monte Carlo, log q(w) - log p(w) at the pass's one sample
    torch.manual_seed(7)
    m = BayesLSTM(2, 3, num_layers=2, kl=kl)
    x = torch.randn(9, 2, 2)
    m(x)
    total = bbb.kl_divergence(m)
    if kl == "closed_form":
        want = sum(
            (bbb.closed_form_kl(mu, torch.nn.functional.softplus(rho), c.prior)).sum()
            for c in bbb.bayes_modules(m)
            for mu, rho in c._pairs()
        )
        m(x[:1])
        assert torch.allclose(bbb.kl_divergence(m), total)
    else:
        want = 0.0
        for c in bbb.bayes_modules(m):
            for (mu, rho), eps in zip(
                c._pairs(), (c._record.eps_w[0], c._record.eps_b[0]), strict=True
            ):
                sigma = torch.nn.functional.softplus(rho)
                w = mu + sigma * eps
                log_q = torch.distributions.Normal(mu, sigma).log_prob(w).sum()
                want = want + log_q - c.prior.log_prob(w).sum()
    assert torch.allclose(total, want, rtol=1e-5)
    assert len(list(bbb.bayes_modules(m))) == 2


@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
@pytest.mark.parametrize("samples", [1, 2])
def test_gradients_reach_every_mu_and_rho(estimator, samples) -> None:
    torch.manual_seed(8)
    m = BayesGRU(2, 3, num_layers=2, bidirectional=True, batch_first=True, estimator=estimator)
    x = torch.randn(2, 4, 2)
    with bbb.vectorized_samples(m, samples):
        y, h = m(bbb.repeat_samples(x, samples))
    (y.square().sum() + h.sum() + bbb.kl_divergence(m)).backward()
    for c in bbb.bayes_modules(m):
        for p in (c.weight_mu, c.weight_rho, c.bias_mu, c.bias_rho):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_a_tiny_sequence_task_trains() -> None:
    # remember the first input of a sequence of 5 through the ELBO (2 weight samples per
    # step): the loss falls by more than half
    torch.manual_seed(9)
    x = torch.randn(32, 4, 1)
    y = x[:, 0, 0:1]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = BayesLSTM(1, 8, batch_first=True)
            self.head = bbb.BayesLinear(8, 1, mu_init="fan_in")

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    net = Net()
    elbo = bbb.ELBO(bbb.Gaussian(sigma=0.1), dataset_size=32, num_samples=2)
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        res = elbo(net, x, y)
        res.loss.backward()
        opt.step()
        losses.append(res.nll.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# --------------------------------------------------------------------------- integration
def test_modes_predict_pruning_and_compact_export(tmp_path) -> None:
    torch.manual_seed(10)
    net = nn.Sequential(BayesGRU(2, 4, batch_first=True))
    x = torch.randn(3, 4, 2)
    # frozen: one sample kept across calls until resample
    with bbb.sampling(net, "frozen"):
        a, b = net(x)[0], net(x)[0]
        bbb.resample(net)
        c = net(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # shared_weight_samples: sample s is one network across calls (two chunks agree)
    with bbb.shared_weight_samples(net), bbb.vectorized_samples(net, 3):
        p = net(bbb.repeat_samples(x, 3))[0]
        q = net(bbb.repeat_samples(x, 3))[0]
    assert torch.equal(p, q)
    # shared_prefix: the B inputs, copied by the layer, give the S copies' numbers
    bbb.resample(net)
    with bbb.sampling(net, "frozen"), bbb.vectorized_samples(net, 3):
        full = net(bbb.repeat_samples(x, 3))[0]
    with bbb.sampling(net, "frozen"), bbb.vectorized_samples(net, 3, batch_size=3):
        prefixed = net(x)[0]
    assert torch.equal(full, prefixed)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = BayesLSTM(2, 4, batch_first=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    model = Head()
    pred = bbb.predict(model, x, likelihood=bbb.Categorical(), num_samples=5)
    assert pred.probs.shape == (3, 2)
    # pruning: the mean network and to_deterministic agree with the mask applied
    result = bbb.prune_by_snr(model, 0.5)
    assert result.removed > 0 and set(result.per_layer) == {"rnn.l0"}
    with bbb.sampling(model, "mean"):
        mean = model(x)
    assert torch.equal(bbb.to_deterministic(model)(x), mean)
    path = tmp_path / "rnn.pt"
    bbb.save_compact(model, path)
    other = Head()
    bbb.load_compact(other, path)
    with bbb.sampling(other, "mean"):
        assert torch.equal(other(x), mean)


# --------------------------------------------------------------------------- refusals
def test_local_and_unknown_estimators_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="every time step.*'reparam', 'flipout'"):
        BayesLSTM(2, 3, estimator="local")
    with pytest.raises(ValueError, match="unknown estimator 'lcoal'.*reparam, flipout"):
        BayesGRU(2, 3, estimator="lcoal")
    m = BayesGRU(2, 3)
    with pytest.raises(ValueError, match="every time step"):
        m.l0.estimator = "local"
    with pytest.raises(ValueError, match="recurrent layers rnn cannot use local"):
        bbb.bayesianize(nn.ModuleDict({"rnn": nn.GRU(2, 3)}), recurrent=True, estimator="local")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_layers": True}, "num_layers must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\]"),
        ({"batch_first": 1}, "batch_first must be True or False"),
        ({"bidirectional": "yes"}, "bidirectional must be True or False"),
        ({"proj_size": 2}, "proj_size.*accepted value: 0"),
        ({"dtype": torch.int64}, "floating-point"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, match) -> None:
    args = {"input_size": 2, "hidden_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        BayesLSTM(**args)


def test_bad_inputs_are_refused_clearly() -> None:
    lstm = BayesLSTM(2, 3, batch_first=True)
    gru = BayesGRU(2, 3)
    x = torch.randn(2, 4, 2)
    packed = nn.utils.rnn.pack_padded_sequence(x, [4, 3], batch_first=True)
    with pytest.raises(TypeError, match="PackedSequence.*pad_packed_sequence"):
        lstm(packed)
    with pytest.raises(ValueError, match="3-D input"):
        lstm(torch.randn(2, 4, 2, 1))
    with pytest.raises(ValueError, match="input_size=2"):
        lstm(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="torch.float32 input"):
        lstm(x.double())
    with pytest.raises(ValueError, match="sequence length must be at least 1"):
        lstm(torch.randn(2, 0, 2))
    with pytest.raises(ValueError, match="tuple"):
        lstm(x, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(1, 2, 3\)"):
        lstm(x, (torch.zeros(2, 2, 3), torch.zeros(1, 2, 3)))
    with pytest.raises(ValueError, match="batch size 5"):
        gru(x.transpose(0, 1), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="one tensor h_0"):
        gru(x, (torch.zeros(1, 4, 3), torch.zeros(1, 4, 3)))
    with pytest.raises(ValueError, match="unbatched.*batch of one"), bbb.vectorized_samples(gru, 2):
        gru(torch.randn(4, 2))
    with pytest.raises(TypeError, match="call the BayesGRU"):
        gru.l0(x)
    assert isinstance(gru.l0, BayesRecurrentWeights)


def test_bayesianize_leaves_recurrent_layers_alone_unless_asked() -> None:
    model = nn.Sequential(nn.GRU(2, 3), nn.Linear(3, 1))
    with pytest.warns(UserWarning, match="recurrent=True converts nn.LSTM/nn.GRU"):
        out = bbb.bayesianize(model)
    assert type(out[0]) is nn.GRU
    assert bbb.convertible_layers(model, recurrent=True) == ["0", "1"]
    with pytest.raises(ValueError, match=r"proj_size.*0 \(proj_size=2\)"):
        bbb.bayesianize(nn.Sequential(nn.LSTM(2, 3, proj_size=2)), recurrent=True)
    assert type(bbb.bayesianize(model, recurrent=True)[0]) is BayesGRU
    with pytest.raises(ValueError, match=r"nothing was made Bayesian.*recurrent=True converts"):
        bbb.bayesianize(nn.Sequential(nn.LSTM(2, 3)))
