/* int8 x int16 GEMV for x86 CPUs with AVX2 (built and loaded by int8_gemv.py).

   y[r, n] ~ scale[n] * sum_k q[n, k] * x[r, k] for a few rows of x: greedy_head.py bounds every
   logit of the LM head with it while streaming half of bf16's bytes. x is rounded to int16 with
   one scale per row (its error is written to ex[r] and is part of greedy_head's bound); the
   products and their sums are exact in int32/int64, so the only other rounding is the final
   one to fp32. Integer arithmetic is ~2x fewer instructions per weight than converting int8 to
   fp32, which on this class of host (AVX2 at half width) was the limit, not the memory.

   The copy is streamed once whatever the number of rows: each group of four vocabulary rows is
   widened to int16 into a buffer that stays in L1 and serves every block of three x rows.

   q is packed so that one pass reads memory in order: [n_pad / 4][k / 16][4][16] int8, i.e.
   for each group of four vocabulary rows, their first 16 weights (one 64-byte line), then their
   next 16, ... (int8_gemv.Avx2Estimator.pack). A row-major layout streamed four rows at a time reads four
   streams and ran ~25 % below the bandwidth a single stream reaches. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define PREFETCH 2048 /* bytes ahead in the packed stream */

static inline int64_t hsum64(__m256i v) { /* the 8 int32 lanes summed without overflow */
    __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

/* R rows of x (int16, scale sx[r]) against one group of four packed weight rows g (k / 16 steps
   of 4 x 16 weights: int8 as packed, or int16 once widened), written to y[r * ldy + n ..]. Each
   int32 lane adds k / 16 product pairs of at most 2 * 127 * 32767, so k <= 4096 cannot overflow. */
#define LOAD_I8(p) _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(p)))
#define LOAD_I16(p) _mm256_load_si256((const __m256i *)(p))
#define FETCH_I8(p) _mm_prefetch((const char *)((p) + PREFETCH), _MM_HINT_NTA)
#define FETCH_I16(p) /* the widened group is in L1 */
#define GROUP(NAME, R, T, LOAD, FETCH)                                                             \
static inline void NAME(const T *g, long k, const int16_t *x, const double *sx,                    \
                        const float *scale, long n, long n_out, float *y, long ldy) {              \
    __m256i acc[R][4];                                                                             \
    for (int r = 0; r < R; r++)                                                                    \
        for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_si256();                           \
    for (long i = 0; i < k; i += 16, g += 64) {                                                    \
        FETCH(g);                                                                                  \
        for (int j = 0; j < 4; j++) {                                                              \
            __m256i w = LOAD(g + 16 * j);                                                          \
            for (int r = 0; r < R; r++)                                                            \
                acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(                         \
                    w, _mm256_loadu_si256((const __m256i *)(x + r * k + i))));                     \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < R; r++)                                                                    \
        for (int j = 0; j < 4 && n + j < n_out; j++)                                               \
            y[r * ldy + n + j] = (float)((double)hsum64(acc[r][j]) * (sx[r] * (double)scale[n + j])); \
}
/* three rows keep 12 accumulators in the 16 registers */
GROUP(group_r1, 1, int8_t, LOAD_I8, FETCH_I8)
GROUP(group_r2, 2, int8_t, LOAD_I8, FETCH_I8)
GROUP(group_r3, 3, int8_t, LOAD_I8, FETCH_I8)
GROUP(wide_r1, 1, int16_t, LOAD_I16, FETCH_I16)
GROUP(wide_r2, 2, int16_t, LOAD_I16, FETCH_I16)
GROUP(wide_r3, 3, int16_t, LOAD_I16, FETCH_I16)

/* Every row of x against every group: a group (4 * k bytes, 2.5 KiB at k = 640) is streamed from
   memory once and then served from L1 to each block of three rows. Passing over the whole copy
   once per block instead re-streamed it rows / 3 times: at 32 rows that was ~11 x 168 MB on
   Gemma's head, bound by memory, not by the multiplies.
   q: packed int8 (above), 64-byte aligned, for n_out rows padded to a multiple of 4; scale: fp32
   [n_out]; x: int16 [rows, k] contiguous and sx: fp64 [rows], x rounded by quantize_rows
   (int8_gemv.py rounds once per step and reuses it for every vocabulary slice); y: fp32
   [rows, n_out], row stride ldy. 1 <= rows, k % 16 == 0, k <= 4096. */
void gemv_i8(const int8_t *q, const float *scale, long n_out, long k, const int16_t *x, const double *sx,
             long rows, float *y, long ldy, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long n = 0; n < n_out; n += 4) {
        const int8_t *g = q + n * k;
        if (rows <= 3) { /* one block: the copy streams once anyway */
            switch (rows) {
            case 1: group_r1(g, k, x, sx, scale, n, n_out, y, ldy); break;
            case 2: group_r2(g, k, x, sx, scale, n, n_out, y, ldy); break;
            default: group_r3(g, k, x, sx, scale, n, n_out, y, ldy); break;
            }
            continue;
        }
        _Alignas(32) int16_t w[4 * 4096];
        for (long i = 0; i < 4 * k; i += 16) {
            _mm_prefetch((const char *)(g + i + PREFETCH), _MM_HINT_NTA);
            _mm256_store_si256((__m256i *)(w + i), _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(g + i))));
        }
        for (long r = 0; r < rows; r += 3) {
            const int16_t *xr = x + r * k;
            float *yr = y + r * ldy;
            switch (rows - r < 3 ? rows - r : 3) {
            case 1: wide_r1(w, k, xr, sx + r, scale, n, n_out, yr, ldy); break;
            case 2: wide_r2(w, k, xr, sx + r, scale, n, n_out, yr, ldy); break;
            default: wide_r3(w, k, xr, sx + r, scale, n, n_out, yr, ldy); break;
            }
        }
    }
}

