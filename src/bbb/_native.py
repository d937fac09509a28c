"""The native kernels (``csrc/bbb_native.c``): built on first use, loaded with ctypes.

What they compute, and why (issue 8): on CPU, the Bayesian step's extra cost over a
deterministic one is mostly elementwise work with transcendental functions (the normals of
the weight sample, softplus, the KL's log), which eager PyTorch does in one pass per
operation and single-threaded random numbers. The C file does the noise (Threefry-2x32-20
counters turned into normals by Box-Muller), the sample and the closed-form Gaussian KL in
one pass per tile, and the backward in one more, with its own inline float32 exp, log, sine
and cosine (polynomials, a few ulps) so that every loop vectorizes.

Building: the system C compiler (``$CC``, split as a shell would, so ``CC="ccache gcc"`` works;
else ``cc``, ``gcc`` or ``clang``) compiles the file once per source, flags and compiler into
``$BBB_CACHE_DIR`` (default ``~/.cache/bbb/native``; a temporary directory where that is not
writable); the library is written to a temporary name and renamed into place, so concurrent
first uses do not see a half-written file, and its name carries the hash of its bytes, checked
before it is loaded: a damaged cached file is built again (loading it would kill the process
with SIGBUS). Where no compiler is found or the build fails, or ``$BBB_NATIVE_DISABLE`` is set
(to anything but ``0``, ``false``, ``no``, ``off`` or nothing), :func:`load` returns None and
:func:`error` says why; :mod:`bbb.kernels` then warns once and runs eagerly. On a CPU for which
torch reports AVX-512, the build uses it (``$BBB_NATIVE_AVX512=0`` builds for AVX2 instead);
the two builds give the same bits (see SIMD_REDUCTIONS in the C file).

Threads: the C loops share fixed blocks of 32768 elements among ``torch.get_num_threads()``
OpenMP threads (built with ``-fopenmp``, the library binds to the ``libgomp.so.1`` PyTorch has
already loaded, so both use one thread pool; a second pool would spin against PyTorch's), and
the KL's per-block partial sums are added in block order, so every result is the same
whatever the number of threads. Without OpenMP the loops run on one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "load",
    "error",
    "available",
    "supports",
    "normal",
    "sample_kl_fwd",
    "sample_kl_bwd",
    "KINDS",
    "PRIORS",
]

#: estimator -> the C kernels' kind code
KINDS = {"reparam": 0, "flipout": 1, "local": 2}
#: prior of the fused kernels -> its code and number of constants (see the C file):
#: ("gaussian", loc, inv_var) with the closed-form KL; ("mixture", c1, c2, p1, p2) with the
#: single-sample Monte Carlo KL, c_k = log(pi_k / s_k / sqrt(2 pi)), p_k = 1 / s_k^2
PRIORS = {"gaussian": (0, 2), "mixture": (1, 4)}
# a prior as the kernels take it: ("gaussian", loc, inv_var) or ("mixture", c1, c2, p1, p2)
NativePrior = tuple[str | float, ...]
_ABI = 9
_CHUNK = 1 << 15  # elements per block: the unit of threading and of the KL's partial sums

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False
_TILE = 512
_pid = os.getpid()  # the process that loaded this module (see _threads)


def _source() -> bytes:
    return resources.files("bbb").joinpath("csrc/bbb_native.c").read_bytes()


def _compiler() -> list[str] | None:
    """The compiler's command line: ``$CC`` split as a shell would (``CC="ccache gcc"``,
    ``CC="gcc -m64"``: the program and its own arguments), else ``cc``, ``gcc`` or
    ``clang``; None where none is found."""
    env = os.environ.get("CC", "").strip()
    if env:
        try:
            argv = shlex.split(env)
        except ValueError:  # unbalanced quotes: taken as one name
            argv = [env]
        found = shutil.which(argv[0]) if argv else None
        if found:
            return [found, *argv[1:]]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cache_dir() -> Path:
    env = os.environ.get("BBB_CACHE_DIR")
    try:
        if env:
            base = Path(env)
        else:
            xdg = os.environ.get("XDG_CACHE_HOME")
            home = Path(xdg) if xdg else Path.home() / ".cache"
            if not home.is_absolute():
                # no home directory (no $HOME and a uid without a passwd entry, as in some
                # containers): Path.home() is "~" (Python 3.11, a folder named "~" would be
                # made in the working directory) or raises (3.12)
                raise OSError(f"no usable cache directory ({home})")
            base = home / "bbb" / "native"
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=base):  # writable?
            pass
        return base
    except (OSError, RuntimeError):  # RuntimeError: Path.home() without a home (Python 3.12)
        # a shared temporary directory: only a private folder of ours, never one another user
        # could have made first (a library planted there would be loaded)
        fallback = Path(tempfile.gettempdir()) / f"bbb-native-{os.getuid()}"
        try:
            fallback.mkdir(mode=0o700, exist_ok=True)
            st = fallback.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077 == 0 and not fallback.is_symlink():
                return fallback
        except OSError:
            pass
        return Path(tempfile.mkdtemp(prefix="bbb-native-"))


#: the AVX-512 subset torch's "AVX512" capability stands for (F, VL, BW, DQ)
_AVX512 = ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]


def _avx512_allowed() -> bool:
    # BBB_NATIVE_AVX512=0 (false, no, off) builds for AVX2 on an AVX-512 CPU (where 512-bit
    # instructions lower the clock, or to compare the two builds: they give the same bits)
    value = os.environ.get("BBB_NATIVE_AVX512", "").strip().lower()
    return value not in ("0", "false", "no", "off")


def _flag_sets() -> list[list[str]]:
    """Compiler flags, fastest first."""
    base = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
    isas: list[list[str]] = [[]]
    if platform.machine() in ("x86_64", "AMD64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX2", "AVX512"):
            isas = [["-mavx2", "-mfma"]]
        if capability == "AVX512" and _avx512_allowed():
            # twice the lanes, and a rotate instruction for Threefry: the noise ~1.7x faster
            # on one thread (AMD EPYC, session 24); a compiler without these flags falls
            # back to the AVX2 build
            isas.insert(0, ["-mavx2", "-mfma", *_AVX512])
    # OpenMP threads, or one thread (SIMD only) where the compiler has no OpenMP
    return [base + isa + omp for isa in isas for omp in (["-fopenmp"], ["-fopenmp-simd"])]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cached(out_dir: Path, tag: str) -> Path | None:
    """A library built before for ``tag`` whose bytes are intact, else None.

    A library's name carries the hash of its contents (``bbb_native-TAG-HASH.so``), checked
    before loading: a damaged file (truncated by a full disk or a copy, say) would not just
    fail to load, dlopen would map it and the process would die of SIGBUS. Damaged files are
    removed (best effort) and the library built again."""
    prefix = f"bbb_native-{tag}-"
    for path in sorted(out_dir.glob(f"{prefix}*.so")):
        try:
            intact = _digest(path) == path.name[len(prefix) : -len(".so")]
        except OSError:
            intact = False
        if intact:
            return path
        with contextlib.suppress(OSError):
            path.unlink()
    return None


#: seconds a compiler command may take (a build takes a few): past it the compiler and every
#: process it started are killed and the eager kernels used
_BUILD_TIMEOUT = 120.0


def _run(cmd: list[str], cwd: str | None = None) -> tuple[int, str, str]:
    """(returncode, stdout, stderr) of ``cmd`` in a session of its own; a command still
    running after :data:`_BUILD_TIMEOUT` is killed with all its children (gcc's cc1, as, ld:
    killing gcc alone left them holding the output pipes, and the wait went on) and raises."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(
                f"{' '.join(cmd)}: no answer after {_BUILD_TIMEOUT:g} s, killed"
            ) from None
    return proc.returncode, out, err


