/* bbb native kernels (issue 8): counter-based normal noise and the fused weight sample + KL.
 *
 * Built on first use by bbb/_native.py with the system C compiler (-O3 -fopenmp; -mavx512f
 * -mavx512vl -mavx512bw -mavx512dq where torch reports AVX512, else -mavx2 -mfma where the CPU
 * has them) and loaded with ctypes. The loops are written so that the compiler vectorizes
 * them, with the math inlined (below). Work is shared among OpenMP threads (the process's
 * libgomp, the one PyTorch loaded, so the same thread pool) in fixed blocks, so that results
 * do not depend on the number of threads.
 *
 * SIMD_REDUCTIONS: the loops that sum the KL's terms keep 8 float lanes (simdlen(8)) whatever
 * the vector width, so the sums are added in the order of an AVX2 build and an AVX-512 build
 * gives the same bits (the elementwise loops use all 16 lanes: their results do not depend on
 * the width). Without it, the KL of an AVX-512 build differed in its last digits.
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

/* Inline float32 math (no calls, so every loop below vectorizes with any C compiler):
 * exp of a non-positive argument, log of a positive normal float, the sine and cosine of a
 * whole turn's fraction, and softplus and log-softplus through t = exp(-|r|). Each is accurate
 * to a few float32 ulps (the tests compare with float64). */
static inline float as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint32_t as_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* exp(x) for x <= 88: x = k ln 2 + r, |r| <= ln2 / 2 (ln 2 in two parts, Cody and Waite),
 * Taylor to r^7 (truncation < 5e-9 relative), times 2^k from the exponent bits; 0 below
 * -87.3 (where float32 would go subnormal). */
static inline float exp_f(float x) {
    float xc = x < -87.3f ? -87.3f : x;
    float k = rintf(xc * 1.44269504088896341f);
    float r = xc - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.98412698e-4f;     /* 1/7! */
    p = p * r + 1.38888889e-3f;   /* 1/6! */
    p = p * r + 8.33333333e-3f;   /* 1/5! */
    p = p * r + 4.16666667e-2f;   /* 1/4! */
    p = p * r + 1.66666667e-1f;   /* 1/3! */
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float scale = as_float((uint32_t)((int32_t)k + 127) << 23);
    return x < -87.3f ? 0.0f : p * scale;
}

/* log(x) for a positive normal float: x = 2^e m, m in [sqrt(1/2), sqrt(2)), f = m - 1,
 * log(1 + f) = f L(f) with L a degree-9 polynomial in (f - c) / h over f's range
 * (interpolation at Chebyshev points, fitted in float64; 1.3e-7 relative in float32
 * arithmetic); no division, so it vectorizes cheaply. */
static inline float log_pos(float x) {
    uint32_t bits = as_bits(x);
    float e = (float)((int32_t)(bits >> 23) - 127);
    float m = as_float((bits & 0x007FFFFFu) | 0x3F800000u);
    int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e = big ? e + 1.0f : e;
    float f = m - 1.0f;
    float y = (f - 6.066017178e-02f) * 2.828427125e+00f;
    float p = -6.593384397e-06f;
    p = p * y + 2.186176177e-05f;
    p = p * y - 5.518442984e-05f;
    p = p * y + 1.893080860e-04f;
    p = p * y - 6.806797349e-04f;
    p = p * y + 2.446760609e-03f;
    p = p * y - 9.149041319e-03f;
    p = p * y + 3.648827690e-02f;
    p = p * y - 1.633952963e-01f;
    p = p * y + 9.708432498e-01f;
    return e * 0.693145751953125f + (f * p + e * 1.42860676533018708e-6f);
}

/* cos(2 pi u) and sin(2 pi u) for u in [0, 1): the nearest quarter turn q, the rest a in
 * [-pi/4, pi/4] by Taylor polynomials (sin to a^9, cos to a^10: < 2e-9), rotated by q. */
