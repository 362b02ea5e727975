/* bf16 GEMV for x86 CPUs with AVX-512F but no bf16 arithmetic (built and loaded by cpu_gemv.py; same
   entry point and contract as gemv_bf16.c). Seen on Intel Xeons whose VM exposes AVX-512 without
   AVX512-BF16 or AMX: there oneDNN runs bf16 emulated, slower than upcasting (kernels.native_bf16).

   y[r, n] = bf16(sum_k x[r, k] * w[n, k] + bias[n]) for 1-64 rows of x: bf16 x bf16 products are
   exact in fp32 and the sums accumulate in fp32, then round to nearest even; only the order of the
   sum differs from a native bf16 GEMM.

   The same even/odd split as gemv_bf16.c, on 512-bit vectors: a 32-bit lane of 32 loaded bf16
   weights holds an even element in its low half and the next odd one in its high half; a shift
   left by 16 makes the even one an fp32, a mask of the high half the odd one. x is split once per
   call (16 even then 16 odd elements per 32), so the inner loop is one load, a shift, an and and
   two FMAs per 32 weights and x row: twice the FMA width of the AVX2 kernel.

   Many rows: each thread takes a block of weight rows (<= BLOCK_BYTES, it stays in L2) and runs
   every group of four x rows over it before the next block, so the weights stream from memory once
   per call whatever the row count (gemv_bf16.c re-streams them for every group of four rows). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* weight rows per iteration: R * NW * 2 accumulators (<= 16) + 2 * NW weight vectors in 32 registers */
#define WEIGHT_ROWS(R) ((R) <= 2 ? 4 : 2)
#define BLOCK_BYTES (256 * 1024)
/* The first group of x rows over a block prefetches into L2: in order, AHEAD bytes past the next
   weight group's start where the rows lie one after another, else PREFETCH elements ahead per row. */
#define AHEAD 6144
#define PREFETCH 4096

#define KERNEL(R)                                                                                  \
static void block_r##R(const uint16_t *w, long ldw, const float *xs, const uint16_t *bias, long n0, \
                       long n1, long k, uint16_t *y, long ldy, int first) {                       \
    enum { NW = WEIGHT_ROWS(R) };                                                                  \
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);                                      \
    const int seq = first && ldw == k, per_row = first && ldw != k;                                \
    for (long n = n0; n < n1; n += NW) {                                                           \
        const uint16_t *wr[NW];                                                                    \
        for (int j = 0; j < NW; j++) wr[j] = w + (n + j < n1 ? n + j : n) * ldw;                   \
        const char *ahead = (const char *)(w + (n + NW) * ldw) + AHEAD; /* seq only */             \
        __m512 even[R][NW], odd[R][NW];                                                            \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW; j++) even[r][j] = odd[r][j] = _mm512_setzero_ps();             \
        for (long i = 0; i < k; i += 32) {                                                         \
            __m512 we[NW], wo[NW];                                                                 \
            if (seq)                                                                               \
                for (int p = 0; p < NW * 64; p += 64) _mm_prefetch(ahead + 2 * NW * i + p, _MM_HINT_T1); \
            for (int j = 0; j < NW; j++) {                                                         \
                if (per_row) _mm_prefetch((const char *)(wr[j] + i + PREFETCH), _MM_HINT_T1);      \
                __m512i v = _mm512_loadu_si512((const void *)(wr[j] + i));                         \
                we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                             \
                wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));                            \
            }                                                                                      \
            for (int r = 0; r < R; r++) {                                                          \
                __m512 xe = _mm512_loadu_ps(xs + r * k + i), xo = _mm512_loadu_ps(xs + r * k + i + 16); \
                for (int j = 0; j < NW; j++) {                                                     \
                    even[r][j] = _mm512_fmadd_ps(we[j], xe, even[r][j]);                           \
                    odd[r][j] = _mm512_fmadd_ps(wo[j], xo, odd[r][j]);                             \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++)                                                                \
            for (int j = 0; j < NW && n + j < n1; j++)                                             \
                y[r * ldy + n + j] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(even[r][j], odd[r][j])) \
                                             + (bias ? bf16_to_float(bias[n + j]) : 0.0f));        \
    }                                                                                              \
}
KERNEL(1)
KERNEL(2)
KERNEL(3)
KERNEL(4)

/* w: bf16 [n_out, k], row stride ldw; x: bf16 [rows, k], row stride ldx; bias: bf16 [n_out] or
   NULL (added in fp32 before the rounding); y: bf16 [rows, n_out], row stride ldy. 1 <= rows,
   k % 32 == 0. Returns 0, or -1 when out of memory (y untouched). */
int gemv_bf16(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, long rows,
              long n_out, long k, uint16_t *y, long ldy, int threads) {
    float *xs = malloc(sizeof(float) * (size_t)(rows * k));
    if (xs == NULL) return -1;
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < k; i += 32)
            for (int e = 0; e < 16; e++) {
                uint32_t lo = (uint32_t)x[r * ldx + i + 2 * e] << 16, hi = (uint32_t)x[r * ldx + i + 2 * e + 1] << 16;
                memcpy(xs + r * k + i + e, &lo, 4);
                memcpy(xs + r * k + i + 16 + e, &hi, 4);
            }
    /* blocks of a multiple of 4 weight rows: at most BLOCK_BYTES, and at least 4 per thread for balance */
    long block = BLOCK_BYTES / (2 * k) / 4 * 4;
    const long even_split = (n_out + 4L * threads - 1) / (4L * threads);
    if (block > (even_split + 3) / 4 * 4) block = (even_split + 3) / 4 * 4;
    if (block < 4) block = 4;
    const long blocks = (n_out + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        const long n0 = b * block, n1 = n0 + block < n_out ? n0 + block : n_out;
        for (long r = 0; r < rows; r += 4) {
            const float *xr = xs + r * k;
            uint16_t *yr = y + r * ldy;
            const int first = r == 0;
            switch (rows - r < 4 ? rows - r : 4) {
            case 1: block_r1(w, ldw, xr, bias, n0, n1, k, yr, ldy, first); break;
            case 2: block_r2(w, ldw, xr, bias, n0, n1, k, yr, ldy, first); break;
            case 3: block_r3(w, ldw, xr, bias, n0, n1, k, yr, ldy, first); break;
            default: block_r4(w, ldw, xr, bias, n0, n1, k, yr, ldy, first); break;
            }
        }
    }
    free(xs);
    return 0;
}
