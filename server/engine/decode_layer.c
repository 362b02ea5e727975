/* One Gemma 3 decoder layer of a decode step as one C call (built and loaded by decode_layer.py).

   At 1-4 rows a bf16 step of Gemma 3 270M streams ~200 MB of layer weights in ~4-6 ms, but the
   Python around its 18 layers (eight kernel calls each, their argument checks, ATen's attention
   with its masks and views, GELU and a multiply) cost another ~4-5 ms. Here a layer is one call
   that drives the same kernels through function pointers handed over at load time: the GEMV
   (cpu_gemv), the norms, the residual norms and the q/k norm + RoPE + K/V write (cpu_fused), so
   everything but attention and GELU is bitwise the Python path. Attention and GELU are computed
   here, in fp32, rounded where ATen rounds them (the softmax weights to bf16 before they weigh V,
   as its flash-attention kernel does; GELU rounded, then the product with up rounded); their sums
   and tanh may differ from ATen's in the last fp32 bits, so a row's output may differ by a bf16
   ulp. Built without FMA contraction (-ffp-contract=off), like ATen's separate vector ops.

   Adapter tokens take the same call: after each projection, a token whose LoRA slot targets it
   gets its delta in PEFT's bf16 rounding order, as the Python path's LoRA backends add it
   (h = bf16(x A^T), then bf16(h Bt), times the slot's scale, rounded, then added and rounded);
   the sums are fp32 in another order than ATen's bmm, so a delta may differ by a bf16 ulp.

   decode_layer_f32 is the same layer in fp32 (the kernels' fp32 variants, the panel GEMM for the
   projections): attention and GELU in fp32 without those roundings, within a few fp32 ulps of
   ATen's; everything else bitwise the Python path's. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* The row-wise kernels of cpu_fused.c and lora_cpu.c for T (uint16_t: bf16; float: fp32), named
   norm_SFX_fn etc. */
#define KERNEL_TYPES(T, SFX)                                                                                       \
    typedef void (*norm_##SFX##_fn)(const T *x, long sn, long sh, const float *scale, long n, long heads,          \
                                    long dim, float eps, T *y);                                                    \
    typedef void (*residual_##SFX##_fn)(const T *a, const T *h, const float *scale1, float eps1,                   \
                                        const float *scale2, float eps2, long n, long dim, T *h_out, T *x_out);   \
    typedef void (*lora_##SFX##_fn)(const T *x, long ldx, T *y, long ldy, long m, const int64_t *tokens,           \
                                    const int64_t *slots, long in, long out, const T *a, const T *bt,            \
                                    long max_rank, const int64_t *ranks, const float *scale, int threads);        \
    typedef int (*prep_##SFX##_fn)(const T *q, long qn, long qh, const T *k, long kn, long kh, const T *v, long vn, \
                                   long vh, const float *qscale, float qeps, const float *kscale, float keps,     \
                                   const T *cos, const T *sin, long sc, long n, long heads, long kvh, long d,     \
                                   T *qout, T *kc, T *vc, long row_cap, long pos_cap, long c_row, long c_head,    \
                                   long c_pos, const int64_t *rows, const int64_t *pos);
KERNEL_TYPES(uint16_t, bf16)
KERNEL_TYPES(float, f32)

/* bf16: a C GEMV of cpu_gemv or the AMX GEMM of amx_gemm (plain rows); fp32: the panel GEMM (gemm_f32_avx512.c): wp its
   panels, w/ldw plain rows (NULL here). */
typedef int (*gemv_fn)(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, long rows,
                       long n_out, long k, uint16_t *y, long ldy, int threads);
typedef void (*gemm_f32_fn)(const float *wp, const float *w, long ldw, long n_out, long k, const float *x, long ldx,
                            const float *bias, long rows, float *y, long ldy, int threads);

/* The model's shapes and the kernels, and the LoRA slot banks' scale [slots + 1] (fp32) and rank
   capacity (decode_layer.py's _Plan mirrors this field for field). The kernels are the dtype's:
   gemv_fn and the *_bf16_fn types above for decode_layer_bf16, gemm_f32_fn and the *_f32_fn ones for
   decode_layer_f32. */
typedef struct {
    void *gemv, *norm, *residual, *prep, *lora;
    long hidden, heads, kvh, d, inter, max_rows;
    const float *lora_scale;
    long max_rank; /* the banks' rows per page (slots.SlotBank.page_rank): a slot's rank rows start there */
    void *gemm;     /* bf16: a gemv_fn for more than gemv_rows rows (the AMX GEMM), or NULL: gemv takes all */
    long gemv_rows;
} Plan;

