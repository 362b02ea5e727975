/* bf16 GEMV for x86 CPUs with AVX512-BF16 (built and loaded by cpu_gemv.py; same entry point and
   contract as gemv_bf16.c).

   y[r, n] = bf16(sum_k x[r, k] * w[n, k] + bias[n]) for 1-4 rows of x. VDPBF16PS multiplies 32
   bf16 pairs and adds each pair's two exact products into an fp32 lane, as oneDNN's bf16 GEMM on
   the same CPU does (denormal inputs read as zero); only the order of the sum differs. The 16
   lanes are added at the end, the bias in fp32, and the result rounds to nearest even.

   Why it exists: at 1-4 rows oneDNN's prepacked bf16 GEMM streams Gemma 3 270M's layer weights
   at ~25-35 GB/s on a 2-core Zen 4 where a plain read reaches ~50-60; this kernel reads each
   weight row once per two to four x rows (those stay in registers) with an in-order prefetch,
   and one x row as one linear stream per thread (gemv_row1). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* weight rows per iteration: R * NW accumulators + R x vectors + NW weights in 32 registers */
#define WEIGHT_ROWS(R) ((R) == 2 ? 6 : 4)
/* In-order prefetch into L2, AHEAD bytes past the next group's start (2-core Zen 4, 36 layers'
   weights cycled, 1 and 4 rows: L1 hints streamed 20-36 GB/s, L2 hints 31-47 GB/s, alike for
   AHEAD 4-48 KB; no prefetch 15-34). */
#define AHEAD 8192
#define PREFETCH 4096 /* elements ahead per row, where rows are not one after another */

#define KERNEL(R)                                                                                  \
static void gemv_r##R(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, \
                      long n_out, long k, uint16_t *y, long ldy, int threads) {                    \
    enum { NW = WEIGHT_ROWS(R) };                                                                  \
    const int seq = ldw == k;                                                                      \
    const long groups = (n_out + NW - 1) / NW;                                                     \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                              \
    for (long g = 0; g < groups; g++) {                                                            \
        const long n = g * NW;                                                                     \
        const uint16_t *wr[NW];                                                                    \
        for (int j = 0; j < NW; j++) wr[j] = w + (n + j < n_out ? n + j : n) * ldw;                \
        const char *ahead = (const char *)(w + (n + NW) * ldw) + AHEAD;                            \
        __m512 acc[R][NW];                                                                         \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW; j++) acc[r][j] = _mm512_setzero_ps();                          \
        for (long i = 0; i < k; i += 32) {                                                         \
            if (seq)                                                                               \
                for (int p = 0; p < NW * 64; p += 64) _mm_prefetch(ahead + 2 * NW * i + p, _MM_HINT_T1); \
            __m512bh xv[R];                                                                        \
            for (int r = 0; r < R; r++) xv[r] = (__m512bh)_mm512_loadu_si512((const void *)(x + r * ldx + i)); \
            for (int j = 0; j < NW; j++) {                                                         \
                if (!seq) _mm_prefetch((const char *)(wr[j] + i + PREFETCH), _MM_HINT_T1);         \
                const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wr[j] + i));       \
                for (int r = 0; r < R; r++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[r]);   \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW && n + j < n_out; j++)                                          \
                y[r * ldy + n + j] = to_bf16(_mm512_reduce_add_ps(acc[r][j])                       \
                                             + (bias ? bf16_to_float(bias[n + j]) : 0.0f));        \
    }                                                                                              \
}
KERNEL(2) KERNEL(3) KERNEL(4)

/* One x row: each thread reads its share of weight rows one after another, a single linear stream
   the hardware prefetcher follows (2-core Zen 4, Gemma 3 270M's layers: 36-43 GB/s against 32-39
   for eight interleaved rows with the in-order L2 prefetch of KERNEL; a software prefetch on top
   measured slower). Four accumulators per row (blocks of 128 columns; the rest into the first),
   added pairwise, then the 16 lanes: each output's arithmetic depends on its own row only. */
#define LOAD_BH(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
static void gemv_row1(const uint16_t *w, long ldw, const uint16_t *x, const uint16_t *bias, long n_out, long k,
                      uint16_t *y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const long t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (long n = n_out * t / nt; n < n_out * (t + 1) / nt; n++) {
            const uint16_t *wr = w + n * ldw;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long i = 0;
            for (; i + 128 <= k; i += 128) {
                a0 = _mm512_dpbf16_ps(a0, LOAD_BH(wr + i), LOAD_BH(x + i));
                a1 = _mm512_dpbf16_ps(a1, LOAD_BH(wr + i + 32), LOAD_BH(x + i + 32));
                a2 = _mm512_dpbf16_ps(a2, LOAD_BH(wr + i + 64), LOAD_BH(x + i + 64));
                a3 = _mm512_dpbf16_ps(a3, LOAD_BH(wr + i + 96), LOAD_BH(x + i + 96));
            }
            for (; i < k; i += 32) a0 = _mm512_dpbf16_ps(a0, LOAD_BH(wr + i), LOAD_BH(x + i));
            y[n] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)))
                           + (bias ? bf16_to_float(bias[n]) : 0.0f));
        }
    }
}

/* w: bf16 [n_out, k], row stride ldw; x: bf16 [rows, k], row stride ldx; bias: bf16 [n_out] or
   NULL (added in fp32 before the rounding); y: bf16 [rows, n_out], row stride ldy. 1 <= rows,
   k % 32 == 0. Returns 0. Rows beyond four are taken four at a time (one weight pass each). */
int gemv_bf16(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, long rows,
              long n_out, long k, uint16_t *y, long ldy, int threads) {
    for (long r = 0; r < rows; r += 4) {
        const uint16_t *xr = x + r * ldx;
        uint16_t *yr = y + r * ldy;
        switch (rows - r < 4 ? rows - r : 4) {
        case 1: gemv_row1(w, ldw, xr, bias, n_out, k, yr, threads); break;
        case 2: gemv_r2(w, ldw, xr, ldx, bias, n_out, k, yr, ldy, threads); break;
        case 3: gemv_r3(w, ldw, xr, ldx, bias, n_out, k, yr, ldy, threads); break;
        default: gemv_r4(w, ldw, xr, ldx, bias, n_out, k, yr, ldy, threads); break;
        }
    }
    return 0;
}
