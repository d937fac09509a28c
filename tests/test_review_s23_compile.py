"""Review s23 (#3): Bayesian layers under torch.compile / TorchScript, helpers on models without
Bayesian layers, a frozen sample across model.half().float(), the dtype of a zero KL."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.distributions as D
from torch import nn
from torch.nn import functional as F

import bbb


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0, **kw: object) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(bbb.BayesLinear(4, 16, **kw), nn.ReLU(), bbb.BayesLinear(16, 3, **kw))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _closed_form(model: nn.Module) -> torch.Tensor:
    """KL(q || N(0, 1)) of the current parameters, by torch.distributions (independent)."""
    total = torch.zeros((), dtype=torch.float64)
    for m in bbb.bayes_modules(model):
        for mu, rho in ((m.weight_mu, m.weight_rho), (m.bias_mu, m.bias_rho)):
            q = D.Normal(mu.detach().double(), F.softplus(rho.detach().double()))
            total = total + D.kl_divergence(q, D.Normal(0.0, 1.0)).sum()
    return total


@pytest.mark.parametrize("accumulate", [1, 2])
def test_compiled_training_compiles_once(accumulate: int) -> None:
    # The trainer's order (forward, zero_grad, backward, step), and gradient accumulation
    # (gradients exist at every forward): the KL cache key read id(param.grad), on which
    # dynamo guarded, so every step recompiled (6 frames for 6 steps; torch falls back to
    # eager after 8, each recompile 10-40 s with inductor).
    m = _model()
    cnt = torch._dynamo.testing.CompileCounter()
    cm = torch.compile(m, backend=cnt)
    x, y = _data()
    elbo = bbb.ELBO(bbb.Categorical(), dataset_size=100)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(6):
        opt.zero_grad()
        for _ in range(accumulate):
            r = elbo(cm, x, y)
            r.loss.backward()
        opt.step()
    for _ in range(3):  # forward before zero_grad (bbb.Trainer's order)
        r = elbo(cm, x, y)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
    assert cnt.frame_count <= 2


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_forward_then_optimizer_step_kl_is_the_new_parameters(fused: bool) -> None:
    # What a compiled forward leaves for kl() must not be taken as current after a step
    # (a fused Adam moves no version counter): kl() is the updated parameters' KL.
    m = _model()
    cnt = torch._dynamo.testing.CompileCounter()
    cm = torch.compile(m, backend=cnt)
    x, _ = _data()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=fused)
    for _ in range(3):
        out = cm(x)
        before = bbb.kl_divergence(m)
        torch.testing.assert_close(before.double(), _closed_form(m), rtol=1e-5, atol=1e-4)
        opt.zero_grad()
        (out.square().mean() + before / 100).backward()
        opt.step()
        after = bbb.kl_divergence(m)
        assert abs(after.item() - before.item()) > 1e-2  # lr 0.1 moves the KL visibly
        torch.testing.assert_close(after.double(), _closed_form(m), rtol=1e-5, atol=1e-4)
    assert cnt.frame_count <= 2


def test_compiled_frozen_mc_kl_after_step_matches_eager_at_same_sample() -> None:
    # Monte Carlo KL: after a compiled frozen-mode forward and a fused step, kl() is the KL at
    # the frozen sample and the new parameters, as an eager pass at that sample gives.
    prior = bbb.ScaleMixturePrior(0.5, 1.0, 0.1)
    m = _model(kl="mc", prior=prior)
    cnt = torch._dynamo.testing.CompileCounter()
    cm = torch.compile(m, backend=cnt)
    x, _ = _data()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    bbb.set_sampling(m, "frozen")
    for _ in range(2):
        out = cm(x)
        opt.zero_grad()
        (out.square().mean() + bbb.kl_divergence(m) / 100).backward()
        opt.step()
        got = bbb.kl_divergence(m).item()
        m(x)  # eager, same frozen sample, current parameters
        want = bbb.kl_divergence(m).item()
        assert got == pytest.approx(want, rel=1e-5)
    assert cnt.frame_count <= 2


def test_eager_kl_after_fused_step_still_current() -> None:
    # the eager guarantee the gradient's part of the key gives (kept)
    m = _model()
    x, _ = _data()
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        out = m(x)
        opt.zero_grad()
        (out.square().mean() + bbb.kl_divergence(m) / 100).backward()
        opt.step()
        torch.testing.assert_close(
            bbb.kl_divergence(m).double(), _closed_form(m), rtol=1e-5, atol=1e-4
        )


def test_jit_script_is_refused_clearly() -> None:
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own
        with pytest.raises(TypeError, match=r"BayesLinear.*torch\.jit\.script.*torch\.compile"):
            torch.jit.script(m)
        # the suggested way out works
        scripted = torch.jit.script(bbb.to_deterministic(m))
    x, _ = _data()
    with bbb.sampling(m, "mean"):
        torch.testing.assert_close(scripted(x), m(x))


def _no_bayes_models() -> dict[str, nn.Module]:
    m = _model()
    det = bbb.to_deterministic(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(det, torch.zeros(2, 4), check_trace=False)
    return {"Linear": nn.Linear(4, 3), "Sequential": det, "Traced": traced}


@pytest.mark.parametrize("kind", ["Linear", "Sequential", "Traced"])
@pytest.mark.parametrize("helper", ["sampling", "set_sampling", "resample", "vectorized", "shared"])
def test_helpers_warn_on_a_model_without_bayesian_layers(kind: str, helper: str) -> None:
    model = _no_bayes_models()[kind]
    with pytest.warns(UserWarning, match=r"no effect.*no Bayesian layers") as rec:
        if helper == "sampling":
            with bbb.sampling(model, "mean"):
                pass
        elif helper == "set_sampling":
            bbb.set_sampling(model, "frozen")
        elif helper == "resample":
            bbb.resample(model)
        elif helper == "vectorized":
            with bbb.vectorized_samples(model, 4):
                pass
        else:
            with bbb.shared_weight_samples(model):
                pass
    bayes = [w for w in rec if "no Bayesian layers" in str(w.message)]
    assert len(bayes) == 1
    assert bayes[0].filename == __file__  # points at the caller's line
    assert kind in str(bayes[0].message) or "Traced" in str(bayes[0].message)


def test_helpers_do_not_warn_on_bayesian_models_nor_from_bbb_itself() -> None:
    x, y = _data()
    m = _model()
    det = bbb.to_deterministic(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with bbb.sampling(m, "mean"), bbb.vectorized_samples(m, 2):
            pass
        bbb.resample(m)
        # bbb's own callers accept deterministic baselines silently
        bbb.predict(det, x, num_samples=3, max_rows=12)  # chunks: shared_weight_samples
        elbo = bbb.ELBO(bbb.Categorical(), dataset_size=100, num_samples=2)
        elbo(det, x, y).loss.backward()


def test_unknown_mode_refused_even_without_bayesian_layers() -> None:
    with pytest.raises(ValueError, match="unknown sampling mode 'meen'"):
        bbb.sampling(nn.Linear(2, 2), "meen")
    with pytest.raises(ValueError, match="unknown sampling mode"):
        bbb.set_sampling(nn.Linear(2, 2), "meen")


def test_frozen_sample_survives_half_float_round_trip() -> None:
    m = _model()
    with torch.no_grad():  # parameters exact in float16, so half().float() keeps them
        for p in m.parameters():
            p.copy_(p.half().float())
    x, _ = _data()
    bbb.set_sampling(m, "frozen")
    with torch.no_grad():
        first = m(x)
        m.half()
        half_out = m(x.half())  # the frozen sample, in float16 for this pass
        m.float()
        again = m(x)
    assert half_out.dtype == torch.float16
    # the float32 sample was kept (it was replaced by its float16 rounding: again != first)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_zero_kl_has_the_parameters_dtype() -> None:
    assert bbb.kl_divergence(nn.Linear(2, 2).double()).dtype == torch.float64
    assert bbb.kl_divergence(nn.Linear(2, 2)).dtype == torch.float32
    assert bbb.kl_divergence(nn.Linear(2, 2).half()).dtype == torch.float32  # as kl() does
    assert bbb.kl_divergence(nn.ReLU()).dtype == torch.float32


@pytest.mark.parametrize("kernels", ["eager", "native"])
def test_traced_noise_is_drawn_anew_at_every_call(kernels: str) -> None:
    # torch.jit.trace of a sampling layer: the worker threads' chunks of bbb's parallel
    # randn (2+ threads, >= 65536 numbers) and the native library's noise were recorded as
    # constants, so the traced model reused (half of) one noise draw at every call
    from bbb import _native
    from bbb.nn import noise

    if kernels == "native" and not _native.available():
        pytest.skip("native kernels not built here")
    threads = torch.get_num_threads()
    n = noise.PARALLEL_MIN_NUMEL * 2
    try:
        torch.set_num_threads(2)
        with bbb.kernels.use_kernels(kernels), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(
                lambda x: x + noise.randn((n,)), (torch.zeros(n),), check_trace=False
            )
            torch.manual_seed(0)
            a, b = traced(torch.zeros(n)), traced(torch.zeros(n))
    finally:
        torch.set_num_threads(threads)
    # two independent normal draws coincide with probability 0 (float32: ~never)
    assert (a == b).float().mean().item() < 1e-3
    # and each is a standard normal draw: mean within 5 standard errors (1/sqrt(n))
    assert abs(a.mean().item()) < 5 / n**0.5
