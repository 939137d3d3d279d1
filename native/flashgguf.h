/*
 * flashgguf native core: the one public header, also cffi's declarations (native/build_ffi.py
 * reads it).
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
#define FG_ERR_BUDGET      -9  /* the DRAM budget cannot hold the pinned rows + one round */

const char *fg_strerror(int code);
/* How this core was built: "openmp=1 sanitize=none" (SIMD: fg_simd_name). */
const char *fg_build_info(void);

/* ---- ggml type ids (same numbers as enum ggml_type) ------------------------------- */
#define FG_TYPE_F32   0
#define FG_TYPE_F16   1
#define FG_TYPE_Q4_0  2
#define FG_TYPE_Q4_1  3
#define FG_TYPE_Q5_0  6
#define FG_TYPE_Q5_1  7
#define FG_TYPE_Q8_0  8
#define FG_TYPE_Q8_1  9
#define FG_TYPE_Q4_K  12  /* K-quants: blocks of 256 values (QK_K) */
#define FG_TYPE_Q5_K  13
#define FG_TYPE_Q6_K  14
#define FG_TYPE_Q8_K  15  /* activations of the K-quant dot products only */

/* ---- FFN activations (the names the file stores: flashgguf.ffn.activation) -------- */
#define FG_ACT_SILU   0
#define FG_ACT_GELU   1  /* tanh approximation, as ggml_gelu */
#define FG_ACT_RELU   2
#define FG_ACT_RELU2  3  /* relu(x)^2 */
#define FG_ACT_FATRELU 4 /* x if x > threshold else 0 (ProSparse) */
#define FG_ACT_DRELU  5  /* dReLU (TurboSparse, Bamboo): relu on the gate and on up */

/* ---- kernels (kernels.c: dispatch; kernels_ref.c: scalar reference; kernels_x86.c) -- */

/* Bytes taken by n values of a type; 0 when the type is unsupported or n is not a whole
 * number of blocks. */
size_t fg_row_size(int type, int64_t n);
/* Block size (values per block) of a type, 0 if unsupported. */
int fg_block_size(int type);
/* The type an activation row is quantized to before a dot product with a weight row of
 * weight_type (ggml's vec_dot_type): Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for
 * Q4_K/Q5_K/Q6_K, F16 for F16, F32 for F32. -1 if unsupported. */
int fg_vec_dot_type(int weight_type);

/* Quantize n floats into type (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q8_K) with
 * ggml's reference rounding. The K-quant weight types (Q4_K, Q5_K, Q6_K) have no quantizer
 * here (ggml's needs a search over scales): FG_ERR_TYPE. */
int fg_quantize_row(int type, const float *x, void *out, int64_t n);
int fg_quantize_row_ref(int type, const float *x, void *out, int64_t n);
/* Dequantize n values of type into floats (every weight type; not Q8_1/Q8_K). For block
 * types n must be a whole number of blocks (256 for K-quants), else FG_ERR_ARG. */
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
/* Name of the SIMD path compiled in: "avx512", "avx2" (x86) or "scalar". */
const char *fg_simd_name(void);

/* ---- runtime --------------------------------------------------------------------- */

typedef struct fg_runtime fg_runtime;

#define FG_PART_GATE 0
#define FG_PART_UP   1
#define FG_PART_DOWN 2

/* What is resident and what is read per token (fg_config.mode). */
#define FG_MODE_DENSE     0  /* every bundle in DRAM, read once at load */
#define FG_MODE_NAIVE     1  /* the whole FFN of a layer read every token, nothing kept */
#define FG_MODE_HYBRID    2  /* the budget's rows pinned, the rest read every token */
#define FG_MODE_PREDICTED 3  /* predictor + window cache + pinned hot rows */
/* gate matrix resident (needs gate_resident): each token's exact gate picks its top
 * gate_keep share of rows by |act(gate)|; the budget's rows pinned hot-first, the chosen
 * others read */
#define FG_MODE_GATE      4

/* Read engine (fg_config.io_backend). */
#define FG_IO_AUTO     0  /* the measured default (threads) */
#define FG_IO_THREADS  1  /* pthread workers issuing pread */
#define FG_IO_URING    2  /* io_uring via raw syscalls; threads when the kernel refuses */

