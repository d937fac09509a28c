"""Review 23 of the command line and of conversion (issues 4 and 5): progress bars only on a
terminal, warnings as one line, Ctrl-C during `bbb train` says how to resume, `bbb --version`;
bayesianize names every weight it leaves deterministic and the buffers it drops."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bbb
import bbb.models as bbb_models
import bbb.runs
from bbb.cli import _show_progress, main

TOY_TINY = [
    "--dataset", "toy", "--toy-n", "64", "--hidden", "8", "--batch-size", "16",
    "--val-samples", "2",
]  # fmt: skip


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing PNGs (most of an in-process tiny run's time); no test here looks at them."""
    import bbb.metrics
    import bbb.plots

    monkeypatch.setattr(bbb.plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(bbb.plots, "regression_band", lambda *a, **k: {})
    monkeypatch.setattr(bbb.metrics, "plot_regression_calibration", lambda *a, **k: None)
    monkeypatch.setattr(bbb.metrics, "plot_reliability_diagram", lambda *a, **k: None)


def cli(*args: Any) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- progress bars


def test_train_draws_no_progress_bar_into_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plots: None
) -> None:
    """Without --quiet, stderr that is no terminal (a log file, CI) gets no tqdm bar: before,
    each epoch wrote a bar redrawn with carriage returns into the log."""
    assert cli("train", *TOY_TINY, "--epochs", "2", "--out", tmp_path / "r") == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err
    # the per-epoch lines still say how training goes
    assert "epoch 1/2" in captured.out and "epoch 2/2" in captured.out


def test_progress_bars_are_drawn_on_a_terminal_unless_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    class Closed:
        def isatty(self) -> bool:
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert _show_progress(False) is True
    assert _show_progress(True) is False
    monkeypatch.setattr(sys, "stderr", Closed())
    assert _show_progress(False) is False


# --------------------------------------------------------------------------- warnings


def test_a_warning_of_a_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning during a command is ``bbb: warning: ...`` on one line of stderr, not Python's
    ``/path/to/bbb/x.py:123: UserWarning: ...`` followed by the library's source line."""
    import bbb.demo

    def warn(*args: Any, **kwargs: Any) -> dict[str, Any]:
        warnings.warn("the band is narrow", UserWarning, stacklevel=1)
        warnings.warn("old option", FutureWarning, stacklevel=1)
        return {}

    monkeypatch.setattr(bbb.demo, "run_demo", warn)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pytest records warnings; show them as Python does outside pytest (its own impl)
        monkeypatch.setattr(
            warnings, "_showwarnmsg_impl", lambda m: sys.stderr.write(warnings._formatwarnmsg(m))
        )
        assert cli("demo", "--quiet") == 0
        err = capsys.readouterr().err
        assert err.splitlines() == [
            "bbb: warning: the band is narrow",
            "bbb: warning: FutureWarning: old option",
        ]
        # --debug keeps Python's format (where it was raised)
        assert cli("--debug", "demo", "--quiet") == 0
        err = capsys.readouterr().err
        assert "test_review_s23_cli.py" in err and "UserWarning: the band is narrow" in err
    # the command restores the process's warning format
    assert warnings.formatwarning is not None
    assert "bbb: warning" not in warnings.formatwarning("x", UserWarning, "f.py", 1, "")


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_train_says_how_to_resume_and_the_run_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_plots: None,
) -> None:
    run = tmp_path / "my run"  # a space: the command printed must be usable as is
    original = bbb.runs.train_run

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        def ctrl_c(epoch: int, row: dict[str, Any]) -> None:
            if epoch == 2:
                raise KeyboardInterrupt

        return original(*args, **kwargs, epoch_callback=ctrl_c)

    monkeypatch.setattr(bbb.runs, "train_run", interrupted)
    assert cli("train", *TOY_TINY, "--quiet", "--epochs", "4", "--out", run) == 130
    err = capsys.readouterr().err
    assert err == f"bbb: interrupted; continue the run with: bbb train --resume '{run}'\n"
    monkeypatch.setattr(bbb.runs, "train_run", original)
    assert cli("train", "--resume", run, "--quiet") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_ctrl_c_before_the_run_exists_says_there_is_nothing_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(bbb.runs, "train_run", interrupted)
    assert cli("train", *TOY_TINY, "--quiet", "--out", tmp_path / "r") == 130
    err = capsys.readouterr().err
    assert err == "bbb: interrupted before the run was set up; nothing to resume\n"


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"bbb {bbb.__version__}\n"


# --------------------------------------------------------------------------- bayesianize


