"""Issue 6/8: the bandit's ``fused_update`` now against its version at a git revision.

Loads the Bayesian population of a bandit run's newest checkpoint twice (one network set
per variant), then times 64 updates (``fused_update`` + the Adam step) per round, the two
variants interleaved in this process, one thread; median ms per update. The old variant is
``src/bbb/bandit/update.py`` at REV, executed as a module of the installed ``bbb.bandit``
package (so it must be the package layout, commit ``08549b1`` or later).

    python benchmarks/probes/bandit_update.py RUN_DIR [--rev 08549b1] [--rounds 40]

RUN_DIR: a run of ``bbb bandit --agents bbb-thompson`` (e.g. ``runs/s19/vcl4096-cap-s5-9``).
Run with nothing else on the machine (pause background jobs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch

import bbb
from bbb import kernels
from bbb.bandit import BanditConfig, _Population
from bbb.bandit import update as new_mod
from bbb.data.mushroom import load_mushroom
from bbb.train.checkpoint import load_checkpoint
from bbb.train.optim import adam

ap = argparse.ArgumentParser()
ap.add_argument("run_dir", type=Path)
ap.add_argument("--rev", default="08549b1")
ap.add_argument("--rounds", type=int, default=40)
ap.add_argument("--data-dir", default=None)
args = ap.parse_args()
torch.set_num_threads(1)
bbb.tune_allocator()
src = subprocess.run(
    ["git", "show", f"{args.rev}:src/bbb/bandit/update.py"],
    capture_output=True,
    text=True,
    check=True,
).stdout
old_mod = types.ModuleType("bbb.bandit._update_at_rev")
old_mod.__package__ = "bbb.bandit"
exec(compile(src, f"update.py@{args.rev}", "exec"), old_mod.__dict__)
values = json.loads((args.run_dir / "config.json").read_text())
if args.data_dir:
    values["data_dir"] = args.data_dir
cfg = BanditConfig(**values)
if cfg.agents != ["bbb-thompson"]:
    raise SystemExit("the probe takes a run of the Bayesian agent alone (--agents bbb-thompson)")
data = load_mushroom(cfg.data_dir)
state, path = load_checkpoint(args.run_dir / "checkpoints")


def build() -> tuple[_Population, torch.optim.Optimizer]:
    p = _Population(cfg, ["bbb-thompson"] * len(cfg.seeds), list(range(len(cfg.seeds))), True,
                    data.contexts.shape[1])  # fmt: skip
    s = state["pops"][0]
    p.model.load_state_dict(s["model"])
    p.buffers.load(s["buffers"], seen=int(state["step"]))
    p.load_prior_state(s.get("prior"))
    opt = adam([p.flat], cfg.lr, eps=cfg.adam_eps)
    opt.load_state_dict(state["optimizer"])
    return p, opt


variants = {
    f"at {args.rev}": (old_mod.fused_update, *build()),
    "now": (new_mod.fused_update, *build()),
}
g = torch.Generator().manual_seed(0)
times: dict[str, list[float]] = {k: [] for k in variants}
with kernels.use_kernels(cfg.kernels):
    for r in range(args.rounds):
        order = list(variants.items())
        for key, (update, pop, opt) in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            for _ in range(64):
                update([pop], g)
                opt.step()
            times[key].append((time.perf_counter() - t0) / 64 * 1e3)
print(f"{path}, {cfg.kernels} kernels, {len(cfg.seeds)} networks")
for key, v in times.items():
    print(f"{key}: median {statistics.median(v):.3f} ms per update ({len(v)} rounds of 64)")