typedef struct fg_config {
    int32_t n_layer;
    int32_t n_embd;
    int32_t n_ff;
    int32_t gated;                 /* 1: gate part present, h = act(gate) * up */
    int32_t gate_resident;         /* 1 (gated): the gate is not in the bundle rows but one
                                    * matrix per layer (fg_runtime_set_gate_rows), kept in
                                    * DRAM in every mode and counted in the budget */
    int32_t split_rows;            /* 1 (gate_resident): a layer's n_ff up rows come first,
                                    * then its n_ff down rows; part_offset[FG_PART_DOWN] is
                                    * the up rows' stride, bundle_stride minus it the down
                                    * rows'. Modes dense and gate only; gate mode then reads
                                    * in two stages (down_keep) */
    int32_t activation;            /* FG_ACT_* */
    float activation_threshold;    /* FG_ACT_FATRELU: values <= this become 0 */
    /* every layer's layout until fg_runtime_set_layer_layout gives it its own */
    int32_t part_type[3];          /* ggml type of gate/up/down parts (gate ignored if !gated;
                                    * with gate_resident, the gate matrix's type) */
    int64_t part_offset[3];        /* byte offset of each part inside a bundle row */
    int64_t bundle_stride;         /* bytes per bundle row (one neuron) */
    int32_t max_tokens;            /* most rows the FFN input may have (llama.cpp's n_ubatch) */
    int32_t n_threads;             /* FFN threads for one-row batches (decode), >= 1 */
    int32_t n_threads_batch;       /* FFN threads for multi-row batches (prompts), >= 1 */
    int32_t use_direct_io;         /* 1: try O_DIRECT, fall back to buffered reads */
    char input_node[32];           /* graph node holding the FFN input, without "-L" */
    char output_node[32];          /* graph node holding the FFN output, without "-L" */
    /* streaming modes (ignored by FG_MODE_DENSE) */
    int32_t mode;                  /* FG_MODE_* */
    int64_t dram_budget;           /* bytes for cache slots + predictors, split across layers
                                    * (the read engine's staging buffers come on top) */
    float pinned_share;            /* predicted mode: share of a layer's slots pinned hot-first
                                    * (hybrid and gate pin every slot) */
    int32_t window_tokens;         /* a row used within this many tokens is evicted last */
    float gate_keep;               /* FG_MODE_GATE: share of a layer's rows each token keeps,
                                    * in (0, 1] (rows whose activation is exactly 0 never) */
    float gate_cache_bonus;        /* FG_MODE_GATE, >= 0: a resident row (pinned or cached)
                                    * is chosen by (1 + bonus) x |act|, a row to read by |act|:
                                    * near the cut, rows in DRAM win over rows to read */
    float down_keep;               /* FG_MODE_GATE on split rows, in (0, 1]: of the rows
                                    * gate_keep chose, each token's top down_keep x n_ff by
                                    * |h| x ||down|| (h = act(gate) x up, exact) have their
                                    * down rows read; >= gate_keep: all of them */
    int32_t coalesce_gap;          /* misses at most this many rows apart share one read;
                                    * -1: as many rows as fit in coalesce_bytes */
    int32_t coalesce_bytes;        /* coalesce_gap -1: the largest gap worth reading through
                                    * (a read's fixed cost in bytes of transfer) */
    int32_t io_backend;            /* FG_IO_* */
    int32_t io_depth;              /* reads in flight */
    int32_t max_read_bytes;        /* largest single read (also the staging buffer size) */
    int32_t read_log_cap;          /* tests: keep (offset, length) of the first N reads */
} fg_config;

typedef struct fg_stats {
    uint64_t tokens;               /* FFN input rows seen by layer 0 */
    uint64_t bytes_read;           /* bytes transferred (whole aligned ranges for direct I/O) */
    uint64_t reads;                /* reads issued */
    uint64_t bytes_needed;         /* missed rows x their stride: bytes_read / this = over-fetch */
    uint64_t cache_hits;           /* unpinned needed rows found in the cache (per layer call) */
    uint64_t cache_misses;         /* unpinned needed rows read from the payload */
    uint64_t neurons_computed;     /* rows computed x tokens they were computed for */
    uint64_t down_computed;        /* split rows: rows whose down row was used x tokens (the
                                    * rest of neurons_computed stopped after up) */
    uint64_t pinned_neurons;       /* rows pinned over all layers (not reset) */
    uint64_t window_evictions;     /* evictions of a row used within the window (too small) */
    double time_predict_s;
    double time_io_wait_s;         /* time blocked on reads (load included) */
    double time_ffn_s;             /* FFN arithmetic */
    double time_total_s;           /* whole FFN calls */
} fg_stats;