static inline void cossin_turn(float u, float *c_out, float *s_out) {
    float v = 4.0f * u;
    float q = rintf(v);
    float a = (v - q) * 1.57079632679489662f;
    float z = a * a;
    float sn = 2.75573192e-6f;        /* 1/9! */
    sn = sn * z - 1.98412698e-4f;     /* 1/7! */
    sn = sn * z + 8.33333333e-3f;
    sn = sn * z - 1.66666667e-1f;
    sn = a + a * z * sn;
    float cs = -2.75573192e-7f;       /* 1/10! */
    cs = cs * z + 2.48015873e-5f;     /* 1/8! */
    cs = cs * z - 1.38888889e-3f;
    cs = cs * z + 4.16666667e-2f;
    cs = cs * z - 0.5f;
    cs = 1.0f + z * cs;
    int qi = (int)q & 3;
    float c = (qi & 1) ? sn : cs;
    float s = (qi & 1) ? cs : sn;
    *c_out = (qi == 1 || qi == 2) ? -c : c;
    *s_out = (qi >= 2) ? -s : s;
}

/* softplus(r) and log softplus(r) from t = exp(-|r|) in (0, 1]: log1p(t) = t Q(t) and
 * log Q(t) = P(t), degree-9 polynomials in x = 2t - 1 (interpolation at Chebyshev points,
 * fitted in float64; errors 1e-7 relative for Q and 4e-8 absolute for P, measured in float32
 * arithmetic). r <= 0: softplus = t Q, log softplus = r + P. r > 0: softplus = r + t Q, its
 * log by log_pos. */
static inline float poly_q(float x) {
    float p = -6.360114211e-06f;
    p = p * x + 2.101880254e-05f;
    p = p * x - 5.271862034e-05f;
    p = p * x + 1.798846577e-04f;
    p = p * x - 6.427940643e-04f;
    p = p * x + 2.290334784e-03f;
    p = p * x - 8.460985040e-03f;
    p = p * x + 3.315212824e-02f;
    p = p * x - 1.442635519e-01f;
    return p * x + 8.109302238e-01f;
}
static inline float poly_p(float x) {
    float p = -2.267615145e-06f;
    p = p * x + 7.812869515e-06f;
    p = p * x - 2.117966850e-05f;
    p = p * x + 7.704446665e-05f;
    p = p * x - 2.965462787e-04f;
    p = p * x + 1.174074460e-03f;
    p = p * x - 5.037620077e-03f;
    p = p * x + 2.505788046e-02f;
    p = p * x - 1.778988467e-01f;
    return p * x - 2.095732725e-01f;
}

#define BM_PAIRS 256
#define TILE (2 * BM_PAIRS)
#define SWITCH (-20.0f)
#define PARALLEL_MIN 32768 /* fewer elements: one thread */

int bbb_native_abi(void) { return 9; }
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

