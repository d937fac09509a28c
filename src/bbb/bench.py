"""Training-step benchmark of bbb's Bayesian layers against plain layers and peer libraries.

``bbb bench`` (or ``python benchmarks/step_time.py``) measures, in one process:

1. **Step time**: one full training step (forward, KL, ELBO, backward, Adam step) of an MLP
   784-H-H-10 (batch 128) for each H in ``--sizes`` and of a small convnet on 1x28x28 inputs
   (two Bayesian 3x3 conv layers + a Bayesian linear head), for each estimator, number of
   samples and prior; the same networks made of ``nn.Linear``/``nn.Conv2d`` (the floor); and
   the peer libraries found installed (:mod:`bbb.bench_peers`). Configurations of one network
   are timed **interleaved** (round-robin, one step each, ``--repeats`` rounds after
   ``--warmup`` steps each) and summarised by the median; the ratio is to the deterministic
   network of the same round-robin.
2. **Inference**: inputs per second of :func:`bbb.predict` with 100 weight samples on 10000
   MNIST-sized inputs (``--quick``: fewer).
3. **Peak memory** for ``num_samples=10``: each configuration runs in a fresh subprocess (with
   this process's allocator setting, ``--no-tune-allocator``) that reads its resident-set
   high-water mark (``VmHWM`` of ``/proc/self/status``, which counts
   torch's CPU tensors, unlike ``tracemalloc``) after building the model and again after three
   training steps; we report the peak and its increase over the built model. (Not
   ``getrusage().ru_maxrss``: Linux carries it over ``fork`` + ``exec``, so a child of a big
   benchmark process would report the parent's peak. It is the fallback off Linux.) A
   configuration whose subprocess fails keeps its row, with ``peak_mib``/``step_mib`` null
   and ``error`` (the child's last error line).
4. **Gradient variance**: per estimator, the unbiased variance over ``--variance-draws``
   repeated draws (at least two) of the gradient of the ELBO loss on one fixed minibatch with
   respect to ``weight_mu`` and ``weight_rho`` (averaged over all weights), at one fixed point
   in training shared by all estimators (the same parameters).

The table format and JSON keys are stable: they are how regressions are found. With ``--json``
the file is written after each part; ``complete`` is false until every requested part is in it
(a run that failed or was stopped keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bench_peers
from . import kernels as _kernels
from .allocator import allocator_tuned, tune_allocator
from .elbo import ELBO
from .likelihoods import Categorical
from .models import bayes_convnet, bayes_mlp, mlp
from .nn.estimators import ESTIMATORS
from .predictive import predict
from .priors import GaussianPrior, Prior, ScaleMixturePrior
from .train.checkpoint import atomic_write_text, strict_json

__all__ = [
    "BenchError",
    "StepResult",
    "build_parser",
    "check_options",
    "main",
    "run_benchmark",
    "format_table",
]

BATCH = 128
DATASET_SIZE = 60_000
PRIORS = ("gaussian", "scale_mixture")
NETS = ("mlp", "conv")
SCHEMA_VERSION = 1

Step = Callable[[], float]


@dataclass
class StepResult:
    """One row of the step-time table."""

    net: str  # "mlp" or "conv"
    hidden: int  # H for the MLP, 0 for the convnet
    library: str  # "deterministic", "bbb", a peer name
    estimator: str  # "-" for the deterministic network
    prior: str  # "gaussian", "scale_mixture" or "-"
    num_samples: int
    ms: float  # median milliseconds per step
    ratio: float  # ms / ms of the deterministic network of the same round-robin
    samples_ratio: float | None = None  # ms / ms of the same config with num_samples=1
    ms_all: list[float] = field(default_factory=list)  # every measurement (ms)


# ----------------------------------------------------------------------------- builders
def make_prior(name: str) -> Prior:
    """The benchmark's priors: N(0, 1), and the paper's scale mixture (pi=0.5, 1, e^-6)."""
    if name == "gaussian":
        return GaussianPrior(1.0)
    if name == "scale_mixture":
        return ScaleMixturePrior(0.5, 1.0, math.exp(-6))
    raise ValueError(f"unknown prior {name!r}; accepted values: {', '.join(PRIORS)}")


def det_convnet() -> nn.Sequential:
    """The deterministic counterpart of :func:`bbb.models.bayes_convnet` (the floor)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def make_data(
    net: str, batch: int = BATCH, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """A synthetic MNIST-shaped minibatch on ``device`` (timing does not depend on the values).

    Every step builder puts its network on the device of ``x``.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 784) if net == "mlp" else (batch, 1, 28, 28)
    x, y = torch.randn(shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), y.to(device)


class BenchError(ValueError):
    """A refused option value of ``bbb bench``: out of range, an unknown name, an empty list,
    a device this machine lacks, a ``--json`` file that cannot be written. ``bbb`` prints it
    as one ``bbb: error:`` line with exit code 1, like every refused value (a malformed option,
    ``--sizes abc``, is a usage error: exit code 2)."""


def resolve_device(name: str) -> torch.device:
    """``--device`` checked: a torch device string whose backend (and index) is usable here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise BenchError(f"--device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name} but CUDA is not available to torch {torch.__version__}")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:  # failed at the first step, after the peers were imported
            raise BenchError(
                f"--device {name}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    return device


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_bbb_model(net: str, hidden: int, estimator: str, prior: str) -> nn.Module:
    """The bbb network of a configuration."""
    if net == "mlp":
        return bayes_mlp(784, [hidden, hidden], 10, estimator=estimator, prior=make_prior(prior))
    return bayes_convnet(1, 10, estimator=estimator, prior=make_prior(prior))


def _adam_step(
    model: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device, lr: float = 1e-3
) -> Step:
    """An Adam training step of ``model`` on ``loss_fn`` (the same helper the peers use)."""
    return bench_peers._optimizer_step(model, loss_fn, lr, device)


def build_step(
    library: str,
    net: str,
    hidden: int,
    estimator: str,
    prior: str,
    num_samples: int,
    x: Tensor,
    y: Tensor,
) -> Step | None:
    """A closure running one training step of a configuration (None: not offered)."""
    if library == "deterministic":
        model = mlp(784, [hidden, hidden], 10) if net == "mlp" else det_convnet()
        return _adam_step(model, lambda: F.cross_entropy(model(x), y), x.device)
    if library in ("bbb", "bbb-compile", "bbb-kernels", "bbb-native"):
        bmodel = make_bbb_model(net, hidden, estimator, prior)
        elbo = ELBO(Categorical(), DATASET_SIZE, num_samples=num_samples)
        if library == "bbb":
            return _adam_step(bmodel, lambda: elbo(bmodel, x, y).loss, x.device)
        if library in ("bbb-kernels", "bbb-native"):
            backend = "compile" if library == "bbb-kernels" else "native"
            step = _adam_step(bmodel, lambda: elbo(bmodel, x, y).loss, x.device)
            return _kernels_step(step, backend)
        return _compiled_step(bmodel, lambda: elbo(bmodel, x, y).loss, x.device)
    return bench_peers.build_peer_step(
        library, net, hidden, estimator, prior, num_samples, x, y, DATASET_SIZE
    )


def _compiled_step(
    model: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device
) -> Step | None:
    """The Adam step of ``model`` with ``loss_fn`` (forward + KL + ELBO) under ``torch.compile``.

    Compiled here, on a first call, so that the timed rounds measure the compiled code; None
    (with a warning naming the error) where compilation is not available (no C++ compiler,
    an unsupported platform): the variant is then left out of the table.
    """
    import warnings

    try:
        step = _adam_step(model, torch.compile(loss_fn), device)
        step()
    except Exception as err:  # noqa: BLE001 - any backend failure means "not offered here"
        warnings.warn(f"bbb bench: torch.compile unavailable ({err!r:.200}); skipped", stacklevel=2)
        return None
    return step


def _kernels_step(step: Step, backend: str = "compile") -> Step | None:
    """``step`` with bbb's kernels backend ``backend`` (:mod:`bbb.kernels`: ``"compile"``, the
    KL kernels compiled by torch.compile, or ``"native"``, the C kernels).

    Built and run once here, so that compilation is not timed; None (the variant left out of
    the table, with the kernels' own warning) where the backend is not available.
    """
    import warnings

    def run() -> float:
        with _kernels.use_kernels(backend):
            return step()  # the loss: it waits for the device, so a timed call is the whole step

    run()
    failed = {
        name: why
        for name, why in _kernels.failures().items()
        if (name == "native") == (backend == "native")  # this backend's failures only
    }
    if failed:
        name, why = next(iter(failed.items()))
        warnings.warn(f"bbb bench: kernel {name} not compiled ({why}); skipped", stacklevel=2)
        return None
    return run


# ----------------------------------------------------------------------------- step time
def _probe(key: str, *config: Any) -> Step | None:
    """``build_step(*config)`` and one step of it (a first warm-up); None if it is not offered or
    fails (a peer that breaks on this device or torch version is left out with a warning, the
    rest of the table is still measured)."""
    import warnings

    try:
        step = build_step(*config)
        if step is not None:
            step()
    except Exception as err:  # noqa: BLE001 - a broken peer must not lose the whole table
        warnings.warn(f"bbb bench: {key} failed ({err!r:.200}); left out", stacklevel=2)
        return None
    return step


def _interleaved(
    steps: Mapping[str, Callable[[], object]], warmup: int, repeats: int, inner: int = 1
) -> dict[str, list[float]]:
    """Round-robin timing: ``repeats`` rounds, ``inner`` steps of every configuration per round
    (more than one for steps too short to time alone); ms per step, one entry per round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            times[key].append((time.perf_counter() - t0) / inner * 1e3)
    return times


def run_step_times(
    nets: Sequence[tuple[str, int]],
    estimators: Sequence[str],
    samples: Sequence[int],
    priors: Sequence[str],
    peers: Sequence[str],
    warmup: int,
    repeats: int,
    log: Callable[[str], None] = print,
    batch: int = BATCH,
    compiled: bool = False,
    kernels: bool = False,
    device: torch.device | str = "cpu",
    native: bool = False,
) -> list[StepResult]:
    """Step times of every configuration, interleaved per network (see module doc)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer (timed rounds), got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    results: list[StepResult] = []
    for net, hidden in nets:
        x, y = make_data(net, batch=batch, device=device)
        configs: dict[str, tuple[str, str, str, int]] = {}
        steps: dict[str, Step] = {}
        det = build_step("deterministic", net, hidden, "-", "-", 1, x, y)
        assert det is not None
        steps["deterministic"] = det
        configs["deterministic"] = ("deterministic", "-", "-", 1)
        extra = [
            *(["bbb-compile"] if compiled else []),
            *(["bbb-kernels"] if kernels else []),
            *(["bbb-native"] if native else []),
        ]
        for lib in ("bbb", *extra, *peers):
            for est in estimators:
                for prior in priors:
                    for s in samples:
                        key = f"{lib}/{est}/{prior}/S={s}"
                        step = _probe(key, lib, net, hidden, est, prior, s, x, y)
                        if step is None:
                            continue
                        steps[key] = step
                        configs[key] = (lib, est, prior, s)
        label = f"{net} H={hidden}" if net == "mlp" else net
        log(f"[bench] {label}: {len(steps)} configurations x {repeats} rounds")
        times = _interleaved(steps, warmup, repeats)
        det_ms = statistics.median(times["deterministic"])
        by_key: dict[tuple[str, str, str, int], float] = {}
        first = len(results)  # this network's rows: results[first:]
        for key, (lib, est, prior, s) in configs.items():
            ms = statistics.median(times[key])
            by_key[(lib, est, prior, s)] = ms
            results.append(
                StepResult(
                    net=net,
                    hidden=hidden if net == "mlp" else 0,
                    library=lib,
                    estimator=est,
                    prior=prior,
                    num_samples=s,
                    ms=round(ms, 3),
                    ratio=round(ms / det_ms, 3),
                    ms_all=[round(t, 3) for t in times[key]],
                )
            )
        # this round-robin's rows only: a network listed twice (--sizes 400,400) had the
        # earlier rows' ratios taken to the later round's S=1 times; the unrounded medians
        for r in results[first:]:
            if r.num_samples == 1:
                continue
            one = by_key.get((r.library, r.estimator, r.prior, 1))
            if one is not None:
                ms = by_key[(r.library, r.estimator, r.prior, r.num_samples)]
                r.samples_ratio = round(ms / one, 3)
    return results


# ----------------------------------------------------------------------------- inference
def run_inference(
    hidden: int, num_inputs: int, num_samples: int = 100, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Throughput of :func:`bbb.predict` (``num_samples`` weight samples) per estimator."""
    device = torch.device(device)
    x = torch.randn(num_inputs, 784, generator=torch.Generator().manual_seed(1)).to(device)
    out: dict[str, Any] = {"hidden": hidden, "inputs": num_inputs, "num_samples": num_samples}
    rows = []
    for est in ESTIMATORS:
        model = make_bbb_model("mlp", hidden, est, "gaussian").to(device)
        with torch.no_grad():
            predict(model, x[: min(256, num_inputs)], num_samples=num_samples)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            predict(model, x, num_samples=num_samples)
            _sync(device)
            sec = time.perf_counter() - t0
        rows.append(
            {
                "estimator": est,
                "seconds": round(sec, 4),
                "inputs_per_s": round(num_inputs / sec, 1),
                "forward_samples_per_s": round(num_inputs * num_samples / sec, 1),
            }
        )
    out["rows"] = rows
    return out


# ----------------------------------------------------------------------------- memory
def _peak_rss_kib() -> int:
    """Resident-set high-water mark of this process image (KiB): VmHWM, else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # ru_maxrss is in KiB on Linux and the BSDs but in bytes on macOS
    return maxrss // 1024 if sys.platform == "darwin" else maxrss


def _memory_child(spec: str) -> None:
    """Subprocess entry: build one configuration, step three times, print the peak (KiB).

    On CPU the peak resident set of the process; on CUDA the peak of memory allocated on the
    device (``torch.cuda.max_memory_allocated``).
    """
    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    # the parent's allocator setting (a fresh process starts with glibc's defaults), so that
    # the peak is measured as the step-time table ran
    tuned = tune_allocator() if cfg.get("tune_allocator", False) else False
    device = torch.device(cfg.get("device", "cpu"))
    x, y = make_data(cfg["net"], batch=cfg["batch"], device=device)
    step = build_step(
        cfg["library"], cfg["net"], cfg["hidden"], cfg["estimator"], cfg["prior"],
        cfg["num_samples"], x, y,
    )  # fmt: skip

    def peak_kib() -> int:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) // 1024
        return _peak_rss_kib()

    base = peak_kib()
    if step is not None:
        for _ in range(3):
            step()
    peak = peak_kib()
    print(
        json.dumps(
            {
                "base_kib": base,
                "peak_kib": peak,
                "offered": step is not None,
                "allocator_tuned": tuned,
            }
        )
    )


def run_memory(
    nets: Sequence[tuple[str, int]],
    estimators: Sequence[str],
    peers: Sequence[str],
    num_samples: int = 10,
    batch: int = BATCH,
    device: torch.device | str = "cpu",
    tuned_allocator: bool | None = None,
) -> list[dict[str, Any]]:
    """Peak memory per configuration (Gaussian prior), one subprocess each: resident memory
    on CPU, memory allocated on the GPU with ``device`` cuda.

    Each subprocess tunes glibc's allocator (:func:`bbb.tune_allocator`) when
    ``tuned_allocator`` is true (None: as this process is, :func:`bbb.allocator.allocator_tuned`),
    so that memory is measured under the same allocator as the step times.

    Each row holds ``net, hidden, library, estimator, num_samples, peak_mib, step_mib``; a
    configuration whose subprocess failed has ``peak_mib`` and ``step_mib`` None and an
    ``error`` string (the last line the subprocess wrote to stderr).
    """
    if tuned_allocator is None:
        tuned_allocator = allocator_tuned()
    rows = []
    for net, hidden in nets:
        cfgs = [("deterministic", "-", "-", 1)]
        cfgs += [("bbb", e, "gaussian", num_samples) for e in estimators]
        cfgs += [
            (p, e, "gaussian", num_samples)
            for p in peers
            for e in estimators
            if e in bench_peers.PEER_ESTIMATORS[p]
        ]
        for lib, est, prior, s in cfgs:
            spec = {
                "net": net, "hidden": hidden, "library": lib, "estimator": est,
                "prior": prior, "num_samples": s, "threads": torch.get_num_threads(), "batch": batch,
                "device": str(device), "tune_allocator": bool(tuned_allocator),
            }  # fmt: skip
            code = "import sys; from bbb.bench import _memory_child; _memory_child(sys.argv[1])"
            proc = subprocess.run(
                [sys.executable, "-c", code, json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
            )
            row: dict[str, Any] = {
                "net": net,
                "hidden": hidden if net == "mlp" else 0,
                "library": lib,
                "estimator": est,
                "num_samples": s,
            }
            if proc.returncode != 0:
                # the same keys as a measured row, no numbers, and the child's last error line
                lines = proc.stderr.strip().splitlines()
                error = lines[-1] if lines else f"exit code {proc.returncode}"
                rows.append({**row, "peak_mib": None, "step_mib": None, "error": error})
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if not res["offered"]:
                continue
            row["peak_mib"] = round(res["peak_kib"] / 1024, 1)
            row["step_mib"] = round((res["peak_kib"] - res["base_kib"]) / 1024, 1)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- variance
def run_grad_variance(
    hidden: int,
    draws: int,
    train_steps: int,
    estimators: Sequence[str] = ESTIMATORS,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Variance over draws of the minibatch loss gradient w.r.t. weight_mu and weight_rho.

    One reparam model is trained for ``train_steps`` steps (synthetic data, seed 0); its
    parameters are loaded into a model of every estimator, so all are measured at the same
    point. For each estimator, ``draws`` gradients of the ELBO loss on one fixed minibatch are
    taken; the per-weight variance over draws is averaged over all weights of the network.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an integer >= 2 (an unbiased variance), got {draws!r}")
    torch.manual_seed(0)
    x, y = make_data("mlp", seed=2, device=device)
    base = make_bbb_model("mlp", hidden, "reparam", "gaussian")
    elbo = ELBO(Categorical(), DATASET_SIZE)
    step = _adam_step(base, lambda: elbo(base, x, y).loss, x.device)
    for _ in range(train_steps):
        step()
    state = base.state_dict()
    measured: list[tuple[str, float, float]] = []  # (estimator, var_grad_mu, var_grad_rho)
    for est in estimators:
        model = make_bbb_model("mlp", hidden, est, "gaussian").to(x.device)
        model.load_state_dict(state)
        mus = [p for n, p in model.named_parameters() if n.endswith("weight_mu")]
        rhos = [p for n, p in model.named_parameters() if n.endswith("weight_rho")]
        g_mu, g_rho = [], []
        for _ in range(draws):
            model.zero_grad(set_to_none=True)
            elbo(model, x, y).loss.backward()
            g_mu.append(torch.cat([p.grad.reshape(-1) for p in mus]))  # type: ignore[union-attr]
            g_rho.append(torch.cat([p.grad.reshape(-1) for p in rhos]))  # type: ignore[union-attr]
        var_mu = torch.stack(g_mu).double().var(0).mean().item()
        var_rho = torch.stack(g_rho).double().var(0).mean().item()
        measured.append((est, var_mu, var_rho))
    best_mu = min(mu for _, mu, _ in measured)
    best_rho = min(rho for _, _, rho in measured)
    return [
        {
            "hidden": hidden,
            "draws": draws,
            "train_steps": train_steps,
            "estimator": est,
            "var_grad_mu": var_mu,
            "var_grad_rho": var_rho,
            "rel_mu": round(var_mu / best_mu, 3) if best_mu > 0 else None,
            "rel_rho": round(var_rho / best_rho, 3) if best_rho > 0 else None,
        }
        for est, var_mu, var_rho in measured
    ]


# ----------------------------------------------------------------------------- output
def format_table(results: Sequence[StepResult]) -> str:
    """The step-time table (stable format: one row per configuration)."""
    head = (
        f"{'net':<5} {'H':>5} {'library':<15} {'estimator':<9} {'prior':<13} {'S':>3} "
        f"{'ms/step':>9} {'x det':>7} {'x S=1':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        sr = "" if r.samples_ratio is None else f"{r.samples_ratio:.2f}"
        h = str(r.hidden) if r.net == "mlp" else "-"
        lines.append(
            f"{r.net:<5} {h:>5} {r.library:<15} {r.estimator:<9} {r.prior:<13} "
            f"{r.num_samples:>3} {r.ms:>9.2f} {r.ratio:>7.2f} {sr:>7}"
        )
    return "\n".join(lines)


def _format_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    lines = ["  ".join(f"{k:>14}" for k in keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Machine, torch version, thread count (and the GPU, on CUDA), stored with the results."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
    }


# ----------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    """A comma-separated list of integers (``--sizes``, ``--samples``). A word that is not an
    integer is a usage error naming the option (exit code 2); the values' range and an empty
    list are checked by :func:`check_options` (exit code 1, like every refused value)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _int(text: str) -> int:
    """An argparse type: an integer (its range is checked by :func:`check_options`)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


# the least value of each integer option (--threads may also be left out: torch's default)
_MINIMUMS = {
    "batch": 1,
    "repeats": 1,
    "warmup": 0,
    "threads": 1,
    "inference_inputs": 1,
    "variance_draws": 2,  # the variance is the unbiased one
}


def _check_json_path(path: Path) -> None:
    """``--json`` can be written: not a directory, in a directory that exists (or is made)
    and takes a new file. Checked before anything is measured: a failed write used to end
    the run after its step-time part, minutes of measurements lost."""
    import tempfile

    if path.is_dir():
        raise BenchError(f"--json {path} is a directory: give the name of the file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except (FileExistsError, NotADirectoryError):  # a file where a directory should be
        blocker = next((p for p in path.parents if p.exists()), path.parent)
        raise BenchError(
            f"--json {path}: {blocker} is a file, not a directory; nothing was measured"
        ) from None
    except OSError as e:
        raise BenchError(
            f"--json {path}: cannot write into {path.parent} ({e.strerror or e}); nothing was "
            "measured"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_options(args: argparse.Namespace) -> torch.device:
    """Refuse a bad option value of the benchmark with a :class:`BenchError` naming it, before
    anything is imported, tuned or measured; returns the ``--device`` to run on."""
    for option, names, accepted in (
        ("--nets", args.nets, NETS),
        ("--estimators", args.estimators, tuple(ESTIMATORS)),
        ("--priors", args.priors, PRIORS),
    ):
        listed = ", ".join(accepted)
        if not names:
            raise BenchError(f"{option} is empty; accepted values: {listed}")
        for name in names:
            if name not in accepted:
                what = option[2:-1]  # net, estimator, prior
                raise BenchError(f"{option}: unknown {what} {name!r}; accepted values: {listed}")
    for option, values in (("--sizes", args.sizes), ("--samples", args.samples)):
        if not values:
            raise BenchError(f"{option} is empty: give comma-separated positive integers")
        bad = [v for v in values if v < 1]
        if bad:
            raise BenchError(f"{option}: values must be positive integers, got {bad[0]}")
    # a value listed twice is a slip, refused like any other: --sizes 400,400 measured the
    # network twice (two identical-looking rows), a repeated estimator, prior or sample count
    # built its configuration twice and timed it once (run_step_times, the library function,
    # takes repeats as given)
    for option, values in (
        ("--sizes", args.sizes),
        ("--nets", args.nets),
        ("--estimators", args.estimators),
        ("--priors", args.priors),
        ("--samples", args.samples),
    ):
        seen: set[object] = set()
        for value in values:
            if value in seen:
                raise BenchError(f"{option} lists {value} twice: give each value once")
            seen.add(value)
    for dest, minimum in _MINIMUMS.items():
        value = getattr(args, dest)
        if value is not None and value < minimum:
            option = "--" + dest.replace("_", "-")
            raise BenchError(f"{option} must be an integer >= {minimum}, got {value}")
    device = resolve_device(getattr(args, "device", "cpu"))
    if args.json is not None:
        _check_json_path(Path(args.json))
    return device


def build_parser(
    prog: str = "bbb bench", parser_class: type[argparse.ArgumentParser] | None = None
) -> argparse.ArgumentParser:
    """Command-line options of the benchmark (``parser_class``: default ``ArgumentParser``)."""
    from .cli import HelpFormatter

    def csv(values: Sequence[object]) -> str:
        return ",".join(str(v) for v in values)

    p = (parser_class or argparse.ArgumentParser)(
        prog=prog,
        description="Training-step benchmark of bbb's Bayesian layers (issue 8).",
        formatter_class=HelpFormatter,
    )
    sizes, samples = [400, 1200], [1, 10]
    p.add_argument(
        "--sizes",
        type=_int_list,
        default=sizes,
        help=f"MLP hidden widths H, comma-separated (default: {csv(sizes)})",
    )
    p.add_argument(
        "--nets",
        type=_str_list,
        default=list(NETS),
        help=f"networks, comma-separated, from {', '.join(NETS)} (default: {csv(NETS)})",
    )
    p.add_argument(
        "--estimators",
        type=_str_list,
        default=list(ESTIMATORS),
        help=f"gradient estimators, comma-separated, from {', '.join(ESTIMATORS)} "
        f"(default: {csv(ESTIMATORS)})",
    )
    p.add_argument(
        "--samples",
        type=_int_list,
        default=samples,
        help=f"num_samples values, comma-separated (default: {csv(samples)})",
    )
    p.add_argument(
        "--priors",
        type=_str_list,
        default=list(PRIORS),
        help=f"priors, comma-separated, from {', '.join(PRIORS)} (default: {csv(PRIORS)})",
    )
    p.add_argument("--batch", type=_int, default=BATCH, help="minibatch size")
    p.add_argument("--repeats", type=_int, default=15, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=_int, default=3, help="warm-up steps per configuration")
    p.add_argument("--threads", type=_int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N]: where every network runs (timings wait for the GPU each step; "
        "memory is then the GPU's peak allocated)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--peers",
        dest="peers",
        action="store_true",
        default=True,
        help="also time the peer libraries installed (bayesian-torch, blitz, torchbnn, pyro) "
        "(default: on; --no-peers turns it off)",
    )
    p.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="time bbb only, not the peer libraries (default: off)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time bbb's step under torch.compile (library 'bbb-compile'; slow to build)",
    )
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also time bbb with its KL kernels compiled (library 'bbb-kernels', bbb.kernels)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="also time bbb with its native C kernels (library 'bbb-native', bbb.kernels; "
        "built on first use with the system C compiler)",
    )
    p.add_argument(
        "--no-tune-allocator",
        dest="tune_allocator",
        action="store_false",
        default=True,
        help="leave glibc's malloc as it is (default: bbb.tune_allocator() for the whole "
        "process, so every library's step reuses freed memory alike)",
    )
    p.add_argument(
        "--no-inference",
        dest="inference",
        action="store_false",
        default=True,
        help="skip the inference-throughput part (default: off, it runs)",
    )
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        default=True,
        help="skip the peak-memory part (default: off, it runs)",
    )
    p.add_argument(
        "--no-variance",
        dest="variance",
        action="store_false",
        default=True,
        help="skip the gradient-variance part (default: off, it runs)",
    )
    p.add_argument(
        "--inference-inputs",
        type=_int,
        default=10_000,
        help="inputs predicted in the inference part",
    )
    p.add_argument(
        "--variance-draws",
        type=_int,
        default=50,
        help="gradient draws per estimator in the gradient-variance part (at least 2: the "
        "variance is the unbiased one)",
    )
    return p


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every requested part and return the JSON-serialisable results.

    The results' ``command`` is ``args.command`` (set by `main` to the program and the options
    it parsed), or this process's ``sys.argv`` for a namespace built elsewhere.
    """
    device = check_options(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = args.sizes
    repeats, warmup, batch = args.repeats, args.warmup, args.batch
    inputs, draws, train_steps = args.inference_inputs, args.variance_draws, 200
    if args.quick:
        sizes = [min(s, 32) for s in sizes][:1] or [32]
        repeats, warmup, batch = min(repeats, 3), min(warmup, 1), min(batch, 8)
        inputs, draws, train_steps = min(inputs, 200), min(draws, 5), 5
    nets: list[tuple[str, int]] = []
    if "mlp" in args.nets:
        nets += [("mlp", h) for h in sizes]
    if "conv" in args.nets:
        nets.append(("conv", 0))
    peers = bench_peers.available_peers() if args.peers else []
    tuned = tune_allocator() if getattr(args, "tune_allocator", True) else False
    info = machine_info(device)
    info["allocator_tuned"] = tuned
    if info["gpu"]:
        log(f"[bench] device {device}: {info['gpu']}")
    log(f"[bench] {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, "
        f"allocator {'tuned (bbb.tune_allocator)' if tuned else 'as is'}")  # fmt: skip
    log(f"[bench] peers: {', '.join(peers) if peers else 'none'}")
    steps = run_step_times(
        nets,
        args.estimators,
        args.samples,
        args.priors,
        peers,
        warmup,
        repeats,
        log,
        batch,
        compiled=args.compile,
        kernels=getattr(args, "kernels", False),
        device=device,
        native=getattr(args, "native", False),
    )
    table = format_table(steps)
    log("\nStep time (median ms; x det: ratio to the deterministic network; x S=1)\n" + table)
    out: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "machine": info,
        # the options this run parsed (main() records them), not sys.argv: a caller's
        # bench.main(argv) runs inside another program (pytest, a script)
        "command": getattr(args, "command", None) or shlex.join(sys.argv),
        "settings": {
            "batch": batch,
            "dataset_size": DATASET_SIZE,
            "repeats": repeats,
            "warmup": warmup,
            "quick": bool(args.quick),
            "peers": peers,
        },
        "step_time": [asdict(r) for r in steps],
        "table": table,
        "complete": False,
    }

    def save() -> None:
        # after every part, atomically: a later part that fails (a GPU out of memory) or a
        # run stopped by a time limit (benchmarks/gpu.sh) keeps the parts measured so far
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.json, strict_json(out, indent=1) + "\n")

    save()
    if args.inference:
        inf = run_inference(max(sizes), inputs, device=device)
        out["inference"] = inf
        log(f"\nInference: bbb.predict, {inf['num_samples']} samples, {inputs} inputs, "
            f"H={inf['hidden']}\n"
            + _format_rows(inf["rows"], ["estimator", "seconds", "inputs_per_s"]))  # fmt: skip
        save()
    if args.memory:
        mem_nets = [(n, h) for n, h in nets if n != "mlp" or h == max(sizes)]
        mem_est = args.estimators[:1] if args.quick else args.estimators
        mem = run_memory(
            mem_nets,
            mem_est,
            [] if args.quick else peers,
            batch=batch,
            device=device,
            tuned_allocator=tuned,
        )
        out["memory"] = mem
        what = "GPU max_memory_allocated" if device.type == "cuda" else "VmHWM"
        log(f"\nPeak memory, num_samples=10 ({what} of a fresh process, MiB)\n"
            + _format_rows(mem, ["net", "library", "estimator", "peak_mib", "step_mib"]))  # fmt: skip
        save()
    if args.variance:
        var = run_grad_variance(min(sizes), draws, train_steps, args.estimators, device=device)
        out["grad_variance"] = var
        log(f"\nGradient variance (H={min(sizes)}, {draws} draws, after {train_steps} steps)\n"
            + _format_rows(var, ["estimator", "var_grad_mu", "var_grad_rho", "rel_mu",
                                 "rel_rho"]))  # fmt: skip
    out["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out["complete"] = True
    if args.json is not None:
        save()
        log(f"\n[bench] wrote {args.json}")
    return out


def main(argv: Sequence[str] | None = None, prog: str = "bbb bench") -> int:
    """Entry point of ``bbb bench`` (``bbb.cli.main`` prints its errors) and, through
    :func:`script_main`, of ``benchmarks/step_time.py``.

    A malformed command line raises :class:`bbb.cli.UsageError` (exit code 2), a refused value
    :class:`BenchError` (exit code 1).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    from .cli import _Parser

    args = build_parser(prog, parser_class=_Parser).parse_args(argv)
    args.command = shlex.join([*shlex.split(prog), *argv])  # recorded in the JSON
    run_benchmark(args)
    return 0


def script_main(argv: Sequence[str] | None = None, prog: str = "benchmarks/step_time.py") -> int:
    """Entry point of the benchmark run as a script: ``bbb bench``'s errors and exit codes
    under the script's name. An error is one line (``PROG: error: ...``; ``--debug`` shows
    the traceback): exit code 2 for a malformed command line, 1 for a refused value or a
    failure, 130 when interrupted (the ``--json`` file keeps the parts measured)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from .cli import UsageError

    try:
        return main(argv, prog=prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line, as bbb prints it, unless --debug
        if debug:
            raise
        print(f"{prog}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(script_main(prog="python -m bbb.bench"))
