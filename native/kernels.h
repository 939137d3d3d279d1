/*
 * Internal kernel declarations: ggml block layouts and fp16 conversion.
 * The layouts are ggml's (ggml-common.h); they are the bytes stored in GGUF files.
 */
#ifndef FLASHGGUF_KERNELS_H
#define FLASHGGUF_KERNELS_H

#include <assert.h>
#include <stdint.h>

#include "flashgguf.h"

typedef uint16_t fg_half; /* IEEE 754 binary16 bits */

#define QK4_0 32
typedef struct {
    fg_half d;               /* scale */
    uint8_t qs[QK4_0 / 2];   /* nibbles: low = value j, high = value j + 16; offset into [-8, +7] */
} fg_block_q4_0;
static_assert(sizeof(fg_block_q4_0) == sizeof(fg_half) + QK4_0 / 2, "q4_0 block size");

#define QK4_1 32
typedef struct {
    fg_half d;               /* scale */
    fg_half m;               /* min: value = d * q + m, q in [0, 15] */
    uint8_t qs[QK4_1 / 2];
} fg_block_q4_1;
static_assert(sizeof(fg_block_q4_1) == 2 * sizeof(fg_half) + QK4_1 / 2, "q4_1 block size");

#define QK8_0 32
typedef struct {
    fg_half d;               /* scale */
    int8_t qs[QK8_0];
} fg_block_q8_0;
static_assert(sizeof(fg_block_q8_0) == sizeof(fg_half) + QK8_0, "q8_0 block size");

#define QK8_1 32
typedef struct {
    fg_half d;               /* scale */
    fg_half s;               /* d * sum(qs): lets q4_1's min term be one multiply per block */
    int8_t qs[QK8_1];
} fg_block_q8_1;
static_assert(sizeof(fg_block_q8_1) == 2 * sizeof(fg_half) + QK8_1, "q8_1 block size");

#define QK5_0 32
typedef struct {
    fg_half d;               /* scale: value = d * (q - 16), q in [0, 31] */
    uint8_t qh[4];           /* bit j of this little-endian uint32: bit 4 of q for value j */
    uint8_t qs[QK5_0 / 2];   /* bits 0..3 of q: low nibble = value j, high = value j + 16 */
} fg_block_q5_0;
static_assert(sizeof(fg_block_q5_0) == sizeof(fg_half) + 4 + QK5_0 / 2, "q5_0 block size");

#define QK5_1 32
typedef struct {
    fg_half d;               /* scale */
    fg_half m;               /* min: value = d * q + m, q in [0, 31] */
    uint8_t qh[4];           /* bit j of this little-endian uint32: bit 4 of q for value j */
    uint8_t qs[QK5_1 / 2];   /* bits 0..3 of q: low nibble = value j, high = value j + 16 */
} fg_block_q5_1;
static_assert(sizeof(fg_block_q5_1) == 2 * sizeof(fg_half) + 4 + QK5_1 / 2, "q5_1 block size");

/* K-quants: super-blocks of 256 values split into sub-blocks with their own integer scales. */
#define QK_K 256
#define K_SCALE_SIZE 12

typedef struct {
    fg_half d;                    /* super-block scale of the 8 sub-block scales */
    fg_half dmin;                 /* super-block scale of the 8 sub-block mins */
    uint8_t scales[K_SCALE_SIZE]; /* 8 scales + 8 mins, 6 bits each (fg_kscale_min) */
    uint8_t qs[QK_K / 2];         /* 4-bit q; bytes [32g, 32g + 32) hold values 64g + l (low
                                   * nibble) and 64g + 32 + l (high nibble), l < 32 */
} fg_block_q4_K;
static_assert(sizeof(fg_block_q4_K) == 2 * sizeof(fg_half) + K_SCALE_SIZE + QK_K / 2,
              "q4_K block size");
/* value of sub-block j (32 values) = d * sc_j * q - dmin * m_j, q in [0, 15] */

