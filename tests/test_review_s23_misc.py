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


def test_has_closed_form_sees_a_pair_registered_with_torch_after_the_first_question() -> None:
    """bbb.kl.has_closed_form cached a prior type's "no" for good: a KL pair registered later
    with torch.distributions.kl.register_kl was never used (kl='auto' stayed Monte Carlo)."""
    from torch import distributions as D

    from bbb.kl import has_closed_form
    from bbb.priors import Prior

    # a distribution type of its own, unknown to torch's KL registry
    class Odd(D.Distribution):
        arg_constraints: dict = {}

    class OddPrior(Prior):
        def distribution(self) -> D.Distribution:
            return Odd(validate_args=False)

    odd = OddPrior()
    assert has_closed_form(odd) is False

    @D.kl.register_kl(D.Normal, Odd)
    def _kl_normal_odd(p: D.Normal, q: Odd) -> torch.Tensor:
        return torch.zeros_like(p.loc)

    try:
        assert has_closed_form(odd) is True
    finally:  # leave torch's registry as it was for the other tests
        del D.kl._KL_REGISTRY[(D.Normal, Odd)]
        D.kl._KL_MEMOIZE.clear()
    assert has_closed_form(odd) is False
