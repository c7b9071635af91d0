/* Fused CPU kernels of the trajectory/advantage core (flowrl/core/kernels/native.py builds and calls them).

   Each kernel is one pass over rows [r0, r1) of row-major [B, T] arrays; native.py splits the rows over
   threads (ctypes releases the GIL). Masks are bool bytes (0 / 1). Everything here has a torch twin in the
   core that CUDA tensors (and CPU tensors, when no C compiler is found) take; tests/test_core_native.py
   checks every kernel against it and against loop references.

   Why: a token-level recurrence in eager torch costs 14-18 passes over [B, T] (masking, the scan's two
   matrix products, whitening); one fused pass reads each input once and writes the output once. */
#include <math.h>
#include <stdint.h>

/* A step id clamped to [0, S - 1] (padding may hold any id). */
static inline int64_t clamp_step(int64_t s, int64_t S) { return s < 0 ? 0 : (s >= S ? S - 1 : s); }

/* ---------------------------------------------------------------------------------------------- AVX2 paths
   x86-64 CPUs with AVX2 and FMA (checked at run time; ``flowrl_simd(0)`` forces the portable code, for tests)
   step eight rows at once in the eight lanes of a vector: an 8 x 8 tile of each input (8 rows x 8 actions) is
   loaded row by row and transposed in registers, the recurrence runs over the tile's 8 columns with one
   vector per column, and the outputs are transposed back; row sums and the per-step kernels take 8 actions per
   vector. The same formulas as the portable code; the last bits may differ (fused multiply-adds, the order of
   sums), and rows are assigned to code paths in blocks of 8, so results do not depend on the thread count. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FLOWRL_AVX2 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma"))) static inline
/* The scan walks each row backwards, which the hardware prefetchers follow poorly (measured: 37 ms backwards
   against 25 ms forwards at B = 16,384, T = 1,024); prefetching 64 actions ahead brings it to 22 ms. */
#define SCAN_PREFETCH 64

AVX2 __m256 sel(__m256 on, __m256 x, __m256 y) { return _mm256_blendv_ps(y, x, on); } /* on ? x : y, per lane */
AVX2 void add_stats(__m256 y, __m256d *s, __m256d *q) { /* per-lane sums of y and y^2, in double */
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
    s[0] = _mm256_add_pd(s[0], lo);
    s[1] = _mm256_add_pd(s[1], hi);
    q[0] = _mm256_fmadd_pd(lo, lo, q[0]);
    q[1] = _mm256_fmadd_pd(hi, hi, q[1]);
}
AVX2 __m256 mask8(const uint8_t *p) { /* 8 mask bytes -> lanes of all ones (valid) or zeros */
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
}
/* In-register 8 x 8 transpose: r[k][j] -> r[j][k]. */
AVX2 void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
        r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
    }
}
/* The 8 x 8 tile of x at rows i0.., actions t0.. as 8 column vectors (c[j] lane k = x[i0 + k, t0 + j]). */
AVX2 void tile(const float *x, int64_t i0, int64_t T, int64_t t0, __m256 c[8]) {
    for (int k = 0; k < 8; k++) c[k] = _mm256_loadu_ps(x + (i0 + k) * T + t0);
    transpose8(c);
}
AVX2 void mask_tile(const uint8_t *m, int64_t i0, int64_t T, int64_t t0, __m256 c[8]) {
    for (int k = 0; k < 8; k++) c[k] = mask8(m + (i0 + k) * T + t0);
    transpose8(c);
}
/* Action t of rows i0..i0+7, lane by lane (the last T % 8 actions). */
AVX2 __m256 column(const float *x, int64_t i0, int64_t T, int64_t t) {
    float c[8];
    for (int k = 0; k < 8; k++) c[k] = x[(i0 + k) * T + t];
    return _mm256_loadu_ps(c);
}

