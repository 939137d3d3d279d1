/* The runtime handle, shared by runtime.c (buffers, FFN), cache.c (slots), predictor.c
 * and hook.c (eval callback). */
#ifndef FLASHGGUF_RUNTIME_INTERNAL_H
#define FLASHGGUF_RUNTIME_INTERNAL_H

#ifdef _OPENMP
#include <omp.h>
#endif

#include "error_slot.h"
#include "flashgguf.h"
#include "io.h"
#include "kernels.h"

/* Fewer rows x tokens than this are computed on one thread (runtime.c's ffn_accumulate). */
#define FG_MIN_PARALLEL_ROWS 128
/* Resident rows of a streaming call are handed to the FFN's threads in chunks this long. */
#define FG_CHUNK_ROWS 64

/* The low-rank predictor of one layer (rows follow the bundle's hot-first order). */
typedef struct fg_predictor {
    int32_t rank;             /* 0: none */
    uint8_t *a;               /* rank Q8_0 rows of n_embd */
    uint8_t *b;               /* n_ff Q8_0 rows of rank */
    uint8_t *b_up;            /* same, or NULL */
    float *scale;             /* n_ff */
    float *sigma_g;           /* n_ff residual RMS of g (expected score), or NULL */
    float *sigma_u;           /* n_ff residual RMS of u, or NULL */
    float threshold;
    size_t nbytes;            /* DRAM taken by the above */
} fg_predictor;

/* Slot buffer of a streaming layer: slots [0, n_pinned) hold rows [0, n_pinned) for good;
 * the others are a cache with a row -> slot map, an LRU list and a free list. */
typedef struct fg_cache {
    uint8_t *slots;           /* capacity rows of the layer's stride, allocated at load */
    int32_t capacity;
    int32_t n_pinned;
    int32_t *slot_of;         /* n_ff: slot holding row i, -1 when not resident */
    int32_t *row_of;          /* capacity: row held by slot s, -1 when free */
    uint64_t *last_used;      /* capacity: token stamp of the slot's last use */
    uint64_t *busy;           /* capacity: round that still needs the slot this call */
    int32_t *prev, *next;     /* LRU list of occupied unpinned slots, least recent at head */
    int32_t head, tail;
    int32_t *free_list;       /* unpinned free slots */
    int32_t n_free;
    uint64_t clock;           /* token stamp: tokens this layer has seen */
} fg_cache;

/* How a layer's bundle rows are laid out and the kernels for its part types: K-quant mixes
 * (Q4_K_M's Q6_K/Q4_K down tensors) give layers different types and strides. */
typedef struct fg_layout {
    int32_t part_type[3];     /* FG_PART_* -> ggml type (gate unused if !gated) */
    int64_t part_offset[3];   /* byte offset of each part inside a row */
    int64_t stride;           /* bytes per bundle row (one neuron's parts) */
    /* where neuron i's parts are in a layer's rows held whole (dense bundles): up at
     * up_start + i x up_step, down at down_start + i x down_step; side by side in one row,
     * or with cfg.split_rows the n_ff up rows first, then the down rows */
    int64_t up_start, up_step, down_start, down_step;
    fg_vec_dot_fn dot_gate, dot_up;
    fg_quantize_fn quant_gate, quant_up;
    fg_axpy_fn axpy_down;
    size_t xq_gate_row, xq_up_row;   /* bytes of one quantized activation row */
} fg_layout;

typedef struct fg_layer {
    uint64_t bundle_offset;   /* absolute file offset of blk.N.ffn_bundle */
    int has_offset;
    fg_layout lay;
    uint8_t *bundles;         /* dense mode: n_ff rows of lay.stride bytes */
    uint64_t gate_offset;     /* cfg.gate_resident: file offset of the gate matrix */
    int has_gate_offset;
    uint8_t *gate_rows;       /* cfg.gate_resident: n_ff rows of gate_row_bytes, resident */
    size_t gate_row_bytes;
    float *up_bias;           /* n_ff or NULL */
    float *gate_bias;         /* n_ff or NULL */
    float *down_bias;         /* n_embd or NULL */
    fg_predictor pred;
    fg_cache cache;
    double weight;            /* share of the budget beyond the minimum (1 by default) */
    float gate_keep;          /* FG_MODE_GATE: share of rows a token keeps (cfg's by default) */
    float *down_norm;         /* cfg.split_rows: n_ff norms of the down columns, or NULL */
} fg_layer;