/* Open the payload file and allocate every buffer. */
int fg_runtime_create(const fg_config *cfg, const char *path, fg_runtime **out);
void fg_runtime_destroy(fg_runtime *rt);
/* Layer's bundle layout when it differs from cfg's part_type/part_offset/bundle_stride
 * (every layer starts with cfg's): K-quant mixes store some layers' parts in other types.
 * part_type[3] and part_offset[3] indexed by FG_PART_*. Before fg_runtime_load. */
int fg_runtime_set_layer_layout(fg_runtime *rt, int32_t layer, const int32_t *part_type,
                                const int64_t *part_offset, int64_t stride);
/* Where layer's bundles live in the file, and its biases (n_ff for up/gate, n_embd for
 * down; NULL when absent; copied). */
int fg_runtime_set_layer(fg_runtime *rt, int32_t layer, uint64_t bundle_offset,
                         const float *up_bias, const float *gate_bias, const float *down_bias);
/* Where layer's gate matrix lives in the file (cfg.gate_resident): n_ff rows of n_embd
 * values of the layout's gate type, in bundle row order; read at load. */
int fg_runtime_set_gate_rows(fg_runtime *rt, int32_t layer, uint64_t offset);
/* Layer's low-rank predictor (flashgguf/predictor.py): a = rank Q8_0 rows of n_embd, b and
 * b_up (NULL if absent) = n_ff Q8_0 rows of rank, scale = n_ff floats; all copied. Call
 * before fg_runtime_load; counted in the DRAM budget. */
int fg_runtime_set_predictor(fg_runtime *rt, int32_t layer, int32_t rank, const void *a,
                             const void *b, const void *b_up, const float *scale,
                             float threshold);
/* Layer's predictor scores the expected contribution under its residuals (after
 * fg_runtime_set_predictor): sigma_g (and sigma_u, with b_up) = n_ff floats >= 0, copied.
 * Before fg_runtime_load; counted in the DRAM budget. */
int fg_runtime_set_predictor_sigma(fg_runtime *rt, int32_t layer, const float *sigma_g,
                                   const float *sigma_u);
/* How much of the budget beyond every layer's minimum goes to layer (> 0; default 1 for
 * all: an even split). Expected active rows per layer are a good weight. Before load. */
int fg_runtime_set_layer_weight(fg_runtime *rt, int32_t layer, double weight);
/* FG_MODE_GATE: the share of layer's rows each token keeps, in (0, 1], instead of
 * cfg.gate_keep (per-layer keeps allocated from the file's error curves). Between calls. */
int fg_runtime_set_gate_keep(fg_runtime *rt, int32_t layer, float keep);
/* cfg.split_rows: layer's down columns' norms (n_ff, >= 0, row order), which with the exact
 * h score the second stage's choice; copied. Needed before load in gate mode. */
int fg_runtime_set_down_norm(fg_runtime *rt, int32_t layer, const float *norm);
/* Allocate every buffer and read what stays resident: every bundle (dense mode) or the
 * pinned rows. FG_ERR_BUDGET when the budget is too small (fg_runtime_min_budget). */
int fg_runtime_load(fg_runtime *rt);
/* Smallest dram_budget the streaming modes accept with this config (bytes): the
 * predictors and resident gate matrices. Every row beyond them is optional: a miss is
 * computed from the staging buffer it was read into (io_depth x max_read_bytes, beside the
 * budget, not in it). */
int64_t fg_runtime_min_budget(const fg_runtime *rt);
/* What load would give each layer (streaming modes), without allocating or reading:
 * capacity[n_layer] slots and pinned[n_layer] rows. FG_ERR_BUDGET as load. */
int fg_runtime_plan(const fg_runtime *rt, int32_t *capacity, int32_t *pinned);
/* Slots and pinned rows of a layer after load. */
int fg_runtime_layer_capacity(const fg_runtime *rt, int32_t layer, int32_t *capacity,
                              int32_t *pinned);
