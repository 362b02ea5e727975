/* int8 x fp32 GEMV for x86 CPUs with AVX2 + FMA (built and loaded by greedy_head.py).

   y[r, n] = scale[n] * sum_k q[n, k] * x[r, k] in fp32, for a few rows of x. q is an int8 copy
   of a weight matrix with one scale per output row; greedy_head.py uses it to bound every
   logit of the LM head while streaming a quarter of the fp32 bytes (half of bf16's). Each
   product of an int8 and a bf16-valued x is exact in fp32; the sum accumulates in fp32 (its
   error is part of greedy_head's bound). Each weight row is read once per group of up to four
   x rows. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define WEIGHT_ROWS(R) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1) /* keeps 8 accumulators in registers */
#define PREFETCH 8192                                     /* bytes ahead */

#define KERNEL(R)                                                                                  \
static void gemv_i8_r##R(const int8_t *q, const float *scale, long n_out, long k, const float *x,   \
                         float *y, long ldy, int threads) {                                        \
    enum { NW = WEIGHT_ROWS(R) };                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (long n = 0; n < n_out; n += NW) {                                                         \
        const int8_t *wr[NW];                                                                      \
        for (int j = 0; j < NW; j++) wr[j] = q + (n + j < n_out ? n + j : n) * k;                  \
        __m256 lo[R][NW], hi[R][NW];                                                               \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW; j++) lo[r][j] = hi[r][j] = _mm256_setzero_ps();                \
        for (long i = 0; i < k; i += 16) {                                                         \
            __m256 wl[NW], wh[NW];                                                                 \
            for (int j = 0; j < NW; j++) {                                                         \
                _mm_prefetch((const char *)(wr[j] + i + PREFETCH), _MM_HINT_NTA);                  \
                __m128i v = _mm_loadu_si128((const __m128i *)(wr[j] + i));                         \
                wl[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));                               \
                wh[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));        \
            }                                                                                      \
            for (int r = 0; r < R; r++) {                                                          \
                __m256 xl = _mm256_loadu_ps(x + r * k + i), xh = _mm256_loadu_ps(x + r * k + i + 8); \
                for (int j = 0; j < NW; j++) {                                                     \
                    lo[r][j] = _mm256_fmadd_ps(wl[j], xl, lo[r][j]);                               \
                    hi[r][j] = _mm256_fmadd_ps(wh[j], xh, hi[r][j]);                               \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW && n + j < n_out; j++)                                          \
                y[r * ldy + n + j] = scale[n + j] * hsum(_mm256_add_ps(lo[r][j], hi[r][j]));       \
    }                                                                                              \
}
KERNEL(1)
KERNEL(2)
KERNEL(3)
KERNEL(4)

/* q: int8 [n_out, k] contiguous; scale: fp32 [n_out]; x: fp32 [rows, k] contiguous; y: fp32
   [rows, n_out], row stride ldy. 1 <= rows, k % 16 == 0. */
void gemv_i8(const int8_t *q, const float *scale, long n_out, long k, const float *x, long rows, float *y,
             long ldy, int threads) {
    for (long r = 0; r < rows; r += 4) {
        const float *xr = x + r * k;
        float *yr = y + r * ldy;
        switch (rows - r < 4 ? rows - r : 4) {
        case 1: gemv_i8_r1(q, scale, n_out, k, xr, yr, ldy, threads); break;
        case 2: gemv_i8_r2(q, scale, n_out, k, xr, yr, ldy, threads); break;
        case 3: gemv_i8_r3(q, scale, n_out, k, xr, yr, ldy, threads); break;
        default: gemv_i8_r4(q, scale, n_out, k, xr, yr, ldy, threads); break;
        }
    }
}

/* The candidates of each row r of est [rows, n_out] (row stride ld): the v with
   est + d >= max_u (est_u - d_u), d_v = coef[v] * x1[r] + 2^-8 |est_v| (greedy_head.py's bound).
   Writes row r's indices, ascending, to idx[r * cap ...] and their count to count[r]; returns 0,
   or -1 when a row has more than cap (idx and count then partly written). */
int select_candidates(const float *est, long ld, const float *coef, const float *x1, long rows, long n_out,
                      long cap, int64_t *idx, int64_t *count) {
    const __m256 rel = _mm256_set1_ps(1.0f / 256.0f), sign = _mm256_set1_ps(-0.0f);
    for (long r = 0; r < rows; r++) {
        const float *e = est + r * ld;
        const __m256 xr = _mm256_set1_ps(x1[r]);
        __m256 lows = _mm256_set1_ps(-INFINITY);
        long v = 0;
        for (; v + 8 <= n_out; v += 8) {
            __m256 ev = _mm256_loadu_ps(e + v);
            __m256 d = _mm256_fmadd_ps(_mm256_loadu_ps(coef + v), xr, _mm256_mul_ps(rel, _mm256_andnot_ps(sign, ev)));
            lows = _mm256_max_ps(lows, _mm256_sub_ps(ev, d));
        }
        float lane[8], floor = -INFINITY;
        _mm256_storeu_ps(lane, lows);
        for (int j = 0; j < 8; j++) floor = lane[j] > floor ? lane[j] : floor;
        for (long t = v; t < n_out; t++) {
            float low = e[t] - fmaf(coef[t], x1[r], fabsf(e[t]) / 256.0f);
            floor = low > floor ? low : floor;
        }
        const __m256 floorv = _mm256_set1_ps(floor);
        long c = 0;
        for (v = 0; v + 8 <= n_out; v += 8) {
            __m256 ev = _mm256_loadu_ps(e + v);
            __m256 d = _mm256_fmadd_ps(_mm256_loadu_ps(coef + v), xr, _mm256_mul_ps(rel, _mm256_andnot_ps(sign, ev)));
            int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(ev, d), floorv, _CMP_GE_OQ));
            while (hit) {
                if (c == cap) return -1;
                idx[r * cap + c++] = v + __builtin_ctz(hit);
                hit &= hit - 1;
            }
        }
        for (long t = v; t < n_out; t++)
            if (e[t] + fmaf(coef[t], x1[r], fabsf(e[t]) / 256.0f) >= floor) {
                if (c == cap) return -1;
                idx[r * cap + c++] = t;
            }
        count[r] = c;
    }
    return 0;
}