AVX2 void scan8_avx2(int64_t i0, int64_t T, const uint8_t *mask, const float *a, const float *b, const float *coef,
                     const float *bias, const float *end, const float *V, float gamma, float c, float scale,
                     float *out, double *rowsum, double *rowsq) {
    const __m256 zero = _mm256_setzero_ps(), vg = _mm256_set1_ps(gamma), vc = _mm256_set1_ps(c);
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 acc = zero, vnext = zero;
    __m256 pending = end ? _mm256_loadu_ps(end + i0) : zero;
    __m256 ci = coef ? _mm256_loadu_ps(coef + i0) : _mm256_set1_ps(1.0f);
    __m256 hi = bias ? _mm256_loadu_ps(bias + i0) : zero;
    __m256d s[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()}, q[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    const int64_t full = T - T % 8;
#define SCAN_COLUMN(ON, A, B, VV, Y)                                                              \
    do {                                                                                          \
        __m256 d = _mm256_add_ps(hi, pending);                                                    \
        if (a) d = _mm256_fmadd_ps(ci, b ? _mm256_sub_ps(A, B) : (A), d);                         \
        if (V) {                                                                                  \
            d = _mm256_sub_ps(_mm256_fmadd_ps(vg, vnext, d), VV);                                 \
            vnext = sel(ON, VV, vnext);                                                           \
        }                                                                                         \
        acc = sel(ON, _mm256_fmadd_ps(vc, acc, d), acc);                                          \
        pending = sel(ON, zero, pending);                                                         \
        Y = sel(ON, _mm256_mul_ps(vs, acc), zero);                                                \
        add_stats(Y, s, q);                                                                       \
    } while (0)
    for (int64_t t = T - 1; t >= full; t--) { /* the ragged end, column by column */
        float mk[8];
        for (int k = 0; k < 8; k++) mk[k] = mask[(i0 + k) * T + t] ? 1.0f : 0.0f;
        __m256 on = _mm256_cmp_ps(_mm256_loadu_ps(mk), zero, _CMP_NEQ_OQ);
        __m256 A = a ? column(a, i0, T, t) : zero, B = b ? column(b, i0, T, t) : zero;
        __m256 VV = V ? column(V, i0, T, t) : zero, y;
        float yk[8];
        SCAN_COLUMN(on, A, B, VV, y);
        _mm256_storeu_ps(yk, y);
        for (int k = 0; k < 8; k++) out[(i0 + k) * T + t] = yk[k];
    }
    for (int64_t t0 = full - 8; t0 >= 0; t0 -= 8) {
        __m256 on[8], A[8], B[8], VV[8], Y[8];
        if (t0 >= SCAN_PREFETCH && (t0 & 15) == 0) /* once per 64-byte line of each row */
            for (int k = 0; k < 8; k++) {
                int64_t at = (i0 + k) * T + t0 - SCAN_PREFETCH;
                _mm_prefetch((const char *)(mask + at), _MM_HINT_T0);
                if (a) _mm_prefetch((const char *)(a + at), _MM_HINT_T0);
                if (b) _mm_prefetch((const char *)(b + at), _MM_HINT_T0);
                if (V) _mm_prefetch((const char *)(V + at), _MM_HINT_T0);
                _mm_prefetch((const char *)(out + at), _MM_HINT_T0);
            }
        mask_tile(mask, i0, T, t0, on);
        if (a) tile(a, i0, T, t0, A);
        if (b) tile(b, i0, T, t0, B);
        if (V) tile(V, i0, T, t0, VV);
        for (int j = 7; j >= 0; j--) SCAN_COLUMN(on[j], A[j], B[j], VV[j], Y[j]);
        transpose8(Y);
        for (int k = 0; k < 8; k++) _mm256_storeu_ps(out + (i0 + k) * T + t0, Y[k]);
    }
#undef SCAN_COLUMN
    double sv[8], qv[8];
    _mm256_storeu_pd(sv, s[0]);
    _mm256_storeu_pd(sv + 4, s[1]);
    _mm256_storeu_pd(qv, q[0]);
    _mm256_storeu_pd(qv + 4, q[1]);
    for (int k = 0; k < 8; k++) {
        if (rowsum) rowsum[i0 + k] = sv[k];
        if (rowsq) rowsq[i0 + k] = qv[k];
    }
}

AVX2 void row_sums_avx2(int64_t i, int64_t T, const uint8_t *mask, const float *x, const float *y, double *out_sum,
                        double *out_sq) {
    const uint8_t *m = mask + i * T;
    const float *xi = x + i * T, *yi = y ? y + i * T : 0;
    __m256d s[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()}, q[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        __m256 v = _mm256_loadu_ps(xi + t);
        if (yi) v = _mm256_sub_ps(v, _mm256_loadu_ps(yi + t));
        add_stats(sel(mask8(m + t), v, _mm256_setzero_ps()), s, q);
    }
    double st = 0.0, sq = 0.0, sv[4], qv[4];
    for (; t < T; t++) {
        float v = m[t] ? (yi ? xi[t] - yi[t] : xi[t]) : 0.0f;
        st += v;
        sq += (double)v * v;
    }
    _mm256_storeu_pd(sv, _mm256_add_pd(s[0], s[1]));
    _mm256_storeu_pd(qv, _mm256_add_pd(q[0], q[1]));
    out_sum[i] = st + (sv[0] + sv[1]) + (sv[2] + sv[3]);
    if (out_sq) out_sq[i] = sq + (qv[0] + qv[1]) + (qv[2] + qv[3]);
}

/* Steps come in runs along t: 8 step ids equal to the current run's are checked with two vector compares,
   and the 8 actions are then handled as one vector; a block where the step changes goes action by action. */
AVX2 int same_step8(const int64_t *st, int64_t cur) {
    __m256i c = _mm256_set1_epi64x(cur);
    __m256i e0 = _mm256_cmpeq_epi64(_mm256_loadu_si256((const __m256i *)st), c);
    __m256i e1 = _mm256_cmpeq_epi64(_mm256_loadu_si256((const __m256i *)(st + 4)), c);
    return _mm256_movemask_epi8(_mm256_and_si256(e0, e1)) == -1;
}

AVX2 void gather_steps_avx2(int64_t i, int64_t T, int64_t S, const uint8_t *mask, const int64_t *step,
                            const float *per, float *out) {
    const uint8_t *m = mask + i * T;
    const int64_t *st = step + i * T;
    const float *p = per + i * S;
    float *o = out + i * T;
    int64_t cur = T > 0 ? st[0] : 0;
    __m256 v = _mm256_set1_ps(p[clamp_step(cur, S)]);
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        if (same_step8(st + t, cur)) {
            _mm256_storeu_ps(o + t, sel(mask8(m + t), v, _mm256_setzero_ps()));
            continue;
        }
        for (int l = 0; l < 8; l++) o[t + l] = m[t + l] ? p[clamp_step(st[t + l], S)] : 0.0f;
        cur = st[t + 7];
        v = _mm256_set1_ps(p[clamp_step(cur, S)]);
    }
    for (; t < T; t++) o[t] = m[t] ? p[clamp_step(st[t], S)] : 0.0f;
}