/* The calls and reads recorded since fg_runtime_trace_start (trace.c). */
typedef struct fg_trace {
    int64_t max_calls, max_reads;
    int64_t n_calls, n_reads;        /* recorded */
    int64_t seen_calls, seen_reads;  /* since the start, past the limits too */
    size_t row_bytes;                /* bytes of one call's needed bitset */
    fg_trace_call *calls;
    uint8_t *needed;
    uint64_t *read_offset, *read_len;
} fg_trace;

struct fg_runtime {
    fg_config cfg;
    fg_reader reader;
    fg_io io;
    fg_layer *layers;
    int loaded;

    /* the predictor's kernels (its tensors are Q8_0) */
    fg_vec_dot_fn dot_q8;
    fg_quantize_fn quant_q8;

    /* scratch, sized for cfg.max_tokens rows before load: nothing is allocated per token */
    uint8_t *xq_gate, *xq_up;        /* quantized FFN input rows (the current layer's types) */
    size_t xq_gate_cap, xq_up_cap;   /* their sizes in bytes */
    float *partial;                  /* n_threads x max_tokens x n_embd partial sums */
    float *hidden;                   /* n_threads x 2 x max_tokens: gate/up values of one neuron */
    float *ffn_out;                  /* max_tokens x n_embd: result waiting for the output node */
    int32_t *pending_rows;           /* per layer: rows in ffn_out waiting, 0 if none */
    int partial_threads;             /* threads whose partial sums hold this call's values */

    /* streaming scratch (allocated at load, n_ff entries each) */
    uint8_t *need_mask;              /* rows needed by the current call */
    int32_t *need;                   /* the same as an ascending list */
    const uint8_t **res_rows;        /* resident rows to compute and their indices */
    int32_t *res_idx;
    const uint8_t **miss_rows;       /* rows read this round and their indices */
    int32_t *miss_idx;
    fg_read *reads;
    fg_copy *copies;
    uint64_t round;                  /* streaming call counter (fg_cache.busy stamps) */

    /* FG_MODE_GATE scratch (allocated at load) */
    float *gate_act;                 /* max_tokens x n_ff: act(gate) of the current call */
    const float *gate_act_now;       /* gate_act while a call's rows take their gate from it */
    float *select_scratch;           /* n_threads_batch x n_ff: |act| copies for selection */

    /* predictor scratch, sized for the largest rank */
    int32_t max_rank;
    uint8_t *pred_xq;                /* one Q8_0 row of n_embd */
    float *pred_z;                   /* max_rank */
    uint8_t *pred_zq;                /* one Q8_0 row of max_rank */

    fg_trace trace;                  /* off unless max_calls > 0 */
    fg_error_slot err;               /* first error inside the callback */
    fg_stats stats;
};

void fg_runtime_set_error(fg_runtime *rt, int code, const char *msg);

/* Append one streaming call (the rows needed are rt->need[0, call->needed)) and its planned
 * reads rt->reads[0, call->reads) to the trace, when one is recording. */
void fg_trace_append(fg_runtime *rt, fg_trace_call *call);

/* The largest FFN team: per-thread scratch is sized for it. */
static inline size_t fg_max_threads(const fg_config *c) {
    return (size_t)(c->n_threads > c->n_threads_batch ? c->n_threads : c->n_threads_batch);
}

/* The FFN input rows in each part's activation type (ggml's vec_dot_type), for layer L,
 * into rt->xq_gate / rt->xq_up (n_tokens <= cfg.max_tokens). */
void fg_quantize_inputs(fg_runtime *rt, const fg_layer *L, const float *x, int32_t n_tokens);

/* Threads of an FFN call: n_threads for decode (one row), n_threads_batch for prompts. */
static inline int fg_call_threads(const fg_config *c, int32_t n_tokens) {
    return n_tokens > 1 ? c->n_threads_batch : c->n_threads;
}

/* Neuron i's up and down parts where a layer's rows are held whole (dense bundles), per
 * fg_layout's starts and steps. */
static inline const uint8_t *fg_dense_up(const fg_layer *L, int64_t i) {
    return L->bundles + L->lay.up_start + i * L->lay.up_step;
}
static inline const uint8_t *fg_dense_down(const fg_layer *L, int64_t i) {
    return L->bundles + L->lay.down_start + i * L->lay.down_step;
}

/* Split rows (cfg.split_rows), pinned slot s: the slot buffer holds the n_pinned up rows,
 * then their down rows (read so at load). */
static inline const uint8_t *fg_pinned_up(const fg_layer *L, int64_t s) {
    return L->cache.slots + (size_t)s * (size_t)L->lay.up_step;
}
static inline const uint8_t *fg_pinned_down(const fg_layer *L, int64_t s) {
    return L->cache.slots + (size_t)L->cache.n_pinned * (size_t)L->lay.up_step +
           (size_t)s * (size_t)L->lay.down_step;
}

