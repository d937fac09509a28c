"""Usability fixes of the command line and the Trainer: resume length, ReduceLROnPlateau,
seeded and split-named evaluations, --help defaults, bandit time limit, dataset-size warning,
argument checks, UCI name suggestions."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bbb
from bbb.cli import _result_file_name, build_parser, main
from bbb.data import load_toy
from bbb.data.checksums import MissingDataError
from bbb.models import bayes_mlp, mlp
from bbb.train import Trainer, seed_everything

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_mushroom = pytest.mark.skipif(
    not (SHARED / "mushroom").is_dir(), reason="the shared Mushroom data is absent"
)
TOY_TINY = [
    "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--val-samples", "2", "--quiet",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.single_thread


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import bbb.plots

    monkeypatch.delenv("BBB_DATA_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # one line per option in --help
    monkeypatch.chdir(tmp_path)
    # no PNGs: no test here looks at them
    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def toy_trainer(
    out_dir: Path | None, epochs: int, *, dataset_size: int | None = None, **kwargs: Any
) -> Trainer:
    generator = seed_everything(0)
    train, val = load_toy(n_train=64, n_val=16, seed=0)
    likelihood = bbb.Gaussian("fixed", sigma=0.5)
    model = bayes_mlp(1, [8], 1)
    elbo = bbb.ELBO(likelihood, len(train) if dataset_size is None else dataset_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    options: dict[str, Any] = {
        "val_loader": DataLoader(val, batch_size=16),
        "epochs": epochs,
        "out_dir": out_dir,
        "val_samples": 2,
        "progress": False,
        "log": None,
        "loader_generator": generator,
    }
    options.update(kwargs)
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=generator)
    return Trainer(model, elbo, optimizer, loader, **options)


# --------------------------------------------------------------------------- 1. resume length


def test_cli_resume_with_fewer_epochs_than_done_is_refused_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli("train", *TOY_TINY, "--epochs", "3", "--out", run) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert cli("train", "--resume", run, "--epochs", "2", "--quiet") == 1
    err = capsys.readouterr().err
    assert err.startswith("bbb: error:")
    assert "already done 3 epochs" in err and "epochs must be >= 3" in err
    assert snapshot(run) == before  # config.json still says 3 epochs; nothing else rewritten
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    # as many epochs as done is fine (nothing to train), and more trains on
    assert cli("train", "--resume", run, "--epochs", "3", "--quiet") == 0
    assert cli("train", "--resume", run, "--epochs", "4", "--quiet") == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_trainer_resume_with_fewer_epochs_than_done_is_refused(tmp_path: Path) -> None:
    toy_trainer(tmp_path, 3).fit()
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"already done 3 epochs.*epochs must be >= 3"):
        toy_trainer(tmp_path, 2).fit(resume=True)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 2. ReduceLROnPlateau


def plateau_trainer(
    out_dir: Path | None, epochs: int, *, validate: bool = True, **plateau: Any
) -> Trainer:
    """A deterministic network that does not learn: its optimizer holds only a parameter
    the loss never reaches, so every epoch's metric equals the first (a plateau)."""
    generator = seed_everything(0)
    train, val = load_toy(n_train=32, n_val=16, seed=0)
    model = mlp(1, [4], 1)
    elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=1.0), len(train), kl_scale=0.0)
    unused = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([unused], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **plateau)
    # deliberate: the Trainer's warning about an optimizer that holds none of the model's
    # parameters is what makes the plateau here
    warnings.filterwarnings("ignore", message="the optimizer holds none of the model")
    return Trainer(
        model,
        elbo,
        optimizer,
        DataLoader(train, batch_size=8, shuffle=True, generator=generator),
        val_loader=DataLoader(val, batch_size=16) if validate else None,
        scheduler=scheduler,
        epochs=epochs,
        out_dir=out_dir,
        val_samples=1,
        progress=False,
        log=None,
        loader_generator=generator,
    )


@pytest.mark.parametrize("validate", [True, False], ids=["val-metric", "train-loss"])
def test_reduce_lr_on_plateau_cuts_the_rate_after_patience_epochs(validate: bool) -> None:
    trainer = plateau_trainer(None, 6, validate=validate, patience=1, factor=0.5)
    trainer.fit()
    # epoch 1 sets the best; epochs 2 and 3 do not improve (2 > patience 1): cut after 3,
    # then again after 5
    lrs = [row["lr"] for row in trainer.history]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])
    if validate:  # it watched the validation metric, which indeed stayed the same
        assert len({row["val_nll"] for row in trainer.history}) == 1


