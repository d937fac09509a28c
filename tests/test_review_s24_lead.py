"""Session 24: the lead's fixes of defects noticed in earlier reviews (issues #3, #4, #7, #9)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bbb


class _ConstantHead(nn.Module):
    """A (mean, log-variance) head whose log-variance is a fixed constant."""

    def __init__(self, log_var: float) -> None:
        super().__init__()
        self.layer = bbb.BayesLinear(2, 1)
        self.log_var = log_var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.layer(x)
        return torch.cat([mean, torch.full_like(mean, self.log_var)], dim=-1)


def test_predict_warns_when_the_heteroscedastic_variance_overflows() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 2)
    lik = bbb.Gaussian(noise="heteroscedastic")
    with pytest.warns(RuntimeWarning, match=r"overflows torch.float32.*5 of 5 examples"):
        pred = bbb.predict(_ConstantHead(100.0), x, likelihood=lik, num_samples=3)
    assert torch.isinf(pred.variance).all()
    # in float64 the same log-variance is finite, and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred64 = bbb.predict(
            _ConstantHead(100.0).double(), x.double(), likelihood=lik, num_samples=3
        )
    assert torch.isfinite(pred64.variance).all()
    # an ordinary log-variance: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bbb.predict(_ConstantHead(1.0), x, likelihood=lik, num_samples=3)


def test_a_bad_value_in_a_config_file_names_the_file(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bbb.cli import main

    cfg = tmp_path / "bad.toml"
    cfg.write_text("lr = -1.0\nepochs = 1\n")
    code = main(["train", "--config", str(cfg), "--dataset", "toy", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{cfg}: lr must be a finite positive number, got -1.0" in err
    assert not (tmp_path / "r").exists()
    # the same bad value given as a flag (overriding the file) is not blamed on the file
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--lr",
            "-2",
            "--dataset",
            "toy",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "lr must be a finite positive number, got -2.0" in err
    assert str(cfg) not in err


def _tiny_uci(d, splits: int):
    """A 40-row, 2-feature data set in the UCI split format; split s tests rows 8s..8s+7."""
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    rows = torch.cat([x, (x @ torch.tensor([1.0, -1.0]) + 3.0)[:, None]], 1).tolist()
    (d / "data.txt").write_text("".join(" ".join(f"{v:.6f}" for v in r) + "\n" for r in rows))
    (d / "index_features.txt").write_text("0\n1\n")
    (d / "index_target.txt").write_text("2\n")
    for split in range(splits):
        test = set(range(8 * split, 8 * split + 8))
        train = "".join(f"{i}\n" for i in range(40) if i not in test)
        (d / f"index_train_{split}.txt").write_text(train)
        (d / f"index_test_{split}.txt").write_text("".join(f"{i}\n" for i in sorted(test)))
    (d / "n_splits.txt").write_text(f"{splits}\n")
    return d


def test_sweep_best_gives_an_absolute_uci_path_for_a_relative_one(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sweep over a UCI set given by a path relative to the working directory recorded
    the path as written, so `bbb sweep best`'s TOML failed from any other directory; the
    trial's config.json had it absolute. Both now agree."""
    pytest.importorskip("optuna")
    import tomllib

    from bbb.cli import main

    _tiny_uci(tmp_path / "sets" / "tiny", splits=1)
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "space.toml"
    space.write_text(
        '[sweep]\ncommand = "train"\n[train]\ndataset = "uci"\nuci_path = "sets/tiny"\n'
        "hidden = [4]\nepochs = 1\nbatch_size = 16\nval_samples = 2\nval_fraction = 0.25\n"
        "[search]\nlr = { grid = [0.01] }\n"
    )
    assert main(["sweep", str(space), "--out", "sw", "--no-trial-plots"]) == 0
    capsys.readouterr()
    assert main(["sweep", "best", "sw"]) == 0
    best = tomllib.loads(capsys.readouterr().out)
    assert best["uci_path"] == str(tmp_path / "sets" / "tiny")
    saved = __import__("json").loads(
        next((tmp_path / "sw" / "trials").iterdir()).joinpath("config.json").read_text()
    )
    assert saved["uci_path"] == best["uci_path"]


