/* bbb native kernels (issue 8): counter-based normal noise and the fused weight sample + KL.
 *
 * Built on first use by bbb/_native.py with the system C compiler (-O3 -fno-math-errno
 * -fopenmp-simd; -mavx2 -mfma where the CPU has them) and loaded with ctypes; the loops are
 * written so that the compiler vectorizes them and calls glibc's vector math library (libmvec)
 * for log, exp, sin and cos. Work is shared among OpenMP threads (-fopenmp: the process's
 * libgomp, the one PyTorch loaded, so the same thread pool) in fixed blocks, so that results
 * do not depend on the number of threads.
 *
 * Noise: element e of the stream with key (k0, k1) is a function of (k0, k1, e) alone.
 * Elements are grouped in tiles of 2 * BM_PAIRS; pair j of tile t uses the 64-bit counter
 * c = t * BM_PAIRS + j, hashed by Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror and Shaw,
 * "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the generator of JAX) into two
 * uniform 32-bit words, and the Box-Muller transform turns them into two independent standard
 * normals, stored at elements t * 2 * BM_PAIRS + j and t * 2 * BM_PAIRS + BM_PAIRS + j.
 * u1 = (top 31 bits + 1/2) / 2^31 lies in (0, 1], so the radius is finite; the largest
 * attainable |z| is sqrt(2 * 32 * log 2) ~ 6.66 (P(|Z| > 6.66) ~ 3e-11).
 *
 * Fused sample + KL (Gaussian posterior N(mu, sigma^2), sigma = softplus(rho), Gaussian prior
 * N(loc, 1 / inv_var), closed-form KL), per weight:
 *   kind 0 (reparam): t = mu + sigma * eps    kind 1 (flipout): t = sigma * eps
 *   kind 2 (local):   t = sigma^2 (no noise)
 *   KL term = (sigma^2 + (mu - loc)^2) * inv_var / 2 - log sigma (the constant added in Python),
 *   log sigma taken as rho below rho = -20 (as bbb.kl.log_softplus).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* glibc's vector math library (libmvec) has SIMD variants of these; declaring them lets the
 * compiler call them from vectorized loops without -ffast-math (whose reassociation would
 * undo the compensated log1p below). */
#ifndef BBB_NO_MVEC
float logf(float) __attribute__((simd("notinbranch")));
float expf(float) __attribute__((simd("notinbranch")));
float sinf(float) __attribute__((simd("notinbranch")));
float cosf(float) __attribute__((simd("notinbranch")));
#endif

#define BM_PAIRS 256
#define TILE (2 * BM_PAIRS)
#define SWITCH (-20.0f)
#define PARALLEL_MIN 32768 /* fewer elements: one thread */

int bbb_native_abi(void) { return 2; }
int bbb_native_tile(void) { return TILE; }

static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

/* Threefry-2x32-20 of the counters c_start .. c_start + BM_PAIRS - 1 (no carry across 2^32
 * inside a tile: tiles start at multiples of BM_PAIRS, so the low word never wraps mid-tile). */
static void threefry_tile(uint64_t c_start, uint32_t k0, uint32_t k1, uint32_t *restrict X0,
                          uint32_t *restrict X1) {
    const uint32_t k2 = 0x1BD11BDAu ^ k0 ^ k1;
    const uint32_t hi = (uint32_t)(c_start >> 32);
    const uint32_t lo0 = (uint32_t)c_start;
#pragma omp simd
    for (int j = 0; j < BM_PAIRS; ++j) {
        uint32_t x0 = lo0 + (uint32_t)j + k0, x1 = hi + k1;
#define TF(r) x0 += x1; x1 = rotl32(x1, r); x1 ^= x0;
        TF(13) TF(15) TF(26) TF(6)   x0 += k1; x1 += k2 + 1u;
        TF(17) TF(29) TF(16) TF(24)  x0 += k2; x1 += k0 + 2u;
        TF(13) TF(15) TF(26) TF(6)   x0 += k0; x1 += k1 + 3u;
        TF(17) TF(29) TF(16) TF(24)  x0 += k1; x1 += k2 + 4u;
        TF(13) TF(15) TF(26) TF(6)   x0 += k2; x1 += k0 + 5u;
#undef TF
        X0[j] = x0;
        X1[j] = x1;
    }
}

/* Raw Threefry-2x32-20 output for counters given as (lo, hi) words: for the tests' known-answer
 * check. */