class _Tagger(nn.Module):
    """A user's block with a learnable parameter of its own and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x * self.scale)


def test_bayesianize_names_recurrent_attention_and_custom_weights_it_leaves() -> None:
    """nn.LSTM, nn.GRUCell, nn.MultiheadAttention's in-projection and a custom module's
    nn.Parameter stay deterministic: before, only Linear/Conv subclasses and embeddings were
    named, these were left without a word (their weights silently got no posterior)."""
    model = nn.ModuleDict(
        {
            "rnn": nn.LSTM(3, 4),
            "cell": nn.GRUCell(3, 4),
            "attn": nn.MultiheadAttention(4, 2),
            "tag": _Tagger(),
            "head": nn.Linear(4, 2),
        }
    )
    with pytest.warns(UserWarning, match="left these layers with weights deterministic") as rec:
        out = bbb.bayesianize(model)
    (message,) = [str(w.message) for w in rec]
    for name in (
        "rnn (LSTM)",
        "cell (GRUCell)",
        "attn (MultiheadAttention)",
        "tag.scale (_Tagger)",
    ):
        assert name in message
    assert isinstance(out["head"], bbb.BayesLinear) and isinstance(out["tag"].proj, bbb.BayesLinear)
    assert "prior" not in message  # the Bayesian layers' own parts are not listed


def test_bayesianize_does_not_warn_about_normalisation_layers_or_a_likelihood() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.GroupNorm(1, 2), nn.Flatten(), nn.LayerNorm(8)
    )
    model.likelihood = bbb.Gaussian("learned", sigma=0.5)  # its noise is no weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bbb.bayesianize(model)


def test_bayesianize_of_a_model_with_only_other_weight_layers_names_them() -> None:
    from torch.nn.utils.parametrizations import spectral_norm

    model = nn.Sequential(spectral_norm(nn.Linear(3, 3)), nn.LSTM(3, 3))
    with pytest.raises(ValueError, match="nothing was made Bayesian") as err:
        bbb.bayesianize(model)
    assert "0 (ParametrizedLinear), 1 (LSTM)" in str(err.value)


def test_bayesianize_names_the_buffers_of_a_replaced_layer() -> None:
    layer = nn.Linear(3, 3)
    layer.register_buffer("input_scale", torch.full((3,), 2.0))
    with pytest.warns(UserWarning, match=r"buffers of their own: 0\.input_scale"):
        out = bbb.bayesianize(nn.Sequential(layer, nn.ReLU()))
    assert not hasattr(out[0], "input_scale")


# --------------------------------------------------------------------------- prune / export


def _toy_run(root: Path, *extra: str) -> Path:
    run = root / "run"
    args = TOY_TINY if not extra else TOY_TINY[:-2]  # --val-samples: bbb runs only
    assert cli("train", *args, "--quiet", "--epochs", "1", "--out", run, *extra) == 0
    return run


def test_prune_export_to_a_directory_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plots: None
) -> None:
    """Before: the run was loaded and pruned, then the atomic write failed with
    ``[Errno 21] Is a directory: '.../.x.tmp' -> '...'``."""
    run = _toy_run(tmp_path)
    capsys.readouterr()
    assert cli("prune", run, "--split", "val", "--num-samples", "2", "--export", tmp_path) == 1
    err = capsys.readouterr().err
    assert err == f"bbb: error: --export {tmp_path} is a directory: give the file to write\n"
    assert not list(run.glob("prune-*.json"))


def test_prune_of_a_deterministic_run_names_its_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plots: None
) -> None:
    """Before: ``prune_by_snr: the model has no Bayesian layers`` (which model? why?)."""
    run = _toy_run(tmp_path, "--method", "sgd")
    capsys.readouterr()
    assert cli("prune", run, "--split", "val") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bbb: error: {run} was trained with --method sgd")
    assert "needs a --method bbb run" in err and len(err.splitlines()) == 1


def test_bandit_draws_no_progress_bar_into_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bbb bandit` without --quiet: its progress bar only on a terminal, as for train."""
    import bbb.bandit

    seen: list[bool] = []
    monkeypatch.setattr(bbb.bandit, "main_bandit", lambda args: seen.append(args.quiet) or 0)

    class Log:
        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Log())
    assert cli("bandit") == 0
    assert seen == [True]  # no bar


def test_bayesianize_of_an_uncopyable_model_says_to_convert_in_place() -> None:
    """The deprecated torch.nn.utils.weight_norm makes a model that copy.deepcopy refuses:
    before, torch's RuntimeError about deepcopy; now a TypeError naming inplace=True, which
    converts it (mu = the layer's effective weight g * v / |v|)."""
    from torch.nn.utils import weight_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its deprecation
        layer = weight_norm(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"cannot be copied.*inplace=True"):
        bbb.bayesianize(nn.Sequential(layer))
    effective = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="had hooks"):  # weight norm's own pre-forward hook
        out = bbb.bayesianize(nn.Sequential(layer), inplace=True, init_from_weights=True)
    assert torch.equal(out[0].weight_mu, effective)