def _mixture_mlp_shared() -> nn.Module:
    return bbb.models.bayes_mlp(4, [8], 2, prior=bbb.ScaleMixturePrior())


def test_a_compact_export_loads_into_a_model_that_does_not_share_its_prior(tmp_path) -> None:
    """save_compact stores a tensor held under several keys once and load_compact filled the
    others from the *target* model's sharing: a model built with its own prior per layer (or
    a used-twice layer built as two) could not load it ("Missing key(s)")."""
    torch.manual_seed(0)
    src = _mixture_mlp_shared()
    bbb.prune_by_snr(src, 0.5)
    f = tmp_path / "c.pt"
    bbb.save_compact(src, f)
    dst = nn.Sequential(
        bbb.BayesLinear(4, 8, prior=bbb.ScaleMixturePrior(pi=0.3)),
        nn.ReLU(),
        bbb.BayesLinear(8, 2, prior=bbb.ScaleMixturePrior(pi=0.3)),
    )
    bbb.load_compact(dst, f)
    x = torch.randn(3, 4)
    with bbb.sampling(src, "mean"), bbb.sampling(dst, "mean"):
        assert torch.equal(src(x), dst(x))
    assert float(dst[2].prior.pi) == pytest.approx(float(src[0].prior.pi))
    # a layer used twice, loaded into a network with two separate layers
    shared = bbb.BayesLinear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    bbb.prune_by_snr(twice, 0.5)
    bbb.save_compact(twice, f)
    two = nn.Sequential(bbb.BayesLinear(4, 4), nn.ReLU(), bbb.BayesLinear(4, 4))
    bbb.load_compact(two, f)
    assert torch.equal(two[2].weight_mask, shared.weight_mask)
    # the kept weights (a pruned weight's mu is stored as 0, see load_compact)
    assert torch.equal(two[2].weight_mu, shared.weight_mu * shared.weight_mask)


def test_a_compact_export_of_a_compiled_model_loads_into_the_plain_one(tmp_path) -> None:
    torch.manual_seed(0)
    plain = _mixture_mlp_shared()
    compiled = torch.compile(plain)
    bbb.prune_by_snr(compiled, 0.5)
    f = tmp_path / "c.pt"
    bbb.save_compact(compiled, f)
    other = _mixture_mlp_shared()
    bbb.load_compact(other, f)
    assert torch.equal(other[0].weight_mask, plain[0].weight_mask)
    # and the other way: a plain file into a compiled model
    again = _mixture_mlp_shared()
    bbb.load_compact(torch.compile(again), f)
    assert torch.equal(again[2].weight_mu, plain[2].weight_mu * plain[2].weight_mask)


def test_a_shared_prior_given_two_values_by_a_state_dict_is_refused() -> None:
    """A checkpoint whose layers have different priors, loaded into a model whose layers share
    one, loaded "All keys matched" with the last layer's value in the shared buffer: the
    first layer's KL silently used the wrong prior."""
    torch.manual_seed(0)
    src = nn.Sequential(
        bbb.BayesLinear(3, 4, prior=bbb.GaussianPrior(0.5)),
        nn.ReLU(),
        bbb.BayesLinear(4, 2, prior=bbb.GaussianPrior(2.0)),
    )
    dst = bbb.models.bayes_mlp(3, [4], 2, prior=bbb.GaussianPrior(0.5))
    assert dst[0].prior is dst[2].prior
    with pytest.raises(
        RuntimeError,
        match=r"shared by several layers.*0\.prior\.sigma = 0\.5.*2\.prior\.sigma = 2\.0",
    ):
        dst.load_state_dict(src.state_dict())
    # equal values under both keys load as before, as do separate priors
    ok = bbb.models.bayes_mlp(3, [4], 2, prior=bbb.GaussianPrior(0.7))
    dst.load_state_dict(ok.state_dict())
    assert float(dst[0].prior.sigma) == pytest.approx(0.7)
    sep = nn.Sequential(
        bbb.BayesLinear(3, 4, prior=bbb.GaussianPrior(1.0)),
        nn.ReLU(),
        bbb.BayesLinear(4, 2, prior=bbb.GaussianPrior(1.0)),
    )
    sep.load_state_dict(src.state_dict())
    assert float(sep[2].prior.sigma) == 2.0 and float(sep[0].prior.sigma) == 0.5
    # loading twice in a row (a second load_state_dict call) is a new load
    dst.load_state_dict(ok.state_dict())