/* One projection's LoRA page bank (slots.SlotBank): a [pages + 1, page_rank, in], bt [pages + 1,
   page_rank, out] (B transposed), ranks int64 [pages + 1] (per first page; 0: the adapter does not
   target it); an adapter's r rows run on over its next pages; a NULL: no adapter targets this
   projection (decode_layer.py's _Lora). */
typedef struct {
    const void *a, *bt; /* the layer function's dtype */
    const int64_t *ranks;
} Lora;

enum { L_Q, L_K, L_V, L_O, L_GATE, L_UP, L_DOWN, L_COUNT };

/* One layer: its weights [out, in] (qkv: q, k, v rows packed; gate_up: gate then up; bf16 plain
   rows, or fp32 in the panel GEMM's panels), the
   fp32 norm scales with their eps, the sliding window (0: none), the attention scale, and the
   layer's K/V caches [row_cap, kvh, pos_cap, d] with their strides (decode_layer.py's _Layer). */
typedef struct {
    const void *qkv, *o, *gate_up, *down;
    const float *input_norm, *q_norm, *k_norm, *post_attn, *pre_ff, *post_ff;
    float input_eps, q_eps, k_eps, post_attn_eps, pre_ff_eps, post_ff_eps;
    long window;
    float scale;
    void *kc, *vc; /* the layer function's dtype */
    long row_cap, pos_cap, c_row, c_head, c_pos;
    Lora lora[L_COUNT];
} Layer;

#define MAX_D 1024
#define LORA_MAX_RANK 1024 /* lora_cpu.c's MAX_RANK */
/* y[t, :out] (row stride ldy) += the LoRA delta of x[t, :in] (row stride ldx) for every token t
   whose slot slots[t] targets this projection (lora_cpu.c's lora_bf16, in PEFT's bf16 order). */
#define LORA_ADD(T, SFX)                                                                                           \
    static void lora_add_##SFX(const Plan *p, const Lora *m, long in, long out, long n, const T *x, long ldx, T *y, \
                               long ldy, const int64_t *slots, int threads) {                                       \
        if (m->a && slots)                                                                                         \
            ((lora_##SFX##_fn)p->lora)(x, ldx, y, ldy, n, NULL, slots, in, out, m->a, m->bt, p->max_rank,          \
                                       m->ranks, p->lora_scale, threads);                                          \
    }
LORA_ADD(uint16_t, bf16)
LORA_ADD(float, f32) /* lora_cpu.c's lora_fp32 */

/* out[t, h] = softmax(q[t, h] . K[rows[t], g] * scale) V[rows[t], g] over the positions
   lo..pos[t] (lo = pos[t] - window + 1 with a window), g = h / (heads / kvh). Scores and sums in
   fp32; each softmax weight rounds to bf16 before it weighs V (ATen's CPU flash attention does),
   the sum of weights does not; the output rounds once. q, out: contiguous [n, heads, d]. */
static int attend_bf16_heads(const Plan *p, const Layer *l, long n, const uint16_t *q, const int64_t *rows,
                             const int64_t *pos, uint16_t *out, int threads) {
    const long heads = p->heads, d = p->d, group = heads / p->kvh;
    long span = 1;
    for (long t = 0; t < n; t++) span = pos[t] + 1 > span ? pos[t] + 1 : span;
    float *scores = malloc(sizeof(float) * (size_t)(n * heads * span));
    if (!scores) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long th = 0; th < n * heads; th++) {
        const long t = th / heads, g = (th % heads) / group;
        const long hi = pos[t] + 1, lo = l->window > 0 && hi > l->window ? hi - l->window : 0;
        const uint16_t *qr = q + th * d;
        const uint16_t *kb = (const uint16_t *)l->kc + rows[t] * l->c_row + g * l->c_head;
        const uint16_t *vb = (const uint16_t *)l->vc + rows[t] * l->c_row + g * l->c_head;
        float *s = scores + th * span, qf[MAX_D], acc[MAX_D], top = -INFINITY, sum = 0.0f;
        for (long i = 0; i < d; i++) {
            qf[i] = bf16_to_float(qr[i]);
            acc[i] = 0.0f;
        }
        for (long j = lo; j < hi; j++) {
            const uint16_t *kr = kb + j * l->c_pos;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (long i = 0; i < d; i++) dot += qf[i] * bf16_to_float(kr[i]);
            s[j - lo] = dot * l->scale;
            top = s[j - lo] > top ? s[j - lo] : top;
        }
        for (long j = lo; j < hi; j++) {
            const float e = expf(s[j - lo] - top), w = bf16_to_float(to_bf16(e));
            const uint16_t *vr = vb + j * l->c_pos;
            sum += e;
#pragma omp simd
            for (long i = 0; i < d; i++) acc[i] += w * bf16_to_float(vr[i]);
        }
        for (long i = 0; i < d; i++) out[th * d + i] = to_bf16(acc[i] / sum);
    }
    free(scores);
    return 0;
}

