"""Fast noise for the Bayesian layers: standard normals and random signs.

Both functions draw exactly the distributions of ``torch.randn`` and of uniform random signs
and are reproducible under ``torch.manual_seed``; they only draw them faster on CPU (issue 8).
With the kernels backend ``"native"`` (:func:`bbb.set_kernels`), float32 normals on CPU come
from the native library (:mod:`bbb._native`: Threefry-2x32-20 and Box-Muller in C).

- :func:`randn`: PyTorch's CPU generator (Mersenne Twister) fills a tensor serially, on one
  core, whatever ``torch.get_num_threads()`` says: 2.4M normals (the weights of a 784-1200-1200
  MLP) take ~10 ms, half the whole deterministic training step. For large tensors we split the
  tensor into one contiguous chunk per thread and fill each chunk with its own
  ``torch.Generator``, seeded from the global generator (one ``torch.randint`` call on the
  calling thread, so the result is a deterministic function of the global seed). The fills run
  concurrently (ATen releases the GIL). The values differ from a single ``torch.randn`` call
  with the same seed, not their distribution: N(0, 1) within and across chunks. (Each chunk's
  seed is drawn from [0, 2^62), but a CPU ``torch.Generator`` keeps only the seed's low 32 bits,
  so there are 2^32 distinct chunk streams: two chunks of one run repeat a stream by chance
  with probability ~50% after ~77000 chunk seeds, i.e. a few thousand steps of a large network.
  A repeat makes two noise chunks equal, not non-normal; it is kept because changing the seeds
  would change every documented result of the eager multi-threaded path. The native kernels'
  Threefry counters do not repeat.)
- :func:`rademacher`: ``torch.randint(0, 2, ...)`` costs one generator call (~10 ns) per sign.
  We draw 63 random bits per ``int64`` word (``random_()`` on int64 gives uniform integers in
  [0, 2^63)) and unpack them with shifts: 63 times fewer generator calls, each bit a fair coin.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .. import _native
from .. import kernels as _kernels

__all__ = ["randn", "rademacher", "PARALLEL_MIN_NUMEL"]

#: Tensors with at least this many elements are filled in parallel on CPU (below it, thread
#: hand-off costs more than it saves).
PARALLEL_MIN_NUMEL = 1 << 16  # measured: 110k normals 482 -> 353 us on 2 threads
_MAX_CHUNKS = 8
_BITS = 63  # random_() on int64 draws uniformly from [0, 2^63): 63 usable bits per word

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()
_shifts: dict[torch.device, Tensor] = {}


def _executor() -> ThreadPoolExecutor:
    """A process-wide worker pool, recreated after a fork (threads do not survive ``fork``)."""
    global _pool, _pool_pid
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool_pid != pid:
            _pool = ThreadPoolExecutor(max_workers=_MAX_CHUNKS - 1, thread_name_prefix="bbb-noise")
            _pool_pid = pid
        return _pool


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """i.i.d. standard normal noise of ``shape``, like ``torch.randn`` (see the module doc)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # inside torch.compile: its own random numbers (the thread count query and the
        # native library's call each broke the graph, twice per local layer). Under
        # torch.jit.trace: a traced randn, drawn anew at each call of the traced model (the
        # native library's noise, and the worker threads' chunks, were recorded as constants:
        # the traced model reused one noise draw, or half of one, at every call)
        return torch.randn(shape, dtype=dtype, device=dev)
    numel = math.prod(shape)
    if (
        dev.type == "cpu"
        and (dtype or torch.get_default_dtype()) == torch.float32
        and _kernels.native_ready()
    ):
        # kernels backend "native": Threefry counters + Box-Muller in C (bbb.kernels)
        return _native.normal(tuple(shape))
    threads = torch.get_num_threads()
    if dev.type != "cpu" or threads < 2 or numel < PARALLEL_MIN_NUMEL:
        return torch.randn(shape, dtype=dtype, device=dev)
    chunks = min(threads, _MAX_CHUNKS, numel // (PARALLEL_MIN_NUMEL // 2))
    out = torch.empty(shape, dtype=dtype, device=dev)
    parts = out.view(-1).tensor_split(chunks)
    # One seed per chunk from the global generator, drawn here on the calling thread: the
    # noise is a deterministic function of the global RNG state (torch.manual_seed).
    seeds = torch.randint(0, 2**62, (chunks,), dtype=torch.int64).tolist()
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    pool = _executor()
    futures = [
        pool.submit(p.normal_, generator=g) for p, g in zip(parts[1:], gens[1:], strict=True)
    ]
    parts[0].normal_(generator=gens[0])
    for f in futures:
        f.result()
    return out


def rademacher(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """Independent random signs (+1/-1) of ``shape``, dtype and device of ``like``."""
    numel = math.prod(shape)
    if numel < 64 or torch.compiler.is_compiling():
        # Tiny tensors: one generator call per sign is cheaper than the unpacking. Inside
        # torch.compile: its own random numbers (random_ on the int64 words broke the graph).
        return torch.randint(0, 2, shape, device=like.device, dtype=like.dtype) * 2 - 1
    words = torch.empty(-(-numel // _BITS), dtype=torch.int64, device=like.device).random_()
    shifts = _shifts.get(like.device)
    if shifts is None:
        shifts = torch.arange(_BITS, dtype=torch.int64, device=like.device)
        _shifts[like.device] = shifts
    bits = (words.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:numel]
    return bits.to(like.dtype).mul_(2).sub_(1).view(shape)
