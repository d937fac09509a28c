"""Review of BayesLSTM / BayesGRU (session 27): the Python loop's backward, torch.compile,
torch's kernel per weight sample, flipout's per-example weights in deep bidirectional layers,
and the integration paths (modes, pruning, checkpoints)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bbb
from bbb.nn import recurrent as rec
from bbb.nn.recurrent import BayesGRU, BayesLSTM

CLASSES = [BayesLSTM, BayesGRU]


def _plain(m: rec._BayesRNNBase, weights: dict[str, tuple[Tensor, Tensor | None]]) -> nn.RNNBase:
    """The nn.LSTM / nn.GRU of ``m``'s options (built here, not by to_torch) holding the given
    combined weight (G*H, in+H) and bias (2*G*H,) per cell, in ``m``'s dtype."""
    cls = nn.LSTM if isinstance(m, BayesLSTM) else nn.GRU
    layer = cls(
        m.input_size, m.hidden_size, m.num_layers, bias=m.bias, batch_first=m.batch_first,
        bidirectional=m.bidirectional, dtype=m.l0.weight_mu.dtype,
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


def _sample_weights(
    m: rec._BayesRNNBase, k: int, only: str | None = None
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Weight sample ``k`` of the latest pass of every cell (or of cell ``only``), as the
    layer built it."""
    out = {}
    for suffix, cell in m.cells():
        if only is not None and suffix != only:
            continue
        r = cell._record
        w = torch.addcmul(cell.weight_mu, cell.weight_sigma, r.eps_w[k]).detach()
        b = None
        if cell.bias_mu is not None:
            b = torch.addcmul(cell.bias_mu, cell.bias_sigma, r.eps_b[k]).detach()
        out[suffix] = (w, b)
    return out


def _count_nodes(t: Tensor, name: str) -> int:
    seen: set[int] = set()
    stack = [t.grad_fn]
    count = 0
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        count += type(fn).__name__ == name
        stack.extend(f for f, _ in fn.next_functions)
    return count


# --------------------------------------------------------------------------- the loop's backward
@pytest.mark.parametrize("cls", CLASSES)
def test_the_loop_backward_does_not_write_the_whole_projection_at_every_step(cls) -> None:
    # the loop read the input projection gi (N, T, G*H) as gi[:, t]: each step's backward
    # (SelectBackward) zero-filled and accumulated a gradient of the whole projection, T
    # times per pass (quadratic in T: 80% of an LSTM training step at T = 100). The steps are
    # now split once (one UnbindBackward per layer and direction)
    torch.manual_seed(0)
    m = BayesGRU if cls is BayesGRU else BayesLSTM
    layer = m(2, 3, num_layers=2, bidirectional=True, batch_first=True, estimator="flipout")
    t = 12
    y, _ = layer(torch.randn(2, t, 2))
    assert _count_nodes(y, "SelectBackward0") == 0
    assert _count_nodes(y, "UnbindBackward0") == 4  # 2 layers x 2 directions
    # and the gradient is still right: float64 gradcheck through the loop
    layer = layer.double()
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x: Tensor) -> Tensor:
        torch.manual_seed(1)
        return layer(x)[0]

    assert torch.autograd.gradcheck(f, (x,))


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("cls", CLASSES)
def test_the_compiled_path_is_the_layers_function(cls, monkeypatch) -> None:
    # inside torch.compile the LSTM runs the Python loop (torch.lstm's CPU kernel failed to
    # trace with autograd: "expected Tensor() for op: aten.mkldnn_rnn_layer"); the loop with
    # one weight for all rows computes torch's function (checked here without compiling, by
    # making the layer believe it is being compiled)
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(3)
    m = cls(2, 3, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 2, generator=gen)
    hx: Tensor | tuple[Tensor, Tensor] = torch.randn(4, 2, 3, generator=gen)
    if cls is BayesLSTM:
        hx = (hx, torch.randn(4, 2, 3, generator=gen))
    with bbb.sampling(m, "mean"):
        want, want_state = m(x, hx)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        if cls is BayesLSTM:

            def refuse(*args: object) -> None:
                raise AssertionError("torch.lstm called while compiling")

            monkeypatch.setattr(torch, "lstm", refuse)
        got, state = m(x, hx)
        monkeypatch.undo()
    assert torch.allclose(got, want, atol=1e-6)
    if cls is BayesLSTM:
        assert torch.allclose(state[0], want_state[0], atol=1e-6)
        assert torch.allclose(state[1], want_state[1], atol=1e-6)
    else:
        assert torch.allclose(state, want_state, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_fullgraph_trains() -> None:
    # torch.compile(BayesLSTM) failed in every mode with autograd on (the fast test above
    # covers the same code path without compiling; BayesGRU compiled before)
    torch._dynamo.reset()
    torch.manual_seed(4)
    m = BayesLSTM(2, 3, num_layers=2, batch_first=True)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 4, 2)
    with bbb.sampling(m, "mean"):
        assert torch.allclose(compiled(x)[0], m(x)[0], atol=1e-6)
    y, _ = compiled(x)
    (y.square().sum() + bbb.kl_divergence(m)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# --------------------------------------------------------------------------- S weight samples
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_weight_samples_run_torchs_kernel_per_sample_bit_for_bit(bias) -> None:
    # S reparam samples of an LSTM: torch's kernel once per block of B rows (faster than the
    # Python loop), so each block is exactly nn.LSTM with that block's weights: 2 layers,
    # both directions, batch_first=False, h_0 and c_0 given for the B examples
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(6)
    m = BayesLSTM(2, 3, num_layers=2, bias=bias, bidirectional=True, rho_init=-1.0)
    b, t, s = 2, 4, 3
    x = torch.randn(t, b, 2, generator=gen)
    hx = (torch.randn(4, b, 3, generator=gen), torch.randn(4, b, 3, generator=gen))
    # batch_first=False: the S copies in blocks of B along dim 1, (T, S * B, in)
    xs = bbb.repeat_samples(x.transpose(0, 1), s).transpose(0, 1)
    with bbb.vectorized_samples(m, s):
        y, (h_n, c_n) = m(xs, hx)
    assert y.shape == (t, s * b, 6) and h_n.shape == c_n.shape == (4, s * b, 3)
    for k in range(s):
        want, (want_h, want_c) = _plain(m, _sample_weights(m, k))(x, hx)
        assert torch.equal(y[:, k * b : (k + 1) * b], want)
        assert torch.equal(h_n[:, k * b : (k + 1) * b], want_h)
        assert torch.equal(c_n[:, k * b : (k + 1) * b], want_c)


def test_a_mean_layer_beside_sampled_ones_keeps_its_one_weight_per_block() -> None:
    # layer 0 in mean mode, layer 1 sampling S = 2: each block is nn.LSTM with mu in layer 0
    # and that block's sample in layer 1
    torch.manual_seed(7)
    m = BayesLSTM(2, 3, num_layers=2, batch_first=True, rho_init=-1.0)
    m.l0.set_sampling("mean")
    x = torch.randn(2, 3, 2)
    with bbb.vectorized_samples(m, 2):
        y, _ = m(bbb.repeat_samples(x, 2))
    for k in range(2):
        weights = {
            "l0": (m.l0.weight_mu.detach(), m.l0.bias_mu.detach()),
            "l1": _sample_weights(m, k, only="l1")["l1"],
        }
        assert torch.equal(y[2 * k : 2 * k + 2], _plain(m, weights)(x)[0])


# --------------------------------------------------------------------------- flipout, deep
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bias", [True, False])
def test_flipout_per_example_weights_in_two_bidirectional_layers(cls, bias, monkeypatch) -> None:
    # S = 2 samples x B = 2 examples (batch_first=False): row (k, n) is torch's layer run
    # with, in every cell, mu + (sigma * eps_k) * (s r^T) for the signs that cell drew for
    # that row (once per sequence), from the given h_0 (and c_0) of example n
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(9)
    signs: list[Tensor] = []
    real = rec.rademacher

    def recording(shape: tuple[int, ...], like: Tensor) -> Tensor:
        out = real(shape, like)
        signs.append(out)
        return out

    monkeypatch.setattr(rec, "rademacher", recording)
    m = cls(2, 3, num_layers=2, bias=bias, bidirectional=True, estimator="flipout",
            rho_init=-1.0, dtype=torch.float64)  # fmt: skip
    s, b, t = 2, 2, 3
    x = torch.randn(t, b, 2, generator=gen, dtype=torch.float64)
    h0 = torch.randn(4, b, 3, generator=gen, dtype=torch.float64)
    hx: Tensor | tuple[Tensor, Tensor] = h0
    if cls is BayesLSTM:
        hx = (h0, torch.randn(4, b, 3, generator=gen, dtype=torch.float64))
    xs = bbb.repeat_samples(x.transpose(0, 1), s).transpose(0, 1)  # (T, S * B, in)
    with bbb.vectorized_samples(m, s):
        y, state = m(xs, hx)
    h_n = state[0] if cls is BayesLSTM else state
    cells = list(m.cells())
    assert len(signs) == 2 * len(cells)  # (r, s) per cell, drawn once for the sequence
    for k in range(s):
        for n in range(b):
            row = k * b + n
            weights = {}
            for i, (suffix, cell) in enumerate(cells):
                r, sg = signs[2 * i][row], signs[2 * i + 1][row]
                rc = cell._record
                w = cell.weight_mu + cell.weight_sigma * rc.eps_w[k] * torch.outer(sg, r)
                bias_n = None
                if bias:
                    bias_n = cell.bias_mu + cell.bias_sigma * rc.eps_b[k] * torch.cat([sg, sg])
                weights[suffix] = (w.detach(), None if bias_n is None else bias_n.detach())
            hx_n = (
                (hx[0][:, n : n + 1], hx[1][:, n : n + 1])
                if isinstance(hx, tuple)
                else hx[:, n : n + 1]
            )
            want, want_state = _plain(m, weights)(x[:, n : n + 1], hx_n)
            assert torch.allclose(y[:, row : row + 1], want, atol=1e-12)
            want_h = want_state[0] if cls is BayesLSTM else want_state
            assert torch.allclose(h_n[:, row : row + 1], want_h, atol=1e-12)


# --------------------------------------------------------------------------- time-major layers
class _TimeMajor(nn.Module):
    """Batch-major data (B, T, in), as bbb.ELBO and bbb.predict hand it, through a
    batch_first=False layer (the usual x.transpose(0, 1)) and a head on the last step."""

    def __init__(self, cls: type[rec._BayesRNNBase]) -> None:
        super().__init__()
        self.rnn = cls(2, 3, num_layers=2, rho_init=-1.0)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.transpose(0, 1))
        return self.head(out[-1])


@pytest.mark.parametrize("cls", CLASSES)
def test_a_time_major_layer_under_the_elbo_runs_each_weight_sample_on_its_examples(cls) -> None:
    # the ELBO's S * B rows, transposed to (T, S * B, in), were read as S blocks of T / S time
    # steps (any T divisible by S: silently another sequence, and h_n had 2 * S * B rows);
    # the copies are now blocks of B along the batch dimension, so block k of the output is
    # torch's layer with weight sample k on the B examples
    torch.manual_seed(10)
    model = _TimeMajor(cls)
    x = torch.randn(5, 4, 2)  # B = 5, T = 4 (divisible by S = 2)
    with bbb.sampling(model, "frozen"), bbb.vectorized_samples(model, 2):
        y = model(bbb.repeat_samples(x, 2))
        _, h_n = model.rnn(bbb.repeat_samples(x, 2).transpose(0, 1))
    h_n = h_n[0] if cls is BayesLSTM else h_n
    assert y.shape == (10, 2) and h_n.shape == (2, 10, 3)
    for k in range(2):
        weights = {}
        for suffix, cell in model.rnn.cells():
            eps = cell._frozen
            w = torch.addcmul(cell.weight_mu, cell.weight_sigma, eps.eps_w[k]).detach()
            b = torch.addcmul(cell.bias_mu, cell.bias_sigma, eps.eps_b[k]).detach()
            weights[suffix] = (w, b)
        out, _ = _plain(model.rnn, weights)(x.transpose(0, 1))
        assert torch.allclose(y[5 * k : 5 * k + 5], model.head(out[-1]), atol=1e-6)
    # bbb.ELBO and bbb.predict (chunked by max_rows) run it
    res = bbb.ELBO(bbb.Categorical(), dataset_size=5, num_samples=2)(
        model, x, torch.tensor([0, 1, 0, 1, 1])
    )
    assert torch.isfinite(res.loss)
    pred = bbb.predict(model, x, likelihood=bbb.Categorical(), num_samples=4, max_rows=8)
    assert pred.probs.shape == (5, 2)


def test_time_major_copies_made_by_the_layer_and_a_batch_not_divisible_by_s() -> None:
    # vectorized_samples(batch_size=B): given the B inputs (T, B, in), the layer makes the
    # copies along dim 1 (the same numbers as the copies given); a batch along dim 1 that is
    # not a multiple of S is refused naming dim 1
    torch.manual_seed(11)
    m = BayesGRU(2, 3)
    x = torch.randn(4, 3, 2)
    xs = bbb.repeat_samples(x.transpose(0, 1), 2).transpose(0, 1)
    with bbb.sampling(m, "frozen"):
        with bbb.vectorized_samples(m, 2):
            full, h_full = m(xs)
        with bbb.vectorized_samples(m, 2, batch_size=3):
            prefixed, h_prefixed = m(x)
    assert torch.equal(full, prefixed) and torch.equal(h_full, h_prefixed)
    not_divisible = r"batch of 3 along dim 1.*multiple of num_samples=2"
    with pytest.raises(ValueError, match=not_divisible), bbb.vectorized_samples(m, 2):
        m(x)
    other = r"batch of 5 along dim 1.*expected 3.*or 6"
    with pytest.raises(ValueError, match=other), bbb.vectorized_samples(m, 2, batch_size=3):
        m(torch.randn(4, 5, 2))


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize(
    ("cls", "estimator", "prior"),
    [
        (BayesLSTM, "reparam", "scale_mixture"),  # torch's kernel per sample
        (BayesLSTM, "flipout", "laplace"),  # the loop
        (BayesGRU, "reparam", "laplace"),  # the loop with S weights
        (BayesGRU, "flipout", "scale_mixture"),
    ],
)
def test_float64_gradcheck_with_two_samples_and_the_monte_carlo_kl(cls, estimator, prior) -> None:
    # output and Monte Carlo KL of S = 2 samples (batch_first=False, 2 layers, both
    # directions) against finite differences in every input, mu and rho
    torch.manual_seed(12)
    p = bbb.ScaleMixturePrior(0.5, 1.0, 0.1) if prior == "scale_mixture" else bbb.LaplacePrior(1.0)
    m = cls(2, 2, num_layers=2, bidirectional=True, estimator=estimator, prior=p, kl="mc",
            rho_init=-1.0, dtype=torch.float64)  # fmt: skip
    names = [n for n, _ in m.named_parameters()]
    params = [q.detach().clone().requires_grad_() for _, q in m.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(x: Tensor, *ps: Tensor) -> tuple[Tensor, Tensor]:
        torch.manual_seed(13)  # the same noise at every evaluation
        xs = bbb.repeat_samples(x.transpose(0, 1), 2).transpose(0, 1)
        with bbb.vectorized_samples(m, 2):
            out, _ = torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (xs,))
            kl = bbb.kl_divergence(m)
        return out.sum(-1), kl

    # fast_mode: the Jacobian checked along random directions (a full one took 4 s a case)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------- conversion
def test_a_half_frozen_torch_layer_is_named_when_converted() -> None:
    # nn.GRU with weight_ih_l1 frozen and weight_hh_l1 trainable: the Bayesian layer holds
    # both in l1.weight_mu, which is frozen; the trainable weight that stops training is
    # named (it was silent). Whole frozen pairs convert silently, as before
    torch.manual_seed(14)
    plain = nn.GRU(2, 3, num_layers=2)
    plain.weight_ih_l1.requires_grad_(False)
    plain.bias_hh_l0.requires_grad_(False)
    plain.bias_ih_l0.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"weight_ih_l1 is frozen but weight_hh_l1 is not") as w:
        bayes = bbb.bayesianize(nn.Sequential(plain), recurrent=True, init_from_weights=True)[0]
    assert len([x for x in w if "is frozen but" in str(x.message)]) == 1  # not the l0 biases
    assert not bayes.l1.weight_mu.requires_grad and not bayes.l1.weight_rho.requires_grad
    assert bayes.l0.weight_mu.requires_grad and bayes.l1.bias_mu.requires_grad
    assert not bayes.l0.bias_mu.requires_grad
