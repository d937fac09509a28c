"""Regression tests for the defects found by the session-6 review (each test names the defect).

Likelihoods and predictions, the ensemble layer, the KL's cached weight sample, the Laplace
closed form, the local estimator's variance floor, pruning counts, and the training engine's
run-directory, resume and early-stopping bookkeeping.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributions as D
import torch.nn.functional as F

import bbb
from bbb import BayesLinear, BayesLinearEnsemble
from bbb.kl import softplus_and_log
from bbb.predictive import RegressionPrediction, sample_outputs
from bbb.priors import LaplacePrior

# --------------------------------------------------------------------------- likelihoods


def test_gaussian_refuses_outputs_with_extra_dimensions() -> None:
    """(B, T, D) outputs made log_prob (S, B, T) and the ELBO weighed the data term 1/T."""
    with pytest.raises(ValueError, match=r"\(B, D\) or \(B,\).*got \(8, 5, 1\)"):
        bbb.Gaussian("fixed").log_prob(torch.randn(2, 8, 5, 1), torch.randn(8, 5, 1))


def test_categorical_accepts_int32_and_int16_labels() -> None:
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([0, 4, 2, 1])
    ref = bbb.Categorical().log_prob(logits, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(bbb.Categorical().log_prob(logits, labels.to(dtype)), ref)


def test_heteroscedastic_gaussian_checks_output_dim() -> None:
    lik = bbb.Gaussian("heteroscedastic", output_dim=1)
    with pytest.raises(ValueError, match="output_dim=1 expects 2 outputs.*got 4"):
        lik.log_prob(torch.randn(2, 8, 4), torch.randn(8, 2))
    assert bbb.Gaussian("heteroscedastic", output_dim=2).log_prob(
        torch.randn(2, 8, 4), torch.randn(8, 2)
    ).shape == (2, 8)


def test_gaussian_rejects_nan_targets_and_nan_min_variance() -> None:
    with pytest.raises(ValueError, match="Gaussian target contains NaN"):
        bbb.Gaussian().log_prob(torch.randn(2, 3, 1), torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="min_variance must be a finite number"):
        bbb.Gaussian("heteroscedastic", min_variance=float("nan"))


def test_regression_prediction_log_prob_checks_the_target_shape() -> None:
    pred = RegressionPrediction(torch.randn(6, 5, 2), torch.ones(6, 5, 2))
    with pytest.raises(ValueError, match=r"targets of shape \(5, 1\).*\(5, 2\)"):
        pred.log_prob(torch.randn(5))
    assert pred.log_prob(torch.randn(5, 2)).shape == (5,)


# --------------------------------------------------------------------------- ELBO inputs


def test_blundell_weight_accepts_numpy_and_tensor_integers() -> None:
    ref = bbb.elbo.blundell_weight(1, 5)
    assert bbb.elbo.blundell_weight(np.int64(1), 5) == ref  # type: ignore[arg-type]
    assert bbb.elbo.blundell_weight(torch.tensor(1), 5) == ref  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_index must be an integer, got 1.5"):
        bbb.elbo.blundell_weight(1.5, 5)  # type: ignore[arg-type]


def test_a_callable_kl_scale_must_return_a_finite_non_negative_number() -> None:
    model = BayesLinear(2, 1)
    elbo = bbb.ELBO(bbb.Gaussian(), 10, kl_scale=lambda step: -1.0)
    with pytest.raises(ValueError, match=r"kl_scale\(0\) returned -1.0"):
        elbo(model, torch.randn(4, 2), torch.randn(4))


# --------------------------------------------------------------------------- sampling modes


def test_frozen_sample_is_never_replaced_by_a_pass_with_other_num_samples() -> None:
    torch.manual_seed(0)
    layer = BayesLinear(3, 2, rho_init=0.0)
    x = torch.randn(4, 3)
    bbb.set_sampling(layer, "frozen")
    before = layer(x)
    with pytest.raises(ValueError, match="1 frozen weight sample.*num_samples=4.*resample"):
        bbb.predict(layer, x, likelihood=bbb.Gaussian(output_dim=2), num_samples=4)
    assert torch.equal(layer(x), before)  # Thompson sampling's sample survived
    bbb.resample(layer)
    pred = bbb.predict(layer, x, likelihood=bbb.Gaussian(output_dim=2), num_samples=4)
    assert pred.sample_means.shape == (4, 4, 2)


def test_chunked_predictions_keep_one_network_per_weight_sample() -> None:
    """Sample s of a reparam model is the same network in every chunk of sample_outputs."""
    torch.manual_seed(0)
    model = BayesLinear(2, 1, rho_init=0.0)  # reparam, sigma ~ 0.69: samples differ a lot
    x = torch.randn(1, 2).repeat(7, 1)  # seven identical rows
    out = sample_outputs(model, x, 3, max_rows=6)  # chunks of 2 rows
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert not torch.allclose(out[0], out[1])  # the samples themselves differ
    assert model.mode == "sample" and model._frozen is None  # restored
    # a frozen sample of the caller's survives a chunked pass in "sample" mode elsewhere
    bbb.set_sampling(model, "frozen")
    y = model(x)
    bbb.set_sampling(model, "sample")
    sample_outputs(model, x, 3, max_rows=6)
    bbb.set_sampling(model, "frozen")
    assert torch.equal(model(x), y)


# --------------------------------------------------------------------------- the ensemble layer


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
@pytest.mark.parametrize("mode", ["sample", "mean", "frozen"])
def test_ensemble_runs_with_several_vectorized_samples(estimator: str, mode: str) -> None:
    torch.manual_seed(0)
    layer = BayesLinearEnsemble(3, 4, 2, estimator=estimator, dtype=torch.float64)
    layer.set_sampling(mode)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with bbb.vectorized_samples(layer, 2):
        y = layer(x.repeat(2, 1, 1))
    assert y.shape == (6, 5, 2)
    mu_w, mu_b = layer.weight_mu, layer.bias_mu
    sig_w, sig_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    if mode == "mean":  # both sample blocks are member k's mean network
        ref = torch.stack([x[k] @ mu_w[k].T + mu_b[k] for k in range(3)])
        torch.testing.assert_close(y[:3], ref)
        torch.testing.assert_close(y[3:], ref)
    elif mode == "frozen" or estimator == "reparam":
        # one weight sample per (sample block, member), w = mu + sigma eps: rows s*K + k of the
        # output are member k's network with sample s's weights (the Thompson-sampling path)
        rec = layer._record
        assert rec is not None and rec.eps_w is not None and rec.eps_b is not None
        for si in range(2):
            for k in range(3):
                w = mu_w[k] + sig_w[k] * rec.eps_w[si, k]
                b = mu_b[k] + sig_b[k] * rec.eps_b[si, k]
                torch.testing.assert_close(y[si * 3 + k], x[k] @ w.T + b, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(y[:3], y[3:])
    else:
        # per-row noise: member k's output for input x has mean x mu_k + mu_b and variance
        # x^2 sigma_k^2 + sigma_b^2, checked within Z standard errors over n independent draws:
        # local draws each row's noise afresh (n identical rows in one pass); flipout's rows
        # share one weight perturbation (sign-flipped), so its draws are n passes of one row
        n = 20000 if estimator == "local" else 4000
        from tests.conftest import Stats

        with torch.no_grad():
            if estimator == "local":
                big = layer(x[:, :1].expand(3, n, 4).contiguous())  # (3, n, 2)
            else:
                big = torch.cat([layer(x[:, :1]) for _ in range(n)], dim=1)
        for k in range(3):
            Stats.assert_mean(big[k], x[k, 0] @ mu_w[k].T + mu_b[k], what=f"member {k} mean")
            Stats.assert_var(
                big[k], x[k, 0] ** 2 @ (sig_w[k] ** 2).T + sig_b[k] ** 2, what=f"member {k} var"
            )
    assert torch.isfinite(layer.kl())


def test_ensemble_input_must_have_members_times_samples_rows() -> None:
    layer = BayesLinearEnsemble(3, 4, 2)
    with pytest.raises(
        ValueError,
        match=r"shape \(3, N, 4\), got \(6, 5, 4\): dimension 0 must be members=3, got 6",
    ):
        layer(torch.randn(6, 5, 4))


def test_to_deterministic_refuses_a_layer_it_cannot_convert() -> None:
    model = torch.nn.Sequential(BayesLinearEnsemble(2, 3, 4), torch.nn.ReLU())
    with pytest.raises(TypeError, match="cannot convert BayesLinearEnsemble"):
        bbb.to_deterministic(model)


# --------------------------------------------------------------------------- KL


def test_mc_kl_after_a_parameter_change_uses_the_current_parameters() -> None:
    """The forward's cached weight sample is stale once mu changes: kl() rebuilds it."""
    torch.manual_seed(0)
    layer = BayesLinear(4, 3, bias=False, prior=LaplacePrior(0.1), kl="mc", dtype=torch.float64)
    layer(torch.randn(5, 4, dtype=torch.float64))
    eps = layer._record.eps_w
    with torch.no_grad():
        layer.weight_mu.add_(1.0)
    sigma = layer.weight_sigma
    w = layer.weight_mu + sigma * eps[0]
    expected = (
        D.Normal(layer.weight_mu, sigma).log_prob(w) - layer.prior.distribution().log_prob(w)
    ).sum()
    torch.testing.assert_close(layer.kl(), expected)


