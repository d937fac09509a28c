"""Review s25 (#8): bbb.kernels and bbb.kl under torch.func transforms, and compile failures.

- The node that refuses a second derivative of closed-form gradients (``first_order_only``)
  is a new-style autograd.Function with a vmap rule: it runs inside ``torch.func`` transforms
  (it raised that it needs ``setup_context``).
- A ``torch.compile`` failure for one argument signature (dtype, device, rank) makes that
  signature run eagerly, not every later call of the kernel.

``torch.compile`` is replaced here by stand-ins (the identity, or one that fails for float64
tensors), so that nothing is compiled for real.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import bbb
from bbb import _native
from bbb import kernels as K
from bbb.kl import closed_form_kl_sum, mc_kl_sum


@pytest.fixture(autouse=True)
def _fresh_kernels() -> Iterator[None]:
    def reset() -> None:
        for k in K._ALL:
            k._compiled, k.failed = None, None
        K.set_kernels("eager")

    reset()
    yield
    reset()


# ------------------------------------------------------------------ 1. first_order_only
def test_first_order_only_runs_under_vmap() -> None:
    # before: RuntimeError "In order to use an autograd.Function with functorch transforms
    # ... it must override the setup_context staticmethod"
    anchor = torch.zeros(3, requires_grad=True)
    grads = torch.arange(12.0).reshape(4, 3)
    out = torch.func.vmap(
        lambda g: K.first_order_only("refused", (g, None), (anchor,)), out_dims=(0, None)
    )(grads)
    assert out[1] is None
    torch.testing.assert_close(out[0], grads, rtol=0, atol=0)
    assert out[0].requires_grad  # hangs on the anchor: a derivative of it is refused
    with pytest.raises(RuntimeError, match="refused"):
        out[0].sum().backward()


def test_first_order_only_refuses_a_derivative_under_func_grad() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        (y,) = K.first_order_only("refused: first-order only", (x * 2.0,))
        return (y * y).sum()

    # before: the setup_context RuntimeError instead of the node's own message
    with pytest.raises(RuntimeError, match="refused: first-order only"):
        torch.func.grad(f)(torch.ones(3))


def test_monte_carlo_kl_gradients_batched_by_vmap_keep_the_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backward batched by torch.func.vmap with create_graph=True (batched vector-Jacobian
    products) through the fused Monte Carlo KL (the compile backend's out-of-place kernels):
    each row is v times the plain gradient, and a derivative of it is still refused."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    rho = torch.full((6,), -3.0, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    prior = bbb.ScaleMixturePrior(0.5, 1.0, 0.1)
    v = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    with bbb.use_kernels("compile"):
        kl = mc_kl_sum(mu, rho, eps, prior)
        (plain,) = torch.autograd.grad(kl, mu, retain_graph=True)

        def vjp(u: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(kl, mu, u, retain_graph=True, create_graph=True)[0]

        # before: RuntimeError (setup_context) from first_order_only inside the backward
        rows = torch.func.vmap(vjp)(v)
    # the same closed-form gradient scaled by each v (a power of two or -1/2: exact)
    torch.testing.assert_close(rows, v[:, None] * plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="first-order only"):
        rows.sum().backward()


# ------------------------------------------------------------------ 2. compile failures
def _compile_failing_for_float64(calls: list[str]) -> Callable[..., Any]:
    """A torch.compile stand-in whose "compiled" function fails for float64 tensors (as an
    unsupported dtype would) and runs the eager body otherwise; ``calls`` records the dtype of
    each call it ran."""

    def compile_(fn: Callable[..., Any], **kw: object) -> Callable[..., Any]:
        def compiled(*args: Any) -> Any:
            if args[0].dtype == torch.float64:
                raise RuntimeError("this backend has no float64 kernels")
            calls.append(str(args[0].dtype))
            return fn(*args)

        return compiled

    return compile_


def _grads(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(7, generator=gen, dtype=dtype)
    rho = torch.randn(7, generator=gen, dtype=dtype) - 3.0
    sigma = torch.nn.functional.softplus(rho)
    return K.gaussian_kl_grads(mu, rho, sigma, torch.tensor(0.7, dtype=dtype), 0.1, 4.0)


def test_a_compile_failure_for_one_dtype_keeps_the_others_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", _compile_failing_for_float64(calls))
    eager32, eager64 = _grads(torch.float32), _grads(torch.float64)
    with bbb.use_kernels("compile"):
        got32 = _grads(torch.float32)
        assert calls == ["torch.float32"]
        with pytest.warns(RuntimeWarning, match="no float64 kernels") as caught:
            got64 = _grads(torch.float64)
        # before: float32 ran eagerly from here on (the kernel was off for every call)
        again32 = _grads(torch.float32)
        assert calls == ["torch.float32", "torch.float32"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failed signature does not warn again
            again64 = _grads(torch.float64)
        assert calls == ["torch.float32", "torch.float32"]  # nor is it compiled again
    for got, want in ((got32, eager32), (again32, eager32), (got64, eager64), (again64, eager64)):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the warning names the arguments that failed (and says the others stay compiled)
    assert "float64 1-d on cpu" in str(caught[0].message)
    failed = K.failures()
    assert list(failed) == ["gaussian_kl_grads"]
    assert "float64" in failed["gaussian_kl_grads"] and "float32" not in failed["gaussian_kl_grads"]


def test_resetting_a_kernel_forgets_its_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", _compile_failing_for_float64(calls))
    with bbb.use_kernels("compile"), pytest.warns(RuntimeWarning, match="float64"):
        _grads(torch.float64)
    assert K.failures()
    for k in K._ALL:
        k._compiled, k.failed = None, None  # the reset the test suites use
    assert K.failures() == {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with bbb.use_kernels("compile"), warnings.catch_warnings():
        warnings.simplefilter("error")
        _grads(torch.float64)


# ------------------------------------------- 3. the fused KLs' backward batched by vmap
def _kl_case(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, mu, rho) through the fused KL functions, float64: the Monte Carlo KL or the
    closed form, on their fast path ("..."), or with a pruning mask and a rho below -20
    ("...-masked", the guarded path)."""
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    rho = torch.full((6,), -3.0, dtype=torch.float64)
    mask = None
    if kind.endswith("-masked"):
        rho[1] = -25.0
        mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float64)
    rho.requires_grad_()
    if kind.startswith("mc"):
        eps = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        prior: bbb.Prior = bbb.ScaleMixturePrior(0.5, 1.0, 0.1)
        return mc_kl_sum(mu, rho, eps, prior, mask=mask), mu, rho
    return closed_form_kl_sum(mu, rho, bbb.GaussianPrior(0.5), mask=mask), mu, rho