def test_a_float32_checkpoint_in_a_float64_model_keeps_the_priors_exact_digits() -> None:
    torch.manual_seed(0)
    m32 = bbb.models.bayes_mlp(3, [4], 2, prior=bbb.GaussianPrior(0.1), kl="mc")
    m64 = bbb.models.bayes_mlp(3, [4], 2, prior=bbb.GaussianPrior(0.1), kl="mc").double()
    m64.load_state_dict(m32.state_dict())
    # the buffer holds 0.1 as float64 (was 0.1 rounded to float32: 0.10000000149...)
    assert float(m64[0].prior.sigma) == 0.1
    ref = bbb.models.bayes_mlp(3, [4], 2, prior=bbb.GaussianPrior(0.1), kl="mc").double()
    ref.load_state_dict(m64.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    m64(x)
    torch.manual_seed(1)
    ref(x)
    assert bbb.kl_divergence(m64).item() == bbb.kl_divergence(ref).item()


def _toy_trainer(out_dir, width: int, epochs: int = 1):
    from torch.utils.data import DataLoader, TensorDataset

    from bbb.train import Trainer

    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 32).unsqueeze(1)
    ds = TensorDataset(x, torch.sin(3 * x))
    model = bbb.models.bayes_mlp(1, [width], 1)
    return Trainer(
        model,
        bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), 32),
        torch.optim.SGD(model.parameters(), lr=1e-2),
        DataLoader(ds, batch_size=16),
        epochs=epochs,
        out_dir=out_dir,
        progress=False,
        log=None,
    )


def test_resuming_another_architecture_or_format_names_the_checkpoint(tmp_path) -> None:
    from bbb.train.checkpoint import CheckpointError, list_checkpoints

    _toy_trainer(tmp_path, 8).fit()
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    with pytest.raises(
        CheckpointError, match=rf"(?s){ckpt.name} does not fit this Trainer's model.*size mismatch"
    ):
        _toy_trainer(tmp_path, 16, epochs=2).fit(resume=True)
    state = torch.load(ckpt, weights_only=False)
    state["format"] = "bbb-checkpoint-99"
    torch.save(state, ckpt)
    with pytest.raises(
        CheckpointError, match=r"format 'bbb-checkpoint-99'.*reads 'bbb-checkpoint-1'"
    ):
        _toy_trainer(tmp_path, 8, epochs=2).fit(resume=True)


def test_load_run_and_load_compact_name_the_file_that_does_not_fit(tmp_path) -> None:
    from bbb.cli import main
    from bbb.runs import load_run
    from bbb.train.checkpoint import CheckpointError

    for name, hidden in (("a", "8"), ("b", "16")):
        code = main(
            ["train", "--dataset", "toy", "--toy-n", "32", "--hidden", hidden, "--epochs", "1",
             "--batch-size", "16", "--val-samples", "2", "--out", str(tmp_path / name)]
        )  # fmt: skip
        assert code == 0
    # run b's weights put into run a's directory: its config builds a width-8 network
    (tmp_path / "a" / "best.pt").write_bytes((tmp_path / "b" / "best.pt").read_bytes())
    with pytest.raises(
        CheckpointError,
        match=r"(?s)best\.pt does not fit the model that .*config\.json builds.*size mismatch",
    ):
        load_run(tmp_path / "a")
    _, model_b, _, _ = load_run(tmp_path / "b")
    bbb.prune_by_snr(model_b, 0.5)
    f = tmp_path / "b.compact.pt"
    bbb.save_compact(model_b, f)
    with pytest.raises(
        RuntimeError, match=r"(?s)b\.compact\.pt does not fit the model: .*size mismatch"
    ):
        bbb.load_compact(bbb.models.bayes_mlp(1, [8], 1), f)


