"""Session-22 review of conversion, pruning, prediction and the MNIST driver: regressions."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bbb
from bbb import BayesLinear
from bbb.models import count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


# --------------------------------------------------------------------------- bayesianize


def test_bayesianize_keeps_frozen_layers_frozen_and_the_train_eval_mode() -> None:
    """A frozen layer (requires_grad=False) became trainable, and a model in eval mode got
    layers in training mode; to_deterministic likewise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)  # the bias of layer 0 stays trainable
    net[2].requires_grad_(False)
    net.eval()
    bnet = bbb.bayesianize(net, init_from_weights=True)
    grads = {n: p.requires_grad for n, p in bnet.named_parameters()}
    assert grads == {
        "0.weight_mu": False,
        "0.weight_rho": False,
        "0.bias_mu": True,
        "0.bias_rho": True,
        "2.weight_mu": False,
        "2.weight_rho": False,
        "2.bias_mu": False,
        "2.bias_rho": False,
    }
    assert not any(m.training for m in bnet.modules())
    assert count_parameters(bnet) == 2 * 4
    # the trainable ones still train
    bnet.train()
    x = torch.randn(5, 3)
    (bnet(x).sum() + bbb.kl_divergence(bnet)).backward()
    assert bnet[0].bias_mu.grad is not None and bnet[0].weight_mu.grad is None

    bnet.eval()
    det = bbb.to_deterministic(bnet)
    assert {n: p.requires_grad for n, p in det.named_parameters()} == {
        "0.weight": False,
        "0.bias": True,
        "2.weight": False,
        "2.bias": False,
    }
    assert not any(m.training for m in det.modules())
    # a bare layer too
    assert bbb.bayesianize(nn.Linear(2, 2).eval()).training is False
    # frozen but not started at the trained weights: its random mu would never train
    with pytest.warns(UserWarning, match=r"kept these frozen layers frozen: 0, 2, but with"):
        bbb.bayesianize(net)
    single = bbb.to_deterministic(BayesLinear(2, 2).eval())
    assert single.training is False


def test_bayesianize_and_to_deterministic_name_the_hooks_they_drop() -> None:
    """Hooks on a replaced layer were silently lost (the new module does not run them)."""
    calls: list[str] = []
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    net[2].register_forward_hook(lambda *_: calls.append("fwd"))
    net[1].register_forward_hook(lambda *_: calls.append("relu"))  # kept module: no warning
    with pytest.warns(UserWarning, match=r"replaced layers that had hooks: 2\. The new"):
        bnet = bbb.bayesianize(net)
    bnet(torch.randn(1, 3))
    assert calls == ["relu"]  # the ReLU's hook still runs; the warning named the lost one
    net2 = nn.Sequential(nn.Linear(3, 3))
    net2[0].weight.register_hook(lambda g: g)
    with pytest.warns(UserWarning, match=r"hooks: 0\."):
        bbb.bayesianize(net2)
    bnet[0].register_forward_pre_hook(lambda *_: None)
    with pytest.warns(UserWarning, match=r"to_deterministic replaced layers that had hooks: 0\."):
        bbb.to_deterministic(bnet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing hooked: no warning
        bbb.bayesianize(nn.Sequential(nn.Linear(2, 2)))


def test_bayesianize_names_weights_tied_between_two_modules() -> None:
    """Two modules sharing a weight Parameter (a tied encoder/decoder) got independent
    posteriors without a word; a module used twice (one layer) is still converted once."""
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 4)
    dec.weight = enc.weight
    with pytest.warns(
        UserWarning, match=r"untied weights shared between modules: 0\.weight = 2\.weight\."
    ):
        bnet = bbb.bayesianize(nn.Sequential(enc, nn.Tanh(), dec))
    assert bnet[0].weight_mu is not bnet[2].weight_mu
    lin = nn.Linear(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bbb.bayesianize(nn.Sequential(lin, nn.Tanh(), lin))


# --------------------------------------------------------------------------- pruning export


def _shared_layer_net() -> nn.Sequential:
    layer = BayesLinear(6, 6, mu_init=(-1.0, 1.0), rho_init=(-4.0, 0.0))
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), BayesLinear(6, 2))


def test_compact_export_of_a_layer_used_twice_stores_it_once_and_zeroes_its_pruned_mu(
    tmp_path,
) -> None:
    """A layer used in two places is in the state dict twice: save_compact compacted the first
    name and stored the second whole (mu, rho and mask), so the file was not compact and
    load_compact gave the pruned weights their old mu instead of 0."""
    torch.manual_seed(0)
    net = _shared_layer_net()
    bbb.prune_by_snr(net, 0.75)
    path = tmp_path / "net.pt"
    bbb.save_compact(net, path)
    blob = torch.load(path, weights_only=True)
    assert not any(k.startswith("2.weight") for k in blob["rest"])
    torch.manual_seed(1)
    fresh = _shared_layer_net()
    bbb.load_compact(fresh, path)
    assert fresh[2] is fresh[0]
    pruned = fresh[0].weight_mask == 0
    assert int(pruned.sum()) == int((net[0].weight_mask == 0).sum()) > 0
    assert torch.equal(fresh[0].weight_mu[pruned], torch.zeros(int(pruned.sum())))
    x = torch.randn(4, 6)
    with bbb.sampling(net, "mean"), bbb.sampling(fresh, "mean"):
        assert torch.equal(fresh(x), net(x))