def test_kl_after_a_no_grad_forward_reaches_the_weights_with_the_compile_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compile backend's code path (torch.compile replaced by the identity, as in
    test_kernels, so the fast suite compiles nothing): the KL's gradients after a no-grad
    forward equal the eager backend's, float64."""
    from bbb import kernels as K

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    for k in K._ALL:  # fresh kernels: none compiled or marked failed by an earlier test
        monkeypatch.setattr(k, "_compiled", None)
        monkeypatch.setattr(k, "failed", None)

    def grads(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        layer = BayesLinear(4, 3, dtype=torch.float64)
        with bbb.use_kernels(backend):
            with torch.no_grad():
                layer(torch.randn(5, 4, dtype=torch.float64))
            layer.kl().backward()
        assert layer.weight_mu.grad is not None and layer.weight_rho.grad is not None
        return layer.weight_mu.grad, layer.weight_rho.grad

    compiled, eager = grads("compile"), grads("eager")
    assert eager[0].abs().sum() > 0 and eager[1].abs().sum() > 0
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_laplace_closed_form_matches_torch_and_stays_finite_for_any_rho() -> None:
    torch.manual_seed(0)
    mu = torch.randn(500, dtype=torch.float64)
    rho = torch.randn(500, dtype=torch.float64) * 2 - 1
    sigma, log_sigma = softplus_and_log(rho)
    prior = LaplacePrior(0.7, loc=0.3)
    p = prior.distribution()
    ours = bbb.kl.closed_form_kl(mu, sigma, prior, log_sigma)
    torch.testing.assert_close(ours, D.kl_divergence(D.Normal(mu, sigma), p))
    for dtype in (torch.float32, torch.float64):
        for r in (-5.0, -30.0, -95.0, -120.0):
            rho_t = torch.full((3,), r, dtype=dtype, requires_grad=True)
            mu_t = torch.tensor([0.0, 0.5, 1e-39], dtype=dtype, requires_grad=True)
            s, ls = softplus_and_log(rho_t)
            k = bbb.kl.closed_form_kl(mu_t, s, LaplacePrior(0.1), ls).sum()
            k.backward()
            assert math.isfinite(float(k.detach())), (dtype, r)
            assert torch.isfinite(rho_t.grad).all() and torch.isfinite(mu_t.grad).all(), (dtype, r)


def test_local_estimator_keeps_tiny_output_variances() -> None:
    """The variance floor was 1e-16: sigma = softplus(-22) ~ 2.8e-10 came out as 1e-8."""
    torch.manual_seed(0)
    layer = BayesLinear(4, 1, bias=False, estimator="local", mu_init=(0.0, 0.0), rho_init=-22.0)
    out = layer(torch.ones(4000, 4)).detach()
    true_sd = 2.0 * float(torch.nn.functional.softplus(torch.tensor(-22.0)))  # sqrt(4) sigma
    # the sample sd of 4000 normals has relative SE 1 / sqrt(2 * 4000) ~ 1.1%: 5% is 4.5 SE
    assert float(out.std()) == pytest.approx(true_sd, rel=0.05)


# --------------------------------------------------------------------------- pruning


def test_pruning_removes_floor_of_the_written_fraction() -> None:
    layer = BayesLinear(10, 10, bias=False)
    assert bbb.prune_by_snr(layer, 0.29).removed == 29  # 0.29 * 100 = 28.999999999999996
    assert bbb.prune_by_snr(layer, 0.29, per_layer=True).removed == 29


# --------------------------------------------------------------------------- ECE bins


def test_reliability_bins_put_a_confidence_on_an_edge_in_the_lower_bin() -> None:
    from bbb.metrics import reliability_diagram_data

    conf = 9 / 11  # on the edge between bins 8 and 9 of 11: bins are right-closed
    probs = torch.tensor([[conf, 1 - conf]], dtype=torch.float64)
    data = reliability_diagram_data(probs, torch.tensor([0]), n_bins=11)
    assert int(data.bin_count[8]) == 1 and int(data.bin_count.sum()) == 1


# --------------------------------------------------------------------------- training runs

TOY = [
    "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--val-samples", "2", "--quiet",
]  # fmt: skip


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    import bbb.metrics
    import bbb.plots

    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
    monkeypatch.setattr(bbb.metrics, "plot_reliability_diagram", lambda *a, **k: None)


def cli(*args: object) -> int:
    from bbb.cli import main

    return main([str(a) for a in args])


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.usefixtures("no_plots")
def test_training_into_a_run_directory_needs_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old run's higher-numbered checkpoints used to survive and win the next resume."""
    run = tmp_path / "s"
    assert cli("train", *TOY, "--epochs", "3", "--out", run) == 0
    capsys.readouterr()
    assert cli("train", *TOY, "--epochs", "1", "--seed", "7", "--out", run) == 1
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint-00002.pt, checkpoint-00003.pt, best.pt" in err
    assert "--resume" in err and "--overwrite" in err
    assert _checkpoints(run) == ["checkpoint-00002.pt", "checkpoint-00003.pt"]  # untouched
    assert cli("train", *TOY, "--epochs", "1", "--seed", "7", "--out", run, "--overwrite") == 0
    assert _checkpoints(run) == ["checkpoint-00001.pt"]
    assert json.loads((run / "config.json").read_text())["seed"] == 7
    assert json.loads((run / "metrics.json").read_text())["summary"]["epochs_trained"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1]


@pytest.mark.usefixtures("no_plots")
def test_resume_refuses_settings_the_restored_state_would_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "r"
    assert cli("train", *TOY, "--epochs", "1", "--out", run) == 0
    capsys.readouterr()
    own_lr = json.loads((run / "config.json").read_text())["lr"]
    assert cli("train", "--resume", run, "--lr", "0.5") == 2
    assert f"--lr ({own_lr!r} -> 0.5) cannot change when resuming" in capsys.readouterr().err
    # repeating the run's own value is harmless
    assert cli("train", "--resume", run, "--lr", str(own_lr), "--epochs", "2") == 0
    capsys.readouterr()
    assert cli("train", "--resume", run, "--out", tmp_path / "elsewhere") == 2
    assert "cannot be combined with --out" in capsys.readouterr().err
    # a bad config.json is named as such, not as "flags"
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "old_key": 1}))
    assert cli("train", "--resume", run) == 1
    assert f"{run / 'config.json'}: unknown key(s) old_key" in capsys.readouterr().err