/* e^x for 8 fp32 lanes, |x| clamped to [-87, 88] (no overflow, no denormals): Cody-Waite
   reduction by ln 2 (Cephes' two-part constant), a degree-6 Taylor polynomial on |r| <= ln 2 / 2
   (relative error ~1e-7), then the power of two in the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    const float coef[] = {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coef[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* act[t, i] = bf16(bf16(gelu_tanh(gate[t, i])) * up[t, i]) with gate_up [n, 2 * inter] (gate
   columns first): ATen's GELU, 0.5 * x * (1 + tanh(beta * (x + kappa * x^3))) in fp32 in its
   operation order, with tanh(u) = sign(u) d / (d + 2), d = e^(2|u|) - 1 (the form of ATen's vector
   tanh, Sleef's, so 1 + tanh(u) rounds alike in the negative tail where it cancels), rounded, then
   ATen's bf16 multiply. Eight lanes at a time
   (libm's scalar tanhf was ~0.7 ms of a Gemma 3 270M step). Exported for decode_layer.py's probe. */
/* 8 fp32 lanes -> 8 lanes whose high 16 bits are to_bf16's rounding of each (bf16.h), low bits kept. */
static inline __m256i round8(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan); /* NaN stays quiet */
}
static inline __m256 bf16_of8(__m256i r) { /* the fp32 value of round8's bf16s */
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

void gelu_mul_bf16(const uint16_t *gate_up, long n, long inter, uint16_t *act) {
    const __m256 beta = _mm256_set1_ps((float)(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    for (long t = 0; t < n; t++) {
        const uint16_t *g = gate_up + t * 2 * inter, *u = g + inter;
        for (long i = 0; i < inter; i += 8) {
            uint16_t lanes[8] = {0}, ups[8] = {0}, res[8];
            const long m = inter - i < 8 ? inter - i : 8;
            if (m < 8) { /* the ragged end through zero-padded lanes */
                memcpy(lanes, g + i, sizeof(uint16_t) * (size_t)m);
                memcpy(ups, u + i, sizeof(uint16_t) * (size_t)m);
            }
            const __m256 x = load8_bf16(m < 8 ? lanes : g + i), up = load8_bf16(m < 8 ? ups : u + i);
            const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, cube)));
            const __m256 sign = _mm256_and_ps(inner, _mm256_set1_ps(-0.0f));
            const __m256 d = _mm256_sub_ps(exp8(_mm256_mul_ps(two, _mm256_xor_ps(inner, sign))), one);  /* expm1(2|u|) */
            const __m256 th = _mm256_xor_ps(_mm256_div_ps(d, _mm256_add_ps(d, two)), sign);
            const __m256 gelu = bf16_of8(round8(_mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, th))));
            const __m256i r = _mm256_srli_epi32(round8(_mm256_mul_ps(gelu, up)), 16);
            const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128((__m128i *)(m < 8 ? res : act + t * inter + i), packed);
            if (m < 8) memcpy(act + t * inter + i, res, sizeof(uint16_t) * (size_t)m);
        }
    }
}

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* s[j] = scale * q . k_j for the keys k_j of type T (row stride c_pos) j = 0..m-1, q fp32, d a
   multiple of 8, LOAD8 reading 8 of a key as fp32: four keys at a time, so four independent FMA
   chains run (one chain was bound by its add latency). scores_f32, and scores_bf16 for bf16 keys. */
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
#define SCORES(SFX, T, LOAD8)                                                                                      \
    static void scores_##SFX(const float *q, const T *k, long c_pos, long m, long d, float scale, float *s) {      \
        long j = 0;                                                                                                \
        for (; j + 4 <= m; j += 4) {                                                                               \
            const T *k0 = k + j * c_pos, *k1 = k0 + c_pos, *k2 = k1 + c_pos, *k3 = k2 + c_pos;                     \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                           \
            for (long i = 0; i < d; i += 8) {                                                                      \
                const __m256 qv = _mm256_loadu_ps(q + i);                                                          \
                a0 = _mm256_fmadd_ps(qv, LOAD8(k0 + i), a0);                                                       \
                a1 = _mm256_fmadd_ps(qv, LOAD8(k1 + i), a1);                                                       \
                a2 = _mm256_fmadd_ps(qv, LOAD8(k2 + i), a2);                                                       \
                a3 = _mm256_fmadd_ps(qv, LOAD8(k3 + i), a3);                                                       \
            }                                                                                                      \
            s[j] = hsum8(a0) * scale, s[j + 1] = hsum8(a1) * scale, s[j + 2] = hsum8(a2) * scale;                  \
            s[j + 3] = hsum8(a3) * scale;                                                                          \
        }                                                                                                          \
        for (; j < m; j++) {                                                                                       \
            const T *kj = k + j * c_pos;                                                                           \
            __m256 a = _mm256_setzero_ps();                                                                        \
            for (long i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LOAD8(kj + i), a);         \
            s[j] = hsum8(a) * scale;                                                                               \
        }                                                                                                          \
    }
