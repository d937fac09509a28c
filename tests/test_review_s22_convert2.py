"""Session-22 review (second pass) of conversion, pruning, prediction, plots and the MNIST
driver: regressions."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import bbb
from bbb.pruning import load_compact, prune_by_snr, save_compact

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "mnist" / "run.py"


# --------------------------------------------------------------------------- bayesianize


def test_bayesianize_gives_each_dtype_a_prior_of_its_own() -> None:
    """One prior shared by float64 and float16 layers was converted in place by each new
    layer, ending in float16 for all: the float64 layers' log-prior used sigma rounded to
    float16 (0.09998 for 0.1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4).double(), nn.Linear(4, 2).half(), nn.Linear(2, 2).double())
    prior = bbb.GaussianPrior(0.1)
    bnet = bbb.bayesianize(net, prior=prior)
    assert [layer.prior.sigma.dtype for layer in bnet] == [
        torch.float64,
        torch.float16,
        torch.float64,
    ]
    # layers of one dtype share one prior (the caller's, for the first dtype met)
    assert bnet[0].prior is prior and bnet[2].prior is prior and bnet[1].prior is not prior
    assert float(bnet[0].prior.sigma) == 0.1  # all of float64's digits
    w = torch.randn(5, dtype=torch.float64)
    exact = bbb.GaussianPrior(0.1).double()
    torch.testing.assert_close(bnet[0].prior.log_prob(w), exact.log_prob(w), rtol=0, atol=0)
    # a single-dtype model still shares the caller's prior object in every layer
    single = bbb.bayesianize(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), prior=prior)
    assert single[0].prior is prior and single[1].prior is prior


# --------------------------------------------------------------------------- pruning


def _shared_layer_net() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    return bbb.bayesianize(
        nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(6, 3)),
        prior=bbb.GaussianPrior(0.5),
        init_from_weights=True,
    )


def test_global_pruning_puts_each_mask_on_its_layers_device_and_dtype() -> None:
    """The global threshold is taken over all layers' scores in one place; each layer's mask
    comes back on the layer's device and in its dtype (same selection as before)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3).double())
    bnet = bbb.bayesianize(net)
    result = prune_by_snr(bnet, 0.5)
    assert result.removed == 16 and result.total == 32
    for layer in bnet:
        assert layer.weight_mask.device == layer.weight_mu.device
        assert layer.weight_mask.dtype == layer.weight_mu.dtype
    kept = torch.cat([(layer.weight_mask.flatten() != 0) for layer in bnet])
    # every removed weight's SNR is at most the threshold, every kept one's at least
    unmasked = torch.cat([bbb.pruning._unmasked_snr(layer).flatten().double() for layer in bnet])
    assert bool((unmasked[~kept] <= result.threshold).all())
    assert bool((unmasked[kept] >= result.threshold).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (layers on two devices)")
def test_global_pruning_of_a_model_split_across_devices() -> None:
    """torch.cat of the layers' scores failed when the layers were on two devices."""
    torch.manual_seed(0)
    bnet = bbb.bayesianize(nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)))
    reference = prune_by_snr(bnet, 0.5)
    masks = [layer.weight_mask.clone() for layer in bnet]
    bnet[1].cuda()
    result = prune_by_snr(bnet, 0.5)
    assert (result.removed, result.threshold) == (reference.removed, reference.threshold)
    assert bnet[0].weight_mask.device.type == "cpu"
    assert bnet[1].weight_mask.device.type == "cuda"
    for layer, mask in zip(bnet, masks, strict=True):
        assert torch.equal(layer.weight_mask.cpu(), mask)


def test_save_compact_stores_a_shared_layers_tensors_once(tmp_path: Path) -> None:
    """A layer used in two places had its biases (and a prior shared by layers its buffers)
    stored under both names; an unpruned shared layer all of its parameters."""
    for fraction in (None, 0.5):
        model = _shared_layer_net()
        if fraction is not None:
            prune_by_snr(model, fraction)
        path = tmp_path / f"m{fraction}.pt"
        save_compact(model, path)
        rest = torch.load(path, weights_only=True)["rest"]
        assert not any(k.startswith("2.") for k in rest), sorted(rest)
        assert "3.prior.sigma" not in rest  # the prior bayesianize shares: stored once
        assert ("0.weight_mu" in rest) is (fraction is None)
        # and it loads back into a fresh model: every name gets the values
        fresh = _shared_layer_net()
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(1.0)
        load_compact(fresh, path)
        for layer, ref in zip(fresh, model, strict=True):
            if not isinstance(ref, bbb.BayesLinear):
                continue
            mask = 1.0 if ref.weight_mask is None else ref.weight_mask
            torch.testing.assert_close(layer.weight_mu * mask, ref.weight_mu * mask)
            torch.testing.assert_close(layer.bias_mu, ref.bias_mu)
            torch.testing.assert_close(layer.bias_rho, ref.bias_rho)
        assert fresh[0] is fresh[2]


def test_load_compact_reads_a_file_that_stores_every_name(tmp_path: Path) -> None:
    """Files written before (a shared layer's entries under each name) still load."""
    model = _shared_layer_net()
    prune_by_snr(model, 0.5)
    path = tmp_path / "old.pt"
    save_compact(model, path)
    blob = torch.load(path, weights_only=True)
    for key, value in model.state_dict().items():  # the old writer's rest: every name
        if not key.endswith(("weight_mu", "weight_rho", "weight_mask")):
            blob["rest"].setdefault(key, value.clone())
    torch.save(blob, path)
    fresh = _shared_layer_net()
    load_compact(fresh, path)
    torch.testing.assert_close(fresh[2].weight_mask, model[2].weight_mask)
    torch.testing.assert_close(fresh[3].bias_mu, model[3].bias_mu)