def test_a_cosine_run_cannot_be_resumed_with_other_epochs(tmp_path: Path) -> None:
    from bbb.config import ConfigError, TrainConfig
    from bbb.runs import train_run

    base = dict(dataset="toy", toy_n=64, hidden=[8], batch_size=16, val_samples=2)
    cfg = TrainConfig(**base, epochs=2, lr_schedule="cosine").validate()
    train_run(cfg, tmp_path / "c", progress=False, log=None, write_plots=False)
    longer = TrainConfig(**base, epochs=4, lr_schedule="cosine").validate()
    with pytest.raises(ConfigError, match="epochs 2 -> 4.*cosine"):
        train_run(longer, tmp_path / "c", resume=True, progress=False, log=None)


def _toy_trainer(out: Path, epochs: int, patience: int | None = None) -> bbb.train.Trainer:
    from torch.utils.data import DataLoader

    from bbb.data.toy import load_toy
    from bbb.models import bayes_mlp
    from bbb.train.trainer import Trainer, seed_everything

    generator = seed_everything(0)
    train, val = load_toy(n_train=64, n_val=32, seed=0)
    model = bayes_mlp(1, [8], 1, estimator="local")
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.5), len(train))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # frozen: validation cannot improve
    return Trainer(
        model,
        elbo,
        opt,
        DataLoader(train, batch_size=16, shuffle=True, generator=generator),
        val_loader=DataLoader(val, batch_size=32),
        epochs=epochs,
        out_dir=out,
        patience=patience,
        val_samples=1,
        val_metric="rmse",
        progress=False,
        log=None,
        loader_generator=generator,
    )