class _PerWeightPrior(bbb.Prior):
    """A per-weight Gaussian prior N(loc, scale^2) of a fixed shape (continual learning)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    def distribution(self) -> torch.distributions.Distribution:
        return torch.distributions.Normal(self.loc, self.scale)


@pytest.mark.parametrize("kl", ["closed_form", "mc"])
@pytest.mark.parametrize("out_features", [4, 3])
def test_a_per_weight_prior_is_not_broadcast_against_the_bias(kl: str, out_features: int) -> None:
    """A (out, in) prior on a layer with a bias: its terms were broadcast against the (out,)
    bias, a (out, in) grid of bias terms summed into the KL (1022 nats where 0 was right),
    or torch's bare size-mismatch error for a non-square layer. Now a clear refusal; a
    bias-free layer takes it."""
    torch.manual_seed(0)
    layer = bbb.BayesLinear(4, out_features, kl=kl)
    layer.prior = _PerWeightPrior(layer.weight_mu, torch.ones(out_features, 4))
    layer(torch.randn(2, 4))
    with pytest.raises(
        ValueError, match=r"batch shape \(" + str(out_features) + r", 4\).*bias=False"
    ):
        layer.kl()
    free = bbb.BayesLinear(4, out_features, bias=False, kl=kl)
    sigma = torch.nn.functional.softplus(free.weight_rho.detach())
    free.prior = _PerWeightPrior(free.weight_mu, sigma)
    free(torch.randn(2, 4))
    if kl == "closed_form":
        assert free.kl().item() == pytest.approx(0.0, abs=1e-4)
    else:
        assert torch.isfinite(free.kl())


@pytest.mark.parametrize("mode", ["mean", "frozen"])
def test_an_elbo_training_step_outside_sample_mode_warns(mode: str) -> None:
    torch.manual_seed(0)
    model = bbb.models.bayes_mlp(2, [4], 1)
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=0.3), 10)
    x, y = torch.randn(5, 2), torch.randn(5, 1)
    with bbb.sampling(model, mode), pytest.warns(RuntimeWarning, match=rf"sampling mode '{mode}'"):
        elbo(model, x, y).loss.backward()
    # in sample mode, and for evaluation (no grad, or eval mode) under any mode: nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elbo(model, x, y)
        with bbb.sampling(model, mode):
            with torch.no_grad():
                elbo(model, x, y)
            model.eval()
            elbo(model, x, y)


def test_an_unknown_option_points_at_the_subcommands_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bbb.cli import main

    assert main(["train", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus (see `bbb train --help`)" in capsys.readouterr().err
    assert main(["--bogus"]) == 2
    assert "(see `bbb --help`)" in capsys.readouterr().err


def test_a_uci_config_files_typos_are_refused_naming_the_file(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo'd [uci] key passed when --splits was given (the table was not read), and an
    unknown [train] key was reported as 'uci settings: ...' without the file."""
    from bbb.cli import main

    out = tmp_path / "run"
    typo = tmp_path / "t.toml"
    typo.write_text("[train]\nepochs = 2\n[uci]\nsplit = [0]\n")
    assert (
        main(["uci", "bostonHousing", "--config", str(typo), "--splits", "1", "--out", str(out)])
        == 1
    )
    assert f"{typo}: unknown key(s) in [uci]: split" in capsys.readouterr().err
    table = tmp_path / "t2.toml"
    table.write_text("[trian]\nepochs = 2\n")
    assert main(["uci", "bostonHousing", "--config", str(table), "--out", str(out)]) == 1
    assert f"{table}: uci settings: unknown key(s) trian" in capsys.readouterr().err
    assert not out.exists()