def test_reduce_lr_on_plateau_state_survives_resume(tmp_path: Path) -> None:
    full = plateau_trainer(tmp_path / "full", 6, patience=1, factor=0.5)
    full.fit()
    plateau_trainer(tmp_path / "part", 4, patience=1, factor=0.5).fit()
    resumed = plateau_trainer(tmp_path / "part", 6, patience=1, factor=0.5)
    resumed.fit(resume=True)
    # restored: the plateau counted from epoch 4 on, so the rate is cut again after epoch 5
    # (a fresh scheduler would have taken epoch 5 as a new best and kept 0.05)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    assert resumed.history[-1]["lr"] == pytest.approx(0.025)
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()


def test_reduce_lr_on_plateau_with_the_wrong_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mode='min'.*create it with mode='max'"):
        toy_trainer(
            None,
            1,
            val_metric="log_likelihood",
            scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(
                torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            ),
        )


# --------------------------------------------------------------------------- 3. evaluate / prune


def test_evaluate_and_prune_are_seeded_and_name_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli("train", *TOY_TINY, "--epochs", "2", "--out", run) == 0
    results = []
    for seed in ("0", "0", "1"):
        assert cli("evaluate", run, "--split", "val", "--num-samples", "5", "--seed", seed) == 0
        results.append(json.loads((run / "eval-val.json").read_text()))
    assert results[0] == results[1]  # the same seed: the same numbers
    assert results[0]["metrics"] != results[2]["metrics"]  # another seed: other weight samples
    assert results[0]["seed"] == 0 and results[2]["seed"] == 1
    assert results[0]["split"] == "val"
    assert not (run / "eval.json").exists()  # the test split's name is not taken by val
    # the default seed is 0
    assert cli("evaluate", run, "--split", "val", "--num-samples", "5") == 0
    assert json.loads((run / "eval-val.json").read_text()) == results[0]
    assert cli("prune", run, "--split", "val", "--fraction", "0.5", "--num-samples", "5") == 0
    pruned = json.loads((run / "prune-0.5-val.json").read_text())
    assert pruned["split"] == "val" and pruned["seed"] == 0 and pruned["pruned"]["removed"] > 0
    assert f"written: {run / 'prune-0.5-val.json'}" in capsys.readouterr().out
    # the toy data set has no test split: the error says which split to use
    assert cli("evaluate", run) == 1
    err = capsys.readouterr().err
    assert "no test split (use --split val)" in err


def test_result_file_names_keep_the_test_names_and_name_other_splits() -> None:
    assert _result_file_name("test") == "eval.json"
    assert _result_file_name("test", 0.95) == "prune-0.95.json"
    assert _result_file_name("val") == "eval-val.json"
    assert _result_file_name("val", 0.5) == "prune-0.5-val.json"