def test_an_early_stopped_run_stays_stopped_when_resumed(tmp_path: Path) -> None:
    run = tmp_path / "p"
    summary = _toy_trainer(run, epochs=30, patience=2).fit()
    assert summary["stopped_early"] and summary["epochs_trained"] < 30
    done = summary["epochs_trained"]
    again = _toy_trainer(run, epochs=30, patience=2).fit(resume=True)
    assert again["epochs_trained"] == done and again["stopped_early"]
    assert _checkpoints(run)[-1] == f"checkpoint-{done:05d}.pt"
    # a larger patience given on resume (a resumable change) lets it train on
    more = _toy_trainer(run, epochs=30, patience=1000).fit(resume=True)
    assert more["epochs_trained"] == 30 and not more["stopped_early"]


def test_a_foreign_pt_file_among_the_checkpoints_is_skipped(tmp_path: Path) -> None:
    run = tmp_path / "k"
    _toy_trainer(run, epochs=2).fit()
    torch.save({"foo": torch.zeros(1)}, run / "checkpoints" / "checkpoint-00009.pt")
    with pytest.warns(UserWarning, match="checkpoint-00009.pt is not a bbb training checkpoint"):
        summary = _toy_trainer(run, epochs=3).fit(resume=True)
    assert summary["epochs_trained"] == 3


