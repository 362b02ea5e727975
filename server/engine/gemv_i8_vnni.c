/* int8 x int16 GEMV with AVX512-VNNI (built and loaded by int8_gemv.py; the greedy LM head's
   estimate on CPUs with avx512_vnni and no AMX, e.g. AMD Zen 4).

   The same sums as gemv_i8.c, y[r, n] = scale[n] * sx[r] * sum_k q[n, k] * x[r, k], exact in
   integers and rounded once the same way, so the two kernels' outputs are bitwise equal. Here a
   register holds one sum per vocabulary row: VPDPWSSD adds, for 16 vocabulary rows at once, their
   two weights of an input pair times that pair of x (broadcast), so nothing is summed across
   lanes at the end (the AVX2 kernel sums each of its accumulators horizontally, which at k = 640
   is a third of its work).

   q is packed [n_pad / 16][k / 2][16][2] int8 (int8_gemv.VnniEstimator.pack): for each group of
   16 vocabulary rows, input pair by input pair, the 16 rows' two weights (32 bytes), widened to
   int16 as read. A group (10 KiB at k = 640) is read once from memory and then from L1 for each
   block of up to 16 x rows. A lane adds two products of at most 127 * 32767 per pair; every 128
   pairs the int32 lanes are added into int64 (256 products cannot overflow int32). */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH 1024 /* bytes ahead in the packed stream */
#define FLUSH 128 /* input pairs between int64 flushes */

/* R (a constant: the accumulators stay in registers) rows of x against group g (16 vocabulary
   rows from n), into y. */
#define BLOCK(NAME, R)                                                                                 \
static void NAME(const int8_t *g, long k, const int16_t *x, const double *sx, const float *scale, long n, \
                 long n_out, float *y, long ldy) {                                                     \
    __m512i acc[R];                                                                                    \
    __m512i wide[R][2]; /* int64 sums: vocabulary rows 0-7, 8-15 */                                    \
    for (long r = 0; r < R; r++) acc[r] = wide[r][0] = wide[r][1] = _mm512_setzero_si512();           \
    const long pairs = k / 2;                                                                          \
    for (long p0 = 0; p0 < pairs; p0 += FLUSH) {                                                       \
        const long p1 = p0 + FLUSH < pairs ? p0 + FLUSH : pairs;                                       \
        for (long p = p0; p < p1; p++) {                                                               \
            _mm_prefetch((const char *)(g + 32 * p + PREFETCH), _MM_HINT_T0);                          \
            const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(g + 32 * p))); \
            for (long r = 0; r < R; r++)                                                               \
                acc[r] = _mm512_dpwssd_epi32(acc[r], w, _mm512_set1_epi32(((const int32_t *)(x + r * k))[p])); \
        }                                                                                              \
        for (long r = 0; r < R; r++) {                                                                 \
            wide[r][0] = _mm512_add_epi64(wide[r][0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[r]))); \
            wide[r][1] = _mm512_add_epi64(wide[r][1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[r], 1))); \
            acc[r] = _mm512_setzero_si512();                                                           \
        }                                                                                              \
    }                                                                                                  \
    store(wide, R, sx, scale, n, n_out, y, ldy);                                                       \
}

/* y[r, n .. n + 15] = float(sum * (sx[r] * scale)) of the int64 sums (gemv_i8.c's rounding). */
static inline void store(__m512i (*wide)[2], long R, const double *sx, const float *scale, long n, long n_out,
                         float *y, long ldy) {
    for (long h = 0; h < 2; h++) {
        const long lo = n + 8 * h;
        if (lo >= n_out) break;
        const long m = n_out - lo < 8 ? n_out - lo : 8;
        const __mmask8 keep = (__mmask8)((1u << m) - 1);
        const __m512d s = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(keep, scale + lo));
        for (long r = 0; r < R; r++) {
            const __m512d f = _mm512_mul_pd(_mm512_cvtepi64_pd(wide[r][h]), _mm512_mul_pd(_mm512_set1_pd(sx[r]), s));
            _mm256_mask_storeu_ps(y + r * ldy + lo, keep, _mm512_cvtpd_ps(f));
        }
    }
}

BLOCK(block16, 16)
BLOCK(block8, 8)
BLOCK(block4, 4)
BLOCK(block2, 2)
BLOCK(block1, 1)

/* Every row of x against every group of 16 vocabulary rows, as gemv_i8.c's gemv_i8 (same
   arguments, this file's packing): n_out rows padded to a multiple of 16 in q; scale fp32
   [n_out]; x int16 [rows, k] and sx fp64 [rows] from quantize_rows; y fp32 [rows, n_out], row
   stride ldy. 1 <= rows, k % 32 == 0, k <= 4096. */
void gemv_i8_vnni(const int8_t *q, const float *scale, long n_out, long k, const int16_t *x, const double *sx,
                  long rows, float *y, long ldy, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long n = 0; n < n_out; n += 16) {
        const int8_t *g = q + n * k;
        for (long r = 0; r < rows;) { /* blocks of 16, then 8, 4, 2, 1 rows */
            const long left = rows - r;
            const int16_t *xr = x + r * k;
            float *yr = y + r * ldy;
            if (left >= 16) block16(g, k, xr, sx + r, scale, n, n_out, yr, ldy), r += 16;
            else if (left >= 8) block8(g, k, xr, sx + r, scale, n, n_out, yr, ldy), r += 8;
            else if (left >= 4) block4(g, k, xr, sx + r, scale, n, n_out, yr, ldy), r += 4;
            else if (left >= 2) block2(g, k, xr, sx + r, scale, n, n_out, yr, ldy), r += 2;
            else block1(g, k, xr, sx + r, scale, n, n_out, yr, ldy), r += 1;
        }
    }
}
