/* A bf16 GEMM on Intel AMX tiles (TDPBF16PS) that reads the weights' plain rows (built and loaded
   by amx_gemm.py): the projections of a 5-64-row bf16 decode step, where oneDNN's prepacked GEMM
   ran well below both the memory's pace and the tiles'.

   y[r, n] = bf16(sum_k x[r, k] w[n, k] (+ bias[n])), sums in fp32 in the tiles, rounded to
   nearest even. The weights are the A operand: a tile is 16 weight rows x 32 inputs, loaded
   straight from the plain rows (stride ldw), so no second copy of the weights exists. x is the B
   operand, packed per call into tiles whose row p holds inputs 2p, 2p + 1 of 16 x rows (zero rows
   pad the last group). A C tile is then [16 outputs][16 x rows]; it is transposed in registers
   before its rows are rounded and stored.

   Each thread takes a contiguous run of 32-output blocks (two A tiles); per block it runs the x
   rows 32 at a time (two B tiles, four C tiles: the eight tiles' limit), so at 64 rows a block's
   weights are read from memory once and again from L1/L2. (Prefetching the next block into L2
   during a block measured slower on the 2-core AMX Xeon: 15.4 against 17.9 GB/s at 8 rows; a copy
   of the weights in tile order, each A tile 1 KB contiguous, 8-18 % faster at 8-128 rows, which
   would cost a second copy of them.) */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "amx_tiles.h"

#define MAX_THREADS 256

/* Ask Linux for the AMX tile state (once per process). 0 when granted. */
int amx_gemm_init(void) { return amx_request(); }

/* r[i] (16 lanes of 32 bits each) -> r[j] = lane j of every r[i]: a 16 x 16 transpose. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* pairs of 2 x 32 bits */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* r[4i + c] now holds, in 128-bit lane L, elements 4L + c of rows 4i .. 4i + 3 */
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);      /* lanes 0, 2 of r[c], then of r[4 + c] */
        t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);  /* lanes 1, 3 */
        t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);       /* lane 0 of each: column c */
        r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);   /* lane 2: column 8 + c */
        r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);  /* lane 1: column 4 + c */
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd); /* lane 3: column 12 + c */
    }
}

/* x rows g * 16 .. g * 16 + 15 (those below rows; zeros past it), inputs 32 i .. 32 i + 31, as
   one B tile at b: b[p][r][2] = x[g * 16 + r][32 i + 2 p + e]. */
static void pack_tile(const uint16_t *x, long ldx, long rows, long g, long i, uint16_t *b) {
    __m512i r[16];
    for (int j = 0; j < 16; j++) {
        const long row = g * 16 + j;
        r[j] = row < rows ? _mm512_loadu_si512((const void *)(x + row * ldx + i * 32)) : _mm512_setzero_si512();
    }
    transpose16(r);
    for (int p = 0; p < 16; p++) _mm512_store_si512((void *)(b + p * 32), r[p]);
}

/* C tile c [16 outputs][16 x rows] (fp32) -> y[g * 16 + j][n0 .. n0 + 15] for x rows below rows,
   bias added in fp32 first, rounded to bf16. */
static void store_tile(const float *c, const uint16_t *bias, long n0, long g, long rows, uint16_t *y, long ldy) {
    __m512i r[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_load_si512((const void *)(c + j * 16));
    transpose16(r);
    __m512 b = _mm512_setzero_ps();
    if (bias)
        b = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0))), 16));
    for (int j = 0; j < 16 && g * 16 + j < rows; j++) {
        const __m512 v = _mm512_castsi512_ps(r[j]);
        const __m256bh h = _mm512_cvtneps_pbh(bias ? _mm512_add_ps(v, b) : v);
        _mm256_storeu_si256((__m256i *)(y + (g * 16 + j) * ldy + n0), (__m256i)h);
    }
}

/* One block of 32 outputs (w0: its first weight row) against x groups g0 and, where NB == 2, g0 + 1. */
#define BLOCK(NB)                                                                                                   \
    static void block##NB(const uint16_t *w0, long ldw, long kc, const uint16_t *xb, long g0, const uint16_t *bias, \
                          long n0, long rows, uint16_t *y, long ldy) {                                             \
        float c[4][256] __attribute__((aligned(64)));                                                              \
        _tile_zero(0);                                                                                             \
        _tile_zero(2);                                                                                             \
        if (NB == 2) {                                                                                             \
            _tile_zero(1);                                                                                         \
            _tile_zero(3);                                                                                         \
        }                                                                                                          \
        for (long i = 0; i < kc; i++) {                                                                            \
            _tile_loadd(4, w0 + i * 32, ldw * 2);                                                                  \
            _tile_loadd(5, w0 + 16 * ldw + i * 32, ldw * 2);                                                       \
            _tile_loadd(6, xb + (g0 * kc + i) * 512, 64);                                                          \
            _tile_dpbf16ps(0, 4, 6);                                                                               \
            _tile_dpbf16ps(2, 5, 6);                                                                               \
            if (NB == 2) {                                                                                         \
                _tile_loadd(7, xb + ((g0 + 1) * kc + i) * 512, 64);                                                \
                _tile_dpbf16ps(1, 4, 7);                                                                           \
                _tile_dpbf16ps(3, 5, 7);                                                                           \
            }                                                                                                      \
        }                                                                                                          \
        _tile_stored(0, c[0], 64);                                                                                 \
        _tile_stored(2, c[2], 64);                                                                                 \
        store_tile(c[0], bias, n0, g0, rows, y, ldy);                                                              \
        store_tile(c[2], bias, n0 + 16, g0, rows, y, ldy);                                                         \
        if (NB == 2) {                                                                                             \
            _tile_stored(1, c[1], 64);                                                                             \
            _tile_stored(3, c[3], 64);                                                                             \
            store_tile(c[1], bias, n0, g0 + 1, rows, y, ldy);                                                      \
            store_tile(c[3], bias, n0 + 16, g0 + 1, rows, y, ldy);                                                 \
        }                                                                                                          \
    }
BLOCK(1)
BLOCK(2)

/* w: bf16 [n_out, k] plain rows (row stride ldw); x: bf16 [rows, k] (row stride ldx); bias: bf16
   [n_out] or NULL; y: bf16 [rows, n_out] (row stride ldy). The gemv_fn signature of
   decode_layer.c. Returns 0; -1 when out of memory; -2 (y untouched) unless 1 <= rows,
   n_out % 32 == 0 and k % 32 == 0. */
int amx_gemm_bf16(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, long rows,
                  long n_out, long k, uint16_t *y, long ldy, int threads) {
    if (rows < 1 || n_out % 32 || k % 32 || n_out < 32) return -2;
    const long kc = k / 32, groups = (rows + 15) / 16, blocks = n_out / 32;
    uint16_t *xb = aligned_alloc(64, (size_t)(groups * kc * 1024));
    if (!xb) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long u = 0; u < groups * kc; u++) pack_tile(x, ldx, rows, u / kc, u % kc, xb + u * 512);
        configure();
        const long t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        for (long b = b0; b < b1; b++) {
            const uint16_t *w0 = w + b * 32 * ldw;
            long g = 0;
            for (; g + 2 <= groups; g += 2) block2(w0, ldw, kc, xb, g, bias, b * 32, rows, y, ldy);
            if (g < groups) block1(w0, ldw, kc, xb, g, bias, b * 32, rows, y, ldy);
        }
        _tile_release();
    }
    free(xb);
    return 0;
}