# --------------------------------------------------------------------------- 4. --help defaults


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser: the top level, its subcommands, and the forwarded ones."""
    from bbb import bench
    from bbb.sweep.cli import _parsers as sweep_parsers

    top = build_parser()
    parsers = {"bbb": top}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                if name not in ("bench", "sweep"):  # stubs: they parse their own options
                    parsers[f"bbb {name}"] = p
    parsers["bbb bench"] = bench.build_parser()
    run, show, best = sweep_parsers()
    parsers.update({"bbb sweep": run, "bbb sweep show": show, "bbb sweep best": best})
    return parsers


def _help_entry(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The --help entry of one option, as ``parser --help`` prints it, on one line."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


def _shown_forms(default: Any) -> list[str]:
    if isinstance(default, (list, tuple)):
        items = [str(v) for v in default]
        return [str(default), str(list(default)), ",".join(items), " ".join(items)]
    return [str(default)]


def _off_unless_given(action: argparse.Action) -> bool:
    return (isinstance(action, argparse._StoreTrueAction) and action.default is False) or (
        isinstance(action, argparse._StoreFalseAction) and action.default is True
    )


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    parsers = _all_parsers()
    assert {"bbb train", "bbb evaluate", "bbb prune", "bbb uci", "bbb bandit", "bbb bench"} <= set(
        parsers
    )
    problems = []
    for name, parser in parsers.items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if action.help == argparse.SUPPRESS:  # a hidden option (internal)
                continue
            flag = action.option_strings[-1]
            if not (action.help or "").strip():
                problems.append(f"{name} {flag}: no help text")
                continue
            if action.default is None or action.default == argparse.SUPPRESS:
                continue
            entry = _help_entry(parser, action)
            if name.startswith("bbb sweep") and _off_unless_given(action):
                # bbb.sweep (not covered by this change) leaves "(default: False)" off its
                # plain on/off flags; every value it takes shows its default (checked below)
                continue
            if "default" not in entry:
                problems.append(f"{name} {flag}: default {action.default!r} not shown: {entry}")
            elif action.nargs != 0 and not any(f in entry for f in _shown_forms(action.default)):
                problems.append(f"{name} {flag}: default {action.default!r} not in: {entry}")
    assert not problems, "\n".join(problems)


def test_uci_and_bench_help_show_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["uci", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "weight samples at test time (default: 100)" in out
    assert "splits run in parallel processes (default: 1)" in out
    assert "(default: None)" not in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "MLP hidden widths H, comma-separated (default: 400,1200)" in out
    assert "--peers also time the peer libraries" in out
    assert "interleaved rounds (median) (default: 15)" in out


# --------------------------------------------------------------------------- 5. bandit limit


def _bandit_cfg(**kw: Any) -> Any:
    from bbb.bandit import BanditConfig

    base = dict(
        steps=10,
        seeds=[0, 1],
        updates_per_step=1,
        batch_size=8,
        buffer_size=16,
        hidden=8,
        checkpoint_every=1000,  # never on the grid before the end: the limit must write one
        data_dir=str(SHARED),
    )
    base.update(kw)
    return BanditConfig(**base)


@needs_mushroom
def test_bandit_time_limit_stops_at_the_next_step_with_a_checkpoint_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    from bbb.bandit import run_bandit
    from bbb.train.checkpoint import list_checkpoints

    full = tmp_path / "full"
    run_bandit(_bandit_cfg(), full, progress=False, log=None)
    part = tmp_path / "part"
    # a limit already reached after the first step: stop there, not at a checkpoint 1000 on
    summary = run_bandit(_bandit_cfg(), part, progress=False, log=None, max_seconds=1e-9)
    assert summary["complete"] is False and summary["steps_done"] == 1
    assert [p.name for p in list_checkpoints(part / "checkpoints")] == ["checkpoint-00001.pt"]
    summary = run_bandit(_bandit_cfg(), part, resume=True, progress=False, log=None)
    assert summary["complete"] is True and summary["steps_done"] == 10
    assert (part / "regret.csv").read_text() == (full / "regret.csv").read_text()
    a, _ = bbb.train.load_checkpoint(full / "checkpoints")
    b, _ = bbb.train.load_checkpoint(part / "checkpoints")
    for pa, pb in zip(a["pops"], b["pops"], strict=True):
        for k in pa["model"]:
            assert torch.equal(pa["model"][k], pb["model"][k]), k


@needs_mushroom
def test_bandit_cli_time_limit_and_one_seed_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "bandit", "--agents", "greedy-0", "--seeds", "0", "--steps", "6", "--hidden", "8",
        "--batch-size", "8", "--buffer-size", "16", "--data-dir", SHARED, "--quiet",
        "--out", tmp_path / "b",
    ]  # fmt: skip
    assert cli(*common, "--max-minutes", "1e-12") == 0
    out = capsys.readouterr().out
    assert "stopped at step 1 of 6" in out and "--resume" in out
    assert cli(*common, "--resume") == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("greedy-0"))
    assert "+-" not in line and "sd n/a" in line  # one seed: no spread to show
    assert "stopped at step" not in out
    assert cli(*common, "--resume", "--max-minutes", "0") == 1
    assert "--max-minutes must be a positive number" in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. StopTraining


def test_stop_training_is_exported_from_bbb_train() -> None:
    from bbb.train import StopTraining
    from bbb.train.trainer import StopTraining as Defined

    assert StopTraining is Defined and "StopTraining" in bbb.train.__all__

    def stop(epoch: int, row: dict[str, Any]) -> None:
        raise StopTraining("enough")

    summary = toy_trainer(None, 5, epoch_callback=stop).fit()
    assert summary["epochs_trained"] == 1 and summary["stopped_by_callback"]


# --------------------------------------------------------------------------- 7. dataset_size


def test_dataset_size_unlike_the_loaders_data_set_warns() -> None:
    with pytest.warns(UserWarning, match=r"dataset_size=50 .* holds 64 examples") as record:
        toy_trainer(None, 1, dataset_size=50)
    message = str(record[0].message)
    assert "filterwarnings" in message and "subset" in message


def test_matching_dataset_size_does_not_warn_also_with_a_distributed_sampler() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toy_trainer(None, 1)
        # one rank's loader of a two-process run: the ELBO has the global size, as it must
        data = TensorDataset(torch.randn(40, 1), torch.randn(40, 1))
        sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False)
        loader = DataLoader(data, batch_size=5, sampler=sampler)
        model = bayes_mlp(1, [4], 1)
        elbo = bbb.ELBO(bbb.Gaussian("fixed", sigma=1.0), 40)
        Trainer(model, elbo, torch.optim.Adam(model.parameters()), loader, log=None)


# --------------------------------------------------------------------------- 8. argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_samples": 2.5}, r"val_samples must be an integer .*, got 2\.5"),
        ({"val_samples": True}, "val_samples must be an integer .*, got True"),
        ({"val_samples": 0}, "val_samples must be >= 1, got 0"),
        ({"y_scale": 0.0}, "y_scale must be a finite positive number"),
        ({"y_scale": float("nan")}, "y_scale must be a finite positive number"),
        ({"patience": 1.5}, "patience must be a positive integer"),
    ],
)
def test_trainer_rejects_non_integer_and_non_positive_numbers(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        toy_trainer(None, 1, **kwargs)


def test_trainer_rejects_a_non_integer_epoch_count() -> None:
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 2.0"):
        toy_trainer(None, 2.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 9. UCI names


def _fake_uci(root: Path, *names: str) -> Path:
    for name in names:
        d = root / "uci" / name
        d.mkdir(parents=True)
        for f in ("data.txt", "index_features.txt", "index_target.txt", "index_train_0.txt"):
            (d / f).write_text("0\n")
    return root


def test_unknown_uci_name_lists_the_data_sets_and_suggests_the_closest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _fake_uci(tmp_path / "data", "energy", "concrete", "kin8nm")
    with pytest.raises(MissingDataError) as info:
        bbb.data.load_uci("enrgy", 0, data_dir=root)
    message = str(info.value)
    assert "Did you mean 'energy'?" in message
    assert "Available under" in message and "concrete, energy, kin8nm" in message
    assert cli("uci", "enrgy", "--data-dir", root) == 1
    err = capsys.readouterr().err
    assert "Did you mean 'energy'?" in err and "concrete, energy, kin8nm" in err
    with pytest.raises(MissingDataError) as info:
        bbb.data.load_uci("zzz", 0, data_dir=root)
    assert "Did you mean" not in str(info.value)
    assert "concrete, energy, kin8nm" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingDataError, match="No UCI data sets found under"):
        bbb.data.load_uci("energy", 0, data_dir=empty)


# --------------------------------------------------------------------------- 10. review fixes:
# per-layer pruning's own file, strict JSON, --device / load_run(device=), exit codes


def _toy_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str = "run") -> Path:
    run = tmp_path / name
    assert cli("train", *TOY_TINY, "--epochs", "2", "--out", run) == 0
    capsys.readouterr()
    return run


def _strict_json(path: Path) -> Any:
    """The file's JSON; NaN, Infinity and -Infinity (not JSON) are an error."""

    def refuse(name: str) -> None:
        raise ValueError(f"{path.name} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_per_layer_pruning_has_its_own_result_file_with_a_null_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _toy_run(tmp_path, capsys)
    common = ["--split", "val", "--fraction", "0.5", "--num-samples", "2"]
    assert cli("prune", run, *common) == 0
    assert cli("prune", run, *common, "--per-layer") == 0
    assert f"written: {run / 'prune-0.5-per-layer-val.json'}" in capsys.readouterr().out
    # the per-layer result did not replace the global one
    glob = _strict_json(run / "prune-0.5-val.json")["pruned"]
    per_layer = _strict_json(run / "prune-0.5-per-layer-val.json")["pruned"]
    assert glob["per_layer"] is False and isinstance(glob["threshold"], float)
    assert per_layer["per_layer"] is True and per_layer["threshold"] is None
    assert _result_file_name("test", 0.95, per_layer=True) == "prune-0.95-per-layer.json"
    assert _result_file_name("val", 0.5, True) == "prune-0.5-per-layer-val.json"
    assert _result_file_name("val", 0.5, False) == "prune-0.5-val.json"


def test_result_files_are_strict_json_with_null_for_non_finite_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bbb.train.trainer

    run = _toy_run(tmp_path, capsys)
    nan, inf = float("nan"), float("inf")
    monkeypatch.setattr(
        bbb.train.trainer, "evaluate", lambda *a, **k: {"rmse": nan, "nll": inf, "ok": 1.5}
    )
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 0
    metrics = _strict_json(run / "eval-val.json")["metrics"]
    assert metrics == {"rmse": None, "nll": None, "ok": 1.5}


def _gpu_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch) -> Path:
    """A toy run whose config.json says it was trained on CUDA, on a machine without CUDA."""
    run = _toy_run(tmp_path, capsys, "gpu-run")
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "device": "cuda"}))
    mp.setattr(torch.cuda, "is_available", lambda: False)  # already so here: made certain
    return run


