"""Interim regret of bandit runs still in progress, read from their newest checkpoints.

    python experiments/bandit/interim.py runs/bandit-full/bbb runs/bandit-full/greedy-a \
        runs/bandit-full/greedy-b [--step T] [--window W]

Parts of one comparison (e.g. the three of ``full_run.sh``) advance at different speeds; this
compares them at a common step T (default: the smallest step every part has checkpointed):
per agent, the cumulative expected regret at T (mean +- sd over seeds, and per seed) and the
mean per-step regret over steps T-W+1..T (default W = 2000), split into its two sources: the
share of steps on which the agent passed an edible mushroom (regret 5) and ate a poisonous one
(regret 15). With ``--blocks B``, also the per-step regret in consecutive blocks of B steps
up to T: the mean over seeds and, in brackets, the lowest and highest seed's (does an agent's
regret keep falling, or rise again?). Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bbb.train import CheckpointError, load_checkpoint
from bbb.train.checkpoint import list_checkpoints


def _newest(run_dir: Path) -> dict:
    if not list_checkpoints(run_dir / "checkpoints"):
        what = "does not exist" if not run_dir.exists() else "holds no checkpoints/"
        raise CheckpointError(
            f"{run_dir} {what}: give bbb bandit run directories (a run merged with "
            "`bbb bandit --merge` keeps none: give the runs that were merged)"
        )
    state, _ = load_checkpoint(run_dir / "checkpoints")
    return state


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories with checkpoints/")
    p.add_argument("--step", type=int, default=None, help="compare at this step")
    p.add_argument("--window", type=int, default=2000, help="late per-step regret window")
    p.add_argument(
        "--blocks", type=int, default=None, help="also per-step regret per block of this many steps"
    )
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be at least 1, got {args.window}")
    if args.blocks is not None and args.blocks < 1:
        p.error(f"--blocks must be at least 1, got {args.blocks}")
    try:
        states = {rd: _newest(rd) for rd in args.runs}
    except (CheckpointError, OSError) as e:  # one line, not a traceback
        p.exit(1, f"interim.py: error: {e}\n")
    common = min(int(s["step"]) for s in states.values())
    step = common if args.step is None else args.step
    if not 0 < step <= common:
        raise SystemExit(f"--step must be in 1..{common} (the newest step every run has)")
    window = min(args.window, step)
    print(
        "newest checkpoints: "
        + ", ".join(f"{rd} {int(s['step'])}" for rd, s in states.items())
        + f"; compared at step {step}"
    )
    # an agent run in several of the runs (e.g. Bayesian variants) is labelled with its run
    seen: dict[str, int] = {}
    for state in states.values():
        for agent in dict.fromkeys(c.split("/")[0] for c in state["columns"]):
            seen[agent] = seen.get(agent, 0) + 1
    for rd, state in states.items():
        regret: torch.Tensor = state["regret"]  # (steps done, columns): expected regret per step
        columns: list[str] = state["columns"]  # "agent/seedN"
        agents = dict.fromkeys(c.split("/")[0] for c in columns)
        for agent in agents:
            label = agent if seen[agent] == 1 else f"{agent} ({rd})"
            cols = [i for i, c in enumerate(columns) if c.split("/")[0] == agent]
            cum = regret[:step, cols].sum(0)
            recent = regret[step - window : step, cols]
            late = recent.mean()
            passed_edible = (recent == 5).float().mean()
            ate_poisonous = (recent == 15).float().mean()
            per_seed = ", ".join(f"{v:.0f}" for v in cum.tolist())
            # over one seed the sample sd is undefined: not "+- 0" (as bbb bandit's own report)
            spread = f" +- {cum.std(correction=1):.0f}" if len(cols) > 1 else " (one seed: sd n/a)"
            print(
                f"{label:14s} cumulative regret at {step}: {cum.mean():.0f}{spread} "
                f"(per seed {per_seed}); "
                f"per step over {step - window + 1}-{step}: {late:.3f} (passed an edible one "
                f"on {100 * passed_edible:.2f}% of steps, ate a poisonous one on "
                f"{100 * ate_poisonous:.2f}%)"
            )
            if args.blocks is not None:
                print("  " + _blocks(regret[:step, cols], args.blocks))
    return 0


def _blocks(regret: torch.Tensor, size: int) -> str:
    """Per-step regret of ``regret`` (steps, seeds) in consecutive blocks of ``size`` steps (the
    last may be shorter), as "first-last: mean over seeds (lowest seed-highest seed)"."""
    parts = []
    for start in range(0, regret.shape[0], size):
        block = regret[start : start + size]
        per_seed = block.mean(0)
        parts.append(
            f"{start + 1}-{start + block.shape[0]}: {per_seed.mean():.2f} "
            f"({per_seed.min():.2f}-{per_seed.max():.2f})"
        )
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
