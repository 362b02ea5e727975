/* Small row-wise ops of a decode step as one C call each (built and loaded by cpu_fused.py).

   At one row a Gemma 3 decode step runs 109 RMSNorms and 36 RoPE rotations. In ATen a bf16
   RMSNorm is ~10 ops (an upcast, pow, mean, add, rsqrt, two muls, a downcast) and a rotation 7
   (two muls, a slice and neg and cat for rotate_half, an add); at one row each op costs its
   dispatch, not its arithmetic. These do the same arithmetic in one pass.

   Built without FMA contraction (-ffp-contract=off) so every product and sum rounds as the
   separate ATen ops round. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) { /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded); /* branch-free: vectorises */
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Gemma's RMSNorm on bf16 rows, all in fp32 then one rounding, as the model computes it:
   y = bf16((x * (1 / sqrt(mean(x^2) + eps))) * scale) for each of the n * heads rows of x
   [n, heads, dim] with strides (sn, sh, 1); scale: fp32 [dim] (Gemma's 1 + w); y: contiguous
   [n, heads, dim]. The squares of bf16 values are exact and sum in double, so the mean is the
   exactly rounded one; ATen sums fp32 squares in fp32, so the two may differ in the mean's last
   bit and, rarely, y by one bf16 ulp. */
void rms_norm_bf16(const uint16_t *x, long sn, long sh, const float *scale, long n, long heads, long dim,
                   float eps, uint16_t *y) {
    for (long t = 0; t < n; t++)
        for (long h = 0; h < heads; h++) {
            const uint16_t *xr = x + t * sn + h * sh;
            uint16_t *yr = y + (t * heads + h) * dim;
            double sum = 0.0;
#pragma omp simd reduction(+ : sum)
            for (long i = 0; i < dim; i++) {
                double v = from_bf16(xr[i]);
                sum += v * v;
            }
            float inv = 1.0f / sqrtf((float)sum / (float)dim + eps);
#pragma omp simd
            for (long i = 0; i < dim; i++) yr[i] = to_bf16(from_bf16(xr[i]) * inv * scale[i]);
        }
}

/* Rotary embedding, y = x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) over
   the last dimension's halves; each product and the sum round as ATen's elementwise ops do (in
   bf16: computed in fp32, rounded to bf16 after every op), so results are bitwise ATen's.
   x: [n, heads, d] with strides (sn, sh, 1); cos, sin: [n, d] with row stride sc (shared by the
   heads); y: contiguous [n, heads, d]. d is even. */
void rope_bf16(const uint16_t *x, long sn, long sh, const uint16_t *cos, const uint16_t *sin, long sc,
               long n, long heads, long d, uint16_t *y) {
    long half = d / 2;
    for (long t = 0; t < n; t++)
        for (long h = 0; h < heads; h++) {
            const uint16_t *xr = x + t * sn + h * sh;
            const uint16_t *c = cos + t * sc, *s = sin + t * sc;
            uint16_t *yr = y + (t * heads + h) * d;
            for (long i = 0; i < half; i++) {
                float a = from_bf16(to_bf16(from_bf16(xr[i]) * from_bf16(c[i])));
                float b = from_bf16(to_bf16(-from_bf16(xr[i + half]) * from_bf16(s[i])));
                yr[i] = to_bf16(a + b);
            }
            for (long i = half; i < d; i++) {
                float a = from_bf16(to_bf16(from_bf16(xr[i]) * from_bf16(c[i])));
                float b = from_bf16(to_bf16(from_bf16(xr[i - half]) * from_bf16(s[i])));
                yr[i] = to_bf16(a + b);
            }
        }
}

/* rope_bf16 in fp32 (every op rounds in fp32, as ATen's fp32 ops do). */
void rope_f32(const float *x, long sn, long sh, const float *cos, const float *sin, long sc,
              long n, long heads, long d, float *y) {
    long half = d / 2;
    for (long t = 0; t < n; t++)
        for (long h = 0; h < heads; h++) {
            const float *xr = x + t * sn + h * sh;
            const float *c = cos + t * sc, *s = sin + t * sc;
            float *yr = y + (t * heads + h) * d;
            for (long i = 0; i < half; i++) {
                float a = xr[i] * c[i], b = -xr[i + half] * s[i];
                yr[i] = a + b;
            }
            for (long i = half; i < d; i++) {
                float a = xr[i] * c[i], b = xr[i - half] * s[i];
                yr[i] = a + b;
            }
        }
}