SCORES(f32, float, load8_f32)
SCORES(bf16, uint16_t, load8_bf16)

/* Scores of n tokens' heads, [n * heads][*span] fp32 (span: the longest context, pos[t] + 1), or
   NULL when out of memory. */
static float *score_rows(long n, long heads, const int64_t *pos, long *span) {
    *span = 1;
    for (long t = 0; t < n; t++) *span = pos[t] + 1 > *span ? pos[t] + 1 : *span;
    return malloc(sizeof(float) * (size_t)(n * heads * *span));
}

/* Unit u of a grouped attention (units: n tokens x kvh groups x split parts of a group, per heads
   each): its token t, KV group g, first query head h0, and the element offset `at` of its first
   key and value (position lo) in the layer's caches; keys lo .. hi - 1 (the sliding window's). */
typedef struct {
    long t, g, h0, lo, hi, at;
} Unit;
static inline Unit unit_of(const Layer *l, long u, long kvh, long split, long group, long per, const int64_t *rows,
                           const int64_t *pos) {
    Unit x;
    x.t = u / (kvh * split), x.g = (u / split) % kvh, x.h0 = x.g * group + (u % split) * per;
    x.hi = pos[x.t] + 1, x.lo = l->window > 0 && x.hi > l->window ? x.hi - l->window : 0;
    x.at = rows[x.t] * l->c_row + x.g * l->c_head + x.lo * l->c_pos;
    return x;
}

/* fp32 attention as attend_bf16, without its roundings (scores, weights, sums and the output
   in fp32, products fused into FMAs), a token's query heads of one KV group together so each
   K/V row is read once for them (at fewer tokens x groups than threads, each head apart).
   d a multiple of 8 (the layer checks). Returns -1 where group * d > MAX_GD. */
#define MAX_GD 4096
static int attend_f32(const Plan *p, const Layer *l, long n, const float *q, const int64_t *rows, const int64_t *pos,
                      float *out, int threads) {
    const long heads = p->heads, d = p->d, kvh = p->kvh, group = heads / kvh;
    const long split = n * kvh < threads ? group : 1, per = group / split; /* heads of a group per unit */
    if (group * d > MAX_GD) return -1;
    long span;
    float *scores = score_rows(n, heads, pos, &span);
    if (!scores) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long u = 0; u < n * kvh * split; u++) {
        const Unit x = unit_of(l, u, kvh, split, group, per, rows, pos);
        const long t = x.t, h0 = x.h0, hi = x.hi, lo = x.lo;
        const float *kb = (const float *)l->kc + x.at, *vb = (const float *)l->vc + x.at;
        float acc[MAX_GD] __attribute__((aligned(32))), top[MAX_GD / 8], sum[MAX_GD / 8];
        for (long i = 0; i < per * d; i++) acc[i] = 0.0f;
        for (long e = 0; e < per; e++) {
            float *s = scores + (t * heads + h0 + e) * span;
            scores_f32(q + (t * heads + h0 + e) * d, kb, l->c_pos, hi - lo, d, l->scale, s);
            top[e] = -INFINITY, sum[e] = 0.0f;
            for (long j = 0; j < hi - lo; j++) top[e] = s[j] > top[e] ? s[j] : top[e];
            for (long j = 0; j < hi - lo; j++) {
                s[j] = expf(s[j] - top[e]);
                sum[e] += s[j];
            }
        }
        for (long j = 0; j < hi - lo; j++) { /* each V row once for the unit's heads */
            const float *vr = vb + j * l->c_pos;
            for (long e = 0; e < per; e++) {
                const __m256 w = _mm256_set1_ps(scores[(t * heads + h0 + e) * span + j]);
                float *ae = acc + e * d;
                for (long i = 0; i < d; i += 8)
                    _mm256_store_ps(ae + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + i), _mm256_load_ps(ae + i)));
            }
        }
        for (long e = 0; e < per; e++)
            for (long i = 0; i < d; i++) out[(t * heads + h0 + e) * d + i] = acc[e * d + i] / sum[e];
    }
    free(scores);
    return 0;
}