def test_the_command_prints_every_line_of_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bbb.cli

    def fail(argv: list[str]) -> int:
        raise ValueError("Error(s) in loading state_dict:\n\tsize mismatch for 0.weight_mu")

    monkeypatch.setattr(bbb.cli, "run", fail)
    assert bbb.cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert "size mismatch for 0.weight_mu" in err


def test_best_pt_ahead_of_the_resumed_checkpoint_is_not_trusted(tmp_path: Path) -> None:
    run = tmp_path / "b"
    _toy_trainer(run, epochs=2).fit()
    best = torch.load(run / "best.pt", weights_only=True)
    torch.save({**best, "epoch": 3}, run / "best.pt")  # as if epoch 3's checkpoint was lost
    # and the checkpoint resumed from names an earlier epoch the best, whose weights best.pt
    # no longer holds (when it names its own epoch, its weights are the best: nothing is lost)
    ckpt = run / "checkpoints" / "checkpoint-00002.pt"
    torch.save({**torch.load(ckpt, weights_only=True), "best_epoch": 1}, ckpt)
    with pytest.warns(UserWarning, match="best.pt holds epoch 3 but checkpoint-00002.pt names"):
        summary = _toy_trainer(run, epochs=3).fit(resume=True)
    assert summary["best_epoch"] == 3  # chosen again: the only epoch validated since