/* The 2 * BM_PAIRS normals of tile t into o[0 .. TILE). */
static void normal_tile(uint64_t t, uint32_t k0, uint32_t k1, float *restrict o) {
    uint32_t X0[BM_PAIRS] __attribute__((aligned(64)));
    uint32_t X1[BM_PAIRS] __attribute__((aligned(64)));
    threefry_tile(t * (uint64_t)BM_PAIRS, k0, k1, X0, X1);
#pragma omp simd
    for (int j = 0; j < BM_PAIRS; ++j) {
        float u1 = ((float)(int32_t)(X0[j] >> 1) + 0.5f) * 4.656612873077392578125e-10f; /* 2^-31 */
        float u2 = (float)(int32_t)(X1[j] >> 8) * 5.9604644775390625e-08f;             /* 2^-24 */
        float l = log_pos(u1);
        float rad = sqrtf(l < 0.0f ? -2.0f * l : 0.0f);
        float c, sn;
        cossin_turn(u2, &c, &sn);
        o[j] = rad * c;
        o[BM_PAIRS + j] = rad * sn;
    }
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

/* Priors of the fused kernels: PRIOR_GAUSS, N(loc, 1 / inv_var) with the closed-form KL
 * (a0 = loc, a1 = inv_var); PRIOR_MIX, the scale mixture pi N(0, s1^2) + (1 - pi) N(0, s2^2)
 * with the single-sample Monte Carlo KL log q(w) - log p(w) at w = mu + sigma eps (a0, a1 =
 * log(pi_k / s_k / sqrt(2 pi)), a2, a3 = 1 / s_k^2; every kind draws eps: for local it is the
 * KL's own weight sample, independent of the activations' noise, as in the eager layers). */
#define PRIOR_GAUSS 0
#define PRIOR_MIX 1
#define HALF_LOG_2PI 0.91893853320467274f

/* log(exp(a) + exp(b)) = max + log1p(exp(-|a - b|)), log1p(t) = t Q(t) */
static inline float logaddexp_f(float a, float b) {
    float m = a > b ? a : b;
    float t = exp_f(-fabsf(a - b));
    return m + t * poly_q(2.0f * t - 1.0f);
}

/* sigma = softplus(r) and, for r <= 0, log sigma (log sigma := r below the switch); for r > 0
 * (sigma > log 2, rare) *ls is 0 and the caller adds -log sigma in a second loop
 * (fix_positive), which keeps the general log out of the vectorized loop. */
static inline float softplus_logs(float r, float *ls) {
    float t = exp_f(-fabsf(r));
    float x = 2.0f * t - 1.0f;
    float tq = t * poly_q(x);
    *ls = r > 0.0f ? 0.0f : (r < SWITCH ? r : r + poly_p(x));
    return r > 0.0f ? r + tq : tq;
}

/* -sum of log sigma over the tile's elements with r > 0 (see softplus_logs). */
static inline float fix_positive(const float *restrict rho, const float *restrict s, int64_t m) {
    float sum = 0.0f;
    for (int64_t j = 0; j < m; ++j)
        if (rho[j] > 0.0f) sum -= log_pos(s[j]);
    return sum;
}

/* d log sigma / d rho = sigmoid(rho) / sigma = 1 / (sigma (1 + e^-rho)), one division; 1 below
 * the switch (where sigmoid(rho) = sigma = e^rho to float precision). sigmoid = sigma * it. */
static inline float dlog_sigma(float r, float s) {
    float em = exp_f(r < -80.0f ? 80.0f : -r); /* e^-rho */
    return r < SWITCH ? 1.0f : 1.0f / (s * (1.0f + em));
}

/* The mixture's score -d log p(w)/dw = w (r1 / s1^2 + r2 / s2^2), the responsibilities r as
 * sigmoids of the components' log-ratio d from one exp (a0, a1 = log(pi_k / s_k / sqrt(2 pi)),
 * a2, a3 = 1 / s_k^2). */
static inline float mix_score(float w, float a0, float a1, float a2, float a3) {
    float d = (a0 - a1) + 0.5f * (a3 - a2) * (w * w);
    float t = exp_f(-fabsf(d));
    float inv = 1.0f / (1.0f + t);
    float r1 = d >= 0.0f ? inv : t * inv;
    float r2 = d >= 0.0f ? t * inv : inv;
    return w * (r1 * a2 + r2 * a3);
}

/* The sample-independent part of one tile: sigma (stored) and, summed, the Gaussian closed
 * form's terms or the Monte Carlo KL's -log sigma - log(2 pi)/2 (log q without eps). */
static inline float sigma_tile(const int prior, const float *restrict mu,
                               const float *restrict rho, float *restrict s_out, int64_t m,
                               float a0, float a1) {
    float sum = 0.0f;
    int positive = 0;
#pragma omp simd simdlen(8) reduction(+ : sum, positive) /* see SIMD_REDUCTIONS */
    for (int64_t j = 0; j < m; ++j) {
        float r = rho[j];
        float ls;
        float s = softplus_logs(r, &ls);
        positive += r > 0.0f;
        s_out[j] = s;
        if (prior == PRIOR_GAUSS) {
            float d = mu[j] - a0;
            sum += (s * s + d * d) * (0.5f * a1) - ls;
        } else {
            sum += -ls - HALF_LOG_2PI;
        }
    }
    return positive ? sum + fix_positive(rho, s_out, m) : sum;
}

/* One weight sample of one tile: the estimator's tensor (kinds 0, 1) and, for the mixture,
 * the sum of -eps^2/2 - log p(w) at w = mu + sigma eps (the sample's part of the MC KL). */
static inline float sample_tile(const int kind, const int prior, const float *restrict mu,
                                const float *restrict s_in, const float *restrict e,
                                float *restrict t_out, int64_t m, float a0, float a1, float a2,
                                float a3) {
    float sum = 0.0f;
#pragma omp simd simdlen(8) reduction(+ : sum) /* see SIMD_REDUCTIONS */
    for (int64_t j = 0; j < m; ++j) {
        float s = s_in[j];
        float ej = e[j];
        if (kind == 0) t_out[j] = mu[j] + s * ej;
        else if (kind == 1) t_out[j] = s * ej;
        if (prior == PRIOR_MIX) {
            float w = mu[j] + s * ej;
            float w2 = w * w;
            sum += -0.5f * ej * ej - logaddexp_f(a0 - 0.5f * a2 * w2, a1 - 0.5f * a3 * w2);
        }
    }
    return sum;
}

/* One sample: the whole forward of one tile in a single pass (kind and prior constant). */
static inline float fwd_tile1(const int kind, const int prior, const float *restrict mu,
                             const float *restrict rho, const float *restrict e,
                             float *restrict t_out, float *restrict s_out, int64_t m, float a0,
                             float a1, float a2, float a3) {
    float sum = 0.0f;
    int positive = 0;
#pragma omp simd simdlen(8) reduction(+ : sum, positive) /* see SIMD_REDUCTIONS */
    for (int64_t j = 0; j < m; ++j) {
        float r = rho[j];
        float ls;
        float s = softplus_logs(r, &ls);
        positive += r > 0.0f;
        s_out[j] = s;
        float ej = (kind == 2 && prior == PRIOR_GAUSS) ? 0.0f : e[j];
        t_out[j] = kind == 0 ? mu[j] + s * ej : (kind == 1 ? s * ej : s * s);
        if (prior == PRIOR_GAUSS) {
            float d = mu[j] - a0;
            sum += (s * s + d * d) * (0.5f * a1) - ls;
        } else {
            float w = mu[j] + s * ej;
            float w2 = w * w;
            float lp = logaddexp_f(a0 - 0.5f * a2 * w2, a1 - 0.5f * a3 * w2);
            sum += (-0.5f * ej * ej - HALF_LOG_2PI - ls) - lp;
        }
    }
    return positive ? sum + fix_positive(rho, s_out, m) : sum;
}

/* Fused forward on elements [0, n) for `samples` weight samples (kinds 0, 1; 1 for kind 2):
 * writes sigma (n), t ((samples, n) for kinds 0 and 1, the variance (n) for kind 2) and, where
 * noise is drawn (all but the Gaussian prior's kind 2), eps (samples, n); sample q, element e
 * uses element start + q * stride + e of the noise stream (start and stride multiples of
 * TILE). The KL (closed form; or the Monte Carlo estimate averaged over the samples) is summed
 * per block of `chunk` elements (a multiple of TILE) into partial[block]. Blocks are shared
 * among `threads` OpenMP threads; the caller adds the partial sums in order, so the result
 * does not depend on the number of threads. */
void bbb_sample_kl_fwd(const float *restrict mu, const float *restrict rho, float *restrict t_out,
                       float *restrict eps, float *restrict sigma_out, int64_t start,
                       int64_t stride, int64_t n, int64_t chunk, uint32_t k0, uint32_t k1,
                       int prior, float a0, float a1, float a2, float a3, int kind, int samples,
                       double *restrict partial, int threads) {
    const int noise = !(kind == 2 && prior == PRIOR_GAUSS);
    const int64_t blocks = (n + chunk - 1) / chunk;
    const float inv_s = 1.0f / (float)samples;
#pragma omp parallel for schedule(static) num_threads(threads) if (n * samples >= PARALLEL_MIN)
    for (int64_t c = 0; c < blocks; ++c) {
        float tmp[TILE] __attribute__((aligned(64)));
        const int64_t c0 = c * chunk;
        const int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
        double acc = 0.0;
        for (int64_t b0 = c0; b0 < c1; b0 += TILE) {
            const int64_t m = c1 - b0 < TILE ? c1 - b0 : TILE;
            const float *mb = mu + b0;
            float *sb = sigma_out + b0;
            if (samples == 1) { /* one pass per tile */
                const float *e = tmp;
                if (noise) {
                    const uint64_t tile = (uint64_t)((start + b0) / TILE);
                    if (m == TILE) {
                        normal_tile(tile, k0, k1, eps + b0);
                        e = eps + b0;
                    } else {
                        normal_tile(tile, k0, k1, tmp);
                        memcpy(eps + b0, tmp, (size_t)m * sizeof(float));
                    }
                }
                float *tb1 = t_out + b0;
#define FWD(K, P) fwd_tile1(K, P, mb, rho + b0, e, tb1, sb, m, a0, a1, a2, a3)
                float sum1;
                if (prior == PRIOR_GAUSS)
                    sum1 = kind == 0 ? FWD(0, PRIOR_GAUSS) : (kind == 1 ? FWD(1, PRIOR_GAUSS) : FWD(2, PRIOR_GAUSS));
                else
                    sum1 = kind == 0 ? FWD(0, PRIOR_MIX) : (kind == 1 ? FWD(1, PRIOR_MIX) : FWD(2, PRIOR_MIX));
#undef FWD
                acc += (double)sum1;
                continue;
            }
            acc += (double)(prior == PRIOR_GAUSS ? sigma_tile(PRIOR_GAUSS, mb, rho + b0, sb, m, a0, a1)
                                                 : sigma_tile(PRIOR_MIX, mb, rho + b0, sb, m, a0, a1));
            if (kind == 2) {
                float *tb = t_out + b0;
#pragma omp simd
                for (int64_t j = 0; j < m; ++j) tb[j] = sb[j] * sb[j];
            }
            if (!noise) continue;
            float part = 0.0f;
            for (int q = 0; q < samples; ++q) {
                float *eq = eps + (int64_t)q * n + b0;
                const float *e = eq;
                const uint64_t tile = (uint64_t)((start + (int64_t)q * stride + b0) / TILE);
                if (m == TILE) {
                    normal_tile(tile, k0, k1, eq);
                } else {
                    normal_tile(tile, k0, k1, tmp);
                    memcpy(eq, tmp, (size_t)m * sizeof(float));
                    e = tmp;
                }
                float *tq = t_out + (int64_t)q * n + b0;
#define SMP(K, P) sample_tile(K, P, mb, sb, e, tq, m, a0, a1, a2, a3)
                if (prior == PRIOR_GAUSS)
                    part += kind == 0 ? SMP(0, PRIOR_GAUSS) : SMP(1, PRIOR_GAUSS);
                else
                    part += kind == 0 ? SMP(0, PRIOR_MIX) : (kind == 1 ? SMP(1, PRIOR_MIX) : SMP(2, PRIOR_MIX));
#undef SMP
            }
            acc += (double)(part * inv_s);
        }
        partial[c] = acc;
    }
}

/* One sample: the whole backward in a single pass (kind and prior constant; the formulas
 * of bwd_tile with one sample). */
static inline void bwd_loop1(const int kind, const int prior, const int hg,
                            const float *restrict mu, const float *restrict rho,
                            const float *restrict sigma, const float *restrict eps,
                            const float *restrict g_t, const float *restrict g_mu, float g_kl,
                            float *restrict grad_mu, float *restrict grad_rho, int64_t n,
                            float a0, float a1, float a2, float a3) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        float r = rho[j];
        float s = sigma[j];
        float dlog = dlog_sigma(r, s);
        float sig = s * dlog;
        float ej = (kind == 2 && prior == PRIOR_GAUSS) ? 0.0f : eps[j];
        float dt = kind == 2 ? 2.0f * s : ej;
        float gm, gs; /* the KL's d/dmu and its d/dsigma without the -1/sigma term */
        if (prior == PRIOR_GAUSS) {
            gm = (mu[j] - a0) * a1;
            gs = s * a1;
        } else {
            float score = mix_score(mu[j] + s * ej, a0, a1, a2, a3);
            gm = score;
            gs = score * ej;
        }
        grad_mu[j] = gm * g_kl + (kind == 0 ? g_t[j] : 0.0f) + (hg ? g_mu[j] : 0.0f);
        grad_rho[j] = (gs * sig) * g_kl - g_kl * dlog + g_t[j] * dt * sig;
    }
}

