"""``BanditConfig``: the bandit's settings, validated; which a resumed run may change."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..config import changed_settings
from ..priors import Prior, make_prior
from .env import AGENTS

# settings only the Bayesian agent reads
BAYES_ONLY_SETTINGS = (
    "thompson_samples",
    "estimator",
    "prior",
    "prior_sigma",
    "prior_pi",
    "prior_sigma1",
    "prior_sigma2",
    "noise_sigma",
    "rho_init",
    "kl_data_size",
    "kernels",
    "prior_update",
)
#: accepted values of ``BanditConfig.kl_data_size`` (the N of the Bayesian agent's KL / N)
KL_DATA_SIZES = ("buffer", "seen", "capacity")
#: accepted values of ``BanditConfig.kernels`` (bbb.kernels backends the bandit uses)
BANDIT_KERNELS = ("eager", "native")

#: seeds must be below this: the run's generators are seeded at fixed offsets of it
SEED_LIMIT = 10_000


@dataclass
class BanditConfig:
    """Settings of a bandit run (saved as ``config.json``)."""

    agents: list[str] = field(default_factory=lambda: list(AGENTS))
    steps: int = 50000
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    hidden: int = 100
    updates_per_step: int = 64
    batch_size: int = 64
    buffer_size: int = 4096
    lr: float = 1e-3
    # Adam's eps, for every agent (torch's default is 1e-8). Larger values damp the steps of
    # parameters whose gradient is tiny: under Adam's normalisation a weight that only the KL
    # pulls (its data left the buffer) moves to the prior at ~lr per update however small the
    # KL's weight. 1e-2 with likelihood noise 0.01 (below), from the 50000-step runs of
    # sessions 26-28 on seeds 0-4 (docs/RESULTS.md, bandit, "Session 28"): the Bayesian agent
    # the lowest of the four agents trained with it. Runs made before session 28 used 1e-8
    # (their config.json says so; --resume reads it)
    adam_eps: float = 1e-2
    thompson_samples: int = 2
    # BBB training steps: weight-space sampling (the paper's algorithm; the fused update)
    estimator: str = "reparam"
    # Prior, likelihood noise and initial rho: chosen on short runs (1500 steps, 16 updates per
    # step, seeds 0-2; docs/RESULTS.md, bandit section): the scale mixture (pi 1/2, e^0, e^-6)
    # stayed near the always-pass policy for ~600 steps (regret 3465 against 1428 for these).
    # Likelihood noise 0.1 (was 0.5), from 10000-step runs (64 updates per step, seeds 0-2,
    # session 3): cumulative regret 4098 +- 154 against 5303 +- 639, lower on every seed, and
    # 0.19 regret per step over steps 8001-10000 against 0.33 (noise 1: 8317, 0.45). Then 0.01
    # with Adam's eps 1e-2 (above; session 28): at 50000 steps on seeds 0-4, 8439 +- 5191
    # against the 0.1 / 1e-8 agent's 18347 +- 4042 (a sharper likelihood keeps what the
    # buffer shows; the larger eps keeps weights whose data left it from drifting to the prior)
    prior: str = "gaussian"
    prior_sigma: float = 1.0  # gaussian / laplace
    prior_pi: float = 0.5
    prior_sigma1: float = 1.0
    prior_sigma2: float = math.exp(-6)
    noise_sigma: float = 0.01  # Gaussian likelihood of the BBB agent's reward model
    rho_init: float = -3.0
    # The ELBO's data-set size N (the loss is mean NLL + KL / N): "buffer", the buffer's current
    # size (the protocol of issue 6, at most buffer_size), or "seen", every interaction so far
    # (the buffer then stands for the whole history, as a minibatch stands for a data set; a
    # variant, not the paper's agent), or "capacity", buffer_size from the first step (the KL
    # weight of a full buffer throughout; a variant: the protocol's N = 1, 2, ... weighs the
    # KL thousands of times more than the data in the first steps)
    kl_data_size: str = "buffer"
    # Every this many steps the Bayesian agent's prior becomes its posterior of that moment (a
    # Gaussian per weight, its mean and sigma, fixed until the next update), as in variational
    # continual learning (Nguyen, Li, Bui and Turner, ICLR 2018): what left the buffer stays in
    # the prior instead of the KL pulling it back to N(0, prior_sigma^2). 0: never (the
    # protocol). A variant, not the paper's agent; Gaussian prior and the fused (reparam)
    # update only (with kernels "native", the noise and the sample are native, the per-weight
    # KL gradient eager: the native kernels take one prior for all weights).
    prior_update: int = 0
    # bbb.kernels backend of the Bayesian agent's update: eager, or native (C noise and the
    # fused sample / closed-form KL gradients, float32 on CPU with the Gaussian prior; the noise
    # has torch.randn's distribution but other numbers, so a run keeps its backend)
    kernels: str = "eager"
    checkpoint_every: int = 500
    data_dir: str | None = None

    def validate(self) -> BanditConfig:
        # agents and seeds as lists, whatever sequence was passed (a tuple or range): the run's
        # config.json holds lists, and --resume compares the settings with it, so a tuple of
        # the same values refused the resume as "other settings" (a range failed to save)
        for key in ("agents", "seeds"):
            v = getattr(self, key)
            if isinstance(v, str | bytes) or not isinstance(v, list | tuple | range):
                raise ValueError(f"{key} must be a list, got {v!r}")
            setattr(self, key, list(v))
        unknown = [a for a in self.agents if a not in AGENTS]
        if unknown or not self.agents:
            raise ValueError(f"unknown agent(s) {unknown}; accepted values: {', '.join(AGENTS)}")
        if len(set(self.agents)) != len(self.agents):
            raise ValueError(f"agents must be distinct, got {self.agents!r}")
        for key in (
            "steps",
            "hidden",
            "updates_per_step",
            "batch_size",
            "buffer_size",
            "thompson_samples",
            "checkpoint_every",
        ):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds!r}")
        # the run derives its generators from the seeds by fixed offsets (initialisation:
        # seeds[0]; environment streams: 10000 + seed; agents' noise: 20000 + seeds[0]), so a
        # seed of 10000 or more would share a stream with another seed's generator
        if any(s >= SEED_LIMIT for s in self.seeds):
            raise ValueError(
                f"seeds must be below {SEED_LIMIT} (the environment and agent generators are "
                f"seeded at 10000 + seed and 20000 + seed, which would collide), got {self.seeds!r}"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        from ..nn.estimators import ESTIMATORS
        from ..priors import PRIOR_NAMES

        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {self.estimator!r}; accepted values: {', '.join(ESTIMATORS)}"
            )
        if self.prior not in PRIOR_NAMES:
            raise ValueError(
                f"unknown prior {self.prior!r}; accepted values: {', '.join(PRIOR_NAMES)}"
            )
        for key in ("lr", "noise_sigma", "adam_eps"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{key} must be a finite positive number, got {v!r}")
        if self.kl_data_size not in KL_DATA_SIZES:
            raise ValueError(
                f"unknown kl_data_size {self.kl_data_size!r}; accepted values: "
                f"{', '.join(KL_DATA_SIZES)}"
            )
        if self.kernels not in BANDIT_KERNELS:
            raise ValueError(
                f"unknown kernels {self.kernels!r}; accepted values: {', '.join(BANDIT_KERNELS)}"
            )
        pu = self.prior_update
        if isinstance(pu, bool) or not isinstance(pu, int) or pu < 0:
            raise ValueError(f"prior_update must be a non-negative integer (0: never), got {pu!r}")
        if pu and (self.prior != "gaussian" or self.estimator != "reparam"):
            raise ValueError(
                "prior_update needs prior 'gaussian' and estimator 'reparam' (the fused "
                f"update's closed-form KL), got prior {self.prior!r}, estimator {self.estimator!r}"
            )
        if not math.isfinite(self.rho_init):
            raise ValueError(f"rho_init must be finite, got {self.rho_init!r}")
        make_prior_from(self)  # the prior's own checks (sigma > 0, pi in (0, 1), ...)
        return self


def make_prior_from(cfg: BanditConfig) -> Prior:
    if cfg.prior == "scale_mixture":
        return make_prior(
            "scale_mixture", pi=cfg.prior_pi, sigma1=cfg.prior_sigma1, sigma2=cfg.prior_sigma2
        )
    if cfg.prior == "laplace":
        return make_prior("laplace", scale=cfg.prior_sigma)
    return make_prior(cfg.prior, sigma=cfg.prior_sigma)


# settings a resumed run may change: how long it runs and where it reads and saves
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "data_dir")


#: settings added after runs were made, with the value those runs used (their config.json
#: lacks the key)
_LEGACY_SETTINGS = {
    "kl_data_size": "buffer",
    "kernels": "eager",
    "adam_eps": 1e-8,
    "prior_update": 0,
}


def read_saved_config(path: Path) -> BanditConfig:
    """The :class:`BanditConfig` a run saved in ``path`` (its ``config.json``), with the
    settings added since filled in as the runs before them used them (``_LEGACY_SETTINGS``,
    as ``--resume`` reads it); a key this version does not know is a ValueError naming the
    file."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} does not hold a bandit run's settings (not a JSON object)")
    known = {f.name for f in fields(BanditConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {', '.join(unknown)} (a run of another bbb version?)"
        )
    return BanditConfig(**{**_LEGACY_SETTINGS, **saved})


def _check_same_config(path: Path, cfg: BanditConfig) -> None:
    """Refuse to resume a run with settings other than those it was started with."""
    if not path.is_file():
        raise ValueError(
            f"cannot resume: {path} does not exist (no run was started in {path.parent}; to "
            "start one there, leave out --resume)"
        )
    saved = {**_LEGACY_SETTINGS, **json.loads(path.read_text())}
    diff = changed_settings(saved, asdict(cfg), _RESUMABLE_CHANGES)
    if diff:
        raise ValueError(
            f"cannot resume {path.parent} with other settings ({'; '.join(diff)}); pass the "
            "run's own settings (see its config.json) or start a new --out"
        )
