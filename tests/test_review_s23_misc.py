"""Session 23 review: the lead's own fixes outside the helpers' areas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bbb.bandit.config import BanditConfig
from bbb.bandit.results import _read_regret_csv, _write_results


def _results(out: Path, value: float) -> None:
    cfg = BanditConfig(agents=["greedy-0"], steps=3, seeds=[0])
    regret = torch.full((3, 1), value)
    _write_results(out, cfg, ["greedy-0/seed0"], regret, regret * 2, 3, 1.0, 0)


def test_regret_csv_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing regret.csv (here: fsync raising, as on a full disk) keeps the
    previous file whole and leaves no temporary file (before: the CSV was written to a fixed
    temporary name without fsync, then renamed)."""
    _results(tmp_path, 5.0)
    before = (tmp_path / "regret.csv").read_bytes()
    cols, expected, realized = _read_regret_csv(tmp_path / "regret.csv")
    assert cols == ["greedy-0/seed0"]
    assert expected.flatten().tolist() == [5.0, 5.0, 5.0]
    assert realized.flatten().tolist() == [10.0, 10.0, 10.0]

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _results(tmp_path, 15.0)
    monkeypatch.undo()
    assert (tmp_path / "regret.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_diagnose_on_a_directory_without_checkpoints_is_a_one_line_error(tmp_path: Path) -> None:
    """experiments/bandit/diagnose.py on a merged run (config.json, no checkpoints) or on a
    directory that is no run: exit status 1 and one line naming the problem (before: a
    CheckpointError / FileNotFoundError traceback)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "experiments" / "bandit" / "diagnose.py"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    for run, expected in ((merged, "holds no checkpoints"), (tmp_path / "nothing", "no config")):
        r = subprocess.run(
            [sys.executable, str(script), str(run)], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 1, r.stderr
        assert expected in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