/* Which read engine runs (FG_IO_THREADS or FG_IO_URING; 0 in dense mode). */
int fg_runtime_io_backend(const fg_runtime *rt);
/* 1 when the payload is read with direct I/O, 0 when buffered (refused by the fs). */
int fg_runtime_direct_io(const fg_runtime *rt);
/* Alignment of the streaming reads' offsets and lengths: the file's direct-I/O alignment
 * (statx; 4096 where the kernel does not say), 1 for buffered reads. */
int fg_runtime_io_alignment(const fg_runtime *rt);
/* Compute one layer's FFN: x and y are n_tokens rows of n_embd floats. */
int fg_runtime_ffn(fg_runtime *rt, int32_t layer, const float *x, float *y, int32_t n_tokens);
/* The same over exactly the rows where mask[i] != 0 (n_ff bytes, row order) instead of the
 * mode's choice, through the cache and reads of streaming modes (oracle tests, no-op for
 * dense weights already resident). */
int fg_runtime_ffn_masked(fg_runtime *rt, int32_t layer, const float *x, float *y,
                          int32_t n_tokens, const uint8_t *mask);
/* The mode's decisions for n_tokens rows of x: out is n_tokens x n_ff bytes (0/1): the
 * predictor's, or in FG_MODE_GATE the gate's (pinned rows not included). */
int fg_runtime_predict(fg_runtime *rt, int32_t layer, const float *x, int32_t n_tokens,
                       uint8_t *out);

/* ---- inspection and fault injection (tests) --------------------------------------- */
/* Row held by each slot (-1 free) and its last-use token stamp; slots [0, pinned) hold
 * rows [0, pinned). Arrays of capacity entries. *clock receives the layer's token stamp. */
int fg_runtime_debug_slots(const fg_runtime *rt, int32_t layer, int32_t *row_of_slot,
                           uint64_t *last_used, uint64_t *clock);
/* Copy the resident bytes of row (the layer's stride); FG_ERR_ARG if not resident. */
int fg_runtime_debug_row(const fg_runtime *rt, int32_t layer, int32_t row, void *out);
/* Reads logged since creation (cfg.read_log_cap): copies up to cap, returns the count. */
int64_t fg_runtime_debug_reads(const fg_runtime *rt, uint64_t *offset, uint64_t *len,
                               int64_t cap);
/* Every read fails with errno_value once `after` more reads have succeeded (0 disables). */
void fg_runtime_debug_fail_reads(fg_runtime *rt, int errno_value, int64_t after);
/* Transient faults a device or kernel may give, which the engines must absorb (the call
 * still computes exactly): every every-th read (counting all reads) first comes back short
 * (FG_FAULT_SHORT: half its bytes, aligned), or fails once with EINTR or EAGAIN. Both
 * engines; 0 disables. */
#define FG_FAULT_SHORT  1
#define FG_FAULT_EINTR  2
#define FG_FAULT_EAGAIN 3
void fg_runtime_debug_transient_reads(fg_runtime *rt, int kind, int64_t every);
/* Every every-th read of a call (from its first) lands delay_us late: threads engine, its
 * worker sleeps before reading; io_uring, its completion is held back until nothing else
 * can land. Reorders completions (after load of a streaming mode, else ignored; 0
 * disables). */
void fg_runtime_debug_delay_reads(fg_runtime *rt, int64_t delay_us, int32_t every);
/* First error raised inside the eval callback since the last call (then cleared);
 * FG_OK if none. msg receives a description (may be NULL). */
int fg_runtime_take_error(fg_runtime *rt, char *msg, size_t msg_cap);
void fg_runtime_get_stats(const fg_runtime *rt, fg_stats *out);
void fg_runtime_reset_stats(fg_runtime *rt);

/* ---- trace (flashgguf-profile run --trace / replay) ---------------------------------- */
/* One streaming FFN call as recorded: its rows needed are a bitset of n_ff bits (bit i of
 * byte i / 8 is row i, least significant bit first), its reads entries
 * [first_read, first_read + reads) of the trace's read list. */