def test_a_gpu_run_loads_and_evaluates_on_a_machine_without_cuda_with_device_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bbb.config import ConfigError

    run = _gpu_run(tmp_path, capsys, monkeypatch)
    # the run's own device (the default) is refused with the way out, not torch's error
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available here") as info:
        bbb.load_run(run)
    assert "device='cpu'" in str(info.value) and "--device cpu" in str(info.value)
    for which in ("best", "last"):
        cfg, model, likelihood, data = bbb.load_run(run, which=which, device="cpu")
        assert cfg.device == "cpu" and data.val is not None
        tensors = [*model.parameters(), *model.buffers(), *likelihood.parameters()]
        assert all(t.device.type == "cpu" for t in tensors)
    with pytest.raises(ValueError, match="accepted values: best, last"):
        bbb.load_run(run, which="first", device="cpu")
    # the command line: evaluate and prune take --device
    for default in ([], ["--device", "run"]):  # `run`, the default: the run's own device
        assert cli("evaluate", run, "--split", "val", "--num-samples", "2", *default) == 1
        err = capsys.readouterr().err
        assert "--device cpu" in err and "not compiled" not in err
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2", "--device", "cpu") == 0
    assert _strict_json(run / "eval-val.json")["device"] == "cpu"
    args = ["--split", "val", "--fraction", "0.5", "--num-samples", "2", "--device", "cpu"]
    assert cli("prune", run, *args) == 0
    # resuming it here needs --device cpu too (a resumed run may change its device)
    assert cli("train", "--resume", run, "--epochs", "3", "--quiet") == 1
    assert "--device cpu" in capsys.readouterr().err
    assert cli("train", "--resume", run, "--epochs", "3", "--device", "cpu", "--quiet") == 0