/* The fused backward of one tile, for a constant kind and prior: gradients of
 * g_kl * KL + sum_q <g_t[q], t[q]> w.r.t. mu and rho. The KL's gradients: Gaussian closed
 * form, d/dmu = (mu - loc) inv_var, d/dsigma = sigma inv_var - 1/sigma; mixture MC (averaged
 * over the samples), with score = -d log p(w)/dw = w (r1 / s1^2 + r2 / s2^2), r the
 * responsibilities (sigmoids of the components' log-ratio, from one exp): d/dmu = mean score,
 * d/dsigma = mean(score eps) - 1/sigma. d/drho = d/dsigma sigmoid(rho), with
 * d log sigma/drho = 1 below the switch. */
static inline void bwd_tile(const int kind, const int prior, const int hg,
                            const float *restrict mu, const float *restrict rho,
                            const float *restrict sigma, const float *restrict eps,
                            const float *restrict g_t, const float *restrict g_mu, float g_kl,
                            float *restrict grad_mu, float *restrict grad_rho, int64_t m,
                            int64_t n, int samples, float a0, float a1, float a2, float a3) {
    float SIG[TILE] __attribute__((aligned(64)));
    float DLOG[TILE] __attribute__((aligned(64)));
    float AM[TILE] __attribute__((aligned(64)));  /* sum_q score (mixture) */
    float AS[TILE] __attribute__((aligned(64)));  /* sum_q score eps (mixture) */
    float GT[TILE] __attribute__((aligned(64)));  /* sum_q g_t */
    float GTE[TILE] __attribute__((aligned(64))); /* sum_q g_t dt/dsigma */
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
        float r = rho[j];
        float s = sigma[j];
        float dlog = dlog_sigma(r, s);
        DLOG[j] = dlog;
        SIG[j] = s * dlog;
        AM[j] = AS[j] = GT[j] = GTE[j] = 0.0f;
    }
    const int noise = !(kind == 2 && prior == PRIOR_GAUSS);
    const int gsamples = kind == 2 ? 1 : samples; /* g_t rows */
    const int esamples = noise ? samples : 0;       /* eps rows */
    const int rows = gsamples > esamples ? gsamples : esamples;
    for (int q = 0; q < rows; ++q) {
        const float *restrict eq = eps + (int64_t)q * n;
        const float *restrict gq = g_t + (int64_t)q * n;
        const int has_g = q < gsamples, has_e = q < esamples;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
            float s = sigma[j];
            float ej = has_e ? eq[j] : 0.0f;
            if (has_g) {
                float g = gq[j];
                GT[j] += g;
                GTE[j] += g * (kind == 2 ? 2.0f * s : ej);
            }
            if (prior == PRIOR_MIX && has_e) {
                float score = mix_score(mu[j] + s * ej, a0, a1, a2, a3);
                AM[j] += score;
                AS[j] += score * ej;
            }
        }
    }
    const float inv_s = 1.0f / (float)samples;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
        float s = sigma[j];
        float gm = prior == PRIOR_GAUSS ? (mu[j] - a0) * a1 : AM[j] * inv_s;
        float gs = prior == PRIOR_GAUSS ? s * a1 : AS[j] * inv_s;
        grad_mu[j] = gm * g_kl + (kind == 0 ? GT[j] : 0.0f) + (hg ? g_mu[j] : 0.0f);
        grad_rho[j] = (gs * SIG[j]) * g_kl - g_kl * DLOG[j] + GTE[j] * SIG[j];
    }
}

