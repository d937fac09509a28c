"""``bbb sweep``: hyper-parameter search on Optuna, from a laptop to many machines.

A *space file* (TOML) names the base command, its fixed options and the searched ones::

    [sweep]
    command = "train"          # the base command (only `train` so far)
    metric = "error"           # validation metric to optimise (default: error / nll)
    trials = 20                # default budget for spaces with ranges (--trials wins)

    [train]                    # fixed options of the base command (TrainConfig keys)
    dataset = "mnist"
    epochs = 20

    [search]                   # one entry per searched option
    lr = { log_float = [1e-5, 1e-2] }                 # a range: int, float or log_float
    num_samples = { grid = [1, 2, 5] }                # a grid (exhaustive when all are grids)
    prior = { choices = ["gaussian", "laplace"] }     # a list (sampled, never exhaustive)
    prior_sigma1 = { grid = [0, 1, 2], transform = "exp(-x)" }   # searched k, used exp(-k)

Every trial is an ordinary run directory ``SWEEP_DIR/trials/trial-NNNN`` written by
:func:`bbb.runs.train_run` with the test split left out; the validation metric of each epoch is
reported to Optuna, whose pruner may stop the trial early. The study lives in a SQLite file in
SWEEP_DIR (``study.db``) or in any database Optuna accepts (``--storage postgresql://...``):
the same command run on several machines joins the same study. Workers send a heartbeat; a
trial whose worker died is marked failed and retried (at most 3 times) by the next worker that
looks at the study, so re-running the command resumes it.

``bbb sweep show SWEEP_DIR`` prints the best trials and writes plots; ``bbb sweep best
SWEEP_DIR`` prints the best trial's configuration as TOML for ``bbb train --config``.
Optuna is an optional dependency: ``pip install -e '.[sweep]'``.
"""

from .cli import main
from .results import best_config_toml, show_sweep
from .run import SweepOptions, run_sweep
from .space import Param, Space, SweepError, load_space

__all__ = [
    "SweepError",
    "Param",
    "Space",
    "load_space",
    "run_sweep",
    "SweepOptions",
    "show_sweep",
    "best_config_toml",
    "main",
]