def test_settings_that_would_be_ignored_are_refused() -> None:
    from bbb.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="uci_path applies to dataset 'uci' only"):
        TrainConfig(dataset="mnist", uci_path="x").validate()
    with pytest.raises(ConfigError, match="subset does not apply to dataset 'toy'"):
        TrainConfig(dataset="toy", subset=10).validate()
    with pytest.raises(ConfigError, match="patience needs a validation split"):
        TrainConfig(dataset="uci", uci_path="x", val_fraction=0.0, patience=3).validate()
    with pytest.raises(ValueError, match="patience needs a val_loader"):
        bbb.train.Trainer(
            BayesLinear(1, 1),
            bbb.ELBO(bbb.Gaussian(), 4),
            torch.optim.SGD(BayesLinear(1, 1).parameters(), 0.1),
            [],
            epochs=1,
            patience=2,
        )


def test_restoring_rng_state_with_another_thread_count_warns() -> None:
    from bbb.train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    set_rng_state(state)  # same thread count: silent
    with pytest.warns(UserWarning, match="written with 7 thread.*OMP_NUM_THREADS=7"):
        set_rng_state({**state, "threads": 7})


# --------------------------------------------------------------------------- bandit runs

BANDIT = [
    "bandit", "--seeds", "0", "--agents", "greedy-0", "--hidden", "8", "--updates-per-step", "1",
    "--buffer-size", "8", "--batch-size", "4", "--checkpoint-every", "5", "--quiet",
]  # fmt: skip


def test_bandit_run_directories_and_resume_bounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "b"
    assert cli(*BANDIT, "--steps", "10", "--out", run) == 0
    capsys.readouterr()
    # a fresh run into it is refused (its checkpoints would lose to the old run's)
    assert cli(*BANDIT, "--steps", "6", "--out", run) == 1
    assert "already holds a bandit run" in capsys.readouterr().err
    # resuming below the steps done is a clear error
    assert cli(*BANDIT, "--steps", "6", "--out", run, "--resume") == 1
    assert "it is at step 10 already (--steps must be at least 10)" in capsys.readouterr().err
    # extending rewrites config.json with the new length
    assert cli(*BANDIT, "--steps", "12", "--out", run, "--resume") == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 12
    # --overwrite starts over
    assert cli(*BANDIT, "--steps", "5", "--out", run, "--overwrite") == 0
    assert _checkpoints(run) == ["checkpoint-00005.pt"]
    assert json.loads((run / "metrics.json").read_text())["steps_done"] == 5


def test_bandit_run_directory_edge_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "b"
    assert cli(*BANDIT, "--steps", "5", "--out", run) == 0
    capsys.readouterr()
    # a run made before kl_data_size existed (its config.json lacks the key) still resumes
    saved = json.loads((run / "config.json").read_text())
    del saved["kl_data_size"]
    (run / "config.json").write_text(json.dumps(saved))
    assert cli(*BANDIT, "--steps", "10", "--out", run, "--resume") == 0
    assert json.loads((run / "metrics.json").read_text())["steps_done"] == 10
    # --overwrite with a data root that does not hold the data deletes nothing
    before = _checkpoints(run)
    assert cli(*BANDIT, "--steps", "5", "--out", run, "--overwrite", "--data-dir", tmp_path) == 1
    assert "mushroom" in capsys.readouterr().err
    assert _checkpoints(run) == before and (run / "metrics.json").is_file()
    # --resume and --overwrite together are refused
    assert cli(*BANDIT, "--steps", "5", "--out", run, "--overwrite", "--resume") == 1
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    # a directory with only the config.json of a run stopped before its first checkpoint is
    # not a run: a new start replaces it
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.json").write_text(json.dumps({**saved, "noise_sigma": 3.0}))
    assert cli(*BANDIT, "--steps", "5", "--out", stub) == 0
    from bbb.bandit import BanditConfig

    assert (
        json.loads((stub / "config.json").read_text())["noise_sigma"] == BanditConfig().noise_sigma
    )