/* Fused backward on n elements: g_t is (samples, n) for kinds 0 and 1, (n) for kind 2; eps as
 * the forward wrote it (not read for the Gaussian prior's kind 2); g_mu, NULL or n elements,
 * an upstream gradient of mu added to grad_mu in the same pass (kinds 1 and 2: the layer's
 * mean path, which would otherwise cost autograd a pass to sum; ignored for kind 0, whose g_t
 * carries it). Blocks of `chunk` are shared among `threads` OpenMP threads. */
void bbb_sample_kl_bwd(const float *restrict mu, const float *restrict rho,
                       const float *restrict sigma, const float *restrict eps,
                       const float *restrict g_t, const float *restrict g_mu, float g_kl,
                       float *restrict grad_mu, float *restrict grad_rho, int64_t n,
                       int64_t chunk, int prior, float a0, float a1, float a2, float a3, int kind,
                       int samples, int threads) {
    const int64_t blocks = (n + chunk - 1) / chunk;
    const int hg = g_mu != 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (n * samples >= PARALLEL_MIN)
    for (int64_t c = 0; c < blocks; ++c) {
        const int64_t c0 = c * chunk;
        const int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
        const float *gm = hg ? g_mu + c0 : g_mu;
        if (samples == 1) { /* one pass over the block */
            const int64_t m1 = c1 - c0;
            const int noise = !(kind == 2 && prior == PRIOR_GAUSS);
            const float *e1 = noise ? eps + c0 : eps;
#define BWD1(K, P, H) bwd_loop1(K, P, H, mu + c0, rho + c0, sigma + c0, e1, g_t + c0, gm, g_kl, grad_mu + c0, grad_rho + c0, m1, a0, a1, a2, a3)
#define BWD1H(K, P) do { if (hg) BWD1(K, P, 1); else BWD1(K, P, 0); } while (0)
            if (prior == PRIOR_GAUSS) {
                if (kind == 0) BWD1(0, PRIOR_GAUSS, 0); /* reparam: g_t carries mu's gradient */
                else if (kind == 1) BWD1H(1, PRIOR_GAUSS);
                else BWD1H(2, PRIOR_GAUSS);
            } else {
                if (kind == 0) BWD1(0, PRIOR_MIX, 0);
                else if (kind == 1) BWD1H(1, PRIOR_MIX);
                else BWD1H(2, PRIOR_MIX);
            }
#undef BWD1H
#undef BWD1
            continue;
        }
        for (int64_t b0 = c0; b0 < c1; b0 += TILE) {
            const int64_t m = c1 - b0 < TILE ? c1 - b0 : TILE;
            const float *gmb = hg ? g_mu + b0 : g_mu;
#define BWD(K, P, H) bwd_tile(K, P, H, mu + b0, rho + b0, sigma + b0, eps + b0, g_t + b0, gmb, g_kl, grad_mu + b0, grad_rho + b0, m, n, samples, a0, a1, a2, a3)
#define BWDH(K, P) do { if (hg) BWD(K, P, 1); else BWD(K, P, 0); } while (0)
            if (prior == PRIOR_GAUSS) {
                if (kind == 0) BWD(0, PRIOR_GAUSS, 0);
                else if (kind == 1) BWDH(1, PRIOR_GAUSS);
                else BWDH(2, PRIOR_GAUSS);
            } else {
                if (kind == 0) BWD(0, PRIOR_MIX, 0);
                else if (kind == 1) BWDH(1, PRIOR_MIX);
                else BWDH(2, PRIOR_MIX);
            }
#undef BWDH
#undef BWD
        }
    }
}