AVX2 void step_sums_avx2(int64_t i, int64_t T, int64_t S, const uint8_t *mask, const int64_t *step, const float *x,
                         float *cnt, float *tot) {
    const uint8_t *m = mask + i * T;
    const int64_t *st = step + i * T;
    const float *xi = x + i * T;
    float *c = cnt + i * S, *u = tot + i * S;
    for (int64_t s = 0; s < S; s++) c[s] = u[s] = 0.0f;
    int64_t cur = T > 0 ? st[0] : 0;
    __m256 acc = _mm256_setzero_ps();
    int n = 0;
    float lanes[8];
    int64_t t = 0;
#define FLUSH_RUN()                                                                                 \
    do {                                                                                          \
        _mm256_storeu_ps(lanes, acc);                                                             \
        int64_t k = clamp_step(cur, S);                                                           \
        c[k] += (float)n;                                                                         \
        u[k] += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])); \
        acc = _mm256_setzero_ps();                                                                \
        n = 0;                                                                                    \
    } while (0)
    for (; t + 8 <= T; t += 8) {
        __m256 on = mask8(m + t);
        if (same_step8(st + t, cur)) {
            acc = _mm256_add_ps(acc, sel(on, _mm256_loadu_ps(xi + t), _mm256_setzero_ps()));
            n += __builtin_popcount(_mm256_movemask_ps(on));
            continue;
        }
        FLUSH_RUN();
        for (int l = 0; l < 8; l++)
            if (m[t + l]) {
                int64_t k = clamp_step(st[t + l], S);
                c[k] += 1.0f;
                u[k] += xi[t + l];
            }
        cur = st[t + 7];
    }
    FLUSH_RUN();
