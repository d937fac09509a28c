"""Review of the Mushroom bandit (issue 6): regressions for the bugs it found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bbb.bandit import BanditConfig, merge_runs, run_bandit

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "mushroom").is_dir(),
    reason="the shared Mushroom data (../shared/data/mushroom) is absent",
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> BanditConfig:
    base = dict(
        steps=3,
        seeds=[0, 1],
        updates_per_step=1,
        batch_size=4,
        buffer_size=8,
        hidden=4,
        checkpoint_every=2,
        data_dir=str(DATA),
    )
    base.update(kw)
    return BanditConfig(**base)


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