/* x fp32 [rows, k] (finite) rounded to int16 per row: xq[r, i] = round(x[r, i] / sx[r]), |xq| <= xmax
   (the largest |x| maps to xmax), and ex[r] >= max_i |x[r, i] - sx[r] * xq[r, i]|. */
void quantize_rows(const float *x, long rows, long k, double xmax, int16_t *xq, double *sx, float *ex) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * k;
        double top = 0, err = 0;
        for (long i = 0; i < k; i++) top = fmax(top, fabs((double)xr[i]));
        sx[r] = top / xmax;
        for (long i = 0; i < k; i++) {
            double v = top > 0 ? nearbyint((double)xr[i] / sx[r]) : 0;
            v = fmin(fmax(v, -xmax), xmax);
            xq[r * k + i] = (int16_t)v;
            err = fmax(err, fabs((double)xr[i] - sx[r] * v));
        }
        ex[r] = (float)((err + top * 0x1p-50) * (1 + 1e-6)); /* the double rounding of err, then float's */
    }
}

/* The candidates of row r of est (row stride ld): the v with
   est + d >= max_u (est_u - d_u), d_v = coef[v] * x1[r] + qa[v] * ex[r] + rel * |est_v|
   (greedy_head.py's bound). Writes them, ascending, to idx[r * cap ...] and their count to
   count[r]; returns 0, or -1 when the row has more than cap (idx then partly written). */
static int select_row(const float *est, long ld, const float *coef, const float *qa, const float *x1,
                      const float *ex, float rel, long r, long n_out, long cap, int64_t *idx, int64_t *count) {
    const __m256 relv = _mm256_set1_ps(rel), sign = _mm256_set1_ps(-0.0f);
#define BOUND(v) _mm256_fmadd_ps(_mm256_loadu_ps(coef + (v)), xr,                                  \
                                 _mm256_fmadd_ps(_mm256_loadu_ps(qa + (v)), er, _mm256_mul_ps(relv, _mm256_andnot_ps(sign, ev))))
#define BOUND1(t) fmaf(coef[t], x1[r], fmaf(qa[t], ex[r], rel * fabsf(e[t])))
    const float *e = est + r * ld;
    const __m256 xr = _mm256_set1_ps(x1[r]), er = _mm256_set1_ps(ex[r]);
    __m256 lows = _mm256_set1_ps(-INFINITY);
    long v = 0;
    for (; v + 8 <= n_out; v += 8) {
        __m256 ev = _mm256_loadu_ps(e + v);
        lows = _mm256_max_ps(lows, _mm256_sub_ps(ev, BOUND(v)));
    }
    float lane[8], floor = -INFINITY;
    _mm256_storeu_ps(lane, lows);
    for (int j = 0; j < 8; j++) floor = lane[j] > floor ? lane[j] : floor;
    for (long t = v; t < n_out; t++) {
        float low = e[t] - BOUND1(t);
        floor = low > floor ? low : floor;
    }
    const __m256 floorv = _mm256_set1_ps(floor);
    long c = 0;
    for (v = 0; v + 8 <= n_out; v += 8) {
        __m256 ev = _mm256_loadu_ps(e + v);
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(ev, BOUND(v)), floorv, _CMP_GE_OQ));
        while (hit) {
            if (c == cap) return -1;
            idx[r * cap + c++] = v + __builtin_ctz(hit);
            hit &= hit - 1;
        }
    }
    for (long t = v; t < n_out; t++)
        if (e[t] + BOUND1(t) >= floor) {
            if (c == cap) return -1;
            idx[r * cap + c++] = t;
        }
    count[r] = c;
    return 0;
}

/* select_row for every row of est [rows, n_out], rows split between threads; returns 0, or -1
   when some row has more than cap candidates (idx and count then partly written). */
int select_candidates(const float *est, long ld, const float *coef, const float *qa, const float *x1,
                      const float *ex, float rel, long rows, long n_out, long cap, int64_t *idx, int64_t *count,
                      int threads) {
    int failed = 0;
    _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(|: failed)")
    for (long r = 0; r < rows; r++)
        failed |= select_row(est, ld, coef, qa, x1, ex, rel, r, n_out, cap, idx, count) != 0;
    return failed ? -1 : 0;
}
