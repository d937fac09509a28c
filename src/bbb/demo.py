"""``bbb demo``: the paper's regression curve (Blundell et al. 2015, section 5.2, Figure 5).

Trains a Bayesian MLP and a plain MLP of the same shape on noisy samples of
y = x + 0.3 sin(2 pi (x + e)) + 0.3 sin(4 pi (x + e)) + e, e ~ N(0, 0.02), x ~ U[0, 0.5],
with the same training loop (:class:`bbb.train.Trainer`), then plots the Bayesian network's
median with interquartile and 95% bands of the network output over weight samples (epistemic
uncertainty; the full predictive band, noise included, dashed) over [-0.2, 1.2] beside the
plain network, and writes ``metrics.json``: validation metrics, and the mean width of the 95%
bands inside the data range and outside it (the band must widen away from the data).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data.toy import load_toy, toy_curve_function
from .elbo import ELBO
from .likelihoods import Gaussian
from .models import bayes_mlp, mlp
from .plots import regression_band
from .priors import GaussianPrior
from .train.checkpoint import atomic_write_text, strict_json
from .train.trainer import Trainer, seed_everything

__all__ = ["run_demo"]


def _band_width(grid: torch.Tensor, q: torch.Tensor, low: float, high: float) -> float:
    sel = (grid[:, 0] >= low) & (grid[:, 0] <= high)
    return float((q[4] - q[0])[sel].mean())


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    n_train: int = 500,
    epochs: int = 300,
    hidden: int = 100,
    seed: int = 0,
    progress: bool = True,
    log: Any = print,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the demo; returns the metrics written to ``out_dir/metrics.json``.

    ``threads``: torch CPU threads while it runs (restored afterwards; ``None`` keeps the
    process's setting). The default, one, makes the numbers independent of the core count
    (the weight noise is drawn in one chunk per thread, so another thread count draws other
    noise) and is the fastest for this small network when other work shares the cores.
    """
    # the options' values first, named as the command spells them, before out_dir is created
    for name, value in (("n_train", n_train), ("epochs", epochs), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} ({flag}) must be a positive integer, got {value!r}")
    if not str(out_dir).strip():
        # Path("") is the working directory: the demo's files would land among the user's
        raise ValueError("out_dir (--out) is empty: give the demo's output directory")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads (--threads) must be a positive integer, got {threads!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, n_train, epochs, hidden, seed, progress, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    out_dir: str | Path, n_train: int, epochs: int, hidden: int, seed: int, progress: bool, log: Any
) -> dict[str, Any]:
    """The demo itself, under the thread setting :func:`run_demo` chose."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # Errno 17 'File exists' / 20 'Not a directory' named neither the option nor the file
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), out)
        where = "is a file" if blocker == out else f"is under {blocker}, which is a file"
        raise ValueError(
            f"the demo's output directory (--out) {out} {where}, not a directory: choose "
            "another --out"
        ) from None
    start = time.perf_counter()
    generator = seed_everything(seed)
    train, val = load_toy(n_train=n_train, n_val=200, seed=seed)
    val_loader = DataLoader(val, batch_size=len(val))

    def loader() -> DataLoader[Any]:
        return DataLoader(train, batch_size=64, shuffle=True, generator=generator)

    # Bayes by Backprop: local reparameterisation, 4 samples, Gaussian prior, learned noise.
    model = bayes_mlp(
        1, [hidden, hidden], 1, prior=GaussianPrior(1.0), estimator="local", mu_init="fan_in"
    )
    likelihood = Gaussian("learned", sigma=0.2)
    elbo = ELBO(likelihood, len(train), num_samples=4)
    opt = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=3e-3)
    if log:
        log(f"training Bayes by Backprop on {n_train} points for {epochs} epochs ...")
    bbb_trainer = Trainer(
        model,
        elbo,
        opt,
        loader(),
        val_loader=val_loader,
        epochs=epochs,
        out_dir=out / "bbb",
        progress=progress,
        log=None,
        loader_generator=generator,
    )
    bbb_summary = bbb_trainer.fit(overwrite=True)  # a re-run replaces the previous demo
    bbb_trainer.load_best()

    # The plain network: same shape, same loop, squared error (a fixed-noise Gaussian, no KL).
    plain = mlp(1, [hidden, hidden], 1)
    plain_lik = Gaussian("fixed", sigma=1.0)
    plain_elbo = ELBO(plain_lik, len(train), kl_scale=0.0)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=3e-3)
    if log:
        log("training the plain network ...")
    plain_trainer = Trainer(
        plain,
        plain_elbo,
        plain_opt,
        loader(),
        val_loader=val_loader,
        epochs=epochs,
        out_dir=out / "plain",
        val_samples=1,
        val_metric="rmse",
        progress=progress,
        log=None,
        loader_generator=generator,
    )
    plain_summary = plain_trainer.fit(overwrite=True)
    plain_trainer.load_best()

    band = regression_band(
        model,
        likelihood,
        train,
        out / "regression.png",
        baseline=plain,
        truth=toy_curve_function,
        title="Bayes by Backprop (bands) vs a plain network (red) on the curve of section 5.2",
    )
    grid, q, qy = band["grid"], band["quantiles"], band["predictive_quantiles"]
    inside = _band_width(grid, q, 0.0, 0.5)
    outside = _band_width(grid, q, 0.8, 1.2)
    metrics = {
        "bbb": {**bbb_summary, "val": bbb_trainer.history[bbb_trainer.best_epoch - 1]},
        "plain": {**plain_summary, "val": plain_trainer.history[plain_trainer.best_epoch - 1]},
        "learned_noise_std": float(likelihood.sigma.detach()[0]),
        "predictive_band95_width_inside_data": _band_width(grid, qy, 0.0, 0.5),
        "predictive_band95_width_outside_data": _band_width(grid, qy, 0.8, 1.2),
        "band95_width_inside_data": inside,
        "band95_width_outside_data": outside,
        "band_widening_ratio": outside / inside,
        "n_train": n_train,
        "epochs": epochs,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - start,
        "plot": str(out / "regression.png"),
    }
    atomic_write_text(out / "metrics.json", strict_json(metrics, indent=2) + "\n")
    if log:
        log(
            f"95% band width: {inside:.3f} inside the data [0, 0.5], {outside:.3f} on [0.8, 1.2] "
            f"(x{outside / inside:.1f}); plot: {out / 'regression.png'}; metrics: {out / 'metrics.json'}"
        )
    return metrics
