/* What gemm_f32_avx512.c and gemm_f32_avx2.c share (built and loaded by panel_gemm.py): the
   layout constants, the copy of plain weight rows into a panel's chunk order, and the gemm_f32
   entry point, which splits the panels over threads and calls the including file's panel().
   The including file defines BLOCK_BYTES first and panel() after. */
#ifndef ADAPTERCTL_PANEL_GEMM_H
#define ADAPTERCTL_PANEL_GEMM_H
#include <immintrin.h>
#include <omp.h>

#define NR 32 /* outputs per panel */
#define KC 64 /* inputs per chunk */
#define RG 36 /* rows of x per pass over a thread's panels (more: x and the partial sums leave L1/L2) */
#define CHUNK_BYTES (KC * NR * 4)

/* Plain rows n .. n + 31 (those below n_out; zeros past it), inputs i0 .. i0 + len - 1, into
   buf [len][NR]; prefetches the next chunk of those rows. */
static void gather(const float *w, long ldw, long n, long n_out, long i0, long len, long k, float *buf) {
    for (long j = 0; j < NR; j++) {
        if (n + j >= n_out) {
            for (long i = 0; i < len; i++) buf[i * NR + j] = 0.0f;
            continue;
        }
        const float *row = w + (n + j) * ldw + i0;
        if (i0 + len < k)
            for (long b = 0; b < 4 * len; b += 64) _mm_prefetch((const char *)(row + len) + b, _MM_HINT_T0);
        for (long i = 0; i < len; i++) buf[i * NR + j] = row[i];
    }
}

/* One panel (outputs n .. n + 31) for rows of x into y; p: the packed panel, or NULL and w / ldw
   the plain rows; s: [rows][NR] scratch, buf: [KC][NR] scratch. Defined by the including file. */
static void panel(const float *p, const float *w, long ldw, long n, long n_out, long k, const float *x, long ldx,
                  const float *bias, long rows, float *y, long ldy, float *s, float *buf);

/* wp: fp32 panels [ceil(n_out / 32)][k][32] (rows past n_out zero), or NULL and w: fp32 plain
   rows [n_out][k] with row stride ldw; x: fp32 [rows, k], row stride ldx; bias: fp32 [n_out] or
   NULL; y: fp32 [rows, n_out], row stride ldy. 1 <= rows, 1 <= k. Each thread takes a contiguous
   run of panels, and block by block of them (<= BLOCK_BYTES) runs every group of up to RG rows in
   turn, so a block read again comes from L2. */
void gemm_f32(const float *wp, const float *w, long ldw, long n_out, long k, const float *x, long ldx,
              const float *bias, long rows, float *y, long ldy, int threads) {
    const long panels = (n_out + NR - 1) / NR;
    if (threads > panels) threads = (int)panels;
    long per_block = BLOCK_BYTES / (k * NR * 4);
    if (per_block < 1) per_block = 1;
#pragma omp parallel num_threads(threads)
    {
        const long t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long q0 = panels * t / nt, q1 = panels * (t + 1) / nt;
        float s[RG * NR] __attribute__((aligned(64)));
        float buf[KC * NR] __attribute__((aligned(64)));
        for (long b0 = q0; b0 < q1; b0 += per_block) {
            const long b1 = b0 + per_block < q1 ? b0 + per_block : q1;
            for (long r0 = 0; r0 < rows; r0 += RG) {
                const long rr = rows - r0 < RG ? rows - r0 : RG;
                for (long q = b0; q < b1; q++)
                    panel(wp ? wp + q * k * NR : 0, w, ldw, q * NR, n_out, k, x + r0 * ldx, ldx, bias, rr, y + r0 * ldy,
                          ldy, s, buf);
            }
        }
    }
}
#endif