typedef struct fg_trace_call {
    int32_t layer;
    int32_t n_tokens;              /* FFN input rows of the call */
    int32_t needed;                /* rows computed */
    int32_t pinned;                /* of them, pinned rows */
    int32_t hits;                  /* of them, found in the cache (not pinned) */
    int32_t misses;                /* of them, read from the payload */
    int32_t reads;                 /* reads issued */
    int32_t reserved;
    uint64_t bytes_read;           /* bytes the reads transferred */
    uint64_t first_read;           /* index of the call's first read among all traced reads */
    double time_predict_s;
    double time_io_wait_s;
    double time_ffn_s;
} fg_trace_call;

/* Record the next max_calls streaming FFN calls (each with its rows needed) and the first
 * max_reads of their reads; clears an earlier trace. After load, streaming modes only
 * (FG_ERR_STATE otherwise); max_calls, max_reads >= 0. */
int fg_runtime_trace_start(fg_runtime *rt, int64_t max_calls, int64_t max_reads);
/* counts[4]: calls recorded, reads recorded, calls seen, reads seen since the start (the
 * seen ones go on past the limits: more seen than recorded means the trace was cut). */
void fg_runtime_trace_counts(const fg_runtime *rt, int64_t *counts);
/* Copy what was recorded: calls[n], needed[n x ((n_ff + 7) / 8)], read_offset[m],
 * read_len[m] with n, m the recorded counts. */
void fg_runtime_trace_copy(const fg_runtime *rt, fg_trace_call *calls, uint8_t *needed,
                           uint64_t *read_offset, uint64_t *read_len);
/* Stop recording and free the trace. */
void fg_runtime_trace_stop(fg_runtime *rt);

/* ggml_backend_sched_eval_callback; user_data is the fg_runtime. */
bool fg_eval_callback(void *tensor, bool ask, void *user_data);

/* ---- mixture of experts (moe.c) ------------------------------------------------------ */
/* One handle per MoE flash GGUF: each layer's routed experts are bundles of the source's own
 * gate, up and down matrices (n_ff_exp rows of n_embd; n_embd rows of n_ff_exp), one bundle
 * per expert, `stride` bytes apart. llama.cpp's graph computes the routing (its router and
 * shared experts stay in the trunk); the eval callback takes the chosen experts and their
 * weights from the graph and writes the routed experts' sum over the MoE output node. */

typedef struct fg_moe fg_moe;

typedef struct fg_moe_config {
    int32_t n_layer;
    int32_t n_embd;
    int32_t n_ff_exp;              /* rows of an expert's gate and up */
    int32_t n_expert;
    int32_t n_expert_used;         /* experts per token (top-k) */
    int32_t activation;            /* FG_ACT_SILU or FG_ACT_GELU: h = act(gate) * up */
    int32_t max_tokens;            /* most rows the MoE input may have (n_ubatch) */
    int32_t n_threads;             /* threads for one-row batches (decode), >= 1 */
    int32_t n_threads_batch;       /* threads for multi-row batches (prompts), >= 1 */
    int32_t use_direct_io;
    int32_t io_backend;            /* FG_IO_* */
    int32_t io_depth;              /* expert reads in flight */
    int32_t resident;              /* 1: every expert read at load and kept (no budget) */
    int64_t dram_budget;           /* !resident: bytes of expert slots (one slot = the
                                    * largest expert bundle); fewer than one slot is allowed:
                                    * every expert is then read when used */
    char input_node[32];           /* graph node of the MoE input, without "-L" */
    char output_node[32];          /* graph node of the routed experts' sum */
} fg_moe_config;

typedef struct fg_moe_stats {
    uint64_t tokens;               /* MoE input rows seen by layer 0 */
    uint64_t calls;                /* MoE layer calls */
    uint64_t expert_hits;          /* experts a call needed that were resident */
    uint64_t expert_misses;        /* experts a call needed that were read */
    uint64_t bytes_read;           /* bytes transferred (load included) */
    uint64_t reads;
    uint64_t bytes_needed;         /* missed experts x their bundle bytes */
    uint64_t evictions;            /* experts dropped from a slot for another */
    uint64_t pinned;               /* experts pinned at load (fg_moe_pin) */
    uint64_t pinned_hits;          /* hits on pinned experts */
    /* next-layer prediction (fg_moe_set_router), decode tokens only: */
    uint64_t next_predicted;       /* experts guessed (n_expert_used per scored call) */
    uint64_t next_right;           /* guesses the layer then routed to */
    uint64_t next_missed_predicted;/* guesses not resident: what a prefetch would read */
    uint64_t next_right_missed;    /* of those, the ones routed to: read in time */
    uint64_t prefetch_reads;       /* experts read on a guess (fg_moe_set_prefetch) */
    uint64_t prefetch_used;        /* of those, routed to and kept: then counted as hits */
    double time_io_wait_s;
    double time_ffn_s;
    double time_total_s;
} fg_moe_stats;

