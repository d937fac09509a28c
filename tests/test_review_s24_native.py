"""Review s24 of the native and compiled kernels (issues #3, #8): the build's edges (a damaged
cached library, ``$CC`` with arguments, a failing compiler, no home directory), the backend
setting (restored when choosing it fails; no torch.compile under "native"), strided or
mismatched layer parameters, and the noise stream (counter arithmetic above 2^32 pairs
against a float64 reference, thread counts, statistics of 10^7 draws)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import bbb
from bbb import _native as N
from bbb import kernels as K

pytestmark = pytest.mark.skipif(
    not N.available(), reason=f"native library not available: {N.error()}"
)

G = ("gaussian", 0.0, 1.0)


@pytest.fixture(autouse=True)
def _eager_after() -> Iterator[None]:
    yield
    K.set_kernels("eager")


@pytest.fixture
def _fresh_library_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """load() as on a first call (restored after the test: the process's library stays)."""
    monkeypatch.setattr(N, "_tried", False)
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_error", None)
    monkeypatch.setattr(K, "_native_warned", False)


# ----------------------------------------------------------------------------- the build
@pytest.mark.slow
def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    """A damaged file in the cache (truncated: a full disk, an interrupted copy) was mapped
    by dlopen and the process died of SIGBUS; it is now detected by its hash and rebuilt."""
    code = (
        "import torch; from bbb import _native as N; assert N.available(), N.error(); "
        "torch.manual_seed(0); print(repr(N.normal((1000,)).sum().item()))"
    )
    env = {**os.environ, "BBB_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    (lib,) = tmp_path.glob("bbb_native-*.so")
    data = lib.read_bytes()
    lib.write_bytes(data[:1000])  # truncated in place, name unchanged
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])
    assert second.stdout == first.stdout  # the same library, the same noise
    (again,) = tmp_path.glob("bbb_native-*.so")
    assert again.read_bytes() == data  # rebuilt (the compile is deterministic), not kept


