"""Defects found in session 28, each with the test that failed before its fix.

1. An integer device (an accelerator's index, as ``torch.device(0)`` reads it) on a machine
   without an accelerator was reported as "not a torch device (e.g. cpu, cuda, cuda:1)".
2. ``BayesLSTM.to_torch`` / ``to_deterministic`` refused a subclass overriding ``forward`` but
   converted one overriding a method ``forward`` computes with, into a plain layer computing
   another function.
3. ``bbb bandit --resume`` took every setting not given on the command line from this
   version's defaults, so a run started with ``--adam-eps 1e-3`` could not be resumed with
   ``--resume --out R`` alone, and every run would have been refused once a default changed.
4. ``ClassificationPrediction.entropy`` / ``.aleatoric`` of a float16 prediction holding a 0
   were NaN (the clamp at 1e-30 underflowed to 0, and 0 * log 0 is NaN).
5. ``bbb.to_deterministic`` converted a subclass of a convolution or embedding overriding the
   method its output is computed with (``_conv``, ``_lookup``) into the plain layer, silently
   another function (only ``forward`` and ``op`` were looked at).
6. ``BayesLinear`` / ``BayesConv*d`` accepted a complex dtype silently (a posterior with a
   complex sigma) and failed on an integer one inside ``nn.Module.to`` without naming the layer.
7. ``bbb.acquire(method="batch_bald")`` scored the pool's BALD in float64 over the whole pool
   at once (three S x N x C float64 temporaries: 400 MB each at S = 100, N = 50000, C = 10);
   now in chunks of inputs, with the same numbers up to float64 rounding.
8. ``Trainer`` restored the states of the generators a training loader draws from by
   position: a run saved with ``loader_generator`` set to its sampler's generator (listed
   first) and resumed without it (the loader's own generator first) swapped the two states,
   silently. They are saved and restored by where they sit in the loader.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import bbb
from bbb.cli import main
from bbb.config import ConfigError
from bbb.runs import check_device


@pytest.mark.skipif(torch.accelerator.is_available(), reason="a machine without an accelerator")
@pytest.mark.parametrize("index", [0, 1])
def test_an_integer_device_without_an_accelerator_says_so(index: int) -> None:
    # before: "device '0' is not a torch device (e.g. cpu, cuda, cuda:1)", though 0 is one
    with pytest.raises(
        ConfigError,
        match=rf"device {index} \(an accelerator's index\) is not "
        r"available here: this machine has no accelerator .*; use device='cpu'",
    ):
        check_device(index)


def test_a_bool_device_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"device must be a string, an index or a torch.device"):
        check_device(True)  # type: ignore[arg-type]


def test_cpu_device_forms_are_accepted() -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")


class _ScaledLoop(bbb.BayesLSTM):
    def _torch_forward(self, *args: Any, **kwargs: Any) -> Any:
        out, hn, cn = super()._torch_forward(*args, **kwargs)
        return 2 * out, hn, cn


class _OwnForward(bbb.BayesGRU):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out, hn = super().forward(*args, **kwargs)
        return 2 * out, hn


@pytest.mark.parametrize(
    ("cls", "method"), [(_ScaledLoop, "_torch_forward"), (_OwnForward, "forward")]
)
def test_a_recurrent_subclass_computing_another_function_is_not_converted(
    cls: type, method: str
) -> None:
    layer = cls(3, 4)
    x = torch.randn(5, 2, 3)
    with bbb.sampling(layer, "mean"):
        out = layer(x)[0]
    plain = bbb.BayesLSTM(3, 4) if cls is _ScaledLoop else bbb.BayesGRU(3, 4)
    plain.load_state_dict(layer.state_dict())
    with bbb.sampling(plain, "mean"):
        assert not torch.allclose(out, plain(x)[0])  # the subclass computes another function
    # before: _ScaledLoop converted silently to an nn.LSTM computing half its mean output
    with pytest.raises(
        TypeError, match=rf"cannot convert {cls.__name__}: it overrides {method}\(\)"
    ):
        layer.to_torch()
    with pytest.raises(TypeError, match=rf"overrides {method}\(\)"):
        bbb.to_deterministic(torch.nn.Sequential(layer))
    assert isinstance(plain.to_torch(), torch.nn.RNNBase)  # the library's own classes convert


_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
_TINY = [
    "--agents", "bbb-thompson", "greedy-0", "--seeds", "0", "--updates-per-step", "2",
    "--batch-size", "8", "--buffer-size", "16", "--hidden", "8", "--checkpoint-every", "2",
    "--data-dir", str(_DATA), "--quiet",
]  # fmt: skip


@pytest.mark.skipif(not (_DATA / "mushroom").is_dir(), reason="the shared Mushroom data is absent")
def test_bandit_resume_takes_the_settings_not_given_from_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "r")
    start = ["bandit", *_TINY, "--steps", "4", "--adam-eps", "1e-3", "--noise-sigma", "0.7"]
    assert main([*start, "--out", out]) == 0
    # before: refused, "cannot resume ... with other settings (adam_eps: 0.001 -> 1e-08; ...)"
    assert main(["bandit", "--resume", "--out", out, "--steps", "6", "--quiet"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["steps"], saved["adam_eps"], saved["noise_sigma"]) == (6, 1e-3, 0.7)
    assert saved["agents"] == ["bbb-thompson", "greedy-0"] and saved["hidden"] == 8
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["steps_done"] == 6
    # a setting given that differs from the run's is still refused, naming it (exit status 1)
    capsys.readouterr()
    assert main(["bandit", "--resume", "--out", out, "--steps", "8", "--noise-sigma", "0.5"]) == 1
    assert "noise_sigma: 0.7 -> 0.5" in capsys.readouterr().err
    # given at the run's own value: accepted
    assert main(["bandit", "--resume", "--out", out, "--steps", "8", "--adam-eps", "1e-3",
                 "--quiet"]) == 0  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_prediction_entropies_of_one_hot_and_uniform_rows_in_every_dtype(
    dtype: torch.dtype,
) -> None:
    sample_probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]], dtype=dtype)
    pred = bbb.ClassificationPrediction(sample_probs.mean(0), sample_probs)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64)).item()
    # before: NaN in float16 (the one-hot samples' 0 * log 0)
    # predictive (0.5, 0.5) for both inputs; the samples: one-hot (0 nats) and uniform (ln 2);
    # a few roundings of values below 1 in the dtype: within 4 of its eps
    tol = 4 * torch.finfo(dtype).eps
    torch.testing.assert_close(
        pred.entropy.double(), torch.tensor([ln2, ln2], dtype=torch.float64), atol=tol, rtol=0
    )
    torch.testing.assert_close(
        pred.aleatoric.double(), torch.tensor([0.0, ln2], dtype=torch.float64), atol=tol, rtol=0
    )


class _ScaledConvT(bbb.BayesConvTranspose2d):
    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: Any, groups: int) -> torch.Tensor:
        return 2 * super()._conv(x, w, b, groups)


class _ScaledConv(bbb.BayesConv1d):
    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: Any, groups: int) -> torch.Tensor:
        return 2 * super()._conv(x, w, b, groups)


class _ShiftedEmbedding(bbb.BayesEmbedding):
    def _lookup(self, x: torch.Tensor) -> torch.Tensor:
        return (super()._lookup(x) + 1) % self.num_embeddings  # the next row


class _Defaults(bbb.BayesConv1d):  # sets a default only: computes the parent's function
    def __init__(self) -> None:
        super().__init__(2, 3, 3)


@pytest.mark.parametrize(
    ("layer", "x", "method"),
    [
        (_ScaledConvT(2, 3, 3), torch.randn(1, 2, 4, 4), "_conv"),
        (_ScaledConv(2, 3, 3), torch.randn(1, 2, 6), "_conv"),
        (_ShiftedEmbedding(5, 3), torch.tensor([0, 4]), "_lookup"),
    ],
)
def test_to_deterministic_refuses_a_subclass_overriding_a_computing_helper(
    layer: torch.nn.Module, x: torch.Tensor, method: str
) -> None:
    with bbb.sampling(layer, "mean"):
        mean = layer(x)
    parent = type(layer).__mro__[1](*_args(layer))
    parent.load_state_dict(layer.state_dict())
    with bbb.sampling(parent, "mean"):
        assert not torch.allclose(mean, parent(x))  # it computes another function
    # before: converted into the plain layer, whose output is the parent's
    with pytest.raises(TypeError, match=rf"overrides {method}\(\) of "):
        bbb.to_deterministic(torch.nn.Sequential(layer))
    assert not isinstance(bbb.to_deterministic(parent), bbb.BayesModule)


def _args(layer: torch.nn.Module) -> tuple[int, ...]:
    if isinstance(layer, bbb.BayesEmbedding):
        return (layer.num_embeddings, layer.embedding_dim)
    return (layer.in_channels, layer.out_channels, 3)


def test_a_subclass_that_only_sets_defaults_still_converts() -> None:
    layer = _Defaults()
    x = torch.randn(1, 2, 6)
    with bbb.sampling(layer, "mean"):
        mean = layer(x)
    torch.testing.assert_close(bbb.to_deterministic(layer)(x), mean)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, "float32"])
@pytest.mark.parametrize("make", [bbb.BayesLinear, bbb.BayesConv1d, bbb.BayesConv3d])
def test_linear_and_conv_layers_refuse_a_dtype_that_is_not_floating(make: Any, dtype: Any) -> None:
    # before: complex64 accepted (sigma = softplus(rho) complex), int64 / "float32" failed in
    # nn.Module internals without the layer's name
    args = (2, 3) if make is bbb.BayesLinear else (2, 3, 1)
    with pytest.raises(ValueError, match=rf"{make.__name__} dtype must be a floating-point "
                       r"torch.dtype \(torch.float16, torch.bfloat16, torch.float32 or "):  # fmt: skip
        make(*args, dtype=dtype)
    assert make(*args, dtype=torch.float64).weight_mu.dtype == torch.float64


def test_pool_bald_in_chunks_gives_the_numbers_of_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import bbb.acquisition as acq

    g = torch.Generator().manual_seed(0)
    sp = torch.softmax(3 * torch.randn(7, 53, 4, generator=g), dim=-1)
    sp[:, 5] = torch.eye(4)[torch.arange(7) % 4]  # one-hot samples: 0 log 0 terms
    p = sp.double()
    mean = p.mean(0)
    one_pass = (torch.special.xlogy(p, p) - torch.special.xlogy(p, mean)).sum(-1).mean(0)
    monkeypatch.setattr(acq, "_CHUNK_ELEMENTS", 7 * 4 * 5)  # chunks of 5 inputs, the last of 3
    chunked = acq._bald64(sp)  # from float32: each chunk converted to float64
    assert chunked.dtype == torch.float64
    # a reduction over another layout may sum in another order: float64 rounding of values
    # below ~2 (log 4), a few ulps, far below any gap that decides a pick
    torch.testing.assert_close(chunked, one_pass.clamp_min(0.0), rtol=0, atol=1e-14)
    monkeypatch.setattr(acq, "_CHUNK_ELEMENTS", 1 << 22)
    assert torch.equal(acq._bald64(sp), one_pass.clamp_min(0.0))  # one chunk: one pass exactly
    # and the public score agrees with ClassificationPrediction.epistemic
    pred = bbb.ClassificationPrediction(p.mean(0), p)
    torch.testing.assert_close(acq.acquisition_scores(pred, "bald").double(), chunked)


def _two_generator_trainer(out_dir: Path | None, epochs: int, pin: bool) -> Any:
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from bbb.models import bayes_mlp
    from bbb.train import Trainer

    x = torch.rand(20, 1, generator=torch.Generator().manual_seed(1))
    ds = TensorDataset(x, torch.sin(3 * x))
    g_sampler = torch.Generator().manual_seed(6)
    g_loader = torch.Generator().manual_seed(10)
    loader = DataLoader(
        ds, batch_size=5, sampler=RandomSampler(ds, generator=g_sampler), generator=g_loader
    )
    torch.manual_seed(0)
    model = bayes_mlp(1, [4], 1)
    return Trainer(
        model,
        bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), 20),
        torch.optim.SGD(model.parameters(), lr=1e-2),
        loader,
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
        loader_generator=g_sampler if pin else None,
    )


def test_a_resume_restores_each_loader_generator_by_its_place_not_its_position(
    tmp_path: Path,
) -> None:
    whole = _two_generator_trainer(None, 3, pin=True)
    whole.fit()
    _two_generator_trainer(tmp_path, 2, pin=True).fit()  # saved with the sampler's listed first
    torch.manual_seed(123)  # the global RNG moved: everything must come from the checkpoint
    resumed = _two_generator_trainer(tmp_path, 3, pin=False)  # the loader's listed first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch to warn about: the same two generators
        resumed.fit(resume=True)
    # before: the two states swapped, the third epoch shuffled otherwise
    for a, b in zip(
        whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_a_resume_whose_loader_generators_sit_elsewhere_warns(tmp_path: Path) -> None:
    first = _two_generator_trainer(tmp_path, 1, pin=False)  # at "loader" and "sampler"
    first.fit()
    other = _two_generator_trainer(tmp_path, 2, pin=False)
    other.train_loader = torch.utils.data.DataLoader(  # the loader's own and a pinned one
        first.train_loader.dataset, batch_size=5, shuffle=True, generator=torch.Generator()
    )
    other.loader_generator = torch.Generator()
    with pytest.warns(UserWarning, match=r"generators at loader, sampler, but this Trainer's "
                      r"loader draws from generators at loader_generator, loader"):  # fmt: skip
        other.fit(resume=True)
