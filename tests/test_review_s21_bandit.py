"""Review of the Mushroom bandit (issue 6): regressions for the bugs it found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bandit import _cfg as bandit_cfg
from test_bandit import needs_data

from bbb.bandit import BanditConfig, merge_runs, run_bandit

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(**kw) -> BanditConfig:
    """test_bandit's tiny configuration, smaller still (3 steps, one update of 4 rows)."""
    small = dict(steps=3, updates_per_step=1, batch_size=4, buffer_size=8, hidden=4)
    return bandit_cfg(**{**small, "checkpoint_every": 2, **kw})


@needs_data
def test_merge_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    """--merge into one of its parts (or any run directory) replaced the part's config.json,
    regret.csv and metrics.json with the merged ones, and the part could not be resumed."""
    bayes, greedy = tmp_path / "bbb", tmp_path / "greedy"
    run_bandit(_cfg(agents=["bbb-thompson"]), bayes, progress=False, log=None)
    run_bandit(_cfg(agents=["greedy-0"]), greedy, progress=False, log=None)
    saved = {n: (bayes / n).read_text() for n in ("config.json", "regret.csv", "metrics.json")}
    with pytest.raises(ValueError, match="it is one of the runs merged"):
        merge_runs([bayes, greedy], bayes)
    other = tmp_path / "other"
    run_bandit(_cfg(agents=["greedy-0.05"]), other, progress=False, log=None)
    with pytest.raises(ValueError, match=r"it holds a bandit run \(checkpoints/\)"):
        merge_runs([bayes, greedy], other)
    assert {n: (bayes / n).read_text() for n in saved} == saved
    # the part still resumes; a fresh --out, and an earlier merge's result, are merged into
    run_bandit(_cfg(agents=["bbb-thompson"], steps=4), bayes, resume=True, progress=False, log=None)
    run_bandit(_cfg(agents=["greedy-0"], steps=4), greedy, resume=True, progress=False, log=None)
    merged = tmp_path / "merged"
    for _ in range(2):
        m = merge_runs([bayes, greedy], merged)
        assert m["steps_done"] == 4 and set(m["agents"]) == {"bbb-thompson", "greedy-0"}


@needs_data
def test_a_config_of_tuples_resumes(tmp_path: Path) -> None:
    """BanditConfig(seeds=(0, 1), agents=(...,)) ran, but its resume was refused as 'other
    settings' (config.json holds lists: [0, 1] != (0, 1)); a range failed to save."""
    kw = dict(agents=("greedy-0",), seeds=(0, 1))
    run_bandit(_cfg(**kw), tmp_path, progress=False, log=None)
    m = run_bandit(_cfg(steps=5, **kw), tmp_path, resume=True, progress=False, log=None)
    assert m["steps_done"] == 5 and m["complete"]
    cfg = _cfg(agents=("greedy-0",), seeds=range(2)).validate()
    assert cfg.seeds == [0, 1] and cfg.agents == ["greedy-0"]
    assert json.loads(json.dumps(cfg.__dict__))["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="agents must be a list, got 'greedy-0'"):
        BanditConfig(agents="greedy-0").validate()  # type: ignore[arg-type]


@needs_data
def test_one_seed_has_no_standard_deviation(tmp_path: Path) -> None:
    """Over one seed metrics.json said cumulative_regret_std 0.0 (the CLI printed 'sd n/a'):
    a reader showed '+- 0'; it is null, and a number again over two seeds."""
    one = run_bandit(_cfg(agents=["greedy-0"], seeds=[0]), tmp_path / "a", progress=False, log=None)
    assert one["agents"]["greedy-0"]["cumulative_regret_std"] is None
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["agents"]["greedy-0"]["cumulative_regret_std"] is None
    two = run_bandit(_cfg(agents=["greedy-0"]), tmp_path / "b", progress=False, log=None)
    assert isinstance(two["agents"]["greedy-0"]["cumulative_regret_std"], float)
