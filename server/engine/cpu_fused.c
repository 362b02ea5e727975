/* Small row-wise ops of a decode step as one C call each (built and loaded by cpu_fused.py).

   At one row a Gemma 3 decode step runs 109 RMSNorms and 36 RoPE rotations. In ATen an RMSNorm
   is ~8 ops (pow, mean, add, rsqrt, two muls, and in bf16 an upcast and a downcast) and a
   rotation 7 (two muls, a slice and neg and cat for rotate_half, an add); at one row each op
   costs its dispatch, not its arithmetic. These do the same arithmetic in one pass, bitwise:
   every product and sum is rounded where and in the order ATen rounds it (built without FMA
   contraction, -ffp-contract=off, and without reassociation). */
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

/* The fp32 sum of the squares of x[0..n), in the order ATen's CPU sum kernel adds a contiguous
   row (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum -> row_sum ->
   multi_row_sum, with 8-lane vectors as on AVX2), so that the mean and everything after it are
   bitwise ATen's: lane l of vector v holds element 8 v + l; the vectors are summed as rows of
   four (ilp 4) with a four-level cascade, the left-over vectors go to the first of the four,
   the four are added in order, then the left-over scalars and the eight lanes one by one. */
#define LANES 8
#define ILP 4
#define LEVELS 4
static inline float from_f32(float f) { return f; }
static inline float to_f32(float f) { return f; }

#define SSQ(NAME, T, LOAD)                                                                         \
static float NAME(const T *x, long n) {                                                            \
    long vecs = n / LANES, rows = vecs / ILP;                                                      \
    float acc[LEVELS][ILP][LANES] = {{{0}}};                                                       \
    long power = 0;                                                                                \
    for (long t = rows - 1; t > 0; t >>= 1) power++; /* ceil(log2(rows)) */                        \
    power = power / LEVELS > 4 ? power / LEVELS : 4;                                               \
    long step = 1L << power, mask = step - 1, i = 0;                                               \
    while (i + step <= rows) {                                                                     \
        for (long j = 0; j < step; j++, i++)                                                       \
            for (int k = 0; k < ILP; k++)                                                          \
                for (int l = 0; l < LANES; l++) {                                                  \
                    float v = LOAD(x[(i * ILP + k) * LANES + l]);                                  \
                    acc[0][k][l] += v * v;                                                         \
                }                                                                                  \
        for (int j = 1; j < LEVELS; j++) {                                                         \
            for (int k = 0; k < ILP; k++)                                                          \
                for (int l = 0; l < LANES; l++) {                                                  \
                    acc[j][k][l] += acc[j - 1][k][l];                                              \
                    acc[j - 1][k][l] = 0.0f;                                                       \
                }                                                                                  \
            if ((i & (mask << (j * power))) != 0) break;                                           \
        }                                                                                          \
    }                                                                                              \
    for (; i < rows; i++)                                                                          \
        for (int k = 0; k < ILP; k++)                                                              \
            for (int l = 0; l < LANES; l++) {                                                      \
                float v = LOAD(x[(i * ILP + k) * LANES + l]);                                      \
                acc[0][k][l] += v * v;                                                             \
            }                                                                                      \
    for (int j = 1; j < LEVELS; j++)                                                               \
        for (int k = 0; k < ILP; k++)                                                              \
            for (int l = 0; l < LANES; l++) acc[0][k][l] += acc[j][k][l];                          \
    for (long t = rows * ILP; t < vecs; t++) /* vectors left over by the rows of four */           \
        for (int l = 0; l < LANES; l++) {                                                          \
            float v = LOAD(x[t * LANES + l]);                                                      \
            acc[0][0][l] += v * v;                                                                 \
        }                                                                                          \
    for (int k = 1; k < ILP; k++)                                                                  \
        for (int l = 0; l < LANES; l++) acc[0][0][l] += acc[0][k][l];                              \
    float sum = 0.0f;                                                                              \
    for (long t = vecs * LANES; t < n; t++) {                                                      \
        float v = LOAD(x[t]);                                                                      \
        sum += v * v;                                                                              \
    }                                                                                              \
    for (int l = 0; l < LANES; l++) sum += acc[0][0][l];                                           \
    return sum;                                                                                    \
}
SSQ(ssq_bf16, uint16_t, from_bf16)
SSQ(ssq_f32, float, from_f32)

/* Gemma's RMSNorm, bitwise as the model (and F.rms_norm) computes it in fp32:
   y = T((x * (1 / sqrt(sum(x^2) / dim + eps))) * scale) for each of the n * heads rows of
   x [n, heads, dim] (bf16 or fp32) with strides (sn, sh, 1); scale: fp32 [dim] (Gemma's 1 + w);
   y: contiguous [n, heads, dim] of x's type. */
#define NORM(NAME, T, LOAD, STORE, SSQ_FN)                                                         \
void NAME(const T *x, long sn, long sh, const float *scale, long n, long heads, long dim, float eps, \
          T *y) {                                                                                  \
    for (long t = 0; t < n; t++)                                                                   \
        for (long h = 0; h < heads; h++) {                                                         \
            const T *xr = x + t * sn + h * sh;                                                     \
            T *yr = y + (t * heads + h) * dim;                                                     \
            float inv = 1.0f / sqrtf(SSQ_FN(xr, dim) / (float)dim + eps);                          \
            _Pragma("omp simd")                                                                    \
            for (long i = 0; i < dim; i++) yr[i] = STORE(LOAD(xr[i]) * inv * scale[i]);            \
        }                                                                                          \
}
NORM(rms_norm_bf16, uint16_t, from_bf16, to_bf16, ssq_bf16)
NORM(rms_norm_f32, float, from_f32, to_f32, ssq_f32)

/* Rotary embedding, y = x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) over
   the last dimension's halves; each product and the sum round to T as ATen's elementwise ops do
   (bf16: computed in fp32, rounded to bf16 after every op; fp32: IEEE fp32 ops), so results are
   bitwise ATen's. x: [n, heads, d] with strides (sn, sh, 1); cos, sin: [n, d] with row stride
   sc (shared by the heads); y: contiguous [n, heads, d]. d is even. */
#define ROUND(LOAD, STORE, v) LOAD(STORE(v))
#define ROPE(NAME, T, LOAD, STORE)                                                                 \
void NAME(const T *x, long sn, long sh, const T *cos, const T *sin, long sc, long n, long heads, long d, \
          T *y) {                                                                                  \
    long half = d / 2;                                                                             \
    for (long t = 0; t < n; t++)                                                                   \
        for (long h = 0; h < heads; h++) {                                                         \
            const T *xr = x + t * sn + h * sh, *c = cos + t * sc, *s = sin + t * sc;               \
            T *yr = y + (t * heads + h) * d;                                                       \
            for (long i = 0; i < d; i++) {                                                         \
                float rot = i < half ? -LOAD(xr[i + half]) : LOAD(xr[i - half]);                   \
                float a = ROUND(LOAD, STORE, LOAD(xr[i]) * LOAD(c[i]));                            \
                float b = ROUND(LOAD, STORE, rot * LOAD(s[i]));                                    \
                yr[i] = STORE(a + b);                                                              \
            }                                                                                      \
        }                                                                                          \
}
ROPE(rope_bf16, uint16_t, from_bf16, to_bf16)
ROPE(rope_f32, float, from_f32, to_f32)