/* One unit of attend_bf16: PER query heads (fp32 rows qf + e * d) of one KV group against its m
   keys and values (bf16 rows kb, vb, stride c_pos), scores into s + e * span, output rows out +
   e * d (bf16). Each K and V row is converted once for the PER heads: two keys at a time into
   2 * PER accumulators, each key's q . k in one FMA chain as scores_bf16 sums it; the softmax's
   e^x eight at a time (exp8); V sixteen lanes at a time into 2 * PER accumulators over every key
   (each a product, then a sum, in key order). d a multiple of 16. */
#define ATTEND_UNIT(PER)                                                                                           \
    static void attend_unit_x##PER(const float *qf, const uint16_t *kb, const uint16_t *vb, long c_pos, long m,   \
                                   long d, float scale, float *s, long span, uint16_t *out) {                     \
        long j = 0;                                                                                                \
        for (; j + 2 <= m; j += 2) {                                                                               \
            const uint16_t *k0 = kb + j * c_pos, *k1 = k0 + c_pos;                                                 \
            __m256 a0[PER], a1[PER];                                                                               \
            for (int e = 0; e < PER; e++) a0[e] = a1[e] = _mm256_setzero_ps();                                     \
            for (long i = 0; i < d; i += 8) {                                                                      \
                if (!(i & 31)) { /* a line of the keys two steps on, and of these keys' values for below */       \
                    _mm_prefetch((const char *)(k0 + 4 * c_pos + i), _MM_HINT_T0);                                \
                    _mm_prefetch((const char *)(k1 + 4 * c_pos + i), _MM_HINT_T0);                                \
                    _mm_prefetch((const char *)(vb + j * c_pos + i), _MM_HINT_T1);                                \
                    _mm_prefetch((const char *)(vb + (j + 1) * c_pos + i), _MM_HINT_T1);                          \
                }                                                                                                  \
                const __m256 x0 = load8_bf16(k0 + i), x1 = load8_bf16(k1 + i);                                     \
                for (int e = 0; e < PER; e++) {                                                                    \
                    const __m256 qv = _mm256_loadu_ps(qf + e * d + i);                                             \
                    a0[e] = _mm256_fmadd_ps(qv, x0, a0[e]);                                                        \
                    a1[e] = _mm256_fmadd_ps(qv, x1, a1[e]);                                                        \
                }                                                                                                  \
            }                                                                                                      \
            for (int e = 0; e < PER; e++) {                                                                        \
                s[e * span + j] = hsum8(a0[e]) * scale;                                                            \
                s[e * span + j + 1] = hsum8(a1[e]) * scale;                                                        \
            }                                                                                                      \
        }                                                                                                          \
        for (; j < m; j++)                                                                                         \
            for (int e = 0; e < PER; e++) scores_bf16(qf + e * d, kb + j * c_pos, c_pos, 1, d, scale, s + e * span + j); \
        float sum[PER];                                                                                            \
        for (int e = 0; e < PER; e++) sum[e] = softmax_weights(s + e * span, m);                                   \
        for (long i = 0; i < d; i += 16) {                                                                         \
            __m256 a0[PER], a1[PER];                                                                               \
            for (int e = 0; e < PER; e++) a0[e] = a1[e] = _mm256_setzero_ps();                                     \
            for (long jj = 0; jj < m; jj++) {                                                                      \
                const uint16_t *vr = vb + jj * c_pos + i;                                                          \
                const __m256 v0 = load8_bf16(vr), v1 = load8_bf16(vr + 8);                                         \
                for (int e = 0; e < PER; e++) {                                                                    \
                    const __m256 w = _mm256_broadcast_ss(s + e * span + jj);                                       \
                    a0[e] = _mm256_add_ps(a0[e], _mm256_mul_ps(w, v0));                                            \
                    a1[e] = _mm256_add_ps(a1[e], _mm256_mul_ps(w, v1));                                            \
                }                                                                                                  \
            }                                                                                                      \
            for (int e = 0; e < PER; e++) {                                                                        \
                const __m256 inv = _mm256_set1_ps(sum[e]);                                                         \
                store8_bf16(out + e * d + i, _mm256_div_ps(a0[e], inv));                                           \
                store8_bf16(out + e * d + i + 8, _mm256_div_ps(a1[e], inv));                                       \
            }                                                                                                      \
        }                                                                                                          \
    }