def _build(cc: list[str]) -> Path:
    src = _source()
    version = _run([*cc, "--version"])[1]
    errors = []
    out_dir = _cache_dir()  # once: its fallback may be a fresh temporary directory
    for flags in _flag_sets():
        tag = hashlib.sha256(
            src + repr((flags, cc, version, platform.machine(), _ABI)).encode()
        ).hexdigest()[:16]
        cached = _cached(out_dir, tag)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "bbb_native.c").write_bytes(src)
            # a name of its own per build (pid and a random part: processes of different
            # containers sharing the cache may have the same pid)
            partial = out_dir / f".bbb_native-{tag}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            # compiled where it lies, by a relative name: the same bytes from every build
            cmd = [*cc, *flags, "bbb_native.c", "-o", str(partial), "-lm"]
            try:
                returncode, _, stderr = _run(cmd, cwd=tmp)  # a hang raises: no second try
                if returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {stderr.strip()[-500:]}")
                    continue
                target = out_dir / f"bbb_native-{tag}-{_digest(partial)}.so"
                os.replace(partial, target)  # atomic: a concurrent loader sees all or nothing
            finally:
                partial.unlink(missing_ok=True)
        return target
    raise RuntimeError("; ".join(errors))


def _bind(lib: ctypes.CDLL) -> None:
    i64, u32, f32, c_int = ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int
    vp = ctypes.c_void_p
    lib.bbb_native_abi.restype = c_int
    lib.bbb_native_tile.restype = c_int
    lib.bbb_normal.argtypes = [vp, i64, i64, u32, u32, c_int]
    lib.bbb_normal.restype = None
    lib.bbb_threefry2x32.argtypes = [u32, u32, u32, u32, vp]
    lib.bbb_threefry2x32.restype = None
    # fwd: mu, rho, t, eps, sigma, start, stride, n, chunk, k0, k1, prior, a0..a3, kind,
    # samples, partial, threads
    fwd: list[type[ctypes._SimpleCData[Any]]] = [vp] * 5 + [i64] * 4 + [u32] * 2 + [c_int]
    lib.bbb_sample_kl_fwd.argtypes = fwd + [f32] * 4 + [c_int, c_int, vp, c_int]
    lib.bbb_sample_kl_fwd.restype = None
    # bwd: mu, rho, sigma, eps, g_t, g_mu, g_kl, grad_mu, grad_rho, n, chunk, prior, a0..a3,
    # kind, samples, threads
    bwd: list[type[ctypes._SimpleCData[Any]]] = [vp] * 6 + [f32, vp, vp, i64, i64, c_int]
    lib.bbb_sample_kl_bwd.argtypes = bwd + [f32] * 4 + [c_int, c_int, c_int]
    lib.bbb_sample_kl_bwd.restype = None


