/* The bf16 LM head on Intel AMX tiles (TDPBF16PS), built and loaded by amx_head.py: a vocabulary
   slice's logits, or only each row's first maximum of them (greedy rows the int8 estimate of
   greedy_head.py does not take: beyond one pass of it, 24 rows).

   Two vocabulary blocks of 16 rows against two A tiles of 16 x rows at a time (four C tiles, the
   eight tiles' limit), the pair's weights read once per 32 x rows; x is copied into contiguous A
   tiles, zero rows padding it to 32. Sums in fp32 in the tiles; each logit is rounded to bf16
   (round to nearest even) as oneDNN rounds its output; on Gemma 3 270M's head the logits were
   bitwise oneDNN's prepacked bf16 GEMM's at 8-32 rows and all but 6e-5 of them at 64.
   In argmax mode each thread keeps, per row, the largest rounded logit of its (increasing)
   vocabulary range and its first index, so a row's result is ATen's argmax of the logits this
   kernel would write. On the 2-core AMX Xeon a tile multiply took ~19 ns (~40 cycles), so at 32
   rows the head is about half memory, half AMX: 26-29 ms against oneDNN + the argmax's 37-47. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "amx_tiles.h"

/* Bytes ahead in the packed stream, prefetched into L2 and spread over every group's pass over a
   pair (into L1, all in the first pass, the prefetches stalled the core: 48-64 rows 5-8 % slower). */
#define PREFETCH 65536
#define MAX_THREADS 256

/* Ask Linux for the AMX tile state (once per process). 0 when granted. */
int amx_head_init(void) { return amx_request(); }

/* w: packed [pairs][k / 32][2][16][16][2] bf16: per pair of 16-row vocabulary blocks and 32 inputs,
   the two B tiles (row i: inputs 2i, 2i + 1 of each of the 16 vocabulary rows), zero rows past n;
   x: bf16 [rows, k] (row stride ldx); k % 32 == 0.
   logits != NULL: logits[r, v] (row stride ldl) = bf16(sum_k x[r, k] w[v, k]) for v < n.
   else: val[r], idx[r] = the largest bf16-rounded logit of row r and its lowest index (v < n).
   Returns 0; 1 when a logit is NaN (argmax mode: the caller then takes another path); -1 when
   out of memory. */
int amx_head_bf16(const uint16_t *w, long n, long k, const uint16_t *x, long ldx, long rows, uint16_t *logits,
                  long ldl, float *val, int64_t *idx, int threads) {
    const long kc = k / 32, pairs = (n + 31) / 32, groups = (rows + 31) / 32;
    const long rpad = groups * 32;
    uint16_t *xa = aligned_alloc(64, (size_t)(rpad * k * 2));
    if (!xa) return -1;
    /* x as A tiles, each contiguous: [group][kc][2 tiles][16 rows][32] (zero rows past `rows`) */
    memset(xa, 0, (size_t)(rpad * k * 2));
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < kc; i++)
            memcpy(xa + (((r / 32) * kc + i) * 2 + (r % 32) / 16) * 512 + (r % 16) * 32, x + r * ldx + i * 32, 64);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    float *tval = NULL;
    int64_t *tidx = NULL;
    if (!logits) {
        tval = malloc(sizeof(float) * (size_t)(threads * rows));
        tidx = malloc(sizeof(int64_t) * (size_t)(threads * rows));
        if (!tval || !tidx) {
            free(xa), free(tval), free(tidx);
            return -1;
        }
        for (long i = 0; i < threads * rows; i++) tval[i] = -INFINITY, tidx[i] = -1;
    }
    int nan_seen = 0;
#pragma omp parallel num_threads(threads) reduction(| : nan_seen)
    {
        configure();
        float c[4][16][16] __attribute__((aligned(64)));
        const int tid = omp_get_thread_num();
#pragma omp for schedule(static)
        for (long p = 0; p < pairs; p++) {
            const uint16_t *wp = w + p * kc * 1024; /* [kc][2 blocks][16][16][2]: one stream */
            for (long g = 0; g < groups; g++) {
                const uint16_t *a = xa + g * kc * 1024;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (long i = 0; i < kc; i++) {
                    const char *wi = (const char *)(wp + i * 1024);
                    for (long l = g * 2048 / groups / 64 * 64; l < (g + 1) * 2048 / groups; l += 64)
                        _mm_prefetch(wi + PREFETCH + l, _MM_HINT_T1); /* spread over the groups' passes */
                    _tile_loadd(4, a + i * 1024, 64);
                    _tile_loadd(5, a + i * 1024 + 512, 64);
                    _tile_loadd(6, wi, 64);
                    _tile_loadd(7, wi + 1024, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, c[0], 64);
                _tile_stored(1, c[1], 64);
                _tile_stored(2, c[2], 64);
                _tile_stored(3, c[3], 64);
                for (int h = 0; h < 2; h++) /* row half: tiles 2h, 2h + 1 */
                    for (int rr = 0; rr < 16; rr++) {
                        const long r = g * 32 + h * 16 + rr;
                        if (r >= rows) break;
                        for (int b = 0; b < 2; b++) {
                            const long v0 = (2 * p + b) * 16;
                            if (v0 >= n) break;
                            const __mmask16 keep = (__mmask16)(n - v0 >= 16 ? 0xffff : (1u << (n - v0)) - 1);
                            const __m256bh bf = _mm512_cvtneps_pbh(_mm512_load_ps(c[2 * h + b][rr]));
                            if (logits) {
                                _mm256_mask_storeu_epi16(logits + r * ldl + v0, keep, (__m256i)bf);
                                continue;
                            }
                            const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32((__m256i)bf), 16));
                            if (_mm512_mask_cmp_ps_mask(keep, f, f, _CMP_UNORD_Q)) nan_seen = 1;
                            const float top = _mm512_mask_reduce_max_ps(keep, f);
                            float *bv = tval + tid * rows + r;
                            if (top > *bv) {
                                const __mmask16 at = _mm512_mask_cmp_ps_mask(keep, f, _mm512_set1_ps(top), _CMP_EQ_OQ);
                                *bv = top;
                                tidx[tid * rows + r] = v0 + __builtin_ctz((unsigned)at);
                            }
                        }
                    }
            }
        }
        _tile_release();
    }
    if (!logits) /* threads hold increasing vocabulary ranges: the first strictly greater wins */
        for (long r = 0; r < rows; r++) {
            float best = -INFINITY;
            int64_t at = -1;
            for (int t = 0; t < threads; t++)
                if (tidx[t * rows + r] >= 0 && (at < 0 || tval[t * rows + r] > best))
                    best = tval[t * rows + r], at = tidx[t * rows + r];
            val[r] = best;
            idx[r] = at < 0 ? 0 : at;
        }
    free(xa), free(tval), free(tidx);
    return nan_seen ? 1 : 0;
}
