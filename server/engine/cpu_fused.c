/* Small row-wise ops of a decode step as one C call each (built and loaded by cpu_fused.py).

   At one row a Gemma 3 decode step runs 109 RMSNorms and 36 RoPE rotations. In ATen an RMSNorm
   is ~8 ops (pow, mean, add, rsqrt, two muls, and in bf16 an upcast and a downcast) and a
   rotation 7 (two muls, a slice and neg and cat for rotate_half, an add); at one row each op
   costs its dispatch, not its arithmetic. These do the same arithmetic in one pass, bitwise:
   every product and sum is rounded where and in the order ATen rounds it (built without FMA
   contraction, -ffp-contract=off, and without reassociation). */
#include <immintrin.h>
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
#define NORM_ROW(NAME, T, LOAD, STORE, SSQ_FN)                                                     \
static inline void NAME(const T *xr, const float *scale, long dim, float eps, T *yr) {             \
    float inv = 1.0f / sqrtf(SSQ_FN(xr, dim) / (float)dim + eps);                                  \
    _Pragma("omp simd")                                                                            \
    for (long i = 0; i < dim; i++) yr[i] = STORE(LOAD(xr[i]) * inv * scale[i]);                    \
}
NORM_ROW(norm_row_bf16, uint16_t, from_bf16, to_bf16, ssq_bf16)
NORM_ROW(norm_row_f32, float, from_f32, to_f32, ssq_f32)

#define NORM(NAME, T, ROW)                                                                         \
void NAME(const T *x, long sn, long sh, const float *scale, long n, long heads, long dim, float eps, \
          T *y) {                                                                                  \
    for (long t = 0; t < n; t++)                                                                   \
        for (long h = 0; h < heads; h++) ROW(x + t * sn + h * sh, scale, dim, eps, y + (t * heads + h) * dim); \
}
NORM(rms_norm_bf16, uint16_t, norm_row_bf16)
NORM(rms_norm_f32, float, norm_row_f32)

/* A sandwich-norm residual step: h_out = T(h + norm1(a)) (the sum in fp32, rounded once, as
   ATen's add rounds), then x_out = norm2(h_out) unless scale2 is NULL. a, h, h_out, x_out:
   contiguous [n, dim]; dim <= MAX_DIM. */
#define MAX_DIM 8192
#define RESIDUAL(NAME, T, LOAD, STORE, ROW)                                                        \
void NAME(const T *a, const T *h, const float *scale1, float eps1, const float *scale2, float eps2, \
          long n, long dim, T *h_out, T *x_out) {                                                  \
    T tmp[MAX_DIM];                                                                                \
    for (long t = 0; t < n; t++) {                                                                 \
        ROW(a + t * dim, scale1, dim, eps1, tmp);                                                  \
        for (long i = 0; i < dim; i++) h_out[t * dim + i] = STORE(LOAD(h[t * dim + i]) + LOAD(tmp[i])); \
        if (scale2) ROW(h_out + t * dim, scale2, dim, eps2, x_out + t * dim);                      \
    }                                                                                              \
}
RESIDUAL(residual_norm_bf16, uint16_t, from_bf16, to_bf16, norm_row_bf16)
RESIDUAL(residual_norm_f32, float, from_f32, to_f32, norm_row_f32)

/* Rotary embedding, y = x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) over
   the last dimension's halves; each product and the sum round to T as ATen's elementwise ops do
   (bf16: computed in fp32, rounded to bf16 after every op; fp32: IEEE fp32 ops), so results are
   bitwise ATen's. x: [n, heads, d] with strides (sn, sh, 1); cos, sin: [n, d] with row stride
   sc (shared by the heads); y: contiguous [n, heads, d]. d is even. */
#define ROUND(LOAD, STORE, v) LOAD(STORE(v))
#define ROPE_ROW(NAME, T, LOAD, STORE)                                                             \
static inline void NAME(const T *xr, const T *c, const T *s, long d, T *yr) {                      \
    long half = d / 2;                                                                             \
    for (long i = 0; i < d; i++) {                                                                 \
        float rot = i < half ? -LOAD(xr[i + half]) : LOAD(xr[i - half]);                           \
        float a = ROUND(LOAD, STORE, LOAD(xr[i]) * LOAD(c[i]));                                    \
        float b = ROUND(LOAD, STORE, rot * LOAD(s[i]));                                            \
        yr[i] = STORE(a + b);                                                                      \
    }                                                                                              \
}
ROPE_ROW(rope_row_bf16, uint16_t, from_bf16, to_bf16)
ROPE_ROW(rope_row_f32, float, from_f32, to_f32)

#define ROPE(NAME, T, ROW)                                                                         \
void NAME(const T *x, long sn, long sh, const T *cos, const T *sin, long sc, long n, long heads, long d, \
          T *y) {                                                                                  \
    for (long t = 0; t < n; t++)                                                                   \
        for (long h = 0; h < heads; h++)                                                           \
            ROW(x + t * sn + h * sh, cos + t * sc, sin + t * sc, d, y + (t * heads + h) * d);      \
}
ROPE(rope_bf16, uint16_t, rope_row_bf16)
ROPE(rope_f32, float, rope_row_f32)

/* Attention's per-token work before the scores, in one call: for token t, cache row rows[t]
   and position pos[t], qout[t, h] = rope(norm_q(q[t, h])), kc[rows[t], g, pos[t]] =
   rope(norm_k(k[t, g])) and vc[rows[t], g, pos[t]] = v[t, g]; each step rounds as the kernels
   above (so as ATen) do, and no norm is applied where its scale is NULL. q, k, v: [n, heads or
   kvh, d] with strides (sn, sh, 1); cos, sin: [n, d], row stride sc; qout: contiguous [n, heads,
   d]; kc, vc: [row_cap, kvh, pos_cap, d] with strides (c_row, c_head, c_pos, 1). d <= MAX_D.
   Returns 0, or -1 (nothing written) when a row or position is out of the caches' range. */
