"""Where a bandit agent's regret comes from, read off a run's last checkpoint (issue 6).

For every member network of ``RUN_DIR`` (written by ``bbb bandit``) this evaluates, on all
8124 mushrooms (the environment draws them uniformly, so these are per-step expectations):

- ``mean-policy``: expected regret per step of acting greedily on the network's mean weights
  (the greedy agents' policy without exploration): the model's error;
- ``thompson``: expected regret per step of the Thompson-sampling decision the agent makes
  (``thompson_samples`` weight samples averaged, frozen per decision), averaged over
  ``--draws`` decisions per mushroom: model error plus the cost of exploration;
- ``sd(eat)``: median over mushrooms of the standard deviation of one sampled eat-value;
- per layer, the fraction of weights whose posterior sigma is above half the prior's width
  (``prior_sigma``; the scale mixture's ``prior_sigma1``): weights left at the prior;
- ``eaten``: how many of the 3916 poisonous mushrooms the mean-weight policy eats, split into
  those with no odor (``odor=n``: 120, the hard ones, told apart by other attributes) and
  those with a distinctive odor (foul, fishy, ...: odor alone rules them out);
- per hidden layer, the number of units at least 90% of whose incoming weights are that wide:
  units whose input is mostly prior noise (the rest carry the reward model).

Usage: ``python experiments/bandit/diagnose.py RUN_DIR [--draws 32] [--step T] [--data-dir DIR]
[--seed S]`` (``--step``: the checkpoint of step T, to compare runs at one step; default the
newest; ``--data-dir``: where the mushroom data is now, if not where the run read it;
``--seed``: of the Thompson draws, default 0: the same command prints the same numbers)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bbb.bandit import EAT, PASS, BanditConfig, _Population, _with_action, expected_regret
from bbb.bandit.config import _LEGACY_SETTINGS
from bbb.data.mushroom import load_mushroom
from bbb.nn.module import resample, sampling, vectorized_samples
from bbb.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint


@torch.no_grad()
def diagnose(
    run_dir: Path, draws: int, step: int | None = None, data_dir: str | None = None, seed: int = 0
) -> list[dict[str, object]]:
    """One row of statistics per member network (see the module docstring); ``data_dir``
    (default: the run's own) holds the mushroom data; ``seed`` seeds the Thompson draws (the
    caller's random state is left as it was)."""
    if draws < 2:  # sd(eat) is a standard deviation over the draws
        raise ValueError(f"draws must be at least 2 (sd(eat) is a spread over them), got {draws}")
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a bandit run directory (no config.json)")
    ckpts = run_dir / "checkpoints"
    if not list_checkpoints(ckpts):
        raise FileNotFoundError(
            f"{run_dir} holds no checkpoints (a run merged with `bbb bandit --merge` keeps "
            "none): point diagnose.py at one of the runs that were merged"
        )
    # a run made before a setting existed ran with its legacy value (as bbb bandit --resume)
    saved = {**_LEGACY_SETTINGS, **json.loads((run_dir / "config.json").read_text())}
    try:
        cfg = BanditConfig(**saved)
    except TypeError as e:  # a key this version does not know
        raise ValueError(
            f"{run_dir / 'config.json'} is not a bandit config this version reads: {e}"
        ) from None
    data = load_mushroom(data_dir if data_dir is not None else cfg.data_dir)
    x, edible = data.contexts, data.edible
    no_odor = x[:, data.feature_names.index("odor=n")] > 0
    n, dim = x.shape
    if step is not None and not (ckpts / f"checkpoint-{step:05d}.pt").is_file():
        steps = ", ".join(str(int(p.stem.split("-")[-1])) for p in list_checkpoints(ckpts))
        raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step} (steps: {steps})")
    state, _ = load_checkpoint(ckpts if step is None else ckpts / f"checkpoint-{step:05d}.pt")
    n_seeds = len(cfg.seeds)
    rows: list[dict[str, object]] = []
    specs = [
        ([a for a in cfg.agents if a == "bbb-thompson"], True),
        ([a for a in cfg.agents if a != "bbb-thompson"], False),
    ]
    pops = [(names, bayes) for names, bayes in specs if names]
    for (names, bayes), saved in zip(pops, state["pops"], strict=True):
        members = [a for a in names for _ in range(n_seeds)]
        seeds = [i for _ in names for i in range(n_seeds)]
        pop = _Population(cfg, members, seeds, bayes, dim)
        pop.model.load_state_dict(saved["model"])
        k = len(members)
        both = torch.stack(
            [_with_action(x, torch.full((n,), PASS)), _with_action(x, torch.full((n,), EAT))], 1
        ).reshape(1, 2 * n, dim + 2)
        with sampling(pop.model, "mean"):
            mean_value = pop.model(both.expand(k, -1, -1)).reshape(k, n, 2)
        mean_action = mean_value.argmax(-1)  # (K, n)
        mean_regret = expected_regret(edible.expand(k, n), mean_action).mean(1)
        poison_eaten = (mean_action == EAT) & ~edible
        eaten_none = (poison_eaten & no_odor).sum(1)
        eaten_other = (poison_eaten & ~no_odor).sum(1)
        ts_regret = torch.full((k,), float("nan"))
        sd_eat = torch.full((k,), float("nan"))
        wide: list[list[float]] = [[] for _ in range(k)]
        noisy: list[list[int]] = [[] for _ in range(k)]
        if bayes:
            width = cfg.prior_sigma1 if cfg.prior == "scale_mixture" else cfg.prior_sigma
            s = cfg.thompson_samples
            total = torch.zeros(k)
            values = []
            with torch.random.fork_rng(devices=[]):  # the same command, the same numbers
                torch.manual_seed(seed)
                for _ in range(draws):
                    resample(pop.model)
                    with sampling(pop.model, "frozen"), vectorized_samples(pop.model, s):
                        v = pop.model(both.expand(k, -1, -1).repeat(s, 1, 1))
                    v = v.reshape(s, k, n, 2)
                    values.append(v[0, :, :, 1])
                    total += expected_regret(edible.expand(k, n), v.mean(0).argmax(-1)).mean(1)
            ts_regret = total / draws
            sd_eat = torch.stack(values).std(0).median(1).values
            for j, layer in enumerate(pop.layers):
                sigma = torch.nn.functional.softplus(layer.weight_rho)  # (K, out, in)
                is_wide = (sigma > 0.5 * width).float()
                frac = is_wide.flatten(1).mean(1)
                for i in range(k):
                    wide[i].append(round(float(frac[i]), 3))
                if j < len(pop.layers) - 1:  # hidden layers: units fed mostly prior noise
                    units = (is_wide.mean(2) >= 0.9).sum(1)  # (K,)
                    for i in range(k):
                        noisy[i].append(int(units[i]))
        for i in range(k):
            rows.append(
                {
                    "member": f"{members[i]}/seed{cfg.seeds[seeds[i]]}",
                    "mean_policy": round(float(mean_regret[i]), 4),
                    "thompson": round(float(ts_regret[i]), 4),
                    "sd_eat": round(float(sd_eat[i]), 3),
                    "wide_fraction": wide[i],
                    "noise_units": noisy[i],
                    "eaten_no_odor": int(eaten_none[i]),
                    "eaten_other_odor": int(eaten_other[i]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--draws", type=int, default=32, help="Thompson decisions per mushroom (at least 2)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data root holding mushroom/ (default: the run's own data_dir, else $BBB_DATA_DIR, "
        "then ../shared/data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Thompson draws")
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error(
            f"--draws must be at least 2 (sd(eat) is a spread over them), got {args.draws}"
        )
    try:
        rows = diagnose(args.run_dir, args.draws, args.step, args.data_dir, args.seed)
    except (OSError, ValueError, CheckpointError) as e:
        parser.exit(1, f"diagnose.py: error: {e}\n")
    print(
        f"{'member':28s} {'mean-policy':>11s} {'thompson':>9s} {'sd(eat)':>8s}  "
        "eaten (no odor / odor)  wide (>prior/2)      noise units"
    )
    for r in rows:
        print(
            f"{r['member']!s:28s} {r['mean_policy']:11.4f} {r['thompson']:9.4f} "
            f"{r['sd_eat']:8.3f}  {r['eaten_no_odor']:>9d} / {r['eaten_other_odor']:<10d} "
            f"{r['wide_fraction']!s:20s} {r['noise_units']}"
        )


if __name__ == "__main__":
    main()