@pytest.mark.slow
def test_two_processes_building_at_once(tmp_path: Path) -> None:
    """Two first uses at once on an empty cache: both load a library (each compiles to a
    name of its own and renames it into place), one library is left, no partial file."""
    code = "from bbb import _native as N; assert N.available(), N.error()"
    env = {**os.environ, "BBB_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("bbb_native-*.so")).name]


def _logging_compiler(tmp_path: Path, rc: int) -> tuple[str, Path]:
    """A $CC value with an argument of its own: a shell script that logs its arguments and
    runs the real compiler (rc 0) or fails (rc 1)."""
    log = tmp_path / "cc.log"
    script = tmp_path / "wrapped cc.sh"  # a space in the path: $CC is split as a shell would
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    run = f'exec {real} "$@"' if rc == 0 else "echo 'wrapped: cannot compile' >&2; exit 1"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{run}\n')
    return f"sh '{script}' -DBBB_FROM_CC=1", log


def test_cc_with_arguments_is_split_and_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CC="ccache gcc" or CC="gcc -m64" (a program and its arguments, as make takes it) was
    looked up as one file name, not found, and silently replaced by cc."""
    cc, log = _logging_compiler(tmp_path, rc=1)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("BBB_CACHE_DIR", str(tmp_path / "cache"))
    argv = N._compiler()
    assert argv == [shutil.which("sh"), str(tmp_path / "wrapped cc.sh"), "-DBBB_FROM_CC=1"]
    with pytest.raises(RuntimeError, match="wrapped: cannot compile"):
        N._build(argv)
    lines = log.read_text().splitlines()
    assert lines[0] == "-DBBB_FROM_CC=1 --version"
    assert all(line.startswith("-DBBB_FROM_CC=1 ") and "bbb_native.c" in line for line in lines[1:])
    assert len(lines) == 1 + len(N._flag_sets())  # every flag set tried
    assert not list((tmp_path / "cache").iterdir())  # no partial file left behind


@pytest.mark.usefixtures("_fresh_library_state")
def test_a_failing_compiler_falls_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cc, _ = _logging_compiler(tmp_path, rc=1)
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("BBB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="native library is not available.*cannot compile"):
        bbb.set_kernels("native")
    assert "cannot compile" in K.failures()["native"]
    torch.manual_seed(0)
    layer = bbb.BayesLinear(3, 2, prior=bbb.GaussianPrior(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        y = layer(torch.randn(4, 3))
        bbb.set_kernels("native")
    assert y.shape == (4, 2) and layer._record is not None and layer._record.kl_w is None


@pytest.mark.parametrize("home", ["tilde", "raises"])
def test_cache_dir_without_a_home_directory(
    home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No $HOME and a uid without a passwd entry (containers): Path.home() is "~" on
    Python 3.11 (a folder "~" was made in the working directory and the library built
    there) or raises RuntimeError on 3.12 (the native backend was disabled)."""
    monkeypatch.delenv("BBB_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)

    def fake_home() -> Path:
        if home == "raises":
            raise RuntimeError("Could not determine home directory.")
        return Path("~")

    monkeypatch.setattr(Path, "home", staticmethod(fake_home))
    got = N._cache_dir()
    assert got.is_absolute() and got.is_dir()
    assert not (tmp_path / "~").exists()


# ----------------------------------------------------------------------------- the setting
@pytest.mark.usefixtures("_fresh_library_state")
def test_use_kernels_restores_the_backend_when_choosing_it_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under -W error, "native"'s unavailable-library warning is raised inside use_kernels'
    set_kernels, after the setting had changed and before the try: it stayed "native"."""
    monkeypatch.setattr(N, "_compiler", lambda: None)
    assert K.get_kernels() == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="no C compiler found"), K.use_kernels("native"):
            pass  # pragma: no cover - not reached
    assert K.get_kernels() == "eager"
    with pytest.raises(KeyError), K.use_kernels("compile"):  # the body raising: restored too
        raise KeyError("x")
    assert K.get_kernels() == "eager"


def test_native_backend_does_not_run_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public fused helpers (gaussian_kl_grads, sample_and_kl) compiled with torch.compile
    under the "native" backend too (seconds per kernel, or a 'torch.compile failed' warning
    where there is no C++ compiler); they run eagerly there."""
    calls: list[object] = []

    def no_compile(*args: object, **kwargs: object) -> object:
        calls.append(args)
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", no_compile)
    for kernel in [K._K_GAUSSIAN_KL, *K._K_FWD.values(), K._K_BWD_EPS]:
        monkeypatch.setattr(kernel, "_compiled", None)
        monkeypatch.setattr(kernel, "failed", None)
    g = torch.Generator().manual_seed(0)
    mu, rho, eps = (torch.randn(3, 4, generator=g) for _ in range(3))
    mu.requires_grad_(True)
    prior = bbb.GaussianPrior(0.5)
    out = {}
    for backend in ("eager", "native"):
        K.set_kernels(backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sigma = torch.nn.functional.softplus(rho)
            grads = K.gaussian_kl_grads(mu.detach(), rho, sigma, torch.tensor(1.0), 0.0, 4.0)
            t, kl = K.sample_and_kl("reparam", mu, rho, eps, prior)
            (t.sum() + kl).backward()
        out[backend] = [*grads, t.detach(), kl.detach(), mu.grad.clone()]
        mu.grad = None
    assert calls == []
    for a, b in zip(out["eager"], out["native"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- layer inputs
@pytest.mark.parametrize("estimator", ["reparam", "flipout", "local"])
def test_native_layer_with_a_strided_bias(estimator: str) -> None:
    """A bias mu sliced from a larger tensor (strided) passed the layer's check (which looks
    at the weights' mu) and the native kernel refused it: ValueError 'mu must be a
    contiguous float32 CPU tensor' in the forward. It is now copied, like a strided rho."""
    K.set_kernels("native")
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for strided in (False, True):
        torch.manual_seed(0)
        layer = bbb.BayesLinear(4, 3, prior=bbb.GaussianPrior(0.5), estimator=estimator)
        if strided:
            with torch.no_grad():
                big = torch.zeros(6)
                big[::2] = layer.bias_mu
                wide = torch.zeros(4, 6)
                wide[:, ::2] = layer.weight_rho.t()
            layer.bias_mu = torch.nn.Parameter(big[::2])
            layer.bias_rho = torch.nn.Parameter(layer.bias_rho.detach().flip(0).flip(0))
            layer.weight_rho = torch.nn.Parameter(wide[:, ::2].t())  # transposed and strided
            assert not layer.bias_mu.is_contiguous() and not layer.weight_rho.is_contiguous()
        torch.manual_seed(1)
        y = layer(x)
        assert layer._record is not None and layer._record.kl_w is not None  # the native node
        kl = layer.kl()  # the node's (a recomputed one would sum in another order)
        ((y**2).sum() + kl).backward()
        results.append([y.detach(), kl.detach()] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_native_layer_names_a_parameter_of_another_dtype() -> None:
    K.set_kernels("native")
    mu, rho = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(
        ValueError, match="bias_rho must be a float32 CPU tensor, got torch.float64"
    ):
        K.native_layer_sample_and_kl(
            "reparam", mu, rho, torch.zeros(3), torch.zeros(3, dtype=torch.float64),
            bbb.GaussianPrior(1.0),
        )  # fmt: skip


# ----------------------------------------------------------------------------- the stream
_MASK = np.uint64(0xFFFFFFFF)


def _threefry_np(c0: np.ndarray, c1: np.ndarray, k0: int, k1: int) -> tuple[np.ndarray, ...]:
    """Threefry-2x32-20 in numpy (Salmon et al. 2011), for the reference below."""
    ks = [np.uint32(k0), np.uint32(k1), np.uint32(0x1BD11BDA ^ k0 ^ k1)]
    rot = [13, 15, 26, 6, 17, 29, 16, 24]
    with np.errstate(over="ignore"):
        x0, x1 = c0 + ks[0], c1 + ks[1]
        for block in range(5):
            for i in range(4):
                r = np.uint32(rot[(block % 2) * 4 + i])
                x0 = x0 + x1
                x1 = ((x1 << r) | (x1 >> np.uint32(32 - r))) ^ x0
            x0 = x0 + ks[(block + 1) % 3]
            x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _reference_normals(start: int, n: int, k0: int, k1: int) -> np.ndarray:
    """Elements [start, start + n) of the stream in float64 from the C file's definition:
    tile t, pair j: counter t * 256 + j (64 bits: low word, high word), its uniforms as the C
    code rounds them to float32, exact log, sqrt, cos and sin."""
    tiles = np.arange(start // 512, start // 512 + -(-n // 512), dtype=np.uint64)
    c = (tiles[:, None] * np.uint64(256) + np.arange(256, dtype=np.uint64)).ravel()
    x0, x1 = _threefry_np((c & _MASK).astype(np.uint32), (c >> np.uint64(32)).astype(np.uint32), k0, k1)  # fmt: skip
    u1 = ((x0 >> np.uint32(1)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-31)
    u2 = (x1 >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    rad = np.sqrt(-2 * np.log(u1.astype(np.float64)))
    angle = 2 * np.pi * u2.astype(np.float64)
    z = np.concatenate(
        [(rad * np.cos(angle)).reshape(-1, 256), (rad * np.sin(angle)).reshape(-1, 256)], axis=1
    )
    return z.ravel()[:n]


def test_threefry_reference_matches_known_answers() -> None:
    # the reference itself against Random123's kat_vectors (as tests/test_native.py)
    out = _threefry_np(np.array([0x243F6A88], np.uint32), np.array([0x85A308D3], np.uint32),
                       0x13198A2E, 0x03707344)  # fmt: skip
    assert (int(out[0][0]), int(out[1][0])) == (0xC4923A9C, 0x483DF7A0)


@pytest.mark.parametrize(
    "start", [0, 512 * 1001, (2**32 - 2) * 512, 2**32 * 512, 2**41 + 512 * 7, 2**61]
)
def test_stream_equals_its_float64_definition_at_large_counters(start: int) -> None:
    """Counters above 2^32 pairs (the high word; int64 arithmetic in C), the uniforms and the
    inline log/sqrt/cos/sin against float64: at most 1e-6 absolute (a few float32 ulps of
    |z| < 7; measured 5e-7 over 8M draws)."""
    lib = N.load()
    assert lib is not None
    n = 3 * 512 + 77  # a partial last tile
    out = torch.empty(n)
    lib.bbb_normal(out.data_ptr(), start, n, 0x9E3779B9, 0x7F4A7C15, 1)
    want = _reference_normals(start, n, 0x9E3779B9, 0x7F4A7C15)
    np.testing.assert_allclose(out.double().numpy(), want, rtol=0, atol=1e-6)


def test_fused_kernels_same_with_three_threads_and_several_samples() -> None:
    """1, 2 and 3 threads: the same noise, tensors, KL and gradients bit for bit, for the
    mixture's Monte Carlo KL with three weight samples over five blocks (the last partial and
    not a multiple of the 512-element tile), and for the local kind."""
    n = 4 * 32768 + 1000 + 3
    g = torch.Generator().manual_seed(2)
    mu, rho = torch.randn(n, generator=g), torch.rand(n, generator=g) * 6 - 7
    prior = ("mixture", -1.2, 4.0, 1.0, math.exp(12))
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            torch.manual_seed(4)
            tt, kl, sigma, eps = N.sample_kl_fwd("flipout", mu, rho, prior, samples=3)
            up = torch.randn(3, n, generator=torch.Generator().manual_seed(5))
            gm, gr = N.sample_kl_bwd("flipout", mu, rho, sigma, eps, up, 0.3, prior, g_mu=mu)
            tl, kll, _, _ = N.sample_kl_fwd("local", mu, rho, G)
            out.append((tt, torch.tensor(kl), eps, gm, gr, tl, torch.tensor(kll)))
        for t in (1, 2, 3):  # the plain noise too (tiles shared among the threads)
            torch.set_num_threads(t)
            torch.manual_seed(4)
            out[t - 1] += (N.normal((n,)),)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(out[0][2][0], out[0][2][1])  # the samples' noise differs
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_ten_million_normals_moments_and_tails() -> None:
    """10^7 draws: standardized mean, variance, skewness and excess kurtosis, whose standard
    errors are sqrt(1 / n), sqrt(2 / n), sqrt(6 / n) and sqrt(24 / n), within 5 SE; the
    frequencies of |Z| > 3, 4 and 5 within 5 binomial SE of their normal probabilities; the
    two members of a Box-Muller pair (elements j and 256 + j of a tile) and the neighbours
    across a tile boundary uncorrelated (SE 1/sqrt(m)), also in their squares (the radius)."""
    n = 10_000_000
    torch.manual_seed(11)
    z = N.normal((n,)).double().numpy()
    se = 1 / math.sqrt(n)
    m, v = z.mean(), z.var()
    assert abs(m) < 5 * se
    assert abs(v - 1) < 5 * math.sqrt(2) * se
    d = (z - m) / math.sqrt(v)
    assert abs((d**3).mean()) < 5 * math.sqrt(6) * se
    assert abs((d**4).mean() - 3) < 5 * math.sqrt(24) * se
    for c in (3, 4, 5):
        p = math.erfc(c / math.sqrt(2))
        assert abs((np.abs(z) > c).mean() - p) < 5 * math.sqrt(p * (1 - p) / n), c
    assert np.abs(z).max() < math.sqrt(2 * 32 * math.log(2)) + 1e-5  # the attainable bound
    tiles = z[: n // 512 * 512].reshape(-1, 512)
    pairs = [(tiles[:, :256].ravel(), tiles[:, 256:].ravel()), (tiles[:-1, -1], tiles[1:, 0])]
    for a, b in pairs:
        lim = 5 / math.sqrt(a.size)
        assert abs(np.corrcoef(a, b)[0, 1]) < lim
        assert abs(np.corrcoef(a * a, b * b)[0, 1]) < lim


# ----------------------------------------------------------------------------- default device
def test_native_noise_and_kernels_ignore_the_default_device() -> None:
    """Under torch.set_default_device / `with torch.device(...)` (meta here; cuda likewise),
    the key was drawn on that device (meta: RuntimeError 'Tensor.item() cannot be called on
    meta tensors'; cuda: from the CUDA generator) and the outputs allocated there, for the C
    code to write through a null (meta) or device (cuda) pointer. Now: the CPU, the same
    numbers as without the context."""
    g = torch.Generator().manual_seed(3)
    mu, rho = torch.randn(700, generator=g), torch.randn(700, generator=g) - 3
    mix = ("mixture", -1.2, 4.0, 1.0, math.exp(12))
    runs = []
    for context in (False, True):
        with torch.device("meta") if context else torch.device("cpu"):
            torch.manual_seed(0)
            got = [N.normal((5, 300))]
            for kind, prior in (("reparam", G), ("flipout", mix), ("local", mix)):
                t, kl, sigma, eps = N.sample_kl_fwd(kind, mu, rho, prior, samples=2)
                got += [t, torch.tensor(kl, device="cpu"), sigma, eps]
        assert all(x.device.type == "cpu" for x in got)
        runs.append(got)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_noiseless_native_kernel_under_a_meta_default_device_does_not_crash() -> None:
    """The Gaussian prior's local kind draws no key, so nothing raised first: the C code wrote
    sigma^2 through the null data pointer of a meta tensor (segmentation fault)."""
    code = (
        "import torch; from bbb import _native as N; assert N.available(), N.error()\n"
        "mu, rho = torch.zeros(1000), torch.full((1000,), -1.0)\n"
        "with torch.device('meta'):\n"
        "    t, kl, sigma, eps = N.sample_kl_fwd('local', mu, rho, ('gaussian', 0.0, 1.0))\n"
        "print(t.device, eps, round(float(t.sum()), 3))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    # softplus(-1)^2 = 0.0981..., times 1000
    assert res.stdout.split() == ["cpu", "None", f"{1000 * math.log1p(math.exp(-1)) ** 2:.3f}"]


# ----------------------------------------------------------------------------- seeding
def test_manual_seed_and_fork_rng_govern_the_native_stream() -> None:
    """The key is one draw from torch's global CPU generator: torch.manual_seed reproduces
    the noise, consecutive calls differ (a new key each), and a draw inside
    torch.random.fork_rng leaves the stream after it as if it had not happened."""
    torch.manual_seed(5)
    a, b = N.normal((1000,)), N.normal((1000,))
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    assert torch.equal(N.normal((1000,)), a)
    with torch.random.fork_rng():
        inner = N.normal((1000,))
    assert torch.equal(N.normal((1000,)), b)
    assert torch.equal(inner, b)  # fork_rng starts from the same state: the same next key


class _NoiseData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return N.normal((64,))


def test_dataloader_workers_draw_different_reproducible_noise() -> None:
    """Forked DataLoader workers: each worker's torch seed differs (base seed + worker id),
    so its native noise does; the same loader generator seed gives the same batches; no
    worker waits on the parent's OpenMP team (one thread in a forked child)."""
    import multiprocessing as mp

    batches = []
    for _ in range(2):
        loader = torch.utils.data.DataLoader(
            _NoiseData(), batch_size=1, num_workers=2,
            multiprocessing_context=mp.get_context("fork"),
            generator=torch.Generator().manual_seed(7), timeout=60,
        )  # fmt: skip
        batches.append(torch.cat(list(loader)))
    assert torch.equal(batches[0], batches[1])
    rows = batches[0]
    assert len({tuple(r[:4].tolist()) for r in rows}) == 4  # no two items share noise


@pytest.mark.usefixtures("_fresh_library_state")
@pytest.mark.parametrize(
    ("value", "disabled"), [("0", False), ("false", False), (" Off ", False), ("1", True)]
)
def test_bbb_native_disable_zero_does_not_disable(
    value: str, disabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BBB_NATIVE_DISABLE=0 disabled the native library (any non-empty value did)."""
    monkeypatch.setenv("BBB_NATIVE_DISABLE", value)
    assert (N.load() is None) == disabled
    assert ("BBB_NATIVE_DISABLE" in (N.error() or "")) == disabled


# ----------------------------------------------------------------------------- torch.func
def test_torch_func_transforms_run_eagerly_under_the_native_backend() -> None:
    """torch.func.grad / vmap over a Bayesian layer raised under "native" (RuntimeError: an
    autograd.Function without setup_context) where eager works; inside a transform the
    native backend now defers to the eager kernels and torch.randn: the same numbers as the
    eager backend, and vmap's randomness modes hold (the native noise was one plain draw)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = bbb.BayesLinear(4, 3, prior=bbb.GaussianPrior(1.0))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (functional_call(layer, p, (x,)) ** 2).sum()

    out = {}
    for backend in ("eager", "native"):
        K.set_kernels(backend)
        torch.manual_seed(2)
        g = grad(loss)(params)
        y = vmap(lambda p: functional_call(layer, p, (x,)), randomness="different")(stacked)
        with pytest.raises(RuntimeError, match="randomness"):
            vmap(lambda p: functional_call(layer, p, (x,)))(stacked)  # default: "error"
        out[backend] = [*g.values(), y]
    assert not torch.equal(out["native"][-1][0], out["native"][-1][1])  # one draw per member
    for a, b in zip(out["eager"], out["native"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # outside a transform the native node runs again
    K.set_kernels("native")
    layer(x)
    assert layer._record is not None and layer._record.kl_w is not None


@pytest.mark.parametrize("estimator", ["reparam", "flipout", "local"])
def test_torch_func_transforms_under_the_compile_backend(estimator: str) -> None:
    """The compile backend's fused node (sample_and_kl) raised under torch.func.grad / vmap
    (no setup_context); inside a transform it is the same formulas as plain operations. The
    data term's gradients equal the eager backend's (float32 rounding of reordered
    operations: 1e-6 relative)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = bbb.BayesLinear(4, 3, prior=bbb.GaussianPrior(1.0), estimator=estimator)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (functional_call(layer, p, (x,)) ** 2).sum()

    out = {}
    for backend in ("eager", "compile"):
        K.set_kernels(backend)
        torch.manual_seed(2)
        g = grad(loss)(params)
        stacked = {k: torch.stack([v, v]) for k, v in params.items()}
        y = vmap(lambda p: functional_call(layer, p, (x,)), randomness="different")(stacked)
        out[backend] = [*g.values(), y]
    for a, b in zip(out["eager"], out["compile"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the plain formulas themselves, gradients against the fused node's (its eager kernels)
    K.set_kernels("eager")
    mu, rho, eps = (torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    prior = bbb.GaussianPrior(0.5, mean=0.1)
    for kind in ("reparam", "flipout", "local"):

        def total(m: torch.Tensor, r: torch.Tensor, kind: str = kind) -> torch.Tensor:
            t, kl = K.sample_and_kl(kind, m, r, eps, prior)
            return t.sum() + kl

        fused = grad(total, argnums=(0, 1))(mu, rho)
        mu_, rho_ = mu.clone().requires_grad_(), rho.clone().requires_grad_()
        t, kl = K.sample_and_kl(kind, mu_, rho_, eps, prior)
        (t.sum() + kl).backward()
        torch.testing.assert_close(fused[0], mu_.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused[1], rho_.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 511, 32768, 32769])
def test_fused_kernel_at_block_and_tile_edges_matches_float64(n: int) -> None:
    """One element, one short of a tile, exactly one 32768-element block, one past it; rho
    at the exp's and the log-switch's edges (-95, -87.5, -87.2, -20 +- 1e-3, 0, 50, 88) and
    over -100..20: t, KL and both gradients against the float64 formulas with autograd, per
    element within 2e-6 of the sum of the absolute values of the terms that make it up
    (cancellation between the KL's and the data's gradient terms is the formulas', not
    rounding; measured 3e-7)."""
    g = torch.Generator().manual_seed(n)
    mu = torch.randn(n, generator=g)
    rho = torch.rand(n, generator=g) * 120 - 100
    edge = torch.tensor([-95.0, -87.5, -87.2, -20.001, -19.999, 0.0, 50.0, 88.0])
    rho[: min(n, 8)] = edge[: min(n, 8)]
    up = torch.randn(n, generator=g)
    loc, inv_var, g_kl = 0.1, 2.0, 0.3
    for kind in ("reparam", "flipout", "local"):
        torch.manual_seed(0)
        t, kl, sigma, eps = N.sample_kl_fwd(kind, mu, rho, ("gaussian", loc, inv_var))
        gm, gr = N.sample_kl_bwd(kind, mu, rho, sigma, eps, up, g_kl, ("gaussian", loc, inv_var))
        r, m, u = rho.double(), mu.double(), up.double()
        s = torch.nn.functional.softplus(r)
        sig = torch.sigmoid(r)
        log_s = torch.where(r < -20, r, torch.log(s))
        dlog = torch.where(r < -20, torch.ones_like(r), sig / s)
        e = None if eps is None else eps.double()
        terms = (s * s + (m - loc) ** 2) * (0.5 * inv_var) - log_s
        want_kl = float(terms.sum())
        if kind == "local":
            want_t, dt = s * s, 2 * s
        else:
            assert e is not None
            want_t, dt = (m + s * e if kind == "reparam" else s * e), e
        # (mu - loc: loc rounds to float32 in the kernel, as in eager float32 arithmetic)
        gm_terms = [g_kl * m * inv_var, torch.full_like(m, -g_kl * loc * inv_var)]
        gm_terms += [u if kind == "reparam" else torch.zeros_like(u)]
        gr_terms = [g_kl * s * inv_var * sig, -g_kl * dlog, u * dt * sig]
        size = want_t.abs() if kind != "reparam" else m.abs() + (want_t - m).abs()
        assert bool(((t.double() - want_t).abs() <= 2e-6 * size + 1e-30).all()), kind
        assert abs(kl - want_kl) <= 2e-6 * float(terms.abs().sum())
        for got, parts in ((gm, gm_terms), (gr, gr_terms)):
            err = (got.double() - sum(parts)).abs()
            assert bool((err <= 2e-6 * sum(p.abs() for p in parts) + 1e-30).all()), kind


def test_a_hanging_compiler_is_killed_and_not_retried(tmp_path: Path) -> None:
    """A compiler that never answers (a stuck ccache or license server; here a child process
    of the compiler that holds its pipes) blocked the first use for 300 s per flag set, and
    killing the compiler alone left its child holding the pipes; now the whole process group
    is killed after the build timeout, once."""
    log = tmp_path / "cc.log"
    script = tmp_path / "stuck.sh"
    # answers --version, then hangs in a child that keeps stdout and stderr open
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{log}"\n'
        'case "$1" in --version) echo stuck 1.0; exit 0;; esac\nsleep 60 & wait\n'
    )
    code = (
        "import sys, time; from bbb import _native as N; N._BUILD_TIMEOUT = 1.0; "
        f"t = time.monotonic(); cc = ['sh', {str(script)!r}]\n"
        "try:\n    N._build(cc)\nexcept RuntimeError as e:\n    print(e)\n"
        "print(round(time.monotonic() - t))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=40,
        env={**os.environ, "BBB_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert "no answer after 1 s, killed" in lines[0]
    assert int(lines[-1]) <= 10
    assert len(log.read_text().splitlines()) == 2  # --version, one compile: no second try