class _Masked(nn.Module):
    """A module with a buffer whose name contains "mask" (e.g. an attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("attn_mask", torch.ones(64, 64))
        self.lin = BayesLinear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_dense_state_bytes_drops_only_the_pruning_masks() -> None:
    """Every key containing "mask" was left out of the dense size, so another module's mask
    buffer (16 KiB here) was not counted."""
    from bbb.pruning import dense_state_bytes

    torch.manual_seed(0)
    net = _Masked()
    bbb.prune_by_snr(net, 0.5)
    size = dense_state_bytes(net)
    net.attn_mask = torch.ones(1, 1)
    # its 16384 bytes of data, less torch.save's record padding (64-byte aligned)
    assert size - dense_state_bytes(net) >= 64 * 64 * 4 - 256


# --------------------------------------------------------------------------- MNIST driver

_ROOT = Path(__file__).resolve().parents[1]
_DATA = _ROOT / ".." / "shared" / "data"
_needs_mnist = pytest.mark.skipif(
    not (_DATA / "mnist").is_dir(), reason="the shared MNIST data (../shared/data/mnist) is absent"
)


def _driver() -> dict[str, Any]:
    return runpy.run_path(str(_ROOT / "experiments" / "mnist" / "run.py"), run_name="mnist_s22")


@_needs_mnist
def test_driver_refuses_rows_whose_directory_holds_a_run_of_other_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-running table1 with other settings (--set, --subset) printed "[done]" for finished
    rows and kept their old results; a value given twice (--seeds 0 0) made two rows of one
    run directory (with --jobs: two children training it)."""
    monkeypatch.setenv("BBB_DATA_DIR", str(_DATA))
    d = _driver()
    out = tmp_path / "mnist"
    args = ["table1", "--epochs", "1", "--widths", "8", "8", "--methods", "sgd", "--quiet"]
    args += ["--subset", "128", "--out", str(out)]
    d["main"]([*args, "--seeds", "0", "0", "--jobs", "2"])
    assert sorted(p.name for p in out.iterdir()) == ["sgd-8-s0"]  # one row, in this process
    before = (out / "sgd-8-s0" / "metrics.json").stat().st_mtime_ns
    with pytest.raises(SystemExit, match=r"sgd-8-s0 \(lr: 0\.001 -> 0\.01\); use the same"):
        d["main"]([*args, "--set", "lr=0.01"])
    d["main"]([*args, "--epochs", "1"])  # the same settings: skipped as done
    assert (out / "sgd-8-s0" / "metrics.json").stat().st_mtime_ns == before


def test_driver_table2_refuses_fractions_outside_the_unit_interval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fraction of 1 failed in prune_by_snr after the earlier fractions' evaluations, and
    table2.json was not written."""
    d = _driver()
    with pytest.raises(SystemExit) as exit_info:
        d["main"](["table2", "--fractions", "0.5", "1.0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--fractions must lie in [0, 1), got 1.0" in capsys.readouterr().err


@_needs_mnist
def test_driver_extras_of_a_run_do_not_depend_on_the_other_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """extras drew the noise images of each run from one generator shared by all runs (and
    the weight samples unseeded): a run's OOD AUROC changed when another run was added."""
    import json
    import shutil

    monkeypatch.setenv("BBB_DATA_DIR", str(_DATA))
    d = _driver()
    out = tmp_path / "mnist"
    args = ["table1", "--epochs", "1", "--widths", "8", "--methods", "sgd", "--quiet"]
    d["main"]([*args, "--subset", "128", "--seeds", "0", "1", "--out", str(out)])
    d["main"](["extras", "--num-samples", "2", "--out", str(out)])
    both = json.loads((out / "extras.json").read_text())
    shutil.rmtree(out / "sgd-8-s0")
    d["main"](["extras", "--num-samples", "2", "--out", str(out)])
    alone = json.loads((out / "extras.json").read_text())
    assert alone["sgd-8-s1"] == both["sgd-8-s1"]


# --------------------------------------------------------------------------- plots


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_regression_band_of_a_model_on_the_gpu(tmp_path: Path) -> None:
    """The grid was made on the CPU for a model on the GPU (the run directory's plot of a 1-D
    regression trained with device='cuda' failed after training), and the plotted tensors
    were not brought back to the CPU."""
    from torch.utils.data import TensorDataset

    from bbb.models import bayes_mlp
    from bbb.plots import regression_band

    torch.manual_seed(0)
    model = bayes_mlp(1, [8], 1).cuda()
    likelihood = bbb.Gaussian().cuda()
    train = TensorDataset(torch.rand(20, 1, device="cuda"), torch.randn(20, 1, device="cuda"))
    out = regression_band(model, likelihood, train, tmp_path / "band.png", num_samples=4)
    assert (tmp_path / "band.png").stat().st_size > 0
    assert out["quantiles"].device.type == "cpu"


def test_bayes_convnet_names_an_image_size_too_small() -> None:
    """image_size below 4 pooled to nothing: the error named BayesLinear's in_features=0."""
    from bbb.models import bayes_convnet

    with pytest.raises(ValueError, match=r"image_size must be an integer of at least 4 .* got 3"):
        bayes_convnet(image_size=3)
    assert bayes_convnet(image_size=4)[-1].in_features == 32