def _disabled() -> bool:
    # BBB_NATIVE_DISABLE=1 (or any other value) disables; unset, empty, 0, false, no, off
    # do not (BBB_NATIVE_DISABLE=0 used to disable too)
    value = os.environ.get("BBB_NATIVE_DISABLE", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def load() -> ctypes.CDLL | None:
    """The native library (built on first call), or None where it cannot be built."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if _disabled():
                raise RuntimeError("disabled by the BBB_NATIVE_DISABLE environment variable")
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set $CC, or install cc/gcc/clang)")
            lib = ctypes.CDLL(str(_build(cc)))
            _bind(lib)
            if lib.bbb_native_abi() != _ABI or lib.bbb_native_tile() != _TILE:
                raise RuntimeError("the built library does not match this version of bbb")
            _lib = lib
        except Exception as err:  # noqa: BLE001 - any build or load failure: report, run eagerly
            _error = f"{type(err).__name__}: {err}"[:800]
        _tried = True
    return _lib


def error() -> str | None:
    """Why the native library could not be built or loaded (None if it was, or not tried)."""
    return _error


def available() -> bool:
    """Whether the native library can be used in this process (builds it on first call)."""
    return load() is not None


def supports(t: Tensor) -> bool:
    """Whether the native kernels take ``t``: a contiguous float32 CPU tensor."""
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()


def _check(**tensors: Tensor | None) -> None:
    """The C kernels read raw memory: every tensor must be a contiguous float32 CPU tensor of
    the same number of elements (a clear error instead of reading out of bounds)."""
    n = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not supports(t):
            raise ValueError(
                f"bbb native kernels: {name} must be a contiguous float32 CPU tensor, got "
                f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()})"
            )
        if n is None:
            n = t.numel()
        elif t.numel() != n:
            raise ValueError(f"bbb native kernels: {name} has {t.numel()} elements, expected {n}")


def _key() -> tuple[int, int]:
    # one draw from the global CPU generator: the noise is a function of torch.manual_seed
    # (on the CPU whatever torch.set_default_device says: under "meta" the draw had no value,
    # under "cuda" it came from the CUDA generator)
    k = int(torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu").item())
    return k & 0xFFFFFFFF, (k >> 32) & 0xFFFFFFFF


def _threads() -> int:
    # GNU OpenMP's thread team does not survive fork(): a forked child (a DataLoader worker)
    # that asked for more than one thread would wait forever, so it runs on one.
    if os.getpid() != _pid:
        return 1
    return max(1, torch.get_num_threads())


def normal(shape: tuple[int, ...] | torch.Size) -> Tensor:
    """i.i.d. N(0, 1) float32 noise of ``shape`` on CPU (the library must be loaded)."""
    lib = load()
    assert lib is not None
    out = torch.empty(shape, dtype=torch.float32, device="cpu")  # not the default device's
    n = out.numel()
    if n == 0:
        return out
    k0, k1 = _key()
    lib.bbb_normal(out.data_ptr(), 0, n, k0, k1, _threads())
    return out


def _prior(prior: NativePrior) -> tuple[int, list[float], bool]:
    """(code, four constants, whether every kind draws noise) of a prior tuple (PRIORS)."""
    name = prior[0]
    spec = PRIORS.get(name) if isinstance(name, str) else None
    if spec is None or len(prior) != 1 + spec[1]:
        raise ValueError(
            f"bbb native kernels: prior must be ('gaussian', loc, inv_var) or ('mixture', c1, "
            f"c2, p1, p2), got {prior!r}"
        )
    code = spec[0]
    consts = [float(v) for v in prior[1:]]
    return code, consts + [0.0] * (4 - len(consts)), code != 0


def sample_kl_fwd(
    kind: str, mu: Tensor, rho: Tensor, prior: NativePrior, samples: int = 1
) -> tuple[Tensor, float, Tensor, Tensor | None]:
    """``(t, KL sum, sigma, eps)`` for flat contiguous float32 ``mu``, ``rho`` (n elements).

    t: ``mu + sigma eps`` (reparam), ``sigma eps`` (flipout), one row per weight sample
    (shape (samples, n), or (n) for one sample), or ``sigma^2`` (local, (n)). The KL (float64
    partial sums, added in a fixed order) is, per weight: for ``("gaussian", loc, inv_var)``,
    ``(sigma^2 + (mu - loc)^2) inv_var / 2 - log sigma`` (the closed form without its
    constant); for ``("mixture", c1, c2, p1, p2)``, ``log q(w) - log p(w)`` at
    ``w = mu + sigma eps`` averaged over the samples (the Monte Carlo estimate). eps: the
    noise drawn, shaped like t (None for the Gaussian prior's local kind, which needs none;
    for the mixture's local kind, one sample: the KL's own).
    """
    lib = load()
    assert lib is not None
    _check(mu=mu, rho=rho)
    code = KINDS[kind]
    pcode, consts, always_noise = _prior(prior)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"bbb native kernels: samples must be a positive integer, got {samples!r}")
    if code == 2:
        samples = 1  # local: one variance; the mixture's KL sample is one weight sample
    n = mu.numel()
    rows = (samples, n) if samples > 1 else (n,)
    # on mu's device (the CPU), not torch.set_default_device's: the C code writes there (a
    # "meta" or "cuda" default device had it write through a null or a device pointer)
    t = torch.empty(n if code == 2 else rows, dtype=mu.dtype, device=mu.device)
    sigma = torch.empty_like(mu)
    noise = always_noise or code != 2
    eps = torch.empty(rows, dtype=mu.dtype, device=mu.device) if noise else None
    # the blocks' partial sums: a ctypes array, read back without a tensor and .item()
    # (the fixed cost of a small layer's call, issue 8)
    partial = (ctypes.c_double * max(1, -(-n // _CHUNK)))()
    k0, k1 = _key() if noise else (0, 0)
    stride = -(-n // _TILE) * _TILE  # sample q's noise starts at q * stride in the stream
    lib.bbb_sample_kl_fwd(
        mu.data_ptr(), rho.data_ptr(), t.data_ptr(),
        eps.data_ptr() if eps is not None else t.data_ptr(),  # not written without noise
        sigma.data_ptr(), 0, stride, n, _CHUNK, k0, k1, pcode, *consts, code, samples,
        ctypes.addressof(partial), _threads(),
    )  # fmt: skip
    total = 0.0
    for v in partial:  # in block order: the same sum for any number of threads
        total += v
    return t, total, sigma, eps


def sample_kl_bwd(
    kind: str,
    mu: Tensor,
    rho: Tensor,
    sigma: Tensor,
    eps: Tensor | None,
    g_t: Tensor,
    g_kl: float,
    prior: NativePrior,
    g_mu: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``g_kl * KL + sum <g_t, t> + <g_mu, mu>`` w.r.t. mu and rho (flat float32
    tensors of n elements); ``eps`` and ``prior`` as :func:`sample_kl_fwd` returned and took,
    ``g_t`` shaped like its t, ``g_mu`` (optional, n elements) a gradient of mu from
    elsewhere (a layer's mean path) added in the same pass (kinds ``"flipout"`` and
    ``"local"``; for ``"reparam"`` add it to ``g_t`` instead)."""
    lib = load()
    assert lib is not None
    g_t = g_t.contiguous()
    _check(mu=mu, rho=rho, sigma=sigma)
    n = mu.numel()
    code = KINDS[kind]
    pcode, consts, always_noise = _prior(prior)
    if eps is None and (always_noise or code != 2):
        raise ValueError(f"bbb native kernels: eps is required for kind {kind!r}, prior {prior!r}")
    if g_mu is not None:
        if code == 0:
            raise ValueError("bbb native kernels: g_mu is for 'flipout' and 'local' (reparam: g_t)")
        g_mu = g_mu.contiguous()
        _check(mu=mu, g_mu=g_mu)
    _check(g_t=g_t, eps=eps)  # each like the forward's t (eps: one row for local)
    samples = g_t.numel() // n if n else 1
    if n and (g_t.numel() != samples * n or (code == 2 and samples != 1)):
        raise ValueError(
            f"bbb native kernels: g_t has {g_t.numel()} elements, expected "
            f"{'n' if code == 2 else 'samples x n'} with n = {n}"
        )
    grad_mu, grad_rho = torch.empty_like(mu), torch.empty_like(mu)
    lib.bbb_sample_kl_bwd(
        mu.data_ptr(), rho.data_ptr(), sigma.data_ptr(),
        eps.data_ptr() if eps is not None else sigma.data_ptr(),  # not read without noise
        g_t.data_ptr(), None if g_mu is None else g_mu.data_ptr(),  # NULL: no mean path
        g_kl, grad_mu.data_ptr(), grad_rho.data_ptr(), n, _CHUNK, pcode, *consts, code, samples,
        _threads(),
    )  # fmt: skip
    return grad_mu, grad_rho