/* s[0..m-1] (scores) -> the softmax weights each rounded to bf16 (the weights V sees); returns the
   sum of the unrounded ones. e^x eight at a time (exp8). */
static float softmax_weights(float *s, long m) {
    float top = -INFINITY;
    for (long j = 0; j < m; j++) top = s[j] > top ? s[j] : top;
    __m256 total = _mm256_setzero_ps();
    const __m256 t = _mm256_set1_ps(top);
    long j = 0;
    for (; j + 8 <= m; j += 8) {
        const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
        total = _mm256_add_ps(total, w);
        _mm256_storeu_ps(s + j, bf16_of8(round8(w)));
    }
    float sum = hsum8(total);
    for (; j < m; j++) {
        float lanes[8] = {s[j] - top}, w[8];
        _mm256_storeu_ps(w, exp8(_mm256_loadu_ps(lanes)));
        sum += w[0];
        s[j] = bf16_to_float(to_bf16(w[0]));
    }
    return sum;
}

static inline void store8_bf16(uint16_t *p, __m256 v) {
    const __m256i r = _mm256_srli_epi32(round8(v), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
ATTEND_UNIT(1)
ATTEND_UNIT(2)
ATTEND_UNIT(4)

/* attend_bf16_heads' attention (each softmax weight rounded to bf16 before it weighs V, the output
   rounded once) by units of one token's query heads of one KV group (attend_unit_x4 for four of
   them, x2, x1 for the rest; at fewer tokens x groups than threads, each head apart), so each K/V
   row is read and converted once per unit; q . k in one FMA chain per key and e^x from exp8, so a
   weight may differ from attend_bf16_heads' in the last bits. Where d is not a multiple of 16 or
   group * d > MAX_GD, attend_bf16_heads. (At 64 rows of Gemma 3 270M the per-head version was
   ~15 % of a bf16 step.) */
static int attend_bf16(const Plan *p, const Layer *l, long n, const uint16_t *q, const int64_t *rows,
                       const int64_t *pos, uint16_t *out, int threads) {
    const long heads = p->heads, d = p->d, kvh = p->kvh, group = heads / kvh;
    if (d % 16 || group * d > MAX_GD) return attend_bf16_heads(p, l, n, q, rows, pos, out, threads);
    const long split = n * kvh < threads ? group : 1, per = group / split;
    long span;
    float *scores = score_rows(n, heads, pos, &span);
    if (!scores) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long u = 0; u < n * kvh * split; u++) {
        const Unit x = unit_of(l, u, kvh, split, group, per, rows, pos);
        const long t = x.t, h0 = x.h0, hi = x.hi, lo = x.lo;
        const uint16_t *kb = (const uint16_t *)l->kc + x.at, *vb = (const uint16_t *)l->vc + x.at;
        float qf[MAX_GD] __attribute__((aligned(32)));
        for (long i = 0; i < per * d; i++) qf[i] = bf16_to_float(q[(t * heads + h0) * d + i]);
        for (long e = 0; e < per;) {
            const long th = t * heads + h0 + e, left = per - e;
            float *sc = scores + th * span;
            if (left >= 4)
                attend_unit_x4(qf + e * d, kb, vb, l->c_pos, hi - lo, d, l->scale, sc, span, out + th * d);
            else if (left >= 2)
                attend_unit_x2(qf + e * d, kb, vb, l->c_pos, hi - lo, d, l->scale, sc, span, out + th * d);
            else
                attend_unit_x1(qf + e * d, kb, vb, l->c_pos, hi - lo, d, l->scale, sc, span, out + th * d);
            e += left >= 4 ? 4 : left >= 2 ? 2 : 1;
        }
    }
    free(scores);
    return 0;
}

/* gelu_tanh(x) * up for 8 fp32 lanes (gelu_mul_f32's arithmetic). */
static inline __m256 gelu_up8(__m256 x, __m256 up) {
    const __m256 beta = _mm256_set1_ps((float)(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, cube)));
    const __m256 sign = _mm256_and_ps(inner, _mm256_set1_ps(-0.0f));
    const __m256 d = _mm256_sub_ps(exp8(_mm256_mul_ps(two, _mm256_xor_ps(inner, sign))), one);
    const __m256 th = _mm256_xor_ps(_mm256_div_ps(d, _mm256_add_ps(d, two)), sign);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, th)), up);
}

