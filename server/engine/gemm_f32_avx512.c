/* fp32 GEMM for x86 CPUs with AVX-512F (built and loaded by panel_gemm.py).

   y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]): each sum in fp32, in order k = 0, 1, ..., one FMA
   per product, then the bias. So y[r] depends on x[r] and w only, bitwise: not on the other rows of
   the call, their number, or the weight's layout (batch-invariant).

   Weights: panels of NR = 32 output rows, [n_pad / 32][k][32] (panel_gemm.pack), or plain rows
   [n_out][k] (row stride ldw), which are copied a chunk at a time into the same [KC][32] order.

   Why: oneDNN's fp32 GEMM on a 2-core Xeon without bf16 units (Dec 6, scratch timings in
   BENCHMARKS.md) ran a step's projections at 24 rows in about the time of streaming the weights
   plus computing with them hot, as if the two did not overlap. Here a panel streams in chunks of KC inputs (8 KiB, prefetched one chunk ahead), and
   every row of x runs over a chunk while it is in L1, so the FMAs of all rows overlap the stream.
   The register block is R x 32 outputs (R <= 12: 24 accumulators): per input two weight vectors
   and one broadcast of x per row, so the FMAs, not the loads, bound it. */
#define BLOCK_BYTES (1024 * 1024) /* panels a thread runs every row group over before the next (in L2) */
#include "panel_gemm.h"

/* R rows of x (at the chunk's first input) over one chunk c [len][NR], adding to the partial
   sums s [R][NR]; ahead: the next chunk to prefetch, or NULL. */
#define BLOCK(R)                                                                                   \
static void block_r##R(const float *c, long len, const float *x, long ldx, float *s, const char *ahead) { \
    __m512 acc[R][2];                                                                              \
    for (int r = 0; r < R; r++) acc[r][0] = _mm512_loadu_ps(s + r * NR), acc[r][1] = _mm512_loadu_ps(s + r * NR + 16); \
    for (long i = 0; i < len; i++) {                                                               \
        if (ahead) _mm_prefetch(ahead + 128 * i, _MM_HINT_T0), _mm_prefetch(ahead + 128 * i + 64, _MM_HINT_T0); \
        const __m512 w0 = _mm512_loadu_ps(c + NR * i), w1 = _mm512_loadu_ps(c + NR * i + 16);     \
        for (int r = 0; r < R; r++) {                                                              \
            const __m512 xv = _mm512_set1_ps(x[r * ldx + i]);                                      \
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);                                        \
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);                                        \
        }                                                                                          \
    }                                                                                              \
    for (int r = 0; r < R; r++) _mm512_storeu_ps(s + r * NR, acc[r][0]), _mm512_storeu_ps(s + r * NR + 16, acc[r][1]); \
}

BLOCK(12)
BLOCK(8)
BLOCK(4)
BLOCK(2)
BLOCK(1)

/* One panel (outputs n .. n + 31) for rows of x: chunk by chunk, every block of rows over the
   chunk. p: the packed panel, or NULL and w / ldw the plain rows. s: [rows][NR] scratch. */
static void panel(const float *p, const float *w, long ldw, long n, long n_out, long k, const float *x, long ldx,
                  const float *bias, long rows, float *y, long ldy, float *s, float *buf) {
    for (long j = 0; j < rows * NR; j++) s[j] = 0.0f;
    for (long i0 = 0; i0 < k; i0 += KC) {
        const long len = i0 + KC < k ? KC : k - i0;
        const float *c = p ? p + i0 * NR : buf;
        if (!p) gather(w, ldw, n, n_out, i0, len, k, buf);
        const char *ahead = p && i0 + KC < k ? (const char *)c + CHUNK_BYTES : 0;
        for (long r = 0; r < rows;) { /* blocks of 12, then 8, 4, 2, 1 rows; the first prefetches */
            const long left = rows - r;
            const float *xr = x + r * ldx + i0;
            float *sr = s + r * NR;
            const char *a = r == 0 ? ahead : 0;
            if (left >= 12) block_r12(c, len, xr, ldx, sr, a), r += 12;
            else if (left >= 8) block_r8(c, len, xr, ldx, sr, a), r += 8;
            else if (left >= 4) block_r4(c, len, xr, ldx, sr, a), r += 4;
            else if (left >= 2) block_r2(c, len, xr, ldx, sr, a), r += 2;
            else block_r1(c, len, xr, ldx, sr, a), r += 1;
        }
    }
    for (int h = 0; h < 2; h++) { /* y[r, n .. n + 31] (the outputs below n_out) = s[r] (+ bias) */
        const long lo = n + 16 * h;
        if (lo >= n_out) break;
        const long m = n_out - lo < 16 ? n_out - lo : 16;
        const __mmask16 keep = (__mmask16)((1u << m) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + lo) : _mm512_setzero_ps();
        for (long r = 0; r < rows; r++)
            _mm512_mask_storeu_ps(y + r * ldy + lo, keep, _mm512_add_ps(_mm512_loadu_ps(s + r * NR + 16 * h), b));
    }
}