def test_bandit_refuses_duplicate_agents() -> None:
    from bbb.bandit import BanditConfig

    with pytest.raises(ValueError, match="agents must be distinct"):
        BanditConfig(agents=["greedy-0", "greedy-0"]).validate()


# --------------------------------------------------------------------------- UCI engine


@pytest.fixture
def uci_dir(tmp_path: Path) -> Path:
    from test_uci import _write_uci_dir

    return _write_uci_dir(tmp_path / "data")


def _uci_cfg(**kw: object) -> object:
    from bbb import uci as U

    return U.uci_config(**{"epochs": 6, "num_samples": 2, **kw})


def test_uci_engine_applies_every_training_setting(uci_dir: Path) -> None:
    """The engine used to build Adam and a plain ELBO whatever the config said."""
    from bbb import uci as U
    from bbb.config import ConfigError

    def result(**kw: object) -> tuple[float, float]:
        r = U.run_split(uci_dir, 0, _uci_cfg(**kw), test_samples=5, passes=3)  # type: ignore[arg-type]
        return r["rmse"], r["ll"]

    base = result()
    for change in (
        {"optimizer": "sgd"},
        {"lr_schedule": "cosine"},
        {"kl_anneal_steps": 1000},
        {"weight_decay": 10.0},
    ):
        assert result(**change) != base, change
    with pytest.raises(ConfigError, match="patience is not used"):
        result(patience=2)