def test_bandit_merge_reads_an_old_runs_config_as_resume_does(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--merge built each part's settings from today's defaults where its config.json lacked a
    key added later, while --resume fills those with the values the old runs used: a default
    changed later would have let runs made with different settings merge. An unknown key was a
    TypeError traceback."""
    import json
    from pathlib import Path

    from bbb.bandit import BanditConfig, merge_runs, run_bandit
    from bbb.bandit import config as bandit_config

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "mushroom").is_dir():
        pytest.skip("the mushroom data set is not in ../shared/data")
    # made with the legacy eps (1e-8), which the old run's config.json, lacking the key, means
    base = dict(steps=4, seeds=[0], updates_per_step=1, batch_size=4, buffer_size=8, hidden=4,
                checkpoint_every=4, data_dir=str(data), adam_eps=1e-8)  # fmt: skip
    old, new = tmp_path / "old", tmp_path / "new"
    run_bandit(BanditConfig(agents=["greedy-0"], **base), old, progress=False, log=None)
    run_bandit(BanditConfig(agents=["greedy-0.01"], **base), new, progress=False, log=None)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["adam_eps"]  # a run made before the setting existed
    (old / "config.json").write_text(json.dumps(cfg))
    merge_runs([old, new], tmp_path / "m1")  # the old run's legacy value is the new run's: merges
    # had the default changed since, the old run's own value (the legacy one) would differ
    monkeypatch.setitem(bandit_config._LEGACY_SETTINGS, "adam_eps", 1e-6)
    with pytest.raises(ValueError, match=r"settings differ in \['adam_eps'\]"):
        merge_runs([old, new], tmp_path / "m2")
    cfg["some_future_setting"] = 1
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"old/config\.json: unknown setting\(s\) some_future_setting"
    ):
        merge_runs([old, new], tmp_path / "m3")


def test_an_interrupted_uci_pool_drops_its_queued_splits(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bbb uci --jobs 2` stopped by Ctrl-C/SIGTERM: leaving the process pool waited for every
    queued split to train; the queued ones are now cancelled."""
    import bbb.uci.run as uci_run
    from bbb.cli import main

    d = _tiny_uci(tmp_path / "tiny", splits=3)
    shutdowns: list[bool] = []

    class _Pool:
        def __init__(self, *a: object, **k: object) -> None:
            pass

        def submit(self, *a: object, **k: object) -> object:
            return object()

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            shutdowns.append(cancel_futures)

    def interrupted(futures: object, finish: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(uci_run, "ProcessPoolExecutor", _Pool)
    monkeypatch.setattr(uci_run, "_results_of", interrupted)
    code = main(["uci", str(d), "--jobs", "2", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert code == 130, capsys.readouterr().err
    assert shutdowns == [True]


def test_sweep_best_prints_the_toml_even_when_its_output_file_cannot_be_written(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    from bbb.cli import main

    space = tmp_path / "space.toml"
    space.write_text(
        '[sweep]\ncommand = "train"\n[train]\ndataset = "toy"\ntoy_n = 32\nhidden = [4]\n'
        "epochs = 1\nbatch_size = 16\nval_samples = 2\n[search]\nlr = { grid = [0.01] }\n"
    )
    assert main(["sweep", str(space), "--out", str(tmp_path / "sw"), "--no-trial-plots"]) == 0
    capsys.readouterr()
    code = main(["sweep", "best", str(tmp_path / "sw"), "-o", str(tmp_path / "nodir" / "b.toml")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "lr = 0.01" in out  # the TOML is not lost with the error
    assert "cannot write" in err and "nodir" in err and len(err.strip().splitlines()) == 1
    assert main(["sweep", "best", str(tmp_path / "sw"), "-o", str(tmp_path / "b.toml")]) == 0
    assert (tmp_path / "b.toml").read_text() == capsys.readouterr().out


def test_a_point_prediction_given_to_regression_report_says_how_to_pass_it() -> None:
    from bbb.metrics import regression_report

    with pytest.raises(ValueError, match=r"read as \(S, B\).*means\.unsqueeze\(0\)"):
        regression_report(torch.zeros(5, 1), torch.ones(5, 1), torch.zeros(5))
    report = regression_report(torch.zeros(1, 5, 1), torch.ones(1, 5, 1), torch.zeros(5))
    assert report["rmse"] == 0.0
