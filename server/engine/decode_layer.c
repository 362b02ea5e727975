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
   the sums are fp32 in another order than ATen's bmm, so a delta may differ by a bf16 ulp. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef int (*gemv_fn)(const uint16_t *w, long ldw, const uint16_t *x, long ldx, const uint16_t *bias, long rows,
                       long n_out, long k, uint16_t *y, long ldy, int threads);
typedef void (*norm_fn)(const uint16_t *x, long sn, long sh, const float *scale, long n, long heads, long dim,
                        float eps, uint16_t *y);
typedef void (*residual_fn)(const uint16_t *a, const uint16_t *h, const float *scale1, float eps1,
                            const float *scale2, float eps2, long n, long dim, uint16_t *h_out, uint16_t *x_out);
typedef void (*lora_fn)(const uint16_t *x, long ldx, uint16_t *y, long ldy, long m, const int64_t *tokens,
                        const int64_t *slots, long in, long out, const uint16_t *a, const uint16_t *bt, long max_rank,
                        const int64_t *ranks, const float *scale, int threads);
typedef int (*prep_fn)(const uint16_t *q, long qn, long qh, const uint16_t *k, long kn, long kh, const uint16_t *v,
                       long vn, long vh, const float *qscale, float qeps, const float *kscale, float keps,
                       const uint16_t *cos, const uint16_t *sin, long sc, long n, long heads, long kvh, long d,
                       uint16_t *qout, uint16_t *kc, uint16_t *vc, long row_cap, long pos_cap, long c_row,
                       long c_head, long c_pos, const int64_t *rows, const int64_t *pos);

/* The model's shapes and the kernels, and the LoRA slot banks' scale [slots + 1] (fp32) and rank
   capacity (decode_layer.py's _Plan mirrors this field for field). */
typedef struct {
    gemv_fn gemv;
    norm_fn norm;
    residual_fn residual;
    prep_fn prep;
    lora_fn lora;
    long hidden, heads, kvh, d, inter, max_rows;
    const float *lora_scale;
    long max_rank;
} Plan;

/* One projection's LoRA slot bank (slots.SlotBank): a [slots + 1, max_rank, in], bt [slots + 1,
   max_rank, out] (B transposed), ranks int64 [slots + 1] (0: the slot does not target it); a NULL:
   no adapter targets this projection (decode_layer.py's _Lora). */
typedef struct {
    const uint16_t *a, *bt;
    const int64_t *ranks;
} Lora;

enum { L_Q, L_K, L_V, L_O, L_GATE, L_UP, L_DOWN, L_COUNT };

/* One layer: plain bf16 weights [out, in] (qkv: q, k, v rows packed; gate_up: gate then up), the
   fp32 norm scales with their eps, the sliding window (0: none), the attention scale, and the
   layer's K/V caches [row_cap, kvh, pos_cap, d] with their strides (decode_layer.py's _Layer). */
typedef struct {
    const uint16_t *qkv, *o, *gate_up, *down;
    const float *input_norm, *q_norm, *k_norm, *post_attn, *pre_ff, *post_ff;
    float input_eps, q_eps, k_eps, post_attn_eps, pre_ff_eps, post_ff_eps;
    long window;
    float scale;
    uint16_t *kc, *vc;
    long row_cap, pos_cap, c_row, c_head, c_pos;
    Lora lora[L_COUNT];
} Layer;

#define MAX_D 1024
#define LORA_MAX_RANK 1024 /* lora_cpu.c's MAX_RANK */
/* y[t, :out] (row stride ldy) += the LoRA delta of x[t, :in] (row stride ldx) for every token t
   whose slot slots[t] targets this projection (lora_cpu.c's lora_bf16, in PEFT's bf16 order). */
static void lora_add(const Plan *p, const Lora *m, long in, long out, long n, const uint16_t *x, long ldx,
                     uint16_t *y, long ldy, const int64_t *slots, int threads) {
    if (m->a && slots)
        p->lora(x, ldx, y, ldy, n, NULL, slots, in, out, m->a, m->bt, p->max_rank, m->ranks, p->lora_scale, threads);
}

/* out[t, h] = softmax(q[t, h] . K[rows[t], g] * scale) V[rows[t], g] over the positions
   lo..pos[t] (lo = pos[t] - window + 1 with a window), g = h / (heads / kvh). Scores and sums in
   fp32; each softmax weight rounds to bf16 before it weighs V (ATen's CPU flash attention does),
   the sum of weights does not; the output rounds once. q, out: contiguous [n, heads, d]. */