KL_CASES = ["mc", "mc-masked", "closed_form", "closed_form-masked"]


@pytest.mark.parametrize("kind", KL_CASES)
def test_kl_gradients_batched_by_is_grads_batched(kind: str) -> None:
    # before: RuntimeError "vmap: aten::mul_(self, *extra_args) is not possible ..." (the
    # backward multiplied unbatched tensors in place by the batched upstream gradient)
    kl, mu, rho = _kl_case(kind)
    plain = torch.autograd.grad(kl, (mu, rho), retain_graph=True)
    v = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)  # exact scalings
    rows = torch.autograd.grad(kl, (mu, rho), v, retain_graph=True, is_grads_batched=True)
    for got, want in zip(rows, plain, strict=True):
        torch.testing.assert_close(got, v[:, None] * want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mc", "mc-masked"])
def test_kl_gradients_by_func_vmap_on_the_eager_backend(kind: str) -> None:
    # before: RuntimeError (in-place product with the batched gradient, then setup_context)
    kl, mu, rho = _kl_case(kind)
    plain = torch.autograd.grad(kl, (mu, rho), retain_graph=True)
    v = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)

    def vjp(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(kl, (mu, rho), u, retain_graph=True, create_graph=True)

    rows = torch.func.vmap(vjp)(v)
    for got, want in zip(rows, plain, strict=True):
        torch.testing.assert_close(got, v[:, None] * want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="first-order only"):
        rows[0].sum().backward()


def test_is_grads_batched_with_create_graph_refuses_the_monte_carlo_kl() -> None:
    """is_grads_batched's vmap drops the refusing node's graph: the gradients would come back
    without one (a penalty built from them silently adding nothing), so they are refused."""
    kl, mu, rho = _kl_case("mc")
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # before: the vmap in-place RuntimeError, not this message
    with pytest.raises(RuntimeError, match="first-order only.*is_grads_batched"):
        torch.autograd.grad(kl, mu, v, is_grads_batched=True, create_graph=True)
    # the closed form's gradients have a graph there (written with autograd): exact second
    # derivatives, d/dmu of v * (mu - 0) / 0.5^2 summed = 4 v per weight
    kl, mu, rho = _kl_case("closed_form")
    (rows,) = torch.autograd.grad(kl, mu, v, is_grads_batched=True, create_graph=True)
    assert rows.requires_grad
    (second,) = torch.autograd.grad(rows.sum(), mu)
    torch.testing.assert_close(second, torch.full_like(mu, 4.0 * 3.0), rtol=1e-12, atol=0)


@pytest.mark.skipif(not _native.available(), reason="native library not available")
@pytest.mark.parametrize("how", ["is_grads_batched", "func.vmap"])
def test_native_backward_batched_by_vmap_is_a_clear_error(how: str) -> None:
    # before: RuntimeError "Batching rule not implemented for aten::item ..."
    torch.manual_seed(0)
    layer = bbb.BayesLinear(4, 3)
    x = torch.randn(5, 4)
    v = torch.ones(2)
    with bbb.use_kernels("native"):
        loss = layer(x).sum() + bbb.kl_divergence(layer)
    params = list(layer.parameters())
    with pytest.raises(RuntimeError, match="cannot run batched by vmap"):
        if how == "is_grads_batched":
            torch.autograd.grad(loss, params, v, is_grads_batched=True)
        else:
            torch.func.vmap(lambda u: torch.autograd.grad(loss, params, u, retain_graph=True))(v)