void bbb_threefry2x32(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t *out) {
    const uint32_t k2 = 0x1BD11BDAu ^ k0 ^ k1;
    uint32_t x0 = c0 + k0, x1 = c1 + k1;
#define TF(r) x0 += x1; x1 = rotl32(x1, r); x1 ^= x0;
    TF(13) TF(15) TF(26) TF(6)   x0 += k1; x1 += k2 + 1u;
    TF(17) TF(29) TF(16) TF(24)  x0 += k2; x1 += k0 + 2u;
    TF(13) TF(15) TF(26) TF(6)   x0 += k0; x1 += k1 + 3u;
    TF(17) TF(29) TF(16) TF(24)  x0 += k1; x1 += k2 + 4u;
    TF(13) TF(15) TF(26) TF(6)   x0 += k2; x1 += k0 + 5u;
#undef TF
    out[0] = x0;
    out[1] = x1;
}

/* The 2 * BM_PAIRS normals of tile t into o[0 .. TILE). The sine and cosine loops are kept
 * apart: fused, the compiler would turn them into a scalar sincosf call. */
static void normal_tile(uint64_t t, uint32_t k0, uint32_t k1, float *restrict o) {
    uint32_t X0[BM_PAIRS] __attribute__((aligned(64)));
    uint32_t X1[BM_PAIRS] __attribute__((aligned(64)));
    float R[BM_PAIRS] __attribute__((aligned(64)));
    float A[BM_PAIRS] __attribute__((aligned(64)));
    threefry_tile(t * (uint64_t)BM_PAIRS, k0, k1, X0, X1);
    const float two_pi = 6.28318530717958647692f;
#pragma omp simd
    for (int j = 0; j < BM_PAIRS; ++j) {
        float u1 = ((float)(int32_t)(X0[j] >> 1) + 0.5f) * 4.656612873077392578125e-10f; /* 2^-31 */
        float u2 = (float)(int32_t)(X1[j] >> 8) * 5.9604644775390625e-08f;             /* 2^-24 */
        float l = logf(u1);
        R[j] = sqrtf(l < 0.0f ? -2.0f * l : 0.0f);
        A[j] = two_pi * u2;
    }
#pragma omp simd
    for (int j = 0; j < BM_PAIRS; ++j) o[j] = R[j] * cosf(A[j]);
#pragma omp simd
    for (int j = 0; j < BM_PAIRS; ++j) o[BM_PAIRS + j] = R[j] * sinf(A[j]);
}

/* Elements [start, start + n) of the normal stream (k0, k1) into out[0 .. n); start must be a
 * multiple of TILE. Tiles are shared among `threads` OpenMP threads. */
void bbb_normal(float *restrict out, int64_t start, int64_t n, uint32_t k0, uint32_t k1,
                int threads) {
    const uint64_t t0 = (uint64_t)(start / TILE);
    const int64_t full = n / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < full; ++i) normal_tile(t0 + (uint64_t)i, k0, k1, out + i * TILE);
    if (full * TILE < n) {
        float tmp[TILE] __attribute__((aligned(64)));
        normal_tile(t0 + (uint64_t)full, k0, k1, tmp);
        memcpy(out + full * TILE, tmp, (size_t)(n - full * TILE) * sizeof(float));
    }
}

/* softplus(r) = max(r, 0) + log1p(exp(-|r|)); log1p(t) as log(u) * t / (u - 1), u = 1 + t
 * (accurate to a few ulp: the rounding of u cancels), t itself where u rounds to 1. */
static inline float softplusf(float r) {
    float t = expf(-fabsf(r));
    float u = 1.0f + t;
    float d = u - 1.0f;
    float lp = d == 0.0f ? t : logf(u) * (t / d);
    return (r > 0.0f ? r : 0.0f) + lp;
}

/* One tile of the fused forward, for a constant kind (inlined and specialised). */
static inline float fwd_tile(const int kind, const float *restrict mu, const float *restrict rho,
                             const float *restrict e, float *restrict t_out,
                             float *restrict s_out, int64_t m, float loc, float half_iv) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < m; ++j) {
        float r = rho[j];
        float s = softplusf(r);
        float ls = r < SWITCH ? r : logf(s);
        float d = mu[j] - loc;
        s_out[j] = s;
        t_out[j] = kind == 0 ? mu[j] + s * e[j] : (kind == 1 ? s * e[j] : s * s);
        sum += (s * s + d * d) * half_iv - ls;
    }
    return sum;
}

