"""Process-wide tuning of glibc's ``malloc`` for training loops (issue 8).

A training step allocates and frees the same large tensors every step (a weight-sized noise
tensor, the sampled weights, their gradients, the optimizer's temporaries). PyTorch's CPU
tensors come from the C library's ``malloc``. On Linux, glibc serves blocks above its *mmap
threshold* (128 KiB at start, raised adaptively up to 32 MiB) with a fresh ``mmap`` and
unmaps them on ``free``; it also *trims* free memory at the top of the heap back to the
kernel. The next step's tensors then land on fresh pages, and the first write to each 4 KiB
page is a page fault plus the kernel zeroing the page. Measured here (MLP 784-1200-1200-10,
batch 128, Gaussian prior, reparam; ``benchmarks/probes/page_faults_mallopt.py``): ~5000
minor page faults per Bayesian step with one weight sample and ~120000 with ten (tensors of
57 MB, above any threshold), none after :func:`tune_allocator`; the ten-sample step went from
640-740 ms to 430-500 ms.

:func:`tune_allocator` keeps freed memory in the process for reuse: no ``mmap`` for large
blocks (``M_MMAP_MAX = 0``), no trimming (``M_TRIM_THRESHOLD`` at its maximum) and a 64 MiB
pad on each heap extension. The cost is that the resident size does not shrink when tensors
are freed (it stays at the peak a caching allocator would hold). It is process-wide: every
library in the process benefits, which is why ``bbb bench`` applies it to all of them alike.
The same effect is available without code through glibc's environment variables
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``) or by preloading jemalloc / tcmalloc, as
PyTorch's CPU performance guide suggests. On other C libraries and platforms it does nothing
and returns ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import warnings

__all__ = ["ENV_VAR", "allocator_tuned", "tune_allocator", "tune_allocator_by_default"]

#: set to ``0`` to keep the ``bbb`` command and the experiment scripts off :func:`tune_allocator`
ENV_VAR = "BBB_TUNE_ALLOCATOR"

# mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 << 20
_INT_MAX = 2**31 - 1  # mallopt takes a C int

_lock = threading.Lock()
_tuned = False


def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, or None where the C library is not glibc (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune_allocator() -> bool:
    """Keep freed heap memory in the process (glibc): no per-step page faults for big tensors.

    Idempotent and process-wide; see the module docstring for what it changes and what it
    costs. Returns True when the settings are in force (glibc on Linux), False where it does
    nothing (another C library or platform, or glibc refused a setting).
    """
    global _tuned
    with _lock:
        if _tuned:
            return True
        libc = _glibc()
        if libc is None:
            return False
        ok = (
            libc.mallopt(_M_MMAP_MAX, 0) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
            and libc.mallopt(_M_TOP_PAD, _TOP_PAD_BYTES) == 1
        )
        _tuned = ok
        return ok


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` has put its settings in force in this process."""
    return _tuned


_ON = ("1", "true", "yes", "on", "")
_OFF = ("0", "false", "no", "off")


def tune_allocator_by_default() -> bool:
    """:func:`tune_allocator` unless the environment says ``BBB_TUNE_ALLOCATOR=0`` (or
    ``false``/``no``/``off``; an unknown value is a warning naming the accepted ones, and tunes).

    Called at the start of the ``bbb`` command (except ``bbb bench``, which has its own
    ``--no-tune-allocator``) and of the experiment scripts: processes that only train or
    evaluate. The library never calls it on import.
    """
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        warnings.warn(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not understood: tuning the allocator (the "
            f"default); accepted values: {', '.join(v for v in _ON if v)} (tune) or "
            f"{', '.join(_OFF)} (do not)",
            stacklevel=2,
        )
    return tune_allocator()
