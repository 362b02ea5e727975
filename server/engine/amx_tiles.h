/* What the AMX kernels of this package share (amx_head.c, gemm_bf16_amx.c): asking Linux for the
   tile state, and the one tile configuration both use, eight tiles of 16 rows x 64 bytes (C: 16 x 16
   fp32; A: 16 x 32 bf16; B: 16 x 16 pairs of bf16). */
#ifndef ADAPTERCTL_AMX_TILES_H
#define ADAPTERCTL_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Ask Linux for the AMX tile state (once per process; ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). 0 when granted. */
static inline int amx_request(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

/* Load the configuration on this thread (each OpenMP thread of a kernel, before its tiles). */
static inline void configure(void) {
    struct tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}
#endif
