/* The LoRA delta of decode tokens on CPU, one call per projection (built and loaded by lora_cpu.py).

   For each listed token t (row tokens[i] of x and y, or row i without a list) with slot s =
   slots[i] and rank r = ranks[s] > 0:  y[t] += scale[s] * (x[t] A[s, :r]^T) Bt[s, :r], with the
   paged banks A [pages + 1, max_rank, in] and Bt [pages + 1, max_rank, out] (lora.py's LoraWeights;
   max_rank here is the rows per page, and a slot's r rows may run on into its next pages) read in place: no gathered copies, no per-token ATen ops. The roundings are those of lora.py's
   backends (bf16: PEFT's order, h = bf16(x A^T), bf16(h Bt), times the fp32 scale, rounded, added,
   rounded; fp32: h = x A^T times the scale, then y + h Bt). Sums in fp32, in another order than
   ATen's bmm. Tokens are split between threads (each token's rows of y are its own). Built without
   FMA contraction (-ffp-contract=off), like ATen's separate ops. bf16 runs eight lanes at a time
   (its scalar conversions had held it to ~12 GB/s of bank reads; the fp32 loops vectorise as
   written). */
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"

#define MAX_RANK 1024
#define MAX_IN 16384
#define BLOCK 256 /* output columns accumulated at a time */

/* fp32: h = (x A^T) * scale, then y + h Bt (lora.py's addmm order). Arguments as lora_bf16's. */
void lora_fp32(const float *x, long ldx, float *y, long ldy, long m, const int64_t *tokens, const int64_t *slots,
               long in, long out, const float *a, const float *bt, long max_rank, const int64_t *ranks,
               const float *scale, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (m > 1)
    for (long i = 0; i < m; i++) {
        const long t = tokens ? tokens[i] : i, s = slots[i], r = s > 0 ? ranks[s] : 0;
        if (r <= 0 || r > MAX_RANK) continue;
        const float *as = a + s * max_rank * in, *bs = bt + s * max_rank * out, *xt = x + t * ldx;
        float h[MAX_RANK];
        for (long j = 0; j < r; j++) {
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long k = 0; k < in; k++) dot += xt[k] * as[j * in + k];
            h[j] = dot * scale[s];
        }
        for (long lo = 0; lo < out; lo += BLOCK) {
            const long w = out - lo < BLOCK ? out - lo : BLOCK;
            float acc[BLOCK] = {0};
            for (long j = 0; j < r; j++) {
                const float *b = bs + j * out + lo;
#pragma omp simd
                for (long c = 0; c < w; c++) acc[c] += h[j] * b[c];
            }
            float *yt = y + t * ldy + lo;
            for (long c = 0; c < w; c++) yt[c] += acc[c];
        }
    }
}

static inline __m256 load8(const uint16_t *p) { /* 8 bf16 -> fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256i bits8(__m256 f) { /* to_bf16 of 8 lanes, each in the low half of an int32 */
    const __m256i u = _mm256_castps_si256(f), hi = _mm256_srli_epi32(u, 16);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

static inline __m256 round8(__m256 f) { return _mm256_castsi256_ps(_mm256_slli_epi32(bits8(f), 16)); }

static inline void store8(uint16_t *p, __m256 f) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits8(f), bits8(f)), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

/* y[t] += delta(x[t]) for the listed tokens (lora_cpu.add's contract), bf16 in PEFT's order: h =
   bf16(x A^T), then per column bf16(bf16(h . Bt) * scale) added to y and rounded; eight lanes at a
   time. Returns 0, or -1 (nothing written) where in is not a multiple of 8 or above MAX_IN. */
int lora_bf16(const uint16_t *x, long ldx, uint16_t *y, long ldy, long m, const int64_t *tokens,
               const int64_t *slots, long in, long out, const uint16_t *a, const uint16_t *bt, long max_rank,
               const int64_t *ranks, const float *scale, int threads) {
    if (in > MAX_IN || in % 8) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (m > 1)
    for (long i = 0; i < m; i++) {
        const long t = tokens ? tokens[i] : i, s = slots[i], r = s > 0 ? ranks[s] : 0;
        if (r <= 0 || r > MAX_RANK) continue;
        const uint16_t *as = a + s * max_rank * in, *bs = bt + s * max_rank * out, *xt = x + t * ldx;
        const __m256 sc = _mm256_set1_ps(scale[s]);
        float xf[MAX_IN], h[MAX_RANK];
        for (long k = 0; k < in; k += 8) _mm256_storeu_ps(xf + k, load8(xt + k));
        for (long j = 0; j < r; j++) {
            __m256 dot = _mm256_setzero_ps();
            for (long k = 0; k < in; k += 8)
                dot = _mm256_add_ps(dot, _mm256_mul_ps(_mm256_loadu_ps(xf + k), load8(as + j * in + k)));
            float lanes[8], sum = 0.0f;
            _mm256_storeu_ps(lanes, dot);
            for (int q = 0; q < 8; q++) sum += lanes[q];
            h[j] = bf16_to_float(to_bf16(sum));
        }
        uint16_t *yt = y + t * ldy;
        long c = 0;
        for (; c + 64 <= out; c += 64) { /* 64 columns in eight registers over every rank */
            __m256 acc[8];
            for (int q = 0; q < 8; q++) acc[q] = _mm256_setzero_ps();
            for (long j = 0; j < r; j++) {
                const __m256 hj = _mm256_set1_ps(h[j]);
                const uint16_t *b = bs + j * out + c;
                for (int q = 0; q < 8; q++) acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(hj, load8(b + 8 * q)));
            }
            for (int q = 0; q < 8; q++) {
                const __m256 delta = round8(_mm256_mul_ps(round8(acc[q]), sc));
                store8(yt + c + 8 * q, _mm256_add_ps(load8(yt + c + 8 * q), delta));
            }
        }
        for (; c < out; c++) { /* the last < 64 columns */
            float acc = 0.0f;
            for (long j = 0; j < r; j++) acc += h[j] * bf16_to_float(bs[j * out + c]);
            yt[c] = to_bf16(bf16_to_float(yt[c]) + bf16_to_float(to_bf16(bf16_to_float(to_bf16(acc)) * scale[s])));
        }
    }
    return 0;
}