def test_uci_blundell_weights_run_over_one_pass(
    uci_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bbb import uci as U

    calls: list[tuple[int | None, int | None]] = []
    real = bbb.ELBO.kl_weight

    def spy(self: bbb.ELBO, batch_size: int, batch_index: int | None, num_batches: int | None):  # type: ignore[no-untyped-def]
        calls.append((batch_index, num_batches))
        return real(self, batch_size, batch_index, num_batches)

    monkeypatch.setattr(bbb.ELBO, "kl_weight", spy)
    U.run_split(uci_dir, 0, _uci_cfg(kl_weighting="blundell"), test_samples=5, passes=3)  # type: ignore[arg-type]
    # full-batch (54 rows < batch 2048): one minibatch per pass, so M = 1 and pi_1 = 1
    assert len(calls) == 6 and set(calls) == {(0, 1)}


def test_tune_scores_diverged_points_last_and_uses_each_points_epochs(uci_dir: Path) -> None:
    from bbb import uci as U
    from bbb.config import ConfigError
    from bbb.data.uci import UCIDataset

    ds = UCIDataset(uci_dir)
    space = U.SearchSpace.from_dict({"grid": {"lr": [0.01, 1e8], "epochs": [6]}, "smooth": 1})
    result = U.tune(ds, _uci_cfg(epochs=8), space, passes=4, log=None)  # type: ignore[arg-type]
    good, bad = result["points"]
    assert bad["val_ll"] is None and bad["diverged_on_splits"] == [0]
    assert good["curve_epochs"] == [3, 6]  # the point's own 6 epochs, in blocks of 3
    assert result["chosen"]["lr"] == 0.01 and result["chosen"]["epochs"] in (3, 6)
    with pytest.raises(ConfigError, match="splits must be a non-empty list"):
        U.SearchSpace.from_dict({"splits": []})
    with pytest.raises(ConfigError, match=r"search splits \[7\] out of range"):
        U.tune(ds, _uci_cfg(), U.SearchSpace.from_dict({"splits": [7]}), log=None)  # type: ignore[arg-type]
    # through run_uci: refused before the run directory (uci.json) is written
    out = uci_dir.parent / "tuned"
    st = U.UCIRunSettings(splits=[0], tune=True, search=U.SearchSpace.from_dict({"splits": [7]}))
    with pytest.raises(ConfigError, match=r"search splits \[7\] out of range"):
        U.run_uci(uci_dir, out, config=_uci_cfg(), settings=st, log=None)  # type: ignore[arg-type]
    assert not out.exists()
    # a cosine schedule would differ between the curves and the final training of E epochs
    with pytest.raises(ConfigError, match="use lr_schedule 'constant' with --tune"):
        U.tune(ds, _uci_cfg(lr_schedule="cosine"), space, log=None)  # type: ignore[arg-type]
    cosine_grid = U.SearchSpace.from_dict({"grid": {"lr_schedule": ["constant", "cosine"]}})
    with pytest.raises(ConfigError, match="use lr_schedule 'constant' with --tune"):
        U.tune(ds, _uci_cfg(), cosine_grid, log=None)  # type: ignore[arg-type]


def test_a_failed_parallel_task_keeps_the_others_results() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bbb.uci.train import _results_of

    def work(i: int) -> int:
        if i == 1:
            raise RuntimeError("split 1 failed")
        return i

    done: list[int] = []
    with ThreadPoolExecutor(2) as pool, pytest.raises(RuntimeError, match="split 1 failed"):
        _results_of([pool.submit(work, i) for i in range(4)], done.append)
    assert sorted(done) == [0, 2, 3]


def test_bench_refuses_zero_repeats() -> None:
    from bbb.bench import run_step_times

    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        run_step_times([("mlp", 8)], ["reparam"], [1], ["gaussian"], [], 0, 0)


def test_uci_all_caps_a_split_count_at_each_sets_splits(
    uci_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--all --splits 4 over sets of 3 splits: each runs its 3 (was: an error mid-run)."""
    out = tmp_path / "all"
    args = ["uci", "--all", uci_dir.parent, "--out", out, "--epochs", "2", "--splits", "4"]
    assert cli(*args, "--test-samples", "2", "--quiet") == 0
    assert "| tiny | 3 |" in capsys.readouterr().out
    (tmp_path / "nothing-here").mkdir()
    assert cli("uci", "--all", tmp_path / "nothing-here", "--out", out) == 1
    assert f"no UCI split directory under {tmp_path / 'nothing-here'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"dataset": "mnist", "toy_n": 50}, "toy_n=50 (dataset 'toy' only)"),
        ({"dataset": "toy", "val_fraction": 0.2}, "val_fraction=0.2 (dataset 'uci' only)"),
        ({"dataset": "mnist", "uci_split": 3}, "uci_split=3 (dataset 'uci' only)"),
        ({"dataset": "mnist", "noise_sigma": 0.5}, "noise_sigma=0.5 (regression (toy, uci) only)"),
        ({"method": "sgd", "prior": "laplace"}, "prior='laplace' (method 'bbb' only)"),
        ({"method": "dropout", "num_samples": 5}, "num_samples=5 (method 'bbb' only)"),
        ({"method": "bbb", "dropout": 0.2}, "dropout=0.2 (method 'dropout' only)"),
        ({"optimizer": "adam", "momentum": 0.5}, "momentum=0.5 (optimizer 'sgd' only)"),
    ],
)
def test_settings_the_run_never_reads_are_named(settings: dict, named: str) -> None:
    """A setting changed from its default that the dataset, method or optimizer never reads
    (the prior of an SGD baseline, the noise of a classifier, ...) was accepted and ignored:
    it is now a ConfigError naming it; the same setting where it applies is accepted."""
    from bbb.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=re.escape(named) + "$|" + re.escape(named + ";")):
        TrainConfig(**settings).validate()
    applies = {
        "toy_n": {"dataset": "toy"},
        "val_fraction": {"dataset": "uci", "uci_path": "x"},
        "uci_split": {"dataset": "uci", "uci_path": "x"},
        "noise_sigma": {"dataset": "toy"},
        "prior": {"method": "bbb"},
        "num_samples": {"method": "bbb"},
        "dropout": {"method": "dropout"},
        "momentum": {"optimizer": "sgd"},
    }[named.split("=")[0]]
    TrainConfig(**{**settings, **applies}).validate()
    # the defaults themselves never trip it, whatever the dataset and method
    for dataset, extra in (("mnist", {}), ("toy", {}), ("uci", {"uci_path": "x"})):
        for method in ("bbb", "sgd", "dropout"):
            TrainConfig(dataset=dataset, method=method, **extra).validate()
