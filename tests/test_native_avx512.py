"""The native kernels' AVX-512 build (issue 8): chosen where torch reports AVX512, opted out
with BBB_NATIVE_AVX512=0, and bit-identical to the AVX2 build (SIMD_REDUCTIONS in the C file)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bbb import _native


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT"])
@pytest.mark.parametrize("opt_out", [None, "0", "off", "1"])
def test_flag_sets_choose_avx512_only_where_torch_reports_it(
    monkeypatch: pytest.MonkeyPatch, capability: str, opt_out: str | None
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(_native.platform, "machine", lambda: "x86_64")
    if opt_out is None:
        monkeypatch.delenv("BBB_NATIVE_AVX512", raising=False)
    else:
        monkeypatch.setenv("BBB_NATIVE_AVX512", opt_out)
    sets = _native._flag_sets()
    avx512 = capability == "AVX512" and opt_out not in ("0", "off")
    assert ("-mavx512f" in sets[0]) is avx512
    # the fallbacks: AVX2 (or plain) builds with OpenMP, then SIMD-only, after the AVX-512 ones
    plain = [f for f in sets if "-mavx512f" not in f]
    assert len(plain) == 2 and "-fopenmp" in plain[0] and "-fopenmp-simd" in plain[1]
    assert all(("-mavx2" in f) is (capability != "DEFAULT") for f in plain)
    assert len(sets) == (4 if avx512 else 2)


_HASH = textwrap.dedent(
    """
    import hashlib, torch
    from bbb import _native as N
    lib = N.load(); assert lib is not None, N.error()
    h = hashlib.sha256()
    def add(t):
        h.update(repr(t).encode() if isinstance(t, float) else t.contiguous().numpy().tobytes())
    g = torch.Generator().manual_seed(0)
    for n in (1, 511, 32769, 200000):
        mu, rho = torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) - 4
        for kind in ("reparam", "flipout", "local"):
            for prior in (("gaussian", 0.0, 1.0), ("mixture", -0.5, -1.2, 1.0, 50.0)):
                for samples in (1, 3):
                    torch.manual_seed(n + samples)
                    t, kl, sig, eps = N.sample_kl_fwd(kind, mu, rho, prior, samples)
                    gm, gr = N.sample_kl_bwd(
                        kind, mu, rho, sig, eps, torch.randn(t.shape, generator=g), 0.01, prior
                    )
                    for v in (t, kl, sig, gm, gr) + (() if eps is None else (eps,)):
                        add(v)
    print(h.hexdigest(), lib._name)
    """
)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512" or _native._compiler() is None,
    reason="needs a CPU for which torch reports AVX512, and a C compiler",
)
def test_the_avx512_and_avx2_builds_give_the_same_bits(tmp_path: Path) -> None:
    """Every output of the fused kernels (samples, KL sums, sigma, noise, both gradients; every
    kind, prior, one and three samples, sizes around the tile and block) is the same bit for
    bit from the two builds, so results do not depend on which one a machine gets."""
    digests = {}
    for opt in ("0", "1"):
        env = {**os.environ, "BBB_NATIVE_AVX512": opt, "BBB_CACHE_DIR": str(tmp_path)}
        env.pop("BBB_NATIVE_DISABLE", None)
        out = subprocess.run(
            [sys.executable, "-c", _HASH], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        digest, name = out.stdout.split()
        digests[opt] = (digest, name)
    assert digests["0"][1] != digests["1"][1]  # two libraries were built and loaded
    assert digests["0"][0] == digests["1"][0]