# --------------------------------------------------------------------------- ready-made models


@pytest.mark.parametrize(
    "build, message",
    [
        # a zero width built a plain network whose output ignores its input (only the bias)
        (lambda: bbb_models.mlp(3, [0], 2), r"mlp: hidden\[0\] must be a positive integer, got 0"),
        (lambda: bbb_models.mlp(3, [-1], 2), r"hidden\[0\] must be a positive integer, got -1"),
        (lambda: bbb_models.mlp(0, [4], 2), "in_features must be a positive integer, got 0"),
        # an int: "Value after * must be an iterable, not int"
        (lambda: bbb_models.bayes_mlp(3, 5, 2), "hidden must be a sequence of layer widths"),
        # a string was read one character per layer ("out_features ... got '1'")
        (lambda: bbb_models.bayes_mlp(3, "12", 2), "got '12'"),
        (lambda: bbb_models.mlp(3, [2.5], 2), r"hidden\[0\] must be a positive integer, got 2.5"),
        # "not enough values to unpack (expected 2, got 1)"
        (lambda: bbb_models.bayes_convnet(channels=(16,)), "channels must be two positive"),
        (lambda: bbb_models.bayes_convnet(num_classes=0), "num_classes must be a positive"),
    ],
)
def test_ready_made_models_refuse_bad_sizes_by_name(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_ready_made_models_accept_any_integer_widths() -> None:
    import numpy as np

    net = bbb_models.mlp(3, np.array([4, 5]), 2)
    assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [4, 5, 2]
    assert len(bbb_models.bayes_mlp(3, [], 2)) == 1
    assert bbb_models.bayes_convnet(channels=[3, 4])[3].out_channels == 4


def test_prune_result_file_names_the_fraction_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plots: None
) -> None:
    """--fraction 0.9999999 wrote prune-1-val.json (a fraction bbb prune refuses), and 0.95
    and 0.9500001 wrote the same file; the short names stay (prune-0.95-val.json)."""
    run = _toy_run(tmp_path)
    for fraction in ("0.9999999", "0.95", "0.9500001", "0"):
        assert (
            cli("prune", run, "--split", "val", "--num-samples", "2", "--fraction", fraction) == 0
        )
    names = sorted(p.name for p in run.glob("prune-*.json"))
    assert names == [
        "prune-0-val.json",
        "prune-0.95-val.json",
        "prune-0.9500001-val.json",
        "prune-0.9999999-val.json",
    ]
    saved = json.loads((run / "prune-0.9999999-val.json").read_text())
    assert saved["pruned"]["removed"] == saved["pruned"]["total"] - 1  # floor(0.9999999 * n)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_demo_out_that_is_a_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """Before: ``bbb: error: [Errno 17] File exists: '...'`` (or Errno 20), naming no option."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine\n")
    out = blocker if where == "file" else blocker / "demo"
    assert cli("demo", "--out", out, "--epochs", "1", "--quiet") == 1
    err = capsys.readouterr().err
    tail = "is a file" if where == "file" else f"is under {blocker}, which is a file"
    assert err == (
        f"bbb: error: the demo's output directory (--out) {out} {tail}, not a directory: "
        "choose another --out\n"
    )
    assert blocker.read_text() == "mine\n"


def test_a_config_file_saved_with_a_byte_order_mark_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plots: None
) -> None:
    """Notepad saves UTF-8 with a BOM: before, ``config file ... is not valid toml: Invalid
    statement (at line 1, column 1)``."""
    config = tmp_path / "run.toml"
    config.write_bytes(
        b'\xef\xbb\xbfdataset = "toy"\ntoy_n = 64\nhidden = [8]\nepochs = 1\nbatch_size = 16\n'
    )
    assert cli("train", "--config", config, "--quiet", "--out", tmp_path / "r") == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["dataset"], saved["toy_n"], saved["hidden"]) == ("toy", 64, [8])
    # a file that is not UTF-8 is still named (the BOM is dropped, nothing else is accepted)
    config.write_bytes(b'\xef\xbb\xbfdataset = "toy\xff"\n')
    assert cli("train", "--config", config, "--quiet", "--out", tmp_path / "s") == 1
    assert f"config file {config} is not UTF-8 text" in capsys.readouterr().err


