/* int8 x int16 logit estimates on Intel AMX tiles (built and loaded by int8_gemv.py).

   The same product as gemv_i8.c, y[r, n] ~ scale[n] * sum_k q[n, k] * x[r, k] with x rounded to
   int16 per row, for up to a few dozen rows: AMX multiplies int8 tiles only, so each int16 x is
   split exactly as x = 256 * hi + lo with hi in [-127, 127] and lo in [-128, 127] (|x| <= 32639),
   and the hi and lo rows ride in the same A tiles against one B tile of weights. The int32 tile
   sums are exact (k <= 4096: 4096 * 127 * 128 < 2^31), 256 * hi + lo is exact in double, so as in
   gemv_i8.c the only rounding after x's is the final one to fp32. One weight tile load serves up
   to 24 rows of x (ROWS_PER_PASS); more rows take one pass per 24. On a 2-core Xeon VM a bare
   tile multiply took ~5 ns, so a pass is bound by streaming q (and loading x's A tiles beside
   it), not by AMX: 6-7 ms for Gemma's 168 MB up to 8 rows, ~10 ms at 24.

   q is packed as TDPBSSD's B operand: [n_pad / 16][k / 64][16][16][4] int8, i.e. per block of
   16 vocabulary rows and 64 inputs one 1 KiB tile whose row i holds, for each of the 16
   vocabulary rows, its inputs 4i .. 4i + 3 (int8_gemv.AmxEstimator.pack). A pass reads it in order. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PREFETCH 8192 /* bytes ahead in the packed stream (eight tiles) */
#define ROWS_PER_PASS 24 /* x rows per pass over q: 48 int8 rows, three A tiles (a fourth measured
                           twice as slow a pass: 21-22 vs 11 ms on the Gemma head, 2-core AMX VM) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Ask Linux for the AMX tile state (once per process; oneDNN asks too). 0 when granted. */
int amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

static void configure(void) {
    struct tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { /* tmm0-2: C (16 x 16 int32), tmm4, 6, 7: A (16 x 64 int8), tmm5: B */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* y[r, b * 16 + j] for the p x rows of one block from its tile sums c (hi rows, then lo rows):
   (256 * hi + lo) is exact in double (< 2^40), then one product and the rounding to fp32, as in
   gemv_i8.c. */
static inline void epilogue(int32_t (*c)[16], long p, long b, long n_out, const double *sx, const float *scale,
                            float *y, long ldy) {
    long n0 = b * 16, m = n_out - n0 < 16 ? n_out - n0 : 16;
    __mmask16 keep = (__mmask16)((1u << m) - 1);
    __m512 s = _mm512_maskz_loadu_ps(keep, scale + n0);
    __m512d s_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(s)), s_hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(s, 1));
    const __m512d k256 = _mm512_set1_pd(256.0);
    for (long r = 0; r < p; r++) {
        __m512i hi = _mm512_load_si512(c[r]), lo = _mm512_load_si512(c[p + r]);
        __m512d f = _mm512_set1_pd(sx[r]);
        __m512d a0 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(hi)), k256,
                                     _mm512_cvtepi32_pd(_mm512_castsi512_si256(lo)));
        __m512d a1 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(hi, 1)), k256,
                                     _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(lo, 1)));
        __m256 y0 = _mm512_cvtpd_ps(_mm512_mul_pd(a0, _mm512_mul_pd(f, s_lo)));
        __m256 y1 = _mm512_cvtpd_ps(_mm512_mul_pd(a1, _mm512_mul_pd(f, s_hi)));
        __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(y0), y1, 1);
        float *dst = y + r * ldy + n0;
        _mm512_mask_storeu_ps(dst, keep, v);
    }
}

/* One pass: the G A-tile groups (16 int8 rows each, hi rows then lo rows of `p` x rows) in xa
   [G * 16][k] against every 16-row block of q; y rows r0 .. r0 + p - 1. */