/* Fused forward on elements [0, n) (element 0 is element `start` of the noise stream, start
 * a multiple of TILE): writes t, sigma and (kinds 0, 1) eps, and the KL terms' sum of each
 * block of `chunk` elements (a multiple of TILE) into partial[block]. Blocks are shared among
 * `threads` OpenMP threads; the caller adds the partial sums in order, so the result does not
 * depend on the number of threads. */
void bbb_sample_kl_fwd(const float *restrict mu, const float *restrict rho, float *restrict t_out,
                       float *restrict eps, float *restrict sigma_out, int64_t start, int64_t n,
                       int64_t chunk, uint32_t k0, uint32_t k1, float loc, float inv_var, int kind,
                       double *restrict partial, int threads) {
    const float half_iv = 0.5f * inv_var;
    const int64_t blocks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)
    for (int64_t c = 0; c < blocks; ++c) {
        float tmp[TILE] __attribute__((aligned(64)));
        const int64_t c0 = c * chunk;
        const int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
        double acc = 0.0;
        for (int64_t b0 = c0; b0 < c1; b0 += TILE) {
            int64_t m = c1 - b0 < TILE ? c1 - b0 : TILE;
            const float *restrict e = tmp;
            if (kind != 2) {
                if (m == TILE) {
                    normal_tile((uint64_t)((start + b0) / TILE), k0, k1, eps + b0);
                    e = eps + b0;
                } else {
                    normal_tile((uint64_t)((start + b0) / TILE), k0, k1, tmp);
                    memcpy(eps + b0, tmp, (size_t)m * sizeof(float));
                }
            }
            float sum;
            if (kind == 0) sum = fwd_tile(0, mu + b0, rho + b0, e, t_out + b0, sigma_out + b0, m, loc, half_iv);
            else if (kind == 1) sum = fwd_tile(1, mu + b0, rho + b0, e, t_out + b0, sigma_out + b0, m, loc, half_iv);
            else sum = fwd_tile(2, mu + b0, rho + b0, e, t_out + b0, sigma_out + b0, m, loc, half_iv);
            acc += (double)sum;
        }
        partial[c] = acc;
    }
}

/* One kind of the fused backward (inlined and specialised). */
static inline void bwd_loop(const int kind, const float *restrict mu, const float *restrict rho,
                            const float *restrict sigma, const float *restrict eps,
                            const float *restrict g_t, float g_kl, float *restrict grad_mu,
                            float *restrict grad_rho, int64_t n, float loc, float inv_var) {
    const float gi = g_kl * inv_var;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float r = rho[j];
        float s = sigma[j];
        float ex = expf(-fabsf(r));
        float sig = (r >= 0.0f ? 1.0f : ex) / (1.0f + ex); /* sigmoid(rho) */
        float dlog = r < SWITCH ? 1.0f : sig / s;           /* d log sigma / d rho */
        float dt = kind == 2 ? 2.0f * s : eps[j];
        grad_mu[j] = (mu[j] - loc) * gi + (kind == 0 ? g_t[j] : 0.0f);
        grad_rho[j] = (s * sig) * gi - g_kl * dlog + g_t[j] * dt * sig;
    }
}

/* Fused backward: gradients of g_kl * KL + <g_t, t> w.r.t. mu and rho on n elements (eps is
 * not read for kind 2), in blocks of `chunk` shared among `threads` OpenMP threads. */
void bbb_sample_kl_bwd(const float *restrict mu, const float *restrict rho,
                       const float *restrict sigma, const float *restrict eps,
                       const float *restrict g_t, float g_kl, float *restrict grad_mu,
                       float *restrict grad_rho, int64_t n, int64_t chunk, float loc,
                       float inv_var, int kind, int threads) {
    const int64_t blocks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= PARALLEL_MIN)
    for (int64_t c = 0; c < blocks; ++c) {
        const int64_t a = c * chunk;
        const int64_t m = a + chunk < n ? chunk : n - a;
        const float *e = kind == 2 ? eps : eps + a;
        if (kind == 0) bwd_loop(0, mu + a, rho + a, sigma + a, e, g_t + a, g_kl, grad_mu + a, grad_rho + a, m, loc, inv_var);
        else if (kind == 1) bwd_loop(1, mu + a, rho + a, sigma + a, e, g_t + a, g_kl, grad_mu + a, grad_rho + a, m, loc, inv_var);
        else bwd_loop(2, mu + a, rho + a, sigma + a, e, g_t + a, g_kl, grad_mu + a, grad_rho + a, m, loc, inv_var);
    }
}