static int attend(const Plan *p, const Layer *l, long n, const uint16_t *q, const int64_t *rows,
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
        const uint16_t *kb = l->kc + rows[t] * l->c_row + g * l->c_head;
        const uint16_t *vb = l->vc + rows[t] * l->c_row + g * l->c_head;
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
void gelu_mul_bf16(const uint16_t *gate_up, long n, long inter, uint16_t *act) {
    const __m256 beta = _mm256_set1_ps((float)(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    for (long t = 0; t < n; t++) {
        const uint16_t *g = gate_up + t * 2 * inter, *u = g + inter;
        for (long i = 0; i < inter; i += 8) {
            uint16_t lanes[8] = {0};
            const long m = inter - i < 8 ? inter - i : 8;
            memcpy(lanes, g + i, sizeof(uint16_t) * (size_t)m);
            const __m256 x = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)lanes)), 16));
            const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            const __m256 inner = _mm256_mul_ps(beta, _mm256_add_ps(x, _mm256_mul_ps(kappa, cube)));
            const __m256 sign = _mm256_and_ps(inner, _mm256_set1_ps(-0.0f));
            const __m256 d = _mm256_sub_ps(exp8(_mm256_mul_ps(two, _mm256_xor_ps(inner, sign))), one);  /* expm1(2|u|) */
            const __m256 th = _mm256_xor_ps(_mm256_div_ps(d, _mm256_add_ps(d, two)), sign);
            float gelu[8];
            _mm256_storeu_ps(gelu, _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, th)));
            for (long j = 0; j < m; j++)
                act[t * inter + i + j] = to_bf16(bf16_to_float(to_bf16(gelu[j])) * bf16_to_float(u[i + j]));
        }
    }
}

/* h_out [n, hidden] = layer(h [n, hidden]) for n decode tokens (token t at cache row rows[t],
   position pos[t]), writing their K/V into the layer's caches; cos, sin: [n, d] with row stride
   sc; slots: int64 [n], each token's LoRA slot (0: base; NULL: all base); scratch: bf16,
   decode_layer_scratch(p) elements. Returns 0, or -1 (h_out not written) where n is outside
   1..max_rows, a row or position is outside the caches (nothing written then), d > MAX_D,
   max_rank > LORA_MAX_RANK, or memory ran out. */
int decode_layer_bf16(const Plan *p, const Layer *l, long n, const uint16_t *h, uint16_t *h_out,
                      const uint16_t *cos, const uint16_t *sin, long sc, const int64_t *rows, const int64_t *pos,
                      const int64_t *slots, uint16_t *scratch, int threads) {
    const long hid = p->hidden, qw = p->heads * p->d, kvw = p->kvh * p->d, qkvw = qw + 2 * kvw, inter = p->inter;
    if (n < 1 || n > p->max_rows || p->d > MAX_D || p->max_rank > LORA_MAX_RANK) return -1;
    uint16_t *x = scratch, *qkv = x + n * hid, *q = qkv + n * qkvw, *att = q + n * qw, *a = att + n * qw;
    uint16_t *h1 = a + n * hid, *x2 = h1 + n * hid, *gu = x2 + n * hid, *act = gu + n * 2 * inter;
    uint16_t *m = act + n * inter;
    p->norm(h, hid, 0, l->input_norm, n, 1, hid, l->input_eps, x);
    p->gemv(l->qkv, hid, x, hid, NULL, n, qkvw, hid, qkv, qkvw, threads);
    lora_add(p, &l->lora[L_Q], hid, qw, n, x, hid, qkv, qkvw, slots, threads);
    lora_add(p, &l->lora[L_K], hid, kvw, n, x, hid, qkv + qw, qkvw, slots, threads);
    lora_add(p, &l->lora[L_V], hid, kvw, n, x, hid, qkv + qw + kvw, qkvw, slots, threads);
    if (p->prep(qkv, qkvw, p->d, qkv + qw, qkvw, p->d, qkv + qw + kvw, qkvw, p->d, l->q_norm, l->q_eps, l->k_norm,
                l->k_eps, cos, sin, sc, n, p->heads, p->kvh, p->d, q, l->kc, l->vc, l->row_cap, l->pos_cap,
                l->c_row, l->c_head, l->c_pos, rows, pos))
        return -1;
    if (attend(p, l, n, q, rows, pos, att, threads)) return -1;
    p->gemv(l->o, qw, att, qw, NULL, n, hid, qw, a, hid, threads);
    lora_add(p, &l->lora[L_O], qw, hid, n, att, qw, a, hid, slots, threads);
    p->residual(a, h, l->post_attn, l->post_attn_eps, l->pre_ff, l->pre_ff_eps, n, hid, h1, x2);
    p->gemv(l->gate_up, hid, x2, hid, NULL, n, 2 * inter, hid, gu, 2 * inter, threads);
    lora_add(p, &l->lora[L_GATE], hid, inter, n, x2, hid, gu, 2 * inter, slots, threads);
    lora_add(p, &l->lora[L_UP], hid, inter, n, x2, hid, gu + inter, 2 * inter, slots, threads);
    gelu_mul_bf16(gu, n, inter, act);
    p->gemv(l->down, inter, act, inter, NULL, n, hid, inter, m, hid, threads);
    lora_add(p, &l->lora[L_DOWN], inter, hid, n, act, inter, m, hid, slots, threads);
    p->residual(m, h1, l->post_ff, l->post_ff_eps, NULL, 0.0f, n, hid, h_out, NULL);
    return 0;
}

/* bf16 elements of scratch decode_layer_bf16 needs at p->max_rows rows. */
long decode_layer_scratch(const Plan *p) {
    const long qw = p->heads * p->d, qkvw = qw + 2 * p->kvh * p->d;
    return p->max_rows * (5 * p->hidden + qkvw + 2 * qw + 3 * p->inter);
}
