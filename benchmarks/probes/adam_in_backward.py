"""Adam inside the native backward (issue 8): would updating mu and rho in the same pass that
computes their gradients pay? A probe of the idea, not a library feature.

Times, interleaved, on the two large layers' weights of the MLP 784-1200-1200-10 (2.38M
weights; reparam, Gaussian prior, closed-form KL, one sample):

- ``separate``: bbb's native backward (``bbb._native.sample_kl_bwd``, the library's kernel:
  reads mu, rho, sigma, eps and the gradient of the sample, writes the gradients of mu and
  rho), then ``torch._fused_adam_`` on (mu, rho) (reads the parameters, their gradients and
  both moments; writes the parameters and moments): what a training step does today;
- ``in backward``: one C loop (compiled here from the library's source plus the loop below,
  with the library's flags) that computes the same gradients and applies Adam's update at once,
  never writing the gradients: 15 memory streams instead of 21.

Between calls a 80 MB buffer is written, so that the tensors are not all in the caches (as in a
step, whose working set at H = 1200 is ~110 MB). Median of 50 rounds after 10.

    python benchmarks/probes/adam_in_backward.py

Run with the background jobs paused.
"""

import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import bbb
from bbb import _native

LOOP = r"""
/* reparam, Gaussian prior (a0 = loc, a1 = inv_var), one sample: bwd_loop1's gradients, then
 * Adam (torch's formulas: lerp of the first moment, denominator sqrt(v) / sqrt(bc2) + eps) */
void probe_bwd_adam(float *restrict mu, float *restrict rho, const float *restrict sigma,
                    const float *restrict eps, const float *restrict g_t, float g_kl,
                    float *restrict m1, float *restrict v1, float *restrict m2,
                    float *restrict v2, int64_t n, int64_t chunk, float a0, float a1, float lr,
                    float b1, float b2, float ep, float bc1, float bc2s, int threads) {
    const int64_t blocks = (n + chunk - 1) / chunk;
    const float step = lr / bc1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < blocks; ++c) {
        const int64_t e = (c + 1) * chunk < n ? (c + 1) * chunk : n;
#pragma omp simd
        for (int64_t j = c * chunk; j < e; ++j) {
            float r = rho[j], s = sigma[j];
            float dlog = dlog_sigma(r, s);
            float sig = s * dlog;
            float gm = (mu[j] - a0) * a1 * g_kl + g_t[j];
            float gr = (s * a1 * sig) * g_kl - g_kl * dlog + g_t[j] * eps[j] * sig;
            float m = m1[j] + (1.0f - b1) * (gm - m1[j]);
            float v = v1[j] * b2 + (1.0f - b2) * gm * gm;
            m1[j] = m;
            v1[j] = v;
            mu[j] -= step * m / (sqrtf(v) / bc2s + ep);
            m = m2[j] + (1.0f - b1) * (gr - m2[j]);
            v = v2[j] * b2 + (1.0f - b2) * gr * gr;
            m2[j] = m;
            v2[j] = v;
            rho[j] -= step * m / (sqrtf(v) / bc2s + ep);
        }
    }
}
"""


def build() -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp(prefix="bbb-probe-"))
    src = Path(_native.__file__).parent / "csrc" / "bbb_native.c"
    (out / "probe.c").write_text(f'#include "{src}"\n{LOOP}')
    flags = _native._flag_sets()[0]
    subprocess.run(["cc", *flags, "probe.c", "-o", "probe.so", "-lm"], cwd=out, check=True)
    lib = ctypes.CDLL(str(out / "probe.so"))
    p, f = ctypes.c_void_p, ctypes.c_float
    ptrs: list[Any] = [p] * 5
    lib.probe_bwd_adam.argtypes = [
        *ptrs,
        f,
        *[p] * 4,
        *[ctypes.c_int64] * 2,
        *[f] * 8,
        ctypes.c_int,
    ]
    return lib


def main() -> None:
    bbb.set_kernels("native")
    lib = build()
    n = 784 * 1200 + 1200 * 1200
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(n, generator=gen) * 0.03
    rho = torch.randn(n, generator=gen) * 0.1 - 5.0
    prior = ("gaussian", 0.0, 1.0)
    g_t = torch.randn(n, generator=gen) * 1e-3
    _, _, sigma, eps = _native.sample_kl_fwd("reparam", mu, rho, prior)
    assert eps is not None
    moments = [torch.zeros(n) for _ in range(4)]
    steps = [torch.tensor(1.0), torch.tensor(1.0)]
    big = torch.empty(20_000_000)
    lr, b1, b2, adam_eps, g_kl = 1e-9, 0.9, 0.999, 1e-8, 1e-5  # lr: the values barely move

    def separate() -> None:
        gm, gr = _native.sample_kl_bwd("reparam", mu, rho, sigma, eps, g_t, g_kl, prior)
        torch._fused_adam_(
            [mu, rho], [gm, gr], [moments[0], moments[2]], [moments[1], moments[3]], [], steps,
            lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=adam_eps, amsgrad=False,
            maximize=False,
        )  # fmt: skip

    def fused() -> None:
        ptr = [ctypes.c_void_p(t.data_ptr()) for t in (mu, rho, sigma, eps, g_t)]
        mom = [ctypes.c_void_p(t.data_ptr()) for t in moments]
        lib.probe_bwd_adam(
            *ptr, g_kl, *mom, n, 65536, 0.0, 1.0, lr, b1, b2, adam_eps, 1 - b1, (1 - b2) ** 0.5,
            torch.get_num_threads(),
        )  # fmt: skip

    times: dict[str, list[float]] = {"separate": [], "in backward": []}
    for i in range(60):
        for name, fn in (("separate", separate), ("in backward", fused)):
            big.fill_(float(i))
            t0 = time.perf_counter()
            fn()
            if i >= 10:
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:12s} {1e3 * statistics.median(ts):.2f} ms (median of {len(ts)})")


if __name__ == "__main__":
    main()
