/* The runtime handle, shared by runtime.c (buffers, FFN) and hook.c (eval callback). */
#ifndef FLASHGGUF_RUNTIME_INTERNAL_H
#define FLASHGGUF_RUNTIME_INTERNAL_H

#include "flashgguf.h"
#include "io.h"
#include "kernels.h"

typedef struct fg_layer {
    uint64_t bundle_offset;   /* absolute file offset of blk.N.ffn_bundle */
    int has_offset;
    uint8_t *bundles;         /* n_ff rows of bundle_stride bytes, allocated once */
    float *up_bias;           /* n_ff or NULL */
    float *gate_bias;         /* n_ff or NULL */
    float *down_bias;         /* n_embd or NULL */
} fg_layer;

struct fg_runtime {
    fg_config cfg;
    fg_reader reader;
    fg_layer *layers;
    int loaded;

    /* kernels picked once for the file's part types */
    fg_vec_dot_fn dot_gate, dot_up;
    fg_quantize_fn quant_gate, quant_up;
    fg_axpy_fn axpy_down;
    size_t xq_gate_row, xq_up_row;   /* bytes of one quantized activation row */

    /* scratch, sized for cfg.max_tokens rows at creation: nothing is allocated per token */
    uint8_t *xq_gate, *xq_up;        /* quantized FFN input rows */
    float *partial;                  /* n_threads x max_tokens x n_embd partial sums */
    float *hidden;                   /* n_threads x 2 x max_tokens: gate/up values of one neuron */
    float *ffn_out;                  /* max_tokens x n_embd: result waiting for the output node */
    int32_t *pending_rows;           /* per layer: rows in ffn_out waiting, 0 if none */

    int err_code;                    /* first error inside the callback, FG_OK if none */
    char err_msg[256];
    fg_stats stats;
};

void fg_runtime_set_error(fg_runtime *rt, int code, const char *msg);
double fg_now_seconds(void);

#endif