def test_evaluate_says_how_many_examples_its_uncertainty_summary_covers(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_plots: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The uncertainty means are over the first 2000 examples, the metrics over all of them:
    before, the result said n_examples = the whole split and nothing about the subset."""
    import bbb.cli

    run = _toy_run(tmp_path)
    monkeypatch.setattr(bbb.cli, "_UNCERTAINTY_EXAMPLES", 5)  # a toy split is small
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 0
    result = json.loads((run / "eval-val.json").read_text())
    assert result["n_examples"] > 5 and result["uncertainty"]["n_examples"] == 5
    assert "n_examples" in capsys.readouterr().out.split("uncertainty:")[1]


def test_ctrl_c_in_the_first_epoch_says_how_to_start_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_plots: None,
) -> None:
    """No epoch ended: --resume would refuse ('nothing to resume'); the command printed works."""
    run = tmp_path / "r"
    original = bbb.runs.train_run

    def interrupted(cfg: Any, out: Any, **kwargs: Any) -> Any:
        (Path(out) / "checkpoints").mkdir(parents=True)
        (Path(out) / "config.json").write_text(json.dumps(cfg.to_dict()))  # set up, then ^C
        raise KeyboardInterrupt

    monkeypatch.setattr(bbb.runs, "train_run", interrupted)
    assert cli("train", *TOY_TINY, "--quiet", "--epochs", "1", "--out", run) == 130
    err = capsys.readouterr().err
    command = f"bbb train --config {run / 'config.json'} --out {run} --overwrite"
    assert (
        err
        == f"bbb: interrupted in the first epoch (no checkpoint yet); start the run again with: {command}\n"
    )
    monkeypatch.setattr(bbb.runs, "train_run", original)
    assert main(command.split()[1:] + ["--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["val"]


@pytest.mark.parametrize(
    "argv, message",
    [
        # wrote metrics.json, regression.png, bbb/ and plain/ into the working directory
        (
            ["demo", "--out", "", "--epochs", "1", "--quiet"],
            "out_dir (--out) is empty: give the demo's output directory",
        ),
        # '--export  is a directory' (Path("") is ".")
        (["prune", "no-run", "--export", ""], "--export is empty: give a file name"),
        (["evaluate", "no-run", "--compact", " "], "--compact is empty: give a file name"),
    ],
)
def test_an_empty_path_option_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli(*argv) == 1
    assert capsys.readouterr().err == f"bbb: error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory


def test_a_run_directory_whose_name_is_not_utf8_is_printed_under_a_strict_utf8_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    """A directory name with a byte that is not UTF-8 (Python decodes it to a surrogate) under
    an en_US.UTF-8 locale (stdout errors='strict'): before, `bbb train` trained, then exited 1
    with "'utf-8' codec can't encode character '\\udcff'" at its summary line."""
    import io

    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    run = tmp_path / "caf\udce9 run"  # b"caf\xe9 run": Latin-1, not UTF-8
    assert cli("train", *TOY_TINY, "--quiet", "--epochs", "1", "--out", run) == 0
    assert b"run directory: " + bytes(run) + b"\n" in raw.getvalue()  # the name's own bytes
    assert stdout.errors == "strict"  # restored
    # an ASCII stdout (PYTHONIOENCODING=ascii): the name escaped, not an error
    ascii_raw = io.BytesIO()
    monkeypatch.setattr(
        sys, "stdout", io.TextIOWrapper(ascii_raw, encoding="ascii", write_through=True)
    )
    assert cli("evaluate", run, "--split", "val", "--num-samples", "2") == 0
    assert b"written: " + str(run).encode("ascii", "backslashreplace") in ascii_raw.getvalue()


@pytest.mark.parametrize("damage", ["no rest", "layers a list", "no rho", "shape a string"])
def test_load_compact_of_a_damaged_export_is_a_value_error_naming_it(
    tmp_path: Path, damage: str
) -> None:
    """Before: a bare KeyError ("bbb: error: 'rho'") or TypeError naming neither file nor layer."""
    model = bbb_models.bayes_mlp(3, [4], 2)
    bbb.prune_by_snr(model, 0.5)
    path = tmp_path / "c.pt"
    bbb.save_compact(model, path)
    blob = torch.load(path, weights_only=True)
    if damage == "no rest":
        del blob["rest"]
    elif damage == "layers a list":
        blob["layers"] = list(blob["layers"].values())
    elif damage == "no rho":
        del blob["layers"]["0"]["rho"]
    else:
        blob["layers"]["0"]["shape"] = "4x3"
    torch.save(blob, path)
    with pytest.raises(ValueError, match=f"{path}: (corrupt compact export|layer '0': corrupt)"):
        bbb.load_compact(bbb_models.bayes_mlp(3, [4], 2), path)
