/* bf16 GEMV for x86 CPUs with AVX2 + FMA but no bf16 arithmetic (built and loaded by cpu_gemv.py).

   y[r, n] = bf16(sum_k x[r, k] * w[n, k]) for a few rows of x (1-32 in cpu_gemv.py): every
   product of two bf16 values is exact in fp32 and the sum accumulates in fp32, then rounds to
   nearest even, as a native bf16 GEMM does; only the order of the sum differs. Each weight row is read once per group of up to
   four x rows, so a step streams the weights near the memory bandwidth instead of ATen's ~4 GB/s
   per core (its bf16 GEMV converts element by element).

   A bf16 value is the top half of an fp32 one. A 32-bit lane of 16 loaded bf16 weights holds an
   even element in its low half and the next odd one in its high half: a shift left by 16 makes
   the even one an fp32, a mask of the high half the odd one. x is split the same way once per
   call (8 even then 8 odd elements per 16), so the inner loop is one load, a shift, an and and
   two FMAs per 16 weights. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define WEIGHT_ROWS(R) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1) /* keeps 8 accumulators in registers */
/* Prefetch. Where a group's NW rows are short (<= IN_ORDER bytes together, as Gemma 3 270M's
   k = 640) and lie one after another, the kernel prefetches the next groups' bytes in order,
   AHEAD bytes past the next group's start: one prefetch per row at its own offset (four streams
   1.3 KB apart) ran 15-25 % slower there. Longer rows (k = 2048) keep one stream per row,
   PREFETCH elements ahead, which measured faster for them. */
#define IN_ORDER 8192
#define AHEAD 6144
#define PREFETCH 8192

#define KERNEL(R, ORDER)                                                                           \
static void gemv_r##R##ORDER(const uint16_t *w, long ldw, const float *xs, const uint16_t *bias,  \
                             long n_out, long k, uint16_t *y, long ldy, int threads) {             \
    enum { NW = WEIGHT_ROWS(R) };                                                                  \
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (long n = 0; n < n_out; n += NW) {                                                         \
        const uint16_t *wr[NW];                                                                    \
        for (int j = 0; j < NW; j++) wr[j] = w + (n + j < n_out ? n + j : n) * ldw;                \
        const char *ahead = (const char *)(w + (n + NW) * ldw) + AHEAD; /* ORDER 1 only */        \
        __m256 even[R][NW], odd[R][NW];                                                            \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW; j++) even[r][j] = odd[r][j] = _mm256_setzero_ps();             \
        for (long i = 0; i < k; i += 16) {                                                         \
            __m256 we[NW], wo[NW];                                                                 \
            if (ORDER)                                                                             \
                for (int p = 0; p < NW * 32; p += 64) _mm_prefetch(ahead + 2 * NW * i + p, _MM_HINT_NTA); \
            for (int j = 0; j < NW; j++) {                                                         \
                if (!ORDER) _mm_prefetch((const char *)(wr[j] + i + PREFETCH), _MM_HINT_NTA);   \
                __m256i v = _mm256_loadu_si256((const __m256i *)(wr[j] + i));                      \
                we[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                             \
                wo[j] = _mm256_castsi256_ps(_mm256_and_si256(v, high));                            \
            }                                                                                      \
            for (int r = 0; r < R; r++) {                                                          \
                __m256 xe = _mm256_loadu_ps(xs + r * k + i), xo = _mm256_loadu_ps(xs + r * k + i + 8); \
                for (int j = 0; j < NW; j++) {                                                     \
                    even[r][j] = _mm256_fmadd_ps(we[j], xe, even[r][j]);                           \
                    odd[r][j] = _mm256_fmadd_ps(wo[j], xo, odd[r][j]);                             \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW && n + j < n_out; j++)                                          \
                y[r * ldy + n + j] = to_bf16(hsum(_mm256_add_ps(even[r][j], odd[r][j]))          \
                                             + (bias ? bf16_to_float(bias[n + j]) : 0.0f));        \
    }                                                                                              \
}
KERNEL(1, 0) KERNEL(1, 1) /* ORDER 1: the in-order prefetch (above), 0: one per row */
KERNEL(2, 0) KERNEL(2, 1)
KERNEL(3, 0) KERNEL(3, 1)
KERNEL(4, 0) KERNEL(4, 1)

/* w: bf16 [n_out, k], row stride ldw; x: bf16 [rows, k], row stride ldx; bias: bf16 [n_out] or
   NULL (added in fp32 before the rounding); y: bf16 [rows, n_out], row stride ldy. 1 <= rows,
   k % 16 == 0. Returns 0, or -1 when out of memory (y untouched). */
int gemv_bf16(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, long rows,
              long n_out, long k, uint16_t *y, long ldy, int threads) {
    float *xs = malloc(sizeof(float) * (size_t)(rows * k));
    if (xs == NULL) return -1;
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < k; i += 16)
            for (int e = 0; e < 8; e++) {
                uint32_t lo = (uint32_t)x[r * ldx + i + 2 * e] << 16, hi = (uint32_t)x[r * ldx + i + 2 * e + 1] << 16;
                memcpy(xs + r * k + i + e, &lo, 4);
                memcpy(xs + r * k + i + 8 + e, &hi, 4);
            }
    for (long r = 0; r < rows; r += 4) {
        const float *xr = xs + r * k;
        uint16_t *yr = y + r * ldy;
        const long left = rows - r < 4 ? rows - r : 4;
        const int seq = ldw == k && WEIGHT_ROWS(left) * k * 2 <= IN_ORDER;
#define CALL(R) (seq ? gemv_r##R##1 : gemv_r##R##0)(w, ldw, xr, bias, n_out, k, yr, ldy, threads)
        switch (left) {
        case 1: CALL(1); break;
        case 2: CALL(2); break;
        case 3: CALL(3); break;
        default: CALL(4); break;
        }
#undef CALL
    }
    free(xs);
    return 0;
}