/* This thread's place in the current OpenMP team (0 of 1 without OpenMP). */
static inline int team_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}
double fg_now_seconds(void);

/* runtime.c, shared with two_stage.c */
/* Coalesce rows (ascending) into rt->reads and rt->copies: row r's bytes are
 * [base + r x step, + len) (len <= step); dst[k] receives row k's bytes (NULL: none).
 * Returns the number of reads. */
int32_t fg_plan_reads(fg_runtime *rt, uint64_t base, uint64_t step, uint64_t len,
                      const int32_t *rows, const uint8_t *const *dst, int32_t n);
/* Rows needed by a streaming call, ascending, into rt->need (pinned rows first); returns
 * how many. mask (trace replay) gives them instead of the mode's choice. */
int32_t fg_needed_rows(fg_runtime *rt, const fg_layer *L, const float *x, int32_t n_tokens,
                       const uint8_t *mask);
/* Zero the partial sums of the threads an n_tokens call uses. */
void fg_partial_clear(fg_runtime *rt, int32_t n_tokens);
/* y = the sum of the partial sums (+ down bias). */
void fg_ffn_reduce(fg_runtime *rt, const fg_layer *L, float *y, int32_t n_tokens);
/* Compute the job's reads as they land, until none is left: compute(rt, L, k0, k1, arg)
 * for the rows of each read (rt->miss_idx[k0, k1), their bytes at rt->miss_rows[k0, k1)
 * in its staging buffer); rows with a slot (rt->copies[k].dst) are then copied there,
 * row_bytes each. Returns the seconds this thread was blocked on the device. */
typedef void (*fg_landed_rows_fn)(const fg_runtime *rt, const fg_layer *L, int32_t k0,
                                  int32_t k1, void *arg);
double fg_consume_reads(fg_runtime *rt, const fg_layer *L, size_t row_bytes,
                        fg_landed_rows_fn compute, void *arg);
/* fg_io_next, its seconds blocked added to *waited. */
int fg_io_next_timed(fg_io *io, fg_landed *got, double *waited);

/* two_stage.c: a streaming call of FG_MODE_GATE on split rows (cfg.split_rows). */
int fg_ffn_two_stage(fg_runtime *rt, int32_t layer, float *y, int32_t n_tokens);

/* cache.c */
int fg_cache_alloc(fg_cache *c, int32_t n_ff, int32_t capacity, int32_t n_pinned,
                   size_t stride);
void fg_cache_free(fg_cache *c);
/* Mark a resident unpinned slot used now by round; moves it to the LRU tail. */
void fg_cache_touch(fg_cache *c, int32_t slot, uint64_t round);
/* A slot for row (free, else the LRU slot not busy in round); -1 when every slot is in
 * use by round (the caller then computes the row without keeping it).
 * *in_window is set when the evicted row was used within window tokens. */
int32_t fg_cache_take(fg_cache *c, int32_t row, uint64_t round, int32_t window,
                      int *in_window);

/* Drop a slot whose read failed: its bytes are not the row's. */
void fg_cache_forget(fg_cache *c, int32_t slot);

/* predictor.c */
void fg_predictor_release(fg_predictor *p);
/* Set mask[i] for rows >= from that the predictor marks active for any of the n_tokens
 * rows of x; token t's decisions go to mask + t * mask_stride (stride 0: their union).
 * mask is OR-ed into, not cleared. */
void fg_predict_rows(fg_runtime *rt, const fg_layer *L, const float *x, int32_t n_tokens,
                     int32_t from, uint8_t *mask, int32_t mask_stride);

/* gate.c (FG_MODE_GATE; the inputs quantized by the caller into rt->xq_gate) */
/* act(gate) of every row for n_tokens rows into rt->gate_act; set mask[i] for rows >= from
 * in a token's top L->gate_keep share by |act| (never an exact 0); token t's decisions go
 * to mask + t * mask_stride (stride 0: their union). mask is OR-ed into, not cleared. */
void fg_gate_select(fg_runtime *rt, const fg_layer *L, int32_t n_tokens, int32_t from,
                    uint8_t *mask, int32_t mask_stride);
/* The second stage (split rows): among rows[0, n) (ascending), whose exact h is in
 * rt->gate_act, set mask[i] for rows i >= from in a token's top cfg.down_keep x n_ff by
 * |h| x down_norm (never an h of exactly 0); union over the n_tokens tokens. */
void fg_gate_select_down(fg_runtime *rt, const fg_layer *L, int32_t n_tokens,
                         const int32_t *rows, int32_t n, int32_t from, uint8_t *mask);

#endif