def test_training_on_cuda_without_cuda_fails_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r"
    assert cli("train", *TOY_TINY, "--epochs", "1", "--device", "cuda", "--out", out) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("bbb: error: device 'cuda' is not available here")
    assert "--device cpu" in err and "not compiled" not in err
    assert len(err.splitlines()) == 1 and "epoch" not in captured.out
    assert not out.exists()


def test_exit_code_2_for_an_unusable_command_line_and_1_for_values_and_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _toy_run(tmp_path, capsys)
    usage = [  # exit 2: what --help describes (choices, types, options that exclude each other)
        ["evaluate", run, "--split", "train"],
        ["train", "--epochs", "abc"],
        ["train", "--resume", run, "--lr", "0.5"],
        ["train", "--resume", run, "--overwrite"],
    ]
    values_and_work = [  # exit 1: values out of range, files, run state
        ["evaluate", run, "--split", "val", "--num-samples", "0"],
        ["evaluate", run, "--split", "val", "--seed", "-3"],
        ["prune", run, "--split", "val", "--fraction", "1.0"],
        ["train", *TOY_TINY, "--lr", "-1", "--out", tmp_path / "new"],
        ["train", "--resume", run, "--epochs", "1", "--quiet"],  # fewer than done
        ["evaluate", tmp_path / "no-such-run"],
    ]
    codes = {}
    for argv in usage + values_and_work:
        codes[" ".join(map(str, argv[:2] + argv[-2:]))] = cli(*argv)
        err = capsys.readouterr().err
        assert err.startswith("bbb: error: ") and len(err.strip().splitlines()) == 1, err
    assert list(codes.values()) == [2] * len(usage) + [1] * len(values_and_work), codes