#undef FLUSH_RUN
    for (; t < T; t++)
        if (m[t]) {
            int64_t k = clamp_step(st[t], S);
            c[k] += 1.0f;
            u[k] += xi[t];
        }
}
#endif

static int simd_mode = -1; /* -1: use AVX2 when the CPU has it; 0: never */

/* Set (0: off, 1: on when supported; -1 leaves it) and report whether the AVX2 paths run. */
int flowrl_simd(int set) {
    if (set >= 0) simd_mode = set ? -1 : 0;
#ifdef FLOWRL_AVX2
    return simd_mode != 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}


/* Discounted scan over the valid actions of each row, fused with the reward and the critic (GAE).

   On the valid actions t of row i (masked actions neither earn nor discount; "next" is the next valid one):
     r_t     = coef_i * (a_t - b_t) + bias_i + [t = last valid action of i] * end_i
     delta_t = r_t + gamma * V_next - V_t            (V after the last action is 0; no V: delta_t = r_t)
     y_t     = scale * sum_{valid s >= t} c^{rank(s) - rank(t)} delta_s
   out[i, t] = y_t on valid actions, 0 elsewhere. a, b, V, coef, bias, end may be NULL (the term is 0; b NULL
   with a set: coef_i * a_t; coef NULL: 1). rowsum / rowsq (may be NULL): the sum of y and of y^2 over row i's
   valid actions, in double, for the caller's whitening. REINFORCE++ returns: no V, c = gamma; GAE: c = gamma
   lambda. out may be a, b or V (each position is read before it is written, once, from the end).

   Portable code: ``NR`` rows are stepped together (a compile-time constant after inlining): their recurrences
   are independent, so the core is not left waiting on one row's multiply-add chain. Branch-free selects.
   (With rows of 4 KiB and page-aligned arrays its loads sit 4 KiB from its last stores, which costs it about
   30%; the AVX2 code stores whole tiles behind its loads and does not pay that.) */
#define SCAN_ROWS 4
static inline void scan_block(const int NR, int64_t i0, int64_t T, const uint8_t *mask, const float *a,
                              const float *b, const float *coef, const float *bias, const float *end, const float *V,
                              float gamma, float c, float scale, float *out, double *rowsum, double *rowsq) {
    float acc[SCAN_ROWS], vnext[SCAN_ROWS], pending[SCAN_ROWS], ci[SCAN_ROWS], hi[SCAN_ROWS];
    double s[SCAN_ROWS], ss[SCAN_ROWS];
    for (int k = 0; k < NR; k++) {
        int64_t i = i0 + k;
        acc[k] = vnext[k] = 0.0f;
        pending[k] = end ? end[i] : 0.0f;
        ci[k] = coef ? coef[i] : 1.0f;
        hi[k] = bias ? bias[i] : 0.0f;
        s[k] = ss[k] = 0.0;
    }
    for (int64_t t = T - 1; t >= 0; t--) {
        for (int k = 0; k < NR; k++) {
            int64_t at = (i0 + k) * T + t;
            int on = mask[at] != 0;
            float d = hi[k] + pending[k];
            if (a) d += ci[k] * (b ? a[at] - b[at] : a[at]);
            if (V) {
                float v = V[at];
                d += gamma * vnext[k] - v;
                vnext[k] = on ? v : vnext[k];
            }
            float nacc = d + c * acc[k];
            acc[k] = on ? nacc : acc[k];
            pending[k] = on ? 0.0f : pending[k];
            float y = on ? scale * acc[k] : 0.0f;
            out[at] = y;
            s[k] += y;
            ss[k] += (double)y * y;
        }
    }
    for (int k = 0; k < NR; k++) {
        if (rowsum) rowsum[i0 + k] = s[k];
        if (rowsq) rowsq[i0 + k] = ss[k];
    }
}

