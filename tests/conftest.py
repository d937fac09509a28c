"""Shared helpers for the tests of the Bayesian layers, KL, ELBO and predictive code.

Statistical assertions: every tolerance is a number of standard errors (``Z`` = 5 unless a
test says otherwise). The standard error is computed either from a known variance or from the
sample itself (for a sample variance: sqrt((m4 - s^4) / n), the large-n standard error of the
variance estimator, valid for any distribution with a finite fourth moment). A 5-SE deviation
has probability < 6e-7 under a normal approximation, and the seeds are fixed, so the tests are
deterministic and a failure means a real discrepancy.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings as _hypothesis_settings
from torch import Tensor

# Under pytest-xdist (`make test` runs `pytest -n auto`), each worker process runs one test at
# a time with one intra-op thread, it and the processes its tests start: with one worker per
# core, torch's default of one thread per core would put cores x cores threads on the machine,
# and OpenMP's per-op synchronisation made small-tensor tests many times slower (see
# single_thread). An OMP_NUM_THREADS the caller set is kept. Results do not depend on the
# thread count: the tests that compare a child process with this one pass the same count
# (torch.get_num_threads()), and those of a multi-threaded code path set their own count.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

Z = 5.0  # standard errors allowed by the statistical checks (see the module docstring)

# Property-based tests draw their examples from a seed fixed per test (derandomize), so every
# run checks the same examples: a failure is reproducible and never depends on the run (the
# examples were random per run before, and a float32 rounding case of brier() appeared in one
# run out of three). No example database: nothing is read from or written to .hypothesis/.
_hypothesis_settings.register_profile("bbb", derandomize=True, database=None)
_hypothesis_settings.load_profile("bbb")


@pytest.fixture(autouse=True)
def _global_seed() -> None:
    """Every test starts with torch's global generator (and Python's) seeded with 0.

    torch seeds its default generator differently in every process, so a test that drew from
    the global stream without seeding it checked other numbers in every run (and under xdist on
    every worker): a Monte Carlo bound asserted on such draws failed about one run in eight
    before its test was seeded. With this fixture a failure reproduces whatever ran before.
    """
    torch.manual_seed(0)
    random.seed(0)


class Stats:
    """Moment checks with tolerances derived from standard errors."""

    z = Z

    @staticmethod
    def mean_and_se(sample: Tensor, known_var: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sample mean over dim 0 and its standard error (known variance, or the sample's)."""
        n = sample.shape[0]
        var = sample.var(0) if known_var is None else known_var
        return sample.mean(0), (var / n).sqrt()

    @staticmethod
    def var_and_se(sample: Tensor) -> tuple[Tensor, Tensor]:
        """Unbiased sample variance over dim 0 and its standard error sqrt((m4 - s^4) / n)."""
        n = sample.shape[0]
        c = sample - sample.mean(0, keepdim=True)
        var = c.pow(2).sum(0) / (n - 1)
        m4 = c.pow(4).mean(0)
        return var, ((m4 - var * var).clamp_min(0) / n).sqrt()

    @classmethod
    def assert_mean(
        cls, sample: Tensor, expected: Tensor, known_var: Tensor | None = None, what: str = "mean"
    ) -> None:
        m, se = cls.mean_and_se(sample, known_var)
        dev = (m - expected).abs()
        # tolerance: Z standard errors of the sample mean
        assert torch.all(dev <= cls.z * se), (
            f"{what}: max deviation {float((dev / se).max()):.2f} standard errors"
        )

    @classmethod
    def assert_var(cls, sample: Tensor, expected: Tensor, what: str = "variance") -> None:
        v, se = cls.var_and_se(sample)
        dev = (v - expected).abs()
        # tolerance: Z standard errors of the sample variance (SE from the sample's 4th moment)
        assert torch.all(dev <= cls.z * se), (
            f"{what}: max deviation {float((dev / se).max()):.2f} standard errors"
        )

    @classmethod
    def assert_same_moments(cls, a: Tensor, b: Tensor, what: str = "") -> None:
        """Two independent samples (over dim 0) have the same means and variances."""
        ma, sea = cls.mean_and_se(a)
        mb, seb = cls.mean_and_se(b)
        se = (sea**2 + seb**2).sqrt()
        # tolerance: Z standard errors of the difference of two independent sample means
        assert torch.all((ma - mb).abs() <= cls.z * se), (
            f"{what} means differ by {float(((ma - mb).abs() / se).max()):.2f} SE"
        )
        va, sva = cls.var_and_se(a)
        vb, svb = cls.var_and_se(b)
        se = (sva**2 + svb**2).sqrt()
        # tolerance: Z standard errors of the difference of two independent sample variances
        assert torch.all((va - vb).abs() <= cls.z * se), (
            f"{what} variances differ by {float(((va - vb).abs() / se).max()):.2f} SE"
        )


@pytest.fixture
def stats() -> type[Stats]:
    """The :class:`Stats` helpers (SE-based moment assertions)."""
    return Stats


@pytest.fixture
def float64_default():
    """Run a test with float64 as the default dtype (restored afterwards).

    Priors store their hyper-parameters in the default dtype, so this is how a test gets priors
    whose buffers hold exactly the float64 value it passed.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards).

    The tests here use many small tensor ops; with several threads per process and other
    processes competing for the cores, OpenMP's per-op synchronisation made them 10-50x slower
    (measured on a 2-core machine under load). Results do not depend on the thread count; the
    one test of the multi-threaded noise fill sets its own thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def lock_held_by_another_process(run_dir: Path) -> Iterator[int]:
    """Another Python process holds ``bbb.train.checkpoint.RunLock(run_dir)`` (a job still
    training there) until the block ends; yields that process's pid."""
    holder = (
        "import sys\n"
        "from bbb.train.checkpoint import RunLock\n"
        f"with RunLock({str(run_dir)!r}):\n"
        "    print('locked', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.communicate("\n", timeout=60)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(
    worker: Callable[..., None], args: tuple, nprocs: int, out: Path, timeout_s: float = 300
) -> object:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; return ``torch.load(out)``
    (what the workers saved there). A rank's failure is raised here; a run still going after
    ``timeout_s`` (a hung collective) is killed and fails the test instead of the suite."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=0.5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs}-process run did not finish in {timeout_s} s")
    return torch.load(out, weights_only=True)