/* act[t, i] = gelu_tanh(gate[t, i]) * up[t, i] in fp32, gate_up [n, 2 * inter] (gate columns
   first): gelu_mul_bf16's arithmetic without its roundings to bf16 (its tanh from e^x, so the last
   fp32 bits may differ from ATen's), rows split over ``threads``. Exported for decode_layer.py's probe. */
void gelu_mul_f32(const float *gate_up, long n, long inter, float *act, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 1)
    for (long t = 0; t < n; t++) {
        const float *g = gate_up + t * 2 * inter, *u = g + inter;
        float *y = act + t * inter;
        long i = 0;
        for (; i + 8 <= inter; i += 8)
            _mm256_storeu_ps(y + i, gelu_up8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
        if (i < inter) { /* the ragged end through zero-padded lanes */
            float lanes[8] = {0}, ups[8] = {0}, res[8];
            memcpy(lanes, g + i, sizeof(float) * (size_t)(inter - i));
            memcpy(ups, u + i, sizeof(float) * (size_t)(inter - i));
            _mm256_storeu_ps(res, gelu_up8(_mm256_loadu_ps(lanes), _mm256_loadu_ps(ups)));
            memcpy(y + i, res, sizeof(float) * (size_t)(inter - i));
        }
    }
}

static inline void gelu_bf16(const uint16_t *gate_up, long n, long inter, uint16_t *act, int threads) {
#pragma omp parallel num_threads(threads) if (n >= 8) /* ROW_SPLIT_MIN */
    {
        const long part = omp_get_thread_num(), parts = omp_get_num_threads();
        const long t0 = n * part / parts, nn = n * (part + 1) / parts - t0;
        if (nn > 0) gelu_mul_bf16(gate_up + t0 * 2 * inter, nn, inter, act + t0 * inter);
    }
}
static inline void gelu_f32(const float *gate_up, long n, long inter, float *act, int threads) {
    gelu_mul_f32(gate_up, n, inter, act, threads);
}

/* A projection y [n, n_out] = x [n, k] W^T through the dtype's GEMM (bf16: plain rows; fp32: panels). */
static inline void proj_bf16(const Plan *p, const void *w, long n_out, long k, long n, const uint16_t *x,
                             uint16_t *y, int threads) {
    ((gemv_fn)(p->gemm && n > p->gemv_rows ? p->gemm : p->gemv))(w, k, x, k, NULL, n, n_out, k, y, n_out, threads);
}
static inline void proj_f32(const Plan *p, const void *w, long n_out, long k, long n, const float *x, float *y,
                            int threads) {
    ((gemm_f32_fn)p->gemv)(w, NULL, 0, n_out, k, x, k, NULL, n, y, n_out, threads);
}

/* h_out [n, hidden] = layer(h [n, hidden]) for n decode tokens (token t at cache row rows[t],
   position pos[t]), writing their K/V into the layer's caches; cos, sin: [n, d] with row stride
   sc; slots: int64 [n], each token's LoRA slot (0: base; NULL: all base); scratch: of the dtype,
   decode_layer_scratch(p) elements. Returns 0, or -1 (h_out not written) where n is outside
   1..max_rows, a row or position is outside the caches (nothing written then), d > MAX_D,
   max_rank > LORA_MAX_RANK, or memory ran out. One body for both dtypes (T, and SFX naming the
   helpers above and the kernel types). */
/* CALL over this thread's part t0..t0 + nn - 1 of the n tokens, the parts split over nt threads (the
   row-wise kernels, single-threaded, measured ~3 ms of a 64-row fp32 step run on one core). */
#define ROW_SPLIT_MIN 8
enum { D_MULTIPLE_bf16 = 1, D_MULTIPLE_f32 = 8 }; /* head sizes each attention takes */
#define BY_ROWS(nt, CALL)                                                                                          \
    _Pragma("omp parallel num_threads(nt) if (nt > 1)") {                                                          \
        const long part = omp_get_thread_num(), parts = omp_get_num_threads();                                     \
        const long t0 = n * part / parts, nn = n * (part + 1) / parts - t0;                                        \
        if (nn > 0) CALL;                                                                                          \
    }
