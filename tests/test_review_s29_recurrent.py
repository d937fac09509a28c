"""Review of BayesLSTM / BayesGRU (session 29): output dtypes under CPU autocast across the
estimators, cell types and kernel backends, and a user's review of the layers' interface."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import bbb
from bbb.nn.recurrent import BayesGRU, BayesLSTM, _BayesRNNBase

CLASSES = [BayesLSTM, BayesGRU]
ESTIMATORS = ["reparam", "flipout"]
BACKENDS = ["eager", "native"]


def _flat(state: Tensor | tuple[Tensor, Tensor]) -> list[Tensor]:
    """``h_n`` (GRU) or ``(h_n, c_n)`` (LSTM) as a list."""
    return list(state) if isinstance(state, tuple) else [state]


def _hx(m: _BayesRNNBase, rows: int, dtype: torch.dtype | None) -> object:
    """An initial state of ``rows`` rows in ``dtype`` (None: no initial state)."""
    if dtype is None:
        return None
    h = torch.randn(m.num_layers * (2 if m.bidirectional else 1), rows, m.hidden_size)
    h = h.to(dtype)
    return (h, 0.5 * h) if isinstance(m, BayesLSTM) else h


def _to_float(hx: object) -> object:
    """``hx`` (None, a tensor or a pair) in float32."""
    if isinstance(hx, tuple):
        return tuple(t.float() for t in hx)
    return hx.float() if isinstance(hx, Tensor) else hx


@contextlib.contextmanager
def _run(backend: str, samples: int, m: _BayesRNNBase) -> Iterator[None]:
    """Kernel backend ``backend`` and, for ``samples`` > 1, ``samples`` vectorized samples."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(bbb.use_kernels(backend))
        if samples > 1:
            stack.enter_context(bbb.vectorized_samples(m, samples))
        yield


@pytest.mark.parametrize("h0_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls", CLASSES)
def test_bfloat16_autocast_dtypes_match_torch_layer(
    cls: type[_BayesRNNBase],
    estimator: str,
    backend: str,
    samples: int,
    h0_dtype: torch.dtype | None,
) -> None:
    """Under CPU bfloat16 autocast every path returns the dtypes of the plain nn.LSTM / nn.GRU
    (to_torch) on the same input and state: the LSTM's kernel is cast by autocast (output,
    h_n, c_n in bfloat16), the GRU's is not (its state's dtype). Before, the LSTM's flipout
    (the Python loop) returned float32 where reparam returned bfloat16. The values are those
    of the float32 pass with the same seed, to bfloat16 rounding."""
    torch.manual_seed(0)
    # sigma = softplus(0) = 0.69: another weight sample would move the outputs by ~0.1-1
    m = cls(4, 6, num_layers=2, bidirectional=True, estimator=estimator, rho_init=0.0)
    x = torch.randn(5, 3 * samples, 4)
    hx = _hx(m, 3 * samples, h0_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_state = m.to_torch()(x, hx)
    expected = [ref_out.dtype] + [t.dtype for t in _flat(ref_state)]
    with _run(backend, samples, m):
        torch.manual_seed(1)
        # (outside autocast the state must have the parameters' dtype)
        full_out, full_state = m(x, _to_float(hx))
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state = m(x, hx)
    got = [out.dtype] + [t.dtype for t in _flat(state)]
    assert got == expected, f"{cls.__name__} {estimator} {backend} S={samples}"
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.002 per operation),
    # accumulated over 5 steps and 2 layers: measured over these cases, the mean absolute
    # difference to the float32 pass is <= 0.0023 and the largest 0.09 (a saturating gate),
    # while another weight sample (sigma 0.69) moves the outputs by >= 0.28 on average; the
    # bounds 0.02 (mean) and 0.2 (largest) sit between the two
    for a, b in zip([out, *_flat(state)], [full_out, *_flat(full_state)], strict=True):
        diff = (a.float() - b.float()).abs()
        assert diff.mean().item() < 0.02 and diff.max().item() < 0.2, diff.max().item()


@pytest.mark.parametrize("mode", ["mean", "frozen"])
@pytest.mark.parametrize("cls", CLASSES)
def test_bfloat16_autocast_dtypes_in_mean_and_frozen_modes(
    cls: type[_BayesRNNBase], mode: str
) -> None:
    """The modes without noise (mean) or with a kept sample (frozen) give the same dtypes
    as sample mode and as the plain layer, flipout included."""
    torch.manual_seed(0)
    m = cls(4, 6, estimator="flipout")
    bbb.set_sampling(m, mode)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_state = m.to_torch()(x)
        out, state = m(x)
    assert [out.dtype] + [t.dtype for t in _flat(state)] == [ref_out.dtype] + [
        t.dtype for t in _flat(ref_state)
    ]