#define PASS(G)                                                                                    \
static void pass_g##G(const int8_t *q, const float *scale, long n_out, long k, const int8_t *xa, \
                      long p, const double *sx, float *y, long ldy, int threads) {                \
    const long kb = k / 64, blocks = (n_out + 15) / 16;                                            \
    _Pragma("omp parallel num_threads(threads)")                                                   \
    {                                                                                              \
        configure();                                                                               \
        int32_t c[G * 16][16] __attribute__((aligned(64)));                                        \
        _Pragma("omp for schedule(static)")                                                        \
        for (long b = 0; b < blocks; b++) {                                                        \
            const int8_t *w = q + b * kb * 1024;                                                   \
            _tile_zero(0);                                                                         \
            if (G > 1) _tile_zero(1);                                                              \
            if (G > 2) _tile_zero(2);                                                              \
            for (long i = 0; i < kb; i++, w += 1024) {                                             \
                for (int l = 0; l < 1024; l += 64) _mm_prefetch((const char *)w + PREFETCH + l, _MM_HINT_T0); \
                _tile_loadd(5, w, 64);                                                             \
                _tile_loadd(4, xa + i * 64, k);                                                    \
                if (G > 1) _tile_loadd(6, xa + 16 * k + i * 64, k);                                \
                if (G > 2) _tile_loadd(7, xa + 32 * k + i * 64, k);                                \
                _tile_dpbssd(0, 4, 5);                                                             \
                if (G > 1) _tile_dpbssd(1, 6, 5);                                                  \
                if (G > 2) _tile_dpbssd(2, 7, 5);                                                  \
            }                                                                                      \
            _tile_stored(0, c[0], 64);                                                             \
            if (G > 1) _tile_stored(1, c[16], 64);                                                 \
            if (G > 2) _tile_stored(2, c[32], 64);                                                 \
            epilogue(c, p, b, n_out, sx, scale, y, ldy);                                            \
        }                                                                                          \
        _tile_release();                                                                           \
    }                                                                                              \
}
PASS(1)
PASS(2)
PASS(3)

/* q: packed int8 (above), 64-byte aligned, for n_out rows padded to a multiple of 16; scale:
   fp32 [n_out]; xq: int16 [rows, k], |xq| <= 32639 (so hi fits int8), with its row scales sx (gemv_i8.c's
   quantize_rows); y: fp32 [rows, n_out], row stride ldy. 1 <= rows, k % 64 == 0, k <= 4096,
   amx_init() granted. Returns 0, or -1 when out of memory (y untouched). */
int gemv_i8_amx(const int8_t *q, const float *scale, long n_out, long k, const int16_t *xq, const double *sx,
                long rows, float *y, long ldy, int threads) {
    int8_t *xa = aligned_alloc(64, (size_t)(2 * ROWS_PER_PASS * k));
    if (xa == NULL)
        return -1;
    for (long r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {
        long p = rows - r0 < ROWS_PER_PASS ? rows - r0 : ROWS_PER_PASS, g = (2 * p + 15) / 16;
        memset(xa, 0, (size_t)(g * 16 * k));
        for (long r = 0; r < p; r++)
            for (long i = 0; i < k; i++) {
                int v = xq[(r0 + r) * k + i];
                int8_t lo = (int8_t)(v & 0xff); /* v - lo is a multiple of 256 */
                xa[r * k + i] = (int8_t)((v - lo) / 256);
                xa[(p + r) * k + i] = lo;
            }
        float *yr = y + r0 * ldy;
        switch (g) {
        case 1: pass_g1(q, scale, n_out, k, xa, p, sx + r0, yr, ldy, threads); break;
        case 2: pass_g2(q, scale, n_out, k, xa, p, sx + r0, yr, ldy, threads); break;
        default: pass_g3(q, scale, n_out, k, xa, p, sx + r0, yr, ldy, threads); break;
        }
    }
    free(xa);
    return 0;
}