#define DECODE_LAYER(NAME, T, SFX)                                                           \
int NAME(const Plan *p, const Layer *l, long n, const T *h, T *h_out, const T *cos, const T *sin, long sc,         \
         const int64_t *rows, const int64_t *pos, const int64_t *slots, T *scratch, int threads) {                \
    const long hid = p->hidden, qw = p->heads * p->d, kvw = p->kvh * p->d, qkvw = qw + 2 * kvw, inter = p->inter;  \
    if (n < 1 || n > p->max_rows || p->d > MAX_D || p->d % D_MULTIPLE_##SFX || p->max_rank > LORA_MAX_RANK)        \
        return -1;                                                                                                 \
    T *x = scratch, *qkv = x + n * hid, *q = qkv + n * qkvw, *att = q + n * qw, *a = att + n * qw;                 \
    T *h1 = a + n * hid, *x2 = h1 + n * hid, *gu = x2 + n * hid, *act = gu + n * 2 * inter;                        \
    T *m = act + n * inter;                                                                                        \
    const int nt = n >= ROW_SPLIT_MIN ? threads : 1;                                                               \
    const norm_##SFX##_fn norm = (norm_##SFX##_fn)p->norm;                                                         \
    const residual_##SFX##_fn residual = (residual_##SFX##_fn)p->residual;                                         \
    const prep_##SFX##_fn prep = (prep_##SFX##_fn)p->prep;                                                         \
    BY_ROWS(nt, norm(h + t0 * hid, hid, 0, l->input_norm, nn, 1, hid, l->input_eps, x + t0 * hid));                \
    proj_##SFX(p, l->qkv, qkvw, hid, n, x, qkv, threads);                                                          \
    lora_add_##SFX(p, &l->lora[L_Q], hid, qw, n, x, hid, qkv, qkvw, slots, threads);                               \
    lora_add_##SFX(p, &l->lora[L_K], hid, kvw, n, x, hid, qkv + qw, qkvw, slots, threads);                         \
    lora_add_##SFX(p, &l->lora[L_V], hid, kvw, n, x, hid, qkv + qw + kvw, qkvw, slots, threads);                   \
    for (long t = 0; t < n; t++) /* checked here, so a part's kernel call cannot fail after another wrote */       \
        if (rows[t] < 0 || rows[t] >= l->row_cap || pos[t] < 0 || pos[t] >= l->pos_cap) return -1;                 \
    BY_ROWS(nt, prep(qkv + t0 * qkvw, qkvw, p->d, qkv + t0 * qkvw + qw, qkvw, p->d, qkv + t0 * qkvw + qw + kvw,    \
                     qkvw, p->d, l->q_norm, l->q_eps, l->k_norm, l->k_eps, cos + t0 * sc, sin + t0 * sc, sc, nn,   \
                     p->heads, p->kvh, p->d, q + t0 * qw, l->kc, l->vc, l->row_cap, l->pos_cap, l->c_row,          \
                     l->c_head, l->c_pos, rows + t0, pos + t0));                                                   \
    if (attend_##SFX(p, l, n, q, rows, pos, att, threads)) return -1;                                              \
    proj_##SFX(p, l->o, hid, qw, n, att, a, threads);                                                              \
    lora_add_##SFX(p, &l->lora[L_O], qw, hid, n, att, qw, a, hid, slots, threads);                                 \
    BY_ROWS(nt, residual(a + t0 * hid, h + t0 * hid, l->post_attn, l->post_attn_eps, l->pre_ff, l->pre_ff_eps, nn, \
                         hid, h1 + t0 * hid, x2 + t0 * hid));                                                      \
    proj_##SFX(p, l->gate_up, 2 * inter, hid, n, x2, gu, threads);                                                 \
    lora_add_##SFX(p, &l->lora[L_GATE], hid, inter, n, x2, hid, gu, 2 * inter, slots, threads);                    \
    lora_add_##SFX(p, &l->lora[L_UP], hid, inter, n, x2, hid, gu + inter, 2 * inter, slots, threads);              \
    gelu_##SFX(gu, n, inter, act, threads);                                                                        \
    proj_##SFX(p, l->down, hid, inter, n, act, m, threads);                                                        \
    lora_add_##SFX(p, &l->lora[L_DOWN], inter, hid, n, act, inter, m, hid, slots, threads);                        \
    BY_ROWS(nt, residual(m + t0 * hid, h1 + t0 * hid, l->post_ff, l->post_ff_eps, NULL, 0.0f, nn, hid,             \
                         h_out + t0 * hid, NULL));                                                                 \
    return 0;                                                                                                      \
}
DECODE_LAYER(decode_layer_bf16, uint16_t, bf16)
DECODE_LAYER(decode_layer_f32, float, f32)

/* Elements of scratch (of the layer's dtype) decode_layer_bf16 or decode_layer_f32 needs at p->max_rows rows. */
long decode_layer_scratch(const Plan *p) {
    const long qw = p->heads * p->d, qkvw = qw + 2 * p->kvh * p->d;
    return p->max_rows * (5 * p->hidden + qkvw + 2 * qw + 3 * p->inter);
}
