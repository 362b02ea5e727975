/* fp32 GEMM for x86 CPUs with AVX2 and FMA but no AVX-512F (built and loaded by panel_gemm.py):
   gemm_f32_avx512.c's contract, layout and blocking on 256-bit registers.

   y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]): each sum in fp32, in order k = 0, 1, ..., one FMA
   per product, then the bias (+0 without one), so y[r] depends on x[r] and w only, bitwise, and is
   bitwise what the AVX-512 kernel gives. Weights: panel_gemm.pack's panels [n_pad / 32][k][32], or
   plain rows [n_out][k] (row stride ldw) copied a chunk at a time into that order.

   With 16 vector registers a block covers half a panel: R x 16 outputs (R <= 6: 12 accumulators,
   two weight vectors, one broadcast of x), the chunk's two halves in turn while it is in L1. */
#define BLOCK_BYTES (512 * 1024) /* panels a thread runs every row group over before the next (in L2) */
#include "panel_gemm.h"

#define HW 16 /* outputs per block (half a panel) */

/* R rows of x (at the chunk's first input) over half h of chunk c [len][NR], adding to the partial
   sums s [R][NR] (columns 16h .. 16h + 15); ahead: the next chunk to prefetch, or NULL. */
#define BLOCK(R)                                                                                   \
static void block_r##R(const float *c, long len, const float *x, long ldx, float *s, const char *ahead) { \
    __m256 acc[R][2];                                                                              \
    for (int r = 0; r < R; r++) acc[r][0] = _mm256_loadu_ps(s + r * NR), acc[r][1] = _mm256_loadu_ps(s + r * NR + 8); \
    for (long i = 0; i < len; i++) {                                                               \
        if (ahead) _mm_prefetch(ahead + 128 * i, _MM_HINT_T0), _mm_prefetch(ahead + 128 * i + 64, _MM_HINT_T0); \
        const __m256 w0 = _mm256_loadu_ps(c + NR * i), w1 = _mm256_loadu_ps(c + NR * i + 8);       \
        for (int r = 0; r < R; r++) {                                                              \
            const __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);                                \
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);                                        \
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);                                        \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < R; r++) _mm256_storeu_ps(s + r * NR, acc[r][0]), _mm256_storeu_ps(s + r * NR + 8, acc[r][1]); \
}

BLOCK(6)
BLOCK(4)
BLOCK(2)
BLOCK(1)

/* One panel (outputs n .. n + 31) for rows of x: chunk by chunk, each half of it, every block of
   rows over that half. p: the packed panel, or NULL and w / ldw the plain rows. s: [rows][NR]. */
static void panel(const float *p, const float *w, long ldw, long n, long n_out, long k, const float *x, long ldx,
                  const float *bias, long rows, float *y, long ldy, float *s, float *buf) {
    const int halves = n_out - n > HW ? 2 : 1;
    for (long j = 0; j < rows * NR; j++) s[j] = 0.0f;
    for (long i0 = 0; i0 < k; i0 += KC) {
        const long len = i0 + KC < k ? KC : k - i0;
        const float *c = p ? p + i0 * NR : buf;
        if (!p) gather(w, ldw, n, n_out, i0, len, k, buf);
        const char *ahead = p && i0 + KC < k ? (const char *)c + CHUNK_BYTES : 0;
        for (int h = 0; h < halves; h++)
            for (long r = 0; r < rows;) { /* blocks of 6, then 4, 2, 1 rows; the very first prefetches */
                const long left = rows - r;
                const float *xr = x + r * ldx + i0;
                float *sr = s + r * NR + HW * h;
                const char *a = r == 0 && h == 0 ? ahead : 0;
                if (left >= 6) block_r6(c + HW * h, len, xr, ldx, sr, a), r += 6;
                else if (left >= 4) block_r4(c + HW * h, len, xr, ldx, sr, a), r += 4;
                else if (left >= 2) block_r2(c + HW * h, len, xr, ldx, sr, a), r += 2;
                else block_r1(c + HW * h, len, xr, ldx, sr, a), r += 1;
            }
    }
    const long m = n_out - n < NR ? n_out - n : NR; /* y[r, n .. n + m - 1] = s[r] (+ bias, else +0) */
    for (long r = 0; r < rows; r++)
        for (long j = 0; j < m; j++) y[r * ldy + n + j] = s[r * NR + j] + (bias ? bias[n + j] : 0.0f);
}