def test_lstm_float64_under_autocast_stays_float64() -> None:
    """Autocast does not cast float64: a float64 BayesLSTM keeps float64 outputs on every path
    (as nn.LSTM does)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for estimator in ESTIMATORS:
        m = BayesLSTM(4, 6, estimator=estimator, dtype=torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h, c) = m(x)
        assert (out.dtype, h.dtype, c.dtype) == (torch.float64,) * 3, estimator


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls", CLASSES)
def test_float16_autocast_runs_every_path(
    cls: type[_BayesRNNBase], estimator: str, backend: str, samples: int
) -> None:
    """Under CPU float16 autocast every path runs and trains, in the dtypes of the plain layer:
    the LSTM in float16 (what autocast gives nn.LSTM where oneDNN has a float16 LSTM; torch's
    kernel on float16 copies here), the GRU as nn.GRU under the same autocast. Before, the
    LSTM's kernel paths (reparam, mean) failed with oneDNN's "could not create a primitive
    descriptor" on CPUs without float16 support while flipout returned float32."""
    torch.manual_seed(0)
    m = cls(4, 6, num_layers=2, bidirectional=True, estimator=estimator, rho_init=0.0)
    x = torch.randn(5, 3 * samples, 4)
    if cls is BayesLSTM:
        expected = [torch.float16] * 3
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            ref_out, ref_state = m.to_torch()(x)
        expected = [ref_out.dtype] + [t.dtype for t in _flat(ref_state)]
    with _run(backend, samples, m):
        torch.manual_seed(1)
        full_out, full_state = m(x)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.float16):
            out, state = m(x)
    assert [out.dtype] + [t.dtype for t in _flat(state)] == expected
    # float16 rounds 8x finer than bfloat16: the bounds of the bfloat16 test hold a fortiori
    # (another weight sample moves the outputs by >= 0.28 on average)
    for a, b in zip([out, *_flat(state)], [full_out, *_flat(full_state)], strict=True):
        diff = (a.float() - b.float()).abs()
        assert diff.mean().item() < 0.02 and diff.max().item() < 0.2, diff.max().item()
    out.float().sum().backward()
    grad = m.l0.weight_mu.grad
    assert grad is not None and grad.dtype == torch.float32 and bool(grad.isfinite().all())


def test_float16_autocast_lstm_mean_is_torch_float16_lstm() -> None:
    """In mean mode the LSTM under CPU float16 autocast is torch's float16 LSTM of the mean
    weights, bit for bit (the same kernel on the same float16 arguments)."""
    torch.manual_seed(0)
    m = BayesLSTM(4, 6, num_layers=2)
    bbb.set_sampling(m, "mean")
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        out, (h, c) = m(x)
    ref, (rh, rc) = m.to_torch().half()(x.half())
    for a, b in ((out, ref), (h, rh), (c, rc)):
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lstm_accepts_hx_as_a_list(estimator: str) -> None:
    """``hx = [h_0, c_0]`` (a list, as nn.LSTM accepts it) gives the output of the tuple; it
    was refused ("hx must be a tuple"). A list of another length is refused, naming it."""
    torch.manual_seed(0)
    m = BayesLSTM(4, 6, estimator=estimator)
    x = torch.randn(5, 3, 4)
    h, c = torch.randn(1, 3, 6), torch.randn(1, 3, 6)
    torch.manual_seed(1)
    out_t, (h_t, c_t) = m(x, (h, c))
    torch.manual_seed(1)
    out_l, (h_l, c_l) = m(x, [h, c])  # type: ignore[arg-type]
    for a, b in ((out_t, out_l), (h_t, h_l), (c_t, c_l)):
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)
    with pytest.raises(ValueError, match=r"hx must be a tuple \(h_0, c_0\) of two tensors, got "
                       r"list of length 3"):  # fmt: skip
        m(x, [h, c, c])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [torch.int64, torch.float64])
@pytest.mark.parametrize("cls", CLASSES)
def test_initial_state_dtype_autocast_cannot_cast_is_refused(
    cls: type[_BayesRNNBase], bad: torch.dtype
) -> None:
    """Under autocast an initial state in a dtype autocast does not cast (integers, float64)
    is refused by name, listing the accepted dtypes; it passed the check (any dtype was
    accepted under autocast) and failed in torch's kernel ("get_mkldnn_dtype: unsupported
    data type")."""
    m = cls(4, 6)
    x = torch.randn(5, 3, 4)
    h = torch.zeros(1, 3, 6, dtype=bad)
    hx = (h, h) if cls is BayesLSTM else h
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(ValueError, match=rf"h_0 must have the parameters' dtype torch.float32 "
                      rf"\(under autocast: one of torch.bfloat16, torch.float16, torch.float32, "
                      rf"the dtypes autocast casts\), got {bad}"),
    ):  # fmt: skip
        m(x, hx)
