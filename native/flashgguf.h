/*
 * flashgguf native core: the one public header (wrapped by cffi, see flashgguf_cdef.h).
 *
 * Everything hangs off a handle (fg_runtime); there is no global state. Functions return
 * FG_OK (0) or a negative FG_ERR_* code and print nothing; fg_strerror() names a code.
 */
#ifndef FLASHGGUF_H
#define FLASHGGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- error codes ------------------------------------------------------------------ */
#define FG_OK               0
#define FG_ERR_NOMEM       -1  /* an allocation failed */
#define FG_ERR_IO          -2  /* open/pread failed (errno kept in the runtime) */
#define FG_ERR_SHORT_READ  -3  /* the file ended before the bytes the payload promised */
#define FG_ERR_ARG         -4  /* an argument is out of range */
#define FG_ERR_TYPE        -5  /* a ggml type the kernels do not support */
#define FG_ERR_SHAPE       -6  /* a tensor seen in the graph has an unexpected shape/type */
#define FG_ERR_STATE       -7  /* call out of order (e.g. compute before load) */
#define FG_ERR_THREADS     -8  /* worker threads could not be started */

const char *fg_strerror(int code);
/* How this core was built: "openmp=1 sanitize=none" (SIMD: fg_simd_name). */
const char *fg_build_info(void);

/* ---- ggml type ids (same numbers as enum ggml_type) ------------------------------- */
#define FG_TYPE_F32   0
#define FG_TYPE_F16   1
#define FG_TYPE_Q4_0  2
#define FG_TYPE_Q4_1  3
#define FG_TYPE_Q8_0  8
#define FG_TYPE_Q8_1  9

/* ---- FFN activations (the names the file stores: flashgguf.ffn.activation) -------- */
#define FG_ACT_SILU   0
#define FG_ACT_GELU   1  /* tanh approximation, as ggml_gelu */
#define FG_ACT_RELU   2
#define FG_ACT_RELU2  3  /* relu(x)^2 */
#define FG_ACT_FATRELU 4 /* x if x > threshold else 0 (ProSparse) */
#define FG_ACT_DRELU  5  /* dReLU (TurboSparse, Bamboo): relu on the gate and on up */

/* ---- kernels (kernels_ref.c: scalar reference; kernels_simd.c: dispatch) ----------- */

/* Bytes taken by n values of a type; 0 when the type is unsupported or n is not a whole
 * number of blocks. */
size_t fg_row_size(int type, int64_t n);
/* Block size (values per block) of a type, 0 if unsupported. */
int fg_block_size(int type);
/* The type an activation row is quantized to before a dot product with a weight row of
 * weight_type (ggml's vec_dot_type): Q8_0 for Q4_0/Q8_0, Q8_1 for Q4_1, F16 for F16,
 * F32 for F32. -1 if unsupported. */
int fg_vec_dot_type(int weight_type);

/* Quantize n floats into type (F32, F16, Q4_0, Q4_1, Q8_0, Q8_1). */
int fg_quantize_row(int type, const float *x, void *out, int64_t n);
int fg_quantize_row_ref(int type, const float *x, void *out, int64_t n);
/* Dequantize n values of type into floats. */
int fg_dequantize_row(int type, const void *src, float *out, int64_t n);
/* *out = dot(w (weight_type), xq (fg_vec_dot_type(weight_type))) over n values. */
int fg_vec_dot(int weight_type, const void *w, const void *xq, int64_t n, float *out);
int fg_vec_dot_ref(int weight_type, const void *w, const void *xq, int64_t n, float *out);
/* y[0..n) += a * dequant(col) where col is n values of type. */
int fg_axpy(int type, const void *col, float a, float *y, int64_t n);
int fg_axpy_ref(int type, const void *col, float a, float *y, int64_t n);
/* Apply an activation in place; threshold is FG_ACT_FATRELU's (the others ignore it).
 * FG_ACT_DRELU applies relu: the FFN applies it to the gate and to up. */
int fg_activate(int activation, float threshold, float *x, int64_t n);
/* Name of the SIMD path compiled in ("avx512", "avx2", "neon" or "scalar"). */
const char *fg_simd_name(void);

/* ---- runtime --------------------------------------------------------------------- */