# --------------------------------------------------------------------------- predict


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(bbb.BayesLinear(4, 5), nn.Tanh(), bbb.BayesLinear(5, 3))


class _RowCounter(nn.Module):
    """Records the rows of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return x


def test_predict_refuses_a_max_rows_below_num_samples() -> None:
    """max_rows < num_samples ran passes of num_samples rows, above the promised bound."""
    model = _classifier()
    with pytest.raises(ValueError, match=r"max_rows \(3\) must be at least num_samples \(4\)"):
        bbb.predict(model, torch.randn(2, 4), num_samples=4, max_rows=3)
    with pytest.raises(ValueError, match="must be at least num_samples"):
        bbb.sample_outputs(model, torch.randn(2, 4), 4, max_rows=3)
    # max_rows == S: one input per pass, each pass within the bound
    counter = _RowCounter()
    seq = nn.Sequential(*model, counter)
    bbb.sample_outputs(seq, torch.randn(3, 4), 4, max_rows=4)
    assert counter.rows == [4, 4, 4]
    counter.rows.clear()
    bbb.sample_outputs(seq, torch.randn(5, 4), 2, max_rows=5)  # chunks of 2 inputs
    assert max(counter.rows) <= 5 and sum(counter.rows) == 10


def test_predict_default_max_rows_admits_any_num_samples() -> None:
    """The default bound (65536 rows) grows to S where S is larger: no error by default."""
    counter = _RowCounter()
    seq = nn.Sequential(*_classifier(), counter)
    out = bbb.sample_outputs(seq, torch.randn(2, 4), 70000)
    assert out.shape == (70000, 2, 3) and counter.rows == [70000, 70000]


# --------------------------------------------------------------------------- plots


def test_regression_band_leaves_the_baselines_mode_alone(tmp_path: Path) -> None:
    """regression_band switched the caller's baseline network to eval mode for good."""
    pytest.importorskip("matplotlib")
    from bbb.plots import regression_band

    torch.manual_seed(0)
    model = nn.Sequential(bbb.BayesLinear(1, 8), nn.Tanh(), bbb.BayesLinear(8, 1))
    baseline = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    seen: list[bool] = []
    baseline.register_forward_pre_hook(lambda m, _inp: seen.append(m.training))
    train = TensorDataset(torch.rand(10, 1), torch.randn(10, 1))
    for mode in (True, False):
        baseline.train(mode)
        regression_band(
            model,
            bbb.Gaussian(sigma=0.1),
            train,
            tmp_path / "b.png",
            num_samples=4,
            baseline=baseline,
        )
        assert baseline.training is mode and all(m.training is mode for m in baseline.modules())
    assert seen == [False, False]  # drawn without dropout both times
    # a submodule in another mode than the network (a frozen dropout) keeps its own
    baseline.train()
    baseline[1].eval()
    regression_band(
        model, bbb.Gaussian(sigma=0.1), train, tmp_path / "b.png", num_samples=4, baseline=baseline
    )
    assert [m.training for m in baseline] == [True, False, True]


# --------------------------------------------------------------------------- MNIST driver


def _driver() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT), run_name="mnist_driver")


def _write_run(
    rd: Path, cfg: Any, epochs_trained: int, stopped_early: bool, *, metrics_first: bool = False
) -> None:
    rd.mkdir(parents=True)
    summary = {"epochs_trained": epochs_trained, "stopped_early": stopped_early}
    metrics = rd / "metrics.json"
    metrics.write_text(json.dumps({"summary": summary}))
    cfg.save(rd / "config.json")
    t = (rd / "config.json").stat().st_mtime_ns
    # metrics.json after config.json (a finished start), or before it (a later, unfinished one)
    os.utime(metrics, ns=(t, t - 10**9 if metrics_first else t + 10**9))


def test_table1_counts_an_early_stopped_run_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row stopped early by patience has fewer epochs than its budget: every re-run resumed
    it (evaluating it again and rewriting its metrics.json) instead of reporting it done."""
    import bbb.runs

    trained: list[Path] = []
    monkeypatch.setattr(bbb.runs, "train_run", lambda cfg, rd, **k: trained.append(Path(rd)))
    d = _driver()
    out = tmp_path / "mnist"
    args = ["table1", "--widths", "8", "--methods", "sgd", "--epochs", "6", "--quiet"]
    cfg = d["_cfg"]("sgd", 8, 6, 0, {"device": "cpu", "patience": 2})
    rd = d["run_dir"](out, "sgd", 8, 0)
    _write_run(rd, cfg, 3, True)
    d["main"]([*args, "--set", "patience=2", "--out", str(out)])
    assert trained == []  # done
    d["main"]([*args, "--set", "patience=1", "--out", str(out)])
    assert trained == []  # a smaller patience: still stopped
    d["main"]([*args, "--set", "patience=3", "--out", str(out)])
    assert trained == [rd]  # a larger patience lets it train on
    # the same patience, but config.json newer than metrics.json: a resume with a larger
    # patience was interrupted, so the early stop on record is not this start's
    assert d["_finished"](rd, cfg) is True
    other = tmp_path / "other"
    _write_run(other, cfg, 3, True, metrics_first=True)
    assert d["_finished"](other, cfg) is False
    # no patience now: the trainer would train on; a run that is not stopped early is not done
    no_patience = d["_cfg"]("sgd", 8, 6, 0, {"device": "cpu"})
    assert d["_finished"](rd, no_patience) is False
    not_stopped = tmp_path / "ns"
    _write_run(not_stopped, cfg, 3, False)
    assert d["_finished"](not_stopped, cfg) is False
    full = tmp_path / "full"
    _write_run(full, cfg, 6, False)
    assert d["_finished"](full, cfg) is True
    assert d["_finished"](tmp_path / "missing", cfg) is False