void flowrl_scan(int64_t r0, int64_t r1, int64_t T, const uint8_t *mask, const float *a, const float *b,
                 const float *coef, const float *bias, const float *end, const float *V, float gamma, float c,
                 float scale, float *out, double *rowsum, double *rowsq) {
    int64_t i = r0;
#ifdef FLOWRL_AVX2
    if (flowrl_simd(-1))
        for (; i + 8 <= r1; i += 8) scan8_avx2(i, T, mask, a, b, coef, bias, end, V, gamma, c, scale, out, rowsum, rowsq);
#endif
    for (; i + SCAN_ROWS <= r1; i += SCAN_ROWS)
        scan_block(SCAN_ROWS, i, T, mask, a, b, coef, bias, end, V, gamma, c, scale, out, rowsum, rowsq);
    for (; i < r1; i++) scan_block(1, i, T, mask, a, b, coef, bias, end, V, gamma, c, scale, out, rowsum, rowsq);
}

/* Per-row sums over valid actions: out_sum[i] = sum_t m * (x_t - y_t) (y may be NULL: 0), and, when out_sq is
   not NULL, out_sq[i] = sum_t m * (x_t - y_t)^2. Double accumulators, eight lanes (one chain of dependent adds
   would wait on each add). */
void flowrl_row_sums(int64_t r0, int64_t r1, int64_t T, const uint8_t *mask, const float *x, const float *y,
                     double *out_sum, double *out_sq) {
#ifdef FLOWRL_AVX2
    if (flowrl_simd(-1)) {
        for (int64_t i = r0; i < r1; i++) row_sums_avx2(i, T, mask, x, y, out_sum, out_sq);
        return;
    }
#endif
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *m = mask + i * T;
        const float *xi = x + i * T, *yi = y ? y + i * T : 0;
        double s[8] = {0}, ss[8] = {0};
        int64_t t = 0;
        for (; t + 8 <= T; t += 8) {
            for (int l = 0; l < 8; l++) {
                float v = m[t + l] ? (yi ? xi[t + l] - yi[t + l] : xi[t + l]) : 0.0f;
                s[l] += v;
                ss[l] += (double)v * v;
            }
        }
        for (; t < T; t++) {
            float v = m[t] ? (yi ? xi[t] - yi[t] : xi[t]) : 0.0f;
            s[0] += v;
            ss[0] += (double)v * v;
        }
        double st = 0.0, sst = 0.0;
        for (int l = 0; l < 8; l++) {
            st += s[l];
            sst += ss[l];
        }
        out_sum[i] = st;
        if (out_sq) out_sq[i] = sst;
    }
}

/* x = (x - mu) * inv on valid actions, 0 elsewhere, in place (the apply step of a whitening). */
void flowrl_affine_masked(int64_t r0, int64_t r1, int64_t T, const uint8_t *mask, float *x, float mu, float inv) {
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *m = mask + i * T;
        float *xi = x + i * T;
        for (int64_t t = 0; t < T; t++) xi[t] = m[t] ? (xi[t] - mu) * inv : 0.0f;
    }
}