#define MAX_D 1024
#define PREP(NAME, T, NORM_FN, ROPE_FN)                                                            \
int NAME(const T *q, long qn, long qh, const T *k, long kn, long kh, const T *v, long vn, long vh,  \
         const float *qscale, float qeps, const float *kscale, float keps, const T *cos, const T *sin, \
         long sc, long n, long heads, long kvh, long d, T *qout, T *kc, T *vc, long row_cap, long pos_cap, \
         long c_row, long c_head, long c_pos, const int64_t *rows, const int64_t *pos) {             \
    T tmp[MAX_D];                                                                                  \
    for (long t = 0; t < n; t++)                                                                   \
        if (rows[t] < 0 || rows[t] >= row_cap || pos[t] < 0 || pos[t] >= pos_cap || d > MAX_D) return -1; \
    for (long t = 0; t < n; t++) {                                                                 \
        const T *c = cos + t * sc, *s = sin + t * sc;                                              \
        for (long h = 0; h < heads; h++) {                                                         \
            const T *x = q + t * qn + h * qh;                                                      \
            if (qscale) { NORM_FN(x, qscale, d, qeps, tmp); x = tmp; }                             \
            ROPE_FN(x, c, s, d, qout + (t * heads + h) * d);                                       \
        }                                                                                          \
        for (long g = 0; g < kvh; g++) {                                                           \
            long at = rows[t] * c_row + g * c_head + pos[t] * c_pos;                               \
            const T *x = k + t * kn + g * kh;                                                      \
            if (kscale) { NORM_FN(x, kscale, d, keps, tmp); x = tmp; }                             \
            ROPE_FN(x, c, s, d, kc + at);                                                          \
            memcpy(vc + at, v + t * vn + g * vh, sizeof(T) * (size_t)d);                           \
        }                                                                                          \
    }                                                                                              \
    return 0;                                                                                      \
}
PREP(attention_prep_bf16, uint16_t, norm_row_bf16, rope_row_bf16)
PREP(attention_prep_f32, float, norm_row_f32, rope_row_f32)

/* idx[r] = the first maximum of x[r, 0..n) (row stride ld), as ATen's argmax: the lowest index of
   the largest value, or of the first NaN where a row has one (+0 and -0 compare equal). Two
   passes, eight lanes at a time: the maximum (four independent chains) and whether a NaN went by,
   then a scan up to the first element equal to it (or the first NaN). Tracking indices in the
   first pass instead measured slower (two blends per vector). For the LM head's slices when only
   their argmax is read. */
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
#define FIRST_MAX(NAME, T, LOAD8, LOAD)                                                            \
void NAME(const T *x, long rows, long ld, long n, int64_t *idx) {                                  \
    for (long r = 0; r < rows; r++) {                                                              \
        const T *xr = x + r * ld;                                                                  \
        __m256 t0 = _mm256_set1_ps(-INFINITY), t1 = t0, t2 = t0, t3 = t0, n0 = _mm256_setzero_ps(), n1 = n0; \
        long i = 0;                                                                                \
        for (; i + 32 <= n; i += 32) { /* four independent chains (an array of them was spilled) */\
            __m256 v0 = LOAD8(xr + i), v1 = LOAD8(xr + i + 8), v2 = LOAD8(xr + i + 16), v3 = LOAD8(xr + i + 24); \
            t0 = _mm256_max_ps(t0, v0);                                                            \
            t1 = _mm256_max_ps(t1, v1);                                                            \
            t2 = _mm256_max_ps(t2, v2);                                                            \
            t3 = _mm256_max_ps(t3, v3);                                                            \
            n0 = _mm256_or_ps(n0, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));                            \
            n1 = _mm256_or_ps(n1, _mm256_cmp_ps(v2, v3, _CMP_UNORD_Q));                            \
        }                                                                                          \
        __m256 nan = _mm256_or_ps(n0, n1);                                                         \
        float lanes[8], m = -INFINITY;                                                             \
        _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(t0, t1), _mm256_max_ps(t2, t3)));     \
        for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;                               \
        int has_nan = _mm256_movemask_ps(nan) != 0;                                                \
        for (; i < n; i++) {                                                                       \
            float v = LOAD(xr[i]);                                                                 \
            has_nan |= v != v;                                                                     \
            m = v > m ? v : m;                                                                     \
        }                                                                                          \
        const __m256 want = _mm256_set1_ps(m);                                                     \
        long j = 0, best = -1;                                                                     \
        for (; j + 8 <= n && best < 0; j += 8) {                                                   \
            __m256 v = LOAD8(xr + j);                                                              \
            int hit = _mm256_movemask_ps(has_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q)               \
                                                 : _mm256_cmp_ps(v, want, _CMP_EQ_OQ));            \
            if (hit) best = j + __builtin_ctz((unsigned)hit);                                      \
        }                                                                                          \
        for (; j < n && best < 0; j++) {                                                           \
            float v = LOAD(xr[j]);                                                                 \
            if (has_nan ? v != v : v == m) best = j;                                               \
        }                                                                                          \
        idx[r] = best < 0 ? 0 : best;                                                              \
    }                                                                                              \
}
FIRST_MAX(first_max_bf16, uint16_t, load8_bf16, from_bf16)
FIRST_MAX(first_max_f32, float, load8_f32, from_f32)
