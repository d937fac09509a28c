"""bbb.tune_allocator: freed tensors' memory is reused without page faults (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import bbb
from bbb import allocator

# Allocates and fills a 64 MiB tensor 10 times (each freed before the next) and prints the
# minor page faults of each iteration. 64 MiB is above glibc's largest mmap threshold, so
# without tuning every iteration maps fresh pages: 16384 faults of 4 KiB (fewer with huge
# pages, never near zero); with tuning the heap keeps the block and reuses it (the first one
# or two iterations still fault while the heap grows to its working size).
_CHILD = """
import resource, sys, torch
import bbb
from bbb.allocator import allocator_tuned
tuned = bbb.tune_allocator() if sys.argv[1] == "tune" else False
# idempotent, and the state reports it
assert bbb.tune_allocator() is tuned if tuned else not allocator_tuned()
assert allocator_tuned() is tuned
def once():
    t = torch.empty(16 << 20)  # 16M float32 = 64 MiB
    t.fill_(1.0)
    del t
faults = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    once()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(tuned, *faults)
"""


def _faults(mode: str) -> tuple[bool, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", [int(v) for v in out[1:]]


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_tuned_allocator_reuses_big_blocks_without_page_faults() -> None:
    _, plain = _faults("plain")
    tuned, faults = _faults("tune")
    assert tuned
    # untuned: 64 MiB of fresh pages every time; even with 2 MiB huge pages >= 32 faults each
    assert min(plain[-5:]) >= 32, plain
    # tuned: from then on the block stays in the heap (a few faults from small allocations)
    assert max(faults[-5:]) < 16, faults


@pytest.mark.skipif(allocator._glibc() is not None, reason="platforms without glibc only")
def test_tune_allocator_does_nothing_without_glibc() -> None:
    assert bbb.tune_allocator() is False
    assert not allocator.allocator_tuned()


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
@pytest.mark.parametrize(("env", "expected"), [("1", "True"), ("0", "False")])
def test_bbb_command_tunes_the_allocator_unless_told_not_to(env: str, expected: str) -> None:
    child = (
        "import bbb.cli, bbb.allocator; "
        "rc = bbb.cli.main(['prune', '--no-such-flag']); "  # a usage error: exits early
        "print(rc, bbb.allocator.allocator_tuned())"
    )
    out = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, allocator.ENV_VAR: env},
    ).stdout.split()
    assert out == ["2", expected]