/* x = 0 off the mask, in place; returns the number of non-finite values left on the mask. */
int64_t flowrl_zero_off_mask_count_nonfinite(int64_t r0, int64_t r1, int64_t T, const uint8_t *mask, float *x) {
    int64_t bad = 0;
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *m = mask + i * T;
        float *xi = x + i * T;
        for (int64_t t = 0; t < T; t++) {
            float v = m[t] ? xi[t] : 0.0f;
            xi[t] = v;
            bad += !isfinite(v);
        }
    }
    return bad;
}

/* out[i, t] = v[i] on valid actions, 0 elsewhere (a per-trajectory value on its actions). */
void flowrl_broadcast_rows(int64_t r0, int64_t r1, int64_t T, const uint8_t *mask, const float *v, float *out) {
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *m = mask + i * T;
        float *o = out + i * T;
        const float vi = v[i];
        for (int64_t t = 0; t < T; t++) o[t] = m[t] ? vi : 0.0f;
    }
}

/* out[i, t] = per[i, clamp(step[i, t], 0, S - 1)] on valid actions, 0 elsewhere (per: float [B, S], finite). */
void flowrl_gather_steps(int64_t r0, int64_t r1, int64_t T, int64_t S, const uint8_t *mask, const int64_t *step,
                         const float *per, float *out) {
#ifdef FLOWRL_AVX2
    if (flowrl_simd(-1)) {
        for (int64_t i = r0; i < r1; i++) gather_steps_avx2(i, T, S, mask, step, per, out);
        return;
    }
#endif
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *m = mask + i * T;
        const int64_t *st = step + i * T;
        const float *p = per + i * S;
        float *o = out + i * T;
        for (int64_t t = 0; t < T; t++) {
            int64_t k = clamp_step(st[t], S);
            o[t] = m[t] ? p[k] : 0.0f;
        }
    }
}

/* cnt[i, s] = # valid actions of row i in step s; tot[i, s] = the sum of x over them (steps clamped to
   [0, S - 1]). cnt and tot: float [B, S], overwritten. Steps come in runs along t (non-decreasing in every
   rollout here; any order is still summed right), so each row sums in registers until its step changes,
   and ``SCAN_ROWS`` rows go together (one row's adds would wait on each other). */
void flowrl_step_sums(int64_t r0, int64_t r1, int64_t T, int64_t S, const uint8_t *mask, const int64_t *step,
                      const float *x, float *cnt, float *tot) {
#ifdef FLOWRL_AVX2
    if (flowrl_simd(-1)) {
        for (int64_t i = r0; i < r1; i++) step_sums_avx2(i, T, S, mask, step, x, cnt, tot);
        return;
    }
#endif
    for (int64_t i = r0; i < r1; i++)
        for (int64_t s = 0; s < S; s++) cnt[i * S + s] = tot[i * S + s] = 0.0f;
    for (int64_t i0 = r0; i0 < r1; i0 += SCAN_ROWS) {
        const int NR = r1 - i0 < SCAN_ROWS ? (int)(r1 - i0) : SCAN_ROWS;
        int64_t cur[SCAN_ROWS];
        float c[SCAN_ROWS], u[SCAN_ROWS];
        for (int k = 0; k < NR; k++) {
            cur[k] = 0;
            c[k] = u[k] = 0.0f;
        }
        for (int64_t t = 0; t < T; t++) {
            for (int k = 0; k < NR; k++) {
                int64_t at = (i0 + k) * T + t, st = step[at];
                int64_t s = clamp_step(st, S);
                int on = mask[at] != 0;
                if (on && s != cur[k]) { /* flush the finished run */
                    cnt[(i0 + k) * S + cur[k]] += c[k];
                    tot[(i0 + k) * S + cur[k]] += u[k];
                    cur[k] = s;
                    c[k] = u[k] = 0.0f;
                }
                c[k] += on ? 1.0f : 0.0f;
                u[k] += on ? x[at] : 0.0f;
            }
        }
        for (int k = 0; k < NR; k++) {
            cnt[(i0 + k) * S + cur[k]] += c[k];
            tot[(i0 + k) * S + cur[k]] += u[k];
        }
    }
}