typedef struct fg_runtime fg_runtime;

#define FG_PART_GATE 0
#define FG_PART_UP   1
#define FG_PART_DOWN 2

typedef struct fg_config {
    int32_t n_layer;
    int32_t n_embd;
    int32_t n_ff;
    int32_t gated;                 /* 1: gate part present, h = act(gate) * up */
    int32_t activation;            /* FG_ACT_* */
    float activation_threshold;    /* FG_ACT_FATRELU: values <= this become 0 */
    int32_t part_type[3];          /* ggml type of gate/up/down parts (gate ignored if !gated) */
    int64_t part_offset[3];        /* byte offset of each part inside a bundle row */
    int64_t bundle_stride;         /* bytes per bundle row (one neuron) */
    int32_t max_tokens;            /* most rows the FFN input may have (llama.cpp's n_ubatch) */
    int32_t n_threads;             /* FFN threads for one-row batches (decode), >= 1 */
    int32_t n_threads_batch;       /* FFN threads for multi-row batches (prompts), >= 1 */
    int32_t use_direct_io;         /* 1: try O_DIRECT, fall back to buffered reads */
    char input_node[32];           /* graph node holding the FFN input, without "-L" */
    char output_node[32];          /* graph node holding the FFN output, without "-L" */
} fg_config;

typedef struct fg_stats {
    uint64_t tokens;               /* FFN input rows seen by layer 0 */
    uint64_t bytes_read;
    uint64_t reads;
    uint64_t neurons_computed;
    double time_io_s;
    double time_ffn_s;
} fg_stats;

/* Open the payload file and allocate every buffer. */
int fg_runtime_create(const fg_config *cfg, const char *path, fg_runtime **out);
void fg_runtime_destroy(fg_runtime *rt);
/* Where layer's bundles live in the file, and its biases (n_ff for up/gate, n_embd for
 * down; NULL when absent; copied). */
int fg_runtime_set_layer(fg_runtime *rt, int32_t layer, uint64_t bundle_offset,
                         const float *up_bias, const float *gate_bias, const float *down_bias);
/* Read every layer's bundles into DRAM (all neurons resident). */
int fg_runtime_load_all(fg_runtime *rt);
/* 1 when the payload is read with direct I/O, 0 when buffered (refused by the fs). */
int fg_runtime_direct_io(const fg_runtime *rt);
/* Compute one layer's FFN: x and y are n_tokens rows of n_embd floats. */
int fg_runtime_ffn(fg_runtime *rt, int32_t layer, const float *x, float *y, int32_t n_tokens);
/* First error raised inside the eval callback since the last call (then cleared);
 * FG_OK if none. msg receives a description (may be NULL). */
int fg_runtime_take_error(fg_runtime *rt, char *msg, size_t msg_cap);
void fg_runtime_get_stats(const fg_runtime *rt, fg_stats *out);
void fg_runtime_reset_stats(fg_runtime *rt);

/* ggml_backend_sched_eval_callback; user_data is the fg_runtime. */
bool fg_eval_callback(void *tensor, bool ask, void *user_data);

/* ---- calibration capture (capture.c) ------------------------------------------------ */

typedef struct fg_capture fg_capture;

/* Record the rows of graph nodes "<node>-L" (F32 [n_embd x rows]), up to max_rows per layer
 * between two takes. */
int fg_capture_create(int32_t n_layer, int32_t n_embd, const char *node, int32_t max_rows,
                      fg_capture **out);
void fg_capture_destroy(fg_capture *c);
/* ggml_backend_sched_eval_callback; user_data is the fg_capture. */
bool fg_capture_callback(void *tensor, bool ask, void *user_data);
/* Rows of layer recorded since its last take. */
int32_t fg_capture_rows(const fg_capture *c, int32_t layer);
/* Copy layer's rows into out (room for out_rows rows) and forget them; a pending capture
 * error (wrong node shape, overflow) is returned instead, see fg_capture_take_error. */
int fg_capture_take(fg_capture *c, int32_t layer, float *out, int32_t out_rows);
int fg_capture_take_error(fg_capture *c, char *msg, size_t msg_cap);

#ifdef __cplusplus
}
#endif
#endif /* FLASHGGUF_H */