int fg_moe_create(const fg_moe_config *cfg, const char *path, fg_moe **out);
void fg_moe_destroy(fg_moe *m);
/* Layer's experts: bundle e at offset + e * stride (stride a multiple of 4096 and offset
 * 4096-aligned); part_type[3] and part_offset[3] by FG_PART_* (gate, up, down). Before
 * fg_moe_load. */
int fg_moe_set_layer(fg_moe *m, int32_t layer, uint64_t offset, int64_t stride,
                     const int32_t *part_type, const int64_t *part_offset);
/* Before fg_moe_load: experts (keys layer * n_expert + expert, distinct, most wanted first)
 * to read at load and never evict; as many as the budget's slots hold, less one slot left
 * for the rest. Without it nothing is pinned. */
int fg_moe_pin(fg_moe *m, const int32_t *keys, int32_t n_keys);
/* Allocate the slots and read what stays resident (every expert when cfg.resident, else
 * the pinned ones). */
int fg_moe_load(fg_moe *m);
/* Layer's router, F32 [n_expert x n_embd] (ggml's [n_embd, n_expert] tensor): with it,
 * each decode call of the layer before guesses this layer's experts from its own input,
 * and the stats score the guesses (next_*). */
int fg_moe_set_router(fg_moe *m, int32_t layer, const float *w);
/* After fg_moe_load, with every layer's router but the first set: on (1), each decode call
 * also reads the next layer's guessed experts that no slot holds, to land while llama.cpp
 * computes that layer's attention; off (0) stops it. FG_ERR_STATE when resident or a
 * router is missing. */
int fg_moe_set_prefetch(fg_moe *m, int on);
/* Number of expert slots after load. */
int32_t fg_moe_slots(const fg_moe *m);
/* 1 when the experts are read with direct I/O, 0 when buffered (refused by the fs). */
int fg_moe_direct_io(const fg_moe *m);
/* y (n_tokens x n_embd) = sum over k of weights[t, k] x expert ids[t, k](x[t]), the experts
 * read through the cache as the callback does (tests, benchmarks). */
int fg_moe_forward(fg_moe *m, int32_t layer, const float *x, const int32_t *ids,
                   const float *weights, float *y, int32_t n_tokens);
/* Hits and misses of each layer since the last reset: arrays of n_layer. */
void fg_moe_layer_stats(const fg_moe *m, uint64_t *hits, uint64_t *misses);
/* Expert resident in slots (1) or not (0): out[n_layer x n_expert]. */
void fg_moe_resident(const fg_moe *m, uint8_t *out);
void fg_moe_get_stats(const fg_moe *m, fg_moe_stats *out);
void fg_moe_reset_stats(fg_moe *m);
int fg_moe_take_error(fg_moe *m, char *msg, size_t msg_cap);
/* Every read fails with errno_value once `after` more reads have succeeded (0 disables). */
void fg_moe_debug_fail_reads(fg_moe *m, int errno_value, int64_t after);
/* Record the routing of the next max_calls MoE calls (flashgguf-profile experts): each
 * call's layer and the experts it used; clears an earlier record. */
int fg_moe_trace_start(fg_moe *m, int64_t max_calls);
/* Calls recorded so far. */
int64_t fg_moe_trace_count(const fg_moe *m);
/* Calls recorded (at most max_calls); copies them: layer[n], used[n x n_expert] (0/1). */
int64_t fg_moe_trace_copy(const fg_moe *m, int32_t *layer, uint8_t *used);
void fg_moe_trace_stop(fg_moe *m);
/* ggml_backend_sched_eval_callback; user_data is the fg_moe. */
bool fg_moe_eval_callback(void *tensor, bool ask, void *user_data);

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
