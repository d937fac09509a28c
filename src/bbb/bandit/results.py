"""Results of a run: the regret CSV, ``metrics.json``, the plot; merging runs of disjoint agents."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..train.checkpoint import atomic_write_text, list_checkpoints, strict_json
from .config import BAYES_ONLY_SETTINGS, BanditConfig, read_saved_config
from .env import AGENTS, BAYES_AGENT, LATE_WINDOW


def _write_results(
    out: Path,
    cfg: BanditConfig,
    columns: list[str],
    regret: Tensor,
    realized: Tensor,
    done: int,
    elapsed: float,
    start_step: int,
) -> dict[str, Any]:
    cum = regret.cumsum(0)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", *[f"{c}:expected" for c in columns], *[f"{c}:realized" for c in columns]])
    for t in range(done):
        w.writerow(
            [
                t + 1,
                *[f"{v:g}" for v in regret[t].tolist()],
                *[f"{v:g}" for v in realized[t].tolist()],
            ]
        )
    # temporary file, fsync, rename, directory fsync: a crash leaves the old file or the new one
    atomic_write_text(out / "regret.csv", buf.getvalue())
    agents: dict[str, Any] = {}
    # the late per-step regret of the target: the last 10000 steps, or every step of a
    # shorter run (the key keeps its name; "per_step_regret_window" says how many steps)
    window = min(LATE_WINDOW, done)
    for agent in cfg.agents:
        cols = [i for i, c in enumerate(columns) if c.split("/")[0] == agent]
        final = cum[-1, cols] if done else torch.zeros(len(cols))
        last = regret[done - window :, cols].mean(0) if done else torch.zeros(len(cols))
        agents[agent] = {
            "cumulative_regret_mean": float(final.mean()),
            # over one seed the sample sd is undefined: null, not 0 (a reader would print +- 0)
            "cumulative_regret_std": float(final.std(correction=1)) if len(cols) > 1 else None,
            "per_step_regret_last_10000_mean": float(last.mean()),
            "cumulative_regret_per_seed": final.tolist(),
        }
    metrics = {
        "steps_done": done,
        "steps": cfg.steps,
        "per_step_regret_window": window,
        "agents": agents,
        "seconds_this_session": elapsed,
        "steps_per_second_this_session": (done - start_step) / max(elapsed, 1e-9),
        "networks": len(columns),
    }
    atomic_write_text(out / "metrics.json", strict_json(metrics, indent=2) + "\n")
    if done:
        _plot(out / "cumulative_regret.png", cfg.agents, columns, cum)
    return metrics


def _read_regret_csv(path: Path) -> tuple[list[str], Tensor, Tensor]:
    """``(columns, expected (T, M), realized (T, M))`` from a run's ``regret.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][0] != "step":
        raise ValueError(f"{path}: not a bandit regret.csv (no 'step' header)")
    header = rows[0][1:]
    m = len(header) // 2
    columns = [h.removesuffix(":expected") for h in header[:m]]
    if header != [f"{c}:expected" for c in columns] + [f"{c}:realized" for c in columns]:
        raise ValueError(f"{path}: unexpected columns {header}")
    values = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]]).reshape(-1, 2 * m)
    return columns, values[:, :m], values[:, m:]


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Combine runs of disjoint agents (same settings, seeds and steps) into one result.

    The agents of a seed see the same mushrooms and coins whichever run they are in (the
    environment streams are seeded per seed), so the Bayesian and the greedy agents can run
    as separate processes, one thread each, and be reported together (measured here, one
    update per member on a quiet machine: the 5 Bayesian networks alone reach 5.4 steps/s and
    the 15 greedy ones 4.0, against 3.06 steps/s for all 20 in one process on two threads). Writes ``regret.csv``, ``metrics.json``,
    ``config.json`` and the plot to ``out_dir``; the runs must have the same number of steps
    done.
    """
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ValueError("merge needs at least two run directories")
    out = Path(out_dir)
    # the merged result replaces config.json, regret.csv and metrics.json in out_dir: never
    # those of a run (one of the parts, or any directory a `bbb bandit` run checkpoints into,
    # whose config.json its --resume checks); an earlier merge's result is replaced
    if any(out.resolve() == d.resolve() for d in dirs):
        raise ValueError(
            f"cannot merge into {out}: it is one of the runs merged (its config.json, "
            "regret.csv and metrics.json would be replaced); choose another --out"
        )
    if list_checkpoints(out / "checkpoints"):
        raise ValueError(
            f"cannot merge into {out}: it holds a bandit run (checkpoints/), whose results "
            "and config.json the merge would replace; choose another --out"
        )
    cfgs, parts = [], []
    for d in dirs:
        for name in ("config.json", "regret.csv", "metrics.json"):
            if not (d / name).is_file():
                raise ValueError(f"cannot merge {d}: {d / name} does not exist")
        # the settings added since a run was made read as it used them (as --resume reads
        # them), not as today's defaults; an unknown key is named with its file
        cfgs.append(read_saved_config(d / "config.json"))
        parts.append(_read_regret_csv(d / "regret.csv"))
    # the Bayesian agent's settings are taken from the run that has it: the greedy agents
    # never read them (a test checks their runs do not change with them)
    has_bayes = [BAYES_AGENT in c.agents for c in cfgs]
    ref = has_bayes.index(True) if any(has_bayes) else 0
    base = asdict(cfgs[ref])
    ignore = {"agents", "steps", "checkpoint_every", "data_dir"}
    for d, c, bayes in zip(dirs, cfgs, has_bayes, strict=True):
        skip = ignore if bayes else ignore | set(BAYES_ONLY_SETTINGS)
        diff = [k for k, v in asdict(c).items() if k not in skip and v != base[k]]
        if diff:
            raise ValueError(f"cannot merge {d} with {dirs[ref]}: settings differ in {diff}")
    agents = [a for c in cfgs for a in c.agents]
    if len(set(agents)) != len(agents):
        raise ValueError(f"cannot merge: an agent appears in more than one run ({agents})")
    done = {int(p[1].shape[0]) for p in parts}
    if len(done) != 1:
        raise ValueError(f"cannot merge runs with different numbers of steps done: {sorted(done)}")
    cfg = BanditConfig(**{**base, "agents": [a for a in AGENTS if a in agents]})
    columns = [c for p in parts for c in p[0]]
    regret = torch.cat([p[1] for p in parts], 1)
    realized = torch.cat([p[2] for p in parts], 1)
    order = sorted(range(len(columns)), key=lambda i: cfg.agents.index(columns[i].split("/")[0]))
    columns = [columns[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    n = done.pop()
    summary = _write_results(out, cfg, columns, regret[:, order], realized[:, order], n, 0.0, 0)
    summary["merged_from"] = [str(d) for d in dirs]
    # wall time is in each run's own metrics.json (runs may span sessions)
    summary.pop("seconds_this_session")
    summary.pop("steps_per_second_this_session")
    atomic_write_text(out / "metrics.json", strict_json(summary, indent=2) + "\n")
    return summary


def _plot(path: Path, agents: Sequence[str], columns: list[str], cum: Tensor) -> None:
    from ..plots import figure

    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = torch.arange(1, cum.shape[0] + 1).numpy()
    for i, agent in enumerate(agents):
        cols = [j for j, c in enumerate(columns) if c.split("/")[0] == agent]
        m = cum[:, cols].mean(1)
        lo, hi = cum[:, cols].min(1).values, cum[:, cols].max(1).values
        ax.plot(steps, m.clamp_min(1).numpy(), color=f"C{i}", label=agent)
        ax.fill_between(
            steps, lo.clamp_min(1).numpy(), hi.clamp_min(1).numpy(), color=f"C{i}", alpha=0.2
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative expected regret")
    ax.set_title("Mushroom bandit (mean over seeds, band: min-max)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