typedef struct {
    fg_half d;                    /* super-block scale of the 8 sub-block scales */
    fg_half dmin;                 /* super-block scale of the 8 sub-block mins */
    uint8_t scales[K_SCALE_SIZE]; /* as Q4_K */
    uint8_t qh[QK_K / 8];         /* bit j of byte l: bit 4 of q for value 32j + l */
    uint8_t qs[QK_K / 2];         /* bits 0..3 of q, laid out as Q4_K's qs */
} fg_block_q5_K;
static_assert(sizeof(fg_block_q5_K) == 2 * sizeof(fg_half) + K_SCALE_SIZE + QK_K / 8 + QK_K / 2,
              "q5_K block size");
/* value of sub-block j (32 values) = d * sc_j * q - dmin * m_j, q in [0, 31] */

typedef struct {
    uint8_t ql[QK_K / 2];         /* bits 0..3 of q; half h (values 128h..) uses bytes
                                   * [64h, 64h + 64): value 128h + 32k + l (l < 32) is the low
                                   * nibble (k < 2) or high nibble (k >= 2) of byte
                                   * 64h + 32 * (k & 1) + l */
    uint8_t qh[QK_K / 4];         /* bits 4..5 of q: value 128h + 32k + l has them at bits
                                   * 2k..2k+1 of byte 32h + l */
    int8_t scales[QK_K / 16];     /* scale of each sub-block of 16 values */
    fg_half d;                    /* super-block scale */
} fg_block_q6_K;
static_assert(sizeof(fg_block_q6_K) == QK_K / 2 + QK_K / 4 + QK_K / 16 + sizeof(fg_half),
              "q6_K block size");
/* value = d * scales[v / 16] * (q - 32), q in [0, 63] */

typedef struct {
    float d;                      /* scale (float, not fp16): value = d * qs */
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];     /* sum of each 16 consecutive qs: the K-quant min terms */
} fg_block_q8_K;
static_assert(sizeof(fg_block_q8_K) == sizeof(float) + QK_K + QK_K / 16 * sizeof(int16_t),
              "q8_K block size");

/* 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block (ggml's get_scale_min_k4).
 * j < 4: the low 6 bits of bytes j (scale) and j + 4 (min); j >= 4: the low (scale) and high
 * (min) nibble of byte j + 4, with bits 4..5 taken from the top 2 bits of bytes j - 4 (scale)
 * and j (min). */
static inline void fg_kscale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Round-to-nearest-even conversions, bit-exact with F16C / ggml. */
float fg_half_to_float(fg_half h);
fg_half fg_float_to_half(float f);

/* Every supported type has a signature of this shape; NULL for unsupported types. */
typedef void (*fg_vec_dot_fn)(const void *w, const void *xq, int64_t n, float *out);
typedef void (*fg_axpy_fn)(const void *col, float a, float *y, int64_t n);
typedef void (*fg_quantize_fn)(const float *x, void *out, int64_t n);

fg_vec_dot_fn fg_vec_dot_ref_fn(int weight_type);
fg_axpy_fn fg_axpy_ref_fn(int type);
fg_quantize_fn fg_quantize_ref_fn(int type);

/* An architecture's SIMD kernels, compiled in when the target has them (and the build does
 * not force the scalar reference); they provide only what they speed up (NULL for the
 * rest). x86: AVX2 + FMA + F16C, kernels_x86.c. */
#if !defined(FG_FORCE_SCALAR) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FG_SIMD_X86 1
#endif
#if defined(FG_SIMD_X86)
fg_vec_dot_fn fg_vec_dot_simd_fn(int weight_type);
fg_axpy_fn fg_axpy_simd_fn(int type);
fg_quantize_fn fg_quantize_simd_fn(int type);
const char *fg_simd_path(void); /* "avx512" or "avx2" */
#endif

/* Fastest available implementation (SIMD where compiled in, else the reference). */
fg_vec_dot_fn fg_vec_dot_fast_fn(int weight_type);
fg_axpy_fn fg_axpy_fast_fn(int type);
fg_quantize_fn fg_quantize_fast_fn(int type);

#endif /* FLASHGGUF_KERNELS_H */
