"""Session 25 review (issues #3, #10): AUROC with infinite scores, ``bbb sweep``'s options
before ``show`` / ``best``, and the median pruner's warm-up epoch."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import bbb
from bbb.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

needs_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None,
    reason="bbb sweep needs Optuna: pip install -e '.[sweep]'",
)


# ------------------------------------------------------------------ AUROC with +-inf scores


def _pairwise_auroc(neg: list[float], pos: list[float]) -> float:
    """P(pos > neg) + P(pos == neg) / 2 over all pairs, one pair at a time (Python floats:
    inf > 1e308, -inf < -1e308, inf == inf)."""
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(neg) * len(pos))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_auroc_ranks_infinite_scores_like_a_pairwise_count(dtype: torch.dtype) -> None:
    """+-inf scores (an entropy or a log-variance that overflowed) were refused ("contains
    infinite values"); they rank above / below every finite score, equal infinities tie."""
    g = torch.Generator().manual_seed(25)
    neg = torch.randint(0, 6, (80,), generator=g).to(dtype)
    pos = torch.randint(1, 8, (60,), generator=g).to(dtype)
    # infinities of both signs in both sets, several of each: ties among them
    neg[:7], neg[7:10] = math.inf, -math.inf
    pos[:5], pos[5:9] = math.inf, -math.inf
    want = _pairwise_auroc(neg.tolist(), pos.tolist())
    assert bbb.metrics.auroc(neg, pos) == pytest.approx(want, abs=1e-12)
    assert bbb.metrics.auroc(pos, neg) == pytest.approx(1.0 - want, abs=1e-12)


def test_auroc_with_infinities_at_the_extremes() -> None:
    inf = math.inf
    finite = torch.tensor([0.0, 1.0, 2.0])
    assert bbb.metrics.auroc(finite, torch.tensor([inf, inf])) == 1.0
    assert bbb.metrics.auroc(finite, torch.tensor([-inf])) == 0.0
    assert bbb.metrics.auroc(torch.tensor([1e308], dtype=torch.float64), torch.tensor([inf])) == 1.0
    # every pair tied (all +inf): chance, as for any equal scores
    assert bbb.metrics.auroc(torch.full((3,), inf), torch.full((2,), inf)) == 0.5
    assert bbb.metrics.auroc(torch.tensor([-inf, inf]), torch.tensor([inf])) == 0.75
    # an integer set against a float set holding inf
    assert bbb.metrics.auroc(torch.tensor([5, 7]), torch.tensor([inf, 6.0])) == 0.75


def test_auroc_still_refuses_nan_scores() -> None:
    with pytest.raises(ValueError, match="scores_positive contains NaN"):
        bbb.metrics.auroc(torch.tensor([0.0, math.inf]), torch.tensor([math.nan, 1.0]))
    with pytest.raises(ValueError, match="scores_negative contains NaN"):
        bbb.metrics.auroc(torch.tensor([math.nan, -math.inf]), torch.tensor([1.0]))


# ------------------------------------------------------------------ bbb sweep's command line

SPACE = """
[sweep]
command = "train"

[train]
dataset = "toy"
toy_n = 64
hidden = [8]
epochs = 1
batch_size = 32
val_samples = 2

[search]
lr = [0.01]
"""


def test_split_subcommand_skips_options_and_their_values() -> None:
    from bbb.sweep.cli import split_subcommand

    url = "sqlite:////tmp/s.db"
    assert split_subcommand(["show", "D"]) == ("show", ["D"])
    assert split_subcommand(["--storage", url, "show", "D"]) == ("show", ["--storage", url, "D"])
    assert split_subcommand(["--storage=" + url, "best", "D"]) == (
        "best",
        ["--storage=" + url, "D"],
    )
    assert split_subcommand(["--top", "3", "--no-plots", "show", "D"]) == (
        "show",
        ["--top", "3", "--no-plots", "D"],
    )
    # an option's value named like a subcommand is a value; the run's words stay as they are
    run = ["--study-name", "show", "S.toml", "--out", "D"]
    assert split_subcommand(run) == ("run", run)
    assert split_subcommand(["S.toml", "--out", "show"]) == ("run", ["S.toml", "--out", "show"])
    assert split_subcommand(["--", "show", "--out", "D"]) == ("run", ["--", "show", "--out", "D"])


def test_sweep_main_gives_show_and_best_the_options_before_the_subcommand(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bbb sweep --storage URL show DIR`` failed with "the following arguments are required:
    --out" (``show`` was read as the run's space file)."""
    import bbb.sweep.cli as sweep_cli

    calls: list[tuple[str, Path, dict[str, Any]]] = []

    def fake_show(sweep_dir: Path, **kw: Any) -> str:
        calls.append(("show", sweep_dir, kw))
        return "shown"

    def fake_best(sweep_dir: Path, **kw: Any) -> str:
        calls.append(("best", sweep_dir, kw))
        return "lr = 0.01\n"

    monkeypatch.setattr(sweep_cli, "show_sweep", fake_show)
    monkeypatch.setattr(sweep_cli, "best_config_toml", fake_best)
    url = "sqlite:////tmp/elsewhere.db"
    assert main(["sweep", "--storage", url, "--top", "3", "show", "DIR", "--no-plots"]) == 0
    assert main(["sweep", "--storage=" + url, "best", "DIR", "--study-name", "s"]) == 0
    assert calls == [
        ("show", Path("DIR"), {"top": 3, "storage": url, "study_name": None, "plots": False}),
        ("best", Path("DIR"), {"storage": url, "study_name": "s"}),
    ]
    assert capsys.readouterr().out == "shown\nlr = 0.01\n"


@pytest.mark.slow
@needs_optuna
def test_sweep_show_and_best_take_the_storage_before_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bbb sweep --storage URL show DIR`` read ``show`` as the run's space file and failed
    with "the following arguments are required: --out"; show and best now read the study."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    url = f"sqlite:///{(tmp_path / 'elsewhere.db').resolve()}"
    assert main(["sweep", str(space), "--out", str(out), "--storage", url, "--no-trial-plots"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--storage", url, "show", str(out), "--no-plots"]) == 0
    assert "1 complete" in capsys.readouterr().out
    assert main(["sweep", "--storage", url, "best", str(out)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["lr"] == 0.01


# ------------------------------------------------------------------ the median pruner


def _finished(optuna: Any, values: dict[int, float]) -> Any:
    return optuna.trial.create_trial(
        value=min(values.values()),
        intermediate_values=values,
        params={},
        distributions={},
    )


@needs_optuna
def test_the_median_pruner_never_stops_a_trial_after_its_first_epoch(tmp_path: Path) -> None:
    """A sweep trial reports step = epoch from 1; ``n_warmup_steps=1`` (Optuna counts from 0)
    let the median pruner stop a trial on its first, noisiest epoch (the documented session-4
    MNIST search pruned two settings there). Epoch 1 is now never pruned; epoch 2 is."""
    import optuna

    from bbb.sweep.space import load_space
    from bbb.sweep.storage import WARMUP_EPOCHS, _make_pruner

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space_file = tmp_path / "space.toml"
    space_file.write_text(SPACE)
    pruner = _make_pruner("median", load_space(space_file))
    study = optuna.create_study(direction="minimize", pruner=pruner)
    for _ in range(5):  # n_startup_trials finished trials, all far better than the new one
        study.add_trial(_finished(optuna, {1: 0.1, 2: 0.05, 3: 0.04}))
    trial = study.ask()
    for epoch in range(1, WARMUP_EPOCHS + 1):
        trial.report(1.0, epoch)
        assert not trial.should_prune(), epoch
    trial.report(1.0, WARMUP_EPOCHS + 1)
    assert trial.should_prune()
    assert WARMUP_EPOCHS == 1