def test_prune_reports_a_bad_fraction_before_the_run_and_its_splits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _toy_run(tmp_path, capsys)  # the toy data set has no test split
    for where in (run, tmp_path / "no-such-run"):
        assert cli("prune", where, "--fraction", "1.0") == 1
        err = capsys.readouterr().err
        assert "--fraction must lie in [0, 1), got 1.0" in err
        assert "no test split" not in err and "not a run directory" not in err
    assert not list(run.glob("prune-*.json"))


def test_resume_before_the_first_checkpoint_says_how_to_start_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bbb.config import TrainConfig

    # a run killed during its first epoch: config.json, no checkpoint
    run = tmp_path / "killed"
    cfg = TrainConfig(
        dataset="toy", toy_n=64, hidden=[8], batch_size=16, val_samples=2, epochs=1
    ).validate()
    run.mkdir()
    cfg.save(run / "config.json")
    assert cli("train", "--resume", run, "--quiet") == 1
    err = capsys.readouterr().err
    assert f"nothing to resume: no checkpoint in {run / 'checkpoints'}" in err
    advice = f"bbb train --config {run / 'config.json'} --out {run} --overwrite"
    assert "with --overwrite instead of --resume" in err and advice in err
    # the advice works
    assert cli(*advice.split()[1:], "--quiet") == 0
    assert (run / "best.pt").is_file()


def test_cli_train_into_a_directory_another_process_trains_into_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bbb train --resume` while another process holds the run: exit 1 naming the holder, and
    the run's files (config.json, metrics, checkpoints) are untouched."""
    from tests.conftest import lock_held_by_another_process

    run = tmp_path / "run"
    assert main(["train", "--dataset", "toy", "--toy-n", "32", "--hidden", "4", "--batch-size",
                 "16", "--epochs", "1", "--val-samples", "1", "--quiet", "--out", str(run)]) == 0  # fmt: skip
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    with lock_held_by_another_process(run) as pid:
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 1
        assert f"is in use: process {pid} on " in capsys.readouterr().err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0


def test_load_run_returns_an_eval_mode_model_so_dropout_is_off(tmp_path: Path) -> None:
    """A dropout baseline loaded for evaluation must predict without dropout: bbb evaluate's
    uncertainty numbers and the MNIST extras (AUROC) are computed from load_run's model."""
    run = tmp_path / "drop"
    assert cli("train", "--dataset", "toy", "--toy-n", "64", "--method", "dropout",
               "--hidden", "16", "--batch-size", "16", "--epochs", "1", "--quiet",
               "--out", run) == 0  # fmt: skip
    _, model, likelihood, data = bbb.load_run(run)
    assert not model.training
    assert data.val is not None
    x = data.val.tensors[0]
    a = bbb.predict(model, x, likelihood=likelihood, num_samples=1)
    b = bbb.predict(model, x, likelihood=likelihood, num_samples=1)
    assert torch.equal(a.mean, b.mean)  # type: ignore[union-attr]


def test_evaluate_names_a_corrupt_config_json_and_another_commands_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated config.json gave json's bare "Expecting property name ..." (no file named);
    a `bbb uci` run directory was said to have "not finished an epoch" and a `bbb bandit` one
    got a list of unknown keys."""
    run = _toy_run(tmp_path, capsys)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 1
    err = capsys.readouterr().err
    assert f"config file {run / 'config.json'} is not valid json" in err, err
    (run / "config.json").write_text(text)
    for marker, command in (("uci.json", "bbb uci"), ("regret.csv", "bbb bandit")):
        other = tmp_path / marker
        other.mkdir()
        (other / "config.json").write_text(text)  # a TrainConfig, as bbb uci saves
        (other / marker).write_text("{}")
        assert cli("prune", other, "--split", "val", "--num-samples", "2") == 1
        err = capsys.readouterr().err
        assert f"is a `{command}` run directory" in err and "not finished" not in err, err
        assert not list(other.glob("prune-*.json"))
    # a bandit run still in progress: its own config.json and checkpoints, no results yet
    running = tmp_path / "bandit-running"
    (running / "checkpoints").mkdir(parents=True)
    (running / "config.json").write_text(
        json.dumps({"agents": ["greedy-0"], "steps": 10, "updates_per_step": 64})
    )
    assert cli("evaluate", running, "--split", "val", "--num-samples", "2") == 1
    err = capsys.readouterr().err
    assert "is a `bbb bandit` run directory" in err and "unknown key" not in err, err
