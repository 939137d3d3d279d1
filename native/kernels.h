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

/* Fastest available implementation (SIMD where compiled in, else the reference). */
fg_vec_dot_fn fg_vec_dot_fast_fn(int weight_type);
fg_axpy_fn fg_axpy_fast_fn(int type);
fg_quantize_fn fg_quantize_fast_fn(int type);

#endif /* FLASHGGUF_KERNELS_H */
