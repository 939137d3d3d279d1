#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "runtime_internal.h"

/* Large sequential reads for the dense and pinned loads; also the bounce buffer size. */
#define FG_LOAD_CHUNK (8u << 20)
/* Fewer output values than this are summed on one thread (see ffn_accumulate). */
#define FG_MIN_PARALLEL_OUT 8192
/* The FFN asks for the bundle row this many rows ahead of the one it computes: a decode
 * streams every row from memory once (Qwen2.5-Coder-1.5B all resident, 2 threads: FFN 150
 * -> 101 ms/token; 12 rows ahead measured no better). */
#define FG_PREFETCH_ROWS 4

double fg_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void fg_runtime_set_error(fg_runtime *rt, int code, const char *msg) {
    fg_error_slot_set(&rt->err, code, msg);
}

static void *alloc_zeroed(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    memset(p, 0, n);
    return p;
}

/* Layout of a layer's rows: every part a whole row of n_embd values of a type the kernels
 * implement, inside the stride, no two parts overlapping. */
static int check_layout(const fg_config *c, const int32_t *part_type, const int64_t *part_offset,
                        int64_t stride) {
    if (stride <= 0) return FG_ERR_ARG;
    /* a resident gate matrix: its type must have kernels, it takes no place in the row */
    if (c->gate_resident && (fg_vec_dot_ref_fn(part_type[FG_PART_GATE]) == NULL ||
                             fg_row_size(part_type[FG_PART_GATE], c->n_embd) == 0)) {
        return FG_ERR_TYPE;
    }
    const int first = c->gated && !c->gate_resident ? FG_PART_GATE : FG_PART_UP;
    int64_t end[3] = {0, 0, 0};
    for (int p = first; p <= FG_PART_DOWN; p++) {
        if (fg_vec_dot_ref_fn(part_type[p]) == NULL || fg_axpy_ref_fn(part_type[p]) == NULL) {
            return FG_ERR_TYPE;
        }
        const int64_t bytes = (int64_t)fg_row_size(part_type[p], c->n_embd);
        if (bytes == 0 || bytes > stride) return FG_ERR_ARG;
        /* offset + bytes <= stride, written so that a huge offset cannot overflow */
        if (part_offset[p] < 0 || part_offset[p] > stride - bytes) return FG_ERR_ARG;
        end[p] = part_offset[p] + bytes;
        for (int q = first; q < p; q++) {
            if (part_offset[p] < end[q] && part_offset[q] < end[p]) return FG_ERR_ARG;
        }
    }
    /* split rows: the down offset is the up rows' stride (the up rows come first) */
    if (c->split_rows && part_offset[FG_PART_UP] != 0) return FG_ERR_ARG;
    /* streaming: one row, unaligned at both ends, must fit a read */
    if (c->mode != FG_MODE_DENSE && (int64_t)c->max_read_bytes < stride + 2 * FG_IO_ALIGN) {
        return FG_ERR_ARG;
    }
    return FG_OK;
}

static int check_streaming_config(const fg_config *c) {
    if (c->mode == FG_MODE_DENSE) return FG_OK;
    if (c->mode < FG_MODE_DENSE || c->mode > FG_MODE_GATE) return FG_ERR_ARG;
    if (c->split_rows && c->mode != FG_MODE_GATE) return FG_ERR_STATE;
    if (c->split_rows && !(c->down_keep > 0.0f && c->down_keep <= 1.0f)) return FG_ERR_ARG;
    if (c->mode == FG_MODE_GATE && (!c->gate_resident || !(c->gate_keep > 0.0f) ||
                                    !(c->gate_keep <= 1.0f) || !(c->gate_cache_bonus >= 0.0f) ||
                                    !isfinite(c->gate_cache_bonus))) {
        return FG_ERR_ARG;
    }
    if (c->dram_budget <= 0 || !(c->pinned_share >= 0.0f && c->pinned_share <= 1.0f) ||
        c->window_tokens < 0 || c->coalesce_gap < -1 || c->coalesce_bytes < 0 ||
        c->io_depth < 1 || c->io_depth > 1024 || c->io_backend < FG_IO_AUTO ||
        c->io_backend > FG_IO_URING) {
        return FG_ERR_ARG;
    }
    return FG_OK;
}

static int check_config(const fg_config *c) {
    if (c->n_layer <= 0 || c->n_embd <= 0 || c->n_ff <= 0 || c->max_tokens <= 0 ||
        c->n_threads <= 0 || c->n_threads_batch <= 0 || c->read_log_cap < 0) {
        return FG_ERR_ARG;
    }
    if (c->activation < FG_ACT_SILU || c->activation > FG_ACT_DRELU) return FG_ERR_ARG;
    if (c->activation == FG_ACT_DRELU && !c->gated) return FG_ERR_ARG;
    if (c->gate_resident != 0 && (c->gate_resident != 1 || !c->gated)) return FG_ERR_ARG;
    if (c->split_rows != 0 && (c->split_rows != 1 || !c->gate_resident)) return FG_ERR_ARG;
    if (!isfinite(c->activation_threshold)) return FG_ERR_ARG;
    if (memchr(c->input_node, 0, sizeof c->input_node) == NULL ||
        memchr(c->output_node, 0, sizeof c->output_node) == NULL || c->input_node[0] == 0 ||
        c->output_node[0] == 0) {
        return FG_ERR_ARG;
    }
    const int rc = check_streaming_config(c);
    return rc != FG_OK ? rc : check_layout(c, c->part_type, c->part_offset, c->bundle_stride);
}

/* Grow a scratch buffer to at least need bytes (before load only: never on the hot path). */
static int ensure_capacity(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return FG_OK;
    void *p = NULL;
    if (posix_memalign(&p, 64, need) != 0) return FG_ERR_NOMEM;
    memset(p, 0, need);
    free(*buf);
    *buf = p;
    *cap = need;
    return FG_OK;
}

/* Set a layer's layout (already checked) and pick its kernels; the quantized-input buffers
 * grow to hold max_tokens rows of its activation types. */
static int apply_layout(fg_runtime *rt, fg_layer *L, const int32_t *part_type,
                        const int64_t *part_offset, int64_t stride) {
    const fg_config *c = &rt->cfg;
    fg_layout *lay = &L->lay;
    memcpy(lay->part_type, part_type, sizeof lay->part_type);
    memcpy(lay->part_offset, part_offset, sizeof lay->part_offset);
    if (!c->gated) { /* the gate slots are not read; keep them inert */
        lay->part_type[FG_PART_GATE] = FG_TYPE_F32;
        lay->part_offset[FG_PART_GATE] = 0;
    }
    lay->stride = stride;
    if (c->split_rows) {
        lay->up_start = 0;
        lay->up_step = part_offset[FG_PART_DOWN];
        lay->down_start = (int64_t)c->n_ff * part_offset[FG_PART_DOWN];
        lay->down_step = stride - part_offset[FG_PART_DOWN];
    } else {
        lay->up_start = part_offset[FG_PART_UP];
        lay->down_start = part_offset[FG_PART_DOWN];
        lay->up_step = lay->down_step = stride;
    }
    const int gate_vt = c->gated ? fg_vec_dot_type(part_type[FG_PART_GATE]) : FG_TYPE_F32;
    const int up_vt = fg_vec_dot_type(part_type[FG_PART_UP]);
    lay->dot_gate = c->gated ? fg_vec_dot_fast_fn(part_type[FG_PART_GATE]) : NULL;
    lay->dot_up = fg_vec_dot_fast_fn(part_type[FG_PART_UP]);
    lay->quant_gate = c->gated ? fg_quantize_fast_fn(gate_vt) : NULL;
    lay->quant_up = fg_quantize_fast_fn(up_vt);
    lay->axpy_down = fg_axpy_fast_fn(part_type[FG_PART_DOWN]);
    lay->xq_gate_row = c->gated ? fg_row_size(gate_vt, c->n_embd) : 0;
    L->gate_row_bytes = c->gate_resident ? fg_row_size(part_type[FG_PART_GATE], c->n_embd) : 0;
    lay->xq_up_row = fg_row_size(up_vt, c->n_embd);
    const size_t rows = (size_t)c->max_tokens;
    int rc = ensure_capacity(&rt->xq_up, &rt->xq_up_cap, rows * lay->xq_up_row);
    if (rc == FG_OK) {
        rc = ensure_capacity(&rt->xq_gate, &rt->xq_gate_cap, rows * lay->xq_gate_row);
    }
    return rc;
}

int fg_runtime_create(const fg_config *cfg, const char *path, fg_runtime **out) {
    *out = NULL;
    int rc = check_config(cfg);
    if (rc != FG_OK) return rc;
    fg_runtime *rt = calloc(1, sizeof *rt);
    if (rt == NULL) return FG_ERR_NOMEM;
    rt->cfg = *cfg;
    rt->reader.fd = -1;
    const fg_config *c = &rt->cfg;

    rc = fg_reader_open(&rt->reader, path, c->use_direct_io, FG_LOAD_CHUNK);
    if (rc != FG_OK) {
        free(rt);
        return rc;
    }
    rt->dot_q8 = fg_vec_dot_fast_fn(FG_TYPE_Q8_0);
    rt->quant_q8 = fg_quantize_fast_fn(FG_TYPE_Q8_0);

    const size_t rows = (size_t)c->max_tokens;
    const size_t embd = (size_t)c->n_embd;
    const size_t max_threads = fg_max_threads(c);
    rt->layers = calloc((size_t)c->n_layer, sizeof *rt->layers);
    rt->pending_rows = calloc((size_t)c->n_layer, sizeof *rt->pending_rows);
    rt->partial = alloc_zeroed(max_threads * rows * embd * sizeof(float));
    rt->hidden = alloc_zeroed(max_threads * 2 * rows * sizeof(float));
    rt->ffn_out = alloc_zeroed(rows * embd * sizeof(float));
    int ok = rt->layers && rt->pending_rows && rt->partial && rt->hidden && rt->ffn_out;
    for (int32_t l = 0; ok && l < c->n_layer; l++) {
        rt->layers[l].weight = 1.0;
        rt->layers[l].gate_keep = c->gate_keep;
        ok = apply_layout(rt, &rt->layers[l], c->part_type, c->part_offset,
                          c->bundle_stride) == FG_OK;
    }
    if (ok && c->n_embd % QK8_0 == 0) {
        rt->pred_xq = alloc_zeroed(fg_row_size(FG_TYPE_Q8_0, c->n_embd));
        ok = rt->pred_xq != NULL;
    }
    if (ok && c->read_log_cap > 0) {
        rt->reader.log.offset = calloc((size_t)c->read_log_cap, sizeof(uint64_t));
        rt->reader.log.len = calloc((size_t)c->read_log_cap, sizeof(uint64_t));
        rt->reader.log.cap = (size_t)c->read_log_cap;
        ok = rt->reader.log.offset && rt->reader.log.len;
    }
    if (!ok) {
        fg_runtime_destroy(rt);
        return FG_ERR_NOMEM;
    }
    *out = rt;
    return FG_OK;
}

void fg_runtime_destroy(fg_runtime *rt) {
    if (rt == NULL) return;
    fg_io_destroy(&rt->io); /* first: its workers may touch the reader */
    if (rt->layers != NULL) {
        for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
            fg_layer *L = &rt->layers[l];
            free(L->bundles);
            free(L->gate_rows);
            free(L->up_bias);
            free(L->gate_bias);
            free(L->down_bias);
            free(L->down_norm);
            fg_predictor_release(&L->pred);
            fg_cache_free(&L->cache);
        }
    }
    free(rt->layers);
    free(rt->pending_rows);
    free(rt->xq_gate);
    free(rt->xq_up);
    free(rt->partial);
    free(rt->hidden);
    free(rt->ffn_out);
    free(rt->need_mask);
    free(rt->need);
    free(rt->res_rows);
    free(rt->res_idx);
    free(rt->miss_rows);
    free(rt->miss_idx);
    free(rt->reads);
    free(rt->copies);
    free(rt->gate_act);
    free(rt->select_scratch);
    free(rt->pred_xq);
    free(rt->pred_z);
    free(rt->pred_zq);
    fg_runtime_trace_stop(rt);
    fg_reader_close(&rt->reader);
    free(rt);
}

static int copy_bias(float **dst, const float *src, size_t n) {
    free(*dst);
    *dst = NULL;
    if (src == NULL) return FG_OK;
    *dst = malloc(n * sizeof(float));
    if (*dst == NULL) return FG_ERR_NOMEM;
    memcpy(*dst, src, n * sizeof(float));
    return FG_OK;
}

int fg_runtime_set_layer_layout(fg_runtime *rt, int32_t layer, const int32_t *part_type,
                                const int64_t *part_offset, int64_t stride) {
    if (layer < 0 || layer >= rt->cfg.n_layer || part_type == NULL || part_offset == NULL) {
        return FG_ERR_ARG;
    }
    if (rt->loaded) return FG_ERR_STATE;
    const int rc = check_layout(&rt->cfg, part_type, part_offset, stride);
    return rc != FG_OK ? rc : apply_layout(rt, &rt->layers[layer], part_type, part_offset, stride);
}

int fg_runtime_set_layer(fg_runtime *rt, int32_t layer, uint64_t bundle_offset,
                         const float *up_bias, const float *gate_bias, const float *down_bias) {
    if (layer < 0 || layer >= rt->cfg.n_layer) return FG_ERR_ARG;
    fg_layer *L = &rt->layers[layer];
    const size_t n_ff = (size_t)rt->cfg.n_ff;
    int rc = copy_bias(&L->up_bias, up_bias, n_ff);
    if (rc == FG_OK) rc = copy_bias(&L->gate_bias, rt->cfg.gated ? gate_bias : NULL, n_ff);
    if (rc == FG_OK) rc = copy_bias(&L->down_bias, down_bias, (size_t)rt->cfg.n_embd);
    if (rc != FG_OK) return rc;
    L->bundle_offset = bundle_offset;
    L->has_offset = 1;
    return FG_OK;
}

int fg_runtime_set_gate_rows(fg_runtime *rt, int32_t layer, uint64_t offset) {
    if (layer < 0 || layer >= rt->cfg.n_layer) return FG_ERR_ARG;
    if (!rt->cfg.gate_resident) return FG_ERR_STATE;
    if (rt->loaded) return FG_ERR_STATE;
    rt->layers[layer].gate_offset = offset;
    rt->layers[layer].has_gate_offset = 1;
    return FG_OK;
}

/* ---- budget plan ------------------------------------------------------------------ */

/* What stays in DRAM whatever the budget: the predictors and resident gate matrices. */
static int64_t fixed_bytes(const fg_runtime *rt) {
    int64_t total = 0;
    for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
        const fg_layer *L = &rt->layers[l];
        total += (int64_t)L->pred.nbytes + (int64_t)L->gate_row_bytes * rt->cfg.n_ff;
    }
    return total;
}

/* Rows a layer of capacity slots pins: hybrid pins every slot (the rest of the layer is
 * read each token: a fixed resident share cannot cycle), and so does gate mode (a token
 * needs 80% of the rows: a cache smaller than that cycles; SmolLM2, 1,000 tokens at a 0.5
 * budget, all slots pinned read 30.5 MiB per token, a 0.25 pinned share 38.9 MiB and 1.009x
 * the perplexity; at 0.7, 18.3 against 30.2 MiB with half pinned), predicted its pinned
 * share (the rest is the cache), naive none (it has no slots). */
static int32_t pinned_rows(const fg_config *c, int32_t capacity) {
    switch (c->mode) {
    case FG_MODE_HYBRID:
    case FG_MODE_GATE: return capacity;
    case FG_MODE_PREDICTED: return (int32_t)((double)c->pinned_share * capacity);
    default: return 0;
    }
}

/* The predictors and gate matrices are a budget's only minimum: a miss without a slot is
 * computed from the read engine's staging buffer, which is working memory beside the budget
 * (as llama.cpp's compute buffers are beside its weights), not part of it: a fixed 4 MiB
 * would be most of a small model's budget. */
int64_t fg_runtime_min_budget(const fg_runtime *rt) { return fixed_bytes(rt); }

/* Split the budget left after the predictors into per-layer capacities by layer
 * weight (expected active rows), a layer never past n_ff, what a full layer cannot take
 * going to the others; naive mode keeps no rows. FG_ERR_BUDGET below the minimum. */
static int split_budget(const fg_runtime *rt, int32_t *capacity) {
    const fg_config *c = &rt->cfg;
    int64_t remaining = c->dram_budget - fg_runtime_min_budget(rt);
    if (remaining < 0) return FG_ERR_BUDGET;
    for (int32_t l = 0; l < c->n_layer; l++) capacity[l] = 0;
    if (c->mode == FG_MODE_NAIVE) return FG_OK;
    for (int32_t pass = 0; pass < c->n_layer && remaining > 0; pass++) {
        double open_weight = 0.0;
        for (int32_t l = 0; l < c->n_layer; l++) {
            if (capacity[l] < c->n_ff) open_weight += rt->layers[l].weight;
        }
        if (open_weight <= 0.0) break;
        int64_t given = 0;
        for (int32_t l = 0; l < c->n_layer; l++) {
            if (capacity[l] >= c->n_ff) continue;
            const int64_t stride = rt->layers[l].lay.stride;
            int64_t add = (int64_t)((double)remaining * rt->layers[l].weight / open_weight) /
                          stride;
            if (add > c->n_ff - capacity[l]) add = c->n_ff - capacity[l];
            capacity[l] += (int32_t)add;
            given += add * stride;
        }
        remaining -= given;
        if (given == 0) break;
    }
    return FG_OK;
}

int fg_runtime_plan(const fg_runtime *rt, int32_t *capacity, int32_t *pinned) {
    const fg_config *c = &rt->cfg;
    if (capacity == NULL || pinned == NULL) return FG_ERR_ARG;
    if (c->mode == FG_MODE_DENSE) return FG_ERR_STATE;
    const int rc = split_budget(rt, capacity);
    if (rc != FG_OK) return rc;
    for (int32_t l = 0; l < c->n_layer; l++) pinned[l] = pinned_rows(c, capacity[l]);
    return FG_OK;
}

int fg_runtime_set_layer_weight(fg_runtime *rt, int32_t layer, double weight) {
    if (layer < 0 || layer >= rt->cfg.n_layer || !(weight > 0.0) || !isfinite(weight)) {
        return FG_ERR_ARG;
    }
    if (rt->loaded) return FG_ERR_STATE;
    rt->layers[layer].weight = weight;
    return FG_OK;
}

int fg_runtime_set_gate_keep(fg_runtime *rt, int32_t layer, float keep) {
    if (layer < 0 || layer >= rt->cfg.n_layer || !(keep > 0.0f) || !(keep <= 1.0f)) {
        return FG_ERR_ARG;
    }
    rt->layers[layer].gate_keep = keep;
    return FG_OK;
}

int fg_runtime_set_down_norm(fg_runtime *rt, int32_t layer, const float *norm) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || norm == NULL) return FG_ERR_ARG;
    if (!c->split_rows || rt->loaded) return FG_ERR_STATE;
    for (int32_t i = 0; i < c->n_ff; i++) {
        if (!(norm[i] >= 0.0f) || !isfinite(norm[i])) return FG_ERR_ARG;
    }
    return copy_bias(&rt->layers[layer].down_norm, norm, (size_t)c->n_ff);
}

/* ---- load ------------------------------------------------------------------------- */

/* Read bytes at offset into *buf, allocated (aligned for direct I/O) on first use. */
static int read_resident(fg_runtime *rt, uint64_t offset, size_t bytes, uint8_t **buf) {
    if (*buf == NULL) {
        void *p = NULL;
        if (posix_memalign(&p, FG_IO_ALIGN, bytes ? bytes : FG_IO_ALIGN) != 0) {
            return FG_ERR_NOMEM;
        }
        *buf = p;
    }
    return fg_reader_read(&rt->reader, offset, bytes, *buf);
}

/* Every layer's resident gate matrix (cfg.gate_resident), whatever the mode. */
static int load_gate_rows(fg_runtime *rt) {
    for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
        fg_layer *L = &rt->layers[l];
        const int rc = read_resident(rt, L->gate_offset, (size_t)rt->cfg.n_ff * L->gate_row_bytes,
                                     &L->gate_rows);
        if (rc != FG_OK) return rc;
    }
    return FG_OK;
}

static int load_dense(fg_runtime *rt) {
    /* the row list of masked calls (fg_runtime_ffn_masked) */
    rt->miss_idx = malloc((size_t)rt->cfg.n_ff * sizeof *rt->miss_idx);
    if (rt->miss_idx == NULL) return FG_ERR_NOMEM;
    for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
        fg_layer *L = &rt->layers[l];
        const int rc = read_resident(rt, L->bundle_offset,
                                     (size_t)rt->cfg.n_ff * (size_t)L->lay.stride, &L->bundles);
        if (rc != FG_OK) return rc;
    }
    return FG_OK;
}

static int alloc_streaming_scratch(fg_runtime *rt) {
    const size_t n_ff = (size_t)rt->cfg.n_ff;
    rt->need_mask = calloc(n_ff, 1);
    rt->need = malloc(n_ff * sizeof *rt->need);
    rt->res_rows = malloc(n_ff * sizeof *rt->res_rows);
    rt->res_idx = malloc(n_ff * sizeof *rt->res_idx);
    rt->miss_rows = malloc(n_ff * sizeof *rt->miss_rows);
    rt->miss_idx = malloc(n_ff * sizeof *rt->miss_idx);
    rt->reads = malloc(n_ff * sizeof *rt->reads);
    rt->copies = malloc(n_ff * sizeof *rt->copies);
    if (rt->cfg.mode == FG_MODE_GATE) {
        rt->gate_act = malloc((size_t)rt->cfg.max_tokens * n_ff * sizeof *rt->gate_act);
        rt->select_scratch = malloc(fg_max_threads(&rt->cfg) * n_ff * sizeof *rt->select_scratch);
        if (!rt->gate_act || !rt->select_scratch) return FG_ERR_NOMEM;
    }
    if (!rt->need_mask || !rt->need || !rt->res_rows || !rt->res_idx || !rt->miss_rows ||
        !rt->miss_idx || !rt->reads || !rt->copies) {
        return FG_ERR_NOMEM;
    }
    return FG_OK;
}

static int load_streaming(fg_runtime *rt) {
    const fg_config *c = &rt->cfg;
    for (int32_t l = 0; l < c->n_layer; l++) {
        if (c->mode == FG_MODE_PREDICTED && rt->layers[l].pred.rank == 0) return FG_ERR_STATE;
    }
    int32_t *capacities = malloc((size_t)c->n_layer * sizeof *capacities);
    if (capacities == NULL) return FG_ERR_NOMEM;
    int rc = split_budget(rt, capacities);
    if (rc == FG_OK) rc = alloc_streaming_scratch(rt);
    rt->stats.pinned_neurons = 0;
    for (int32_t l = 0; rc == FG_OK && l < c->n_layer; l++) {
        fg_layer *L = &rt->layers[l];
        const int32_t capacity = capacities[l];
        const int32_t pinned = pinned_rows(c, capacity);
        rc = fg_cache_alloc(&L->cache, c->n_ff, capacity, pinned, (size_t)L->lay.stride);
        if (rc == FG_OK && pinned > 0 && !c->split_rows) {
            rc = fg_reader_read(&rt->reader, L->bundle_offset,
                                (size_t)pinned * (size_t)L->lay.stride, L->cache.slots);
        } else if (rc == FG_OK && pinned > 0) { /* the pinned up rows, then their down rows */
            const size_t up = (size_t)pinned * (size_t)L->lay.up_step;
            rc = fg_reader_read(&rt->reader, L->bundle_offset, up, L->cache.slots);
            if (rc == FG_OK) {
                rc = fg_reader_read(&rt->reader, L->bundle_offset + (uint64_t)L->lay.down_start,
                                    (size_t)pinned * (size_t)L->lay.down_step,
                                    L->cache.slots + up);
            }
        }
        rt->stats.pinned_neurons += (uint64_t)pinned;
    }
    free(capacities);
    if (rc == FG_OK) {
        rc = fg_io_init(&rt->io, &rt->reader, c->io_backend, c->io_depth,
                        (size_t)c->max_read_bytes, c->n_ff);
    }
    return rc;
}

int fg_runtime_load(fg_runtime *rt) {
    if (rt->loaded) return FG_ERR_STATE;
    for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
        const fg_layer *L = &rt->layers[l];
        if (!L->has_offset || (rt->cfg.gate_resident && !L->has_gate_offset)) return FG_ERR_STATE;
        if (rt->cfg.split_rows && rt->cfg.mode == FG_MODE_GATE && L->down_norm == NULL) {
            return FG_ERR_STATE;
        }
    }
    const double t0 = fg_now_seconds();
    int rc = rt->cfg.gate_resident ? load_gate_rows(rt) : FG_OK;
    if (rc == FG_OK) rc = rt->cfg.mode == FG_MODE_DENSE ? load_dense(rt) : load_streaming(rt);
    rt->stats.time_io_wait_s += fg_now_seconds() - t0;
    rt->stats.bytes_read = rt->reader.bytes_read;
    rt->stats.reads = rt->reader.reads;
    if (rc == FG_OK) {
        rt->loaded = 1;
        fg_reader_drop_bounce(&rt->reader); /* 8 MiB that only the loads needed */
    }
    return rc;
}

int fg_runtime_layer_capacity(const fg_runtime *rt, int32_t layer, int32_t *capacity,
                              int32_t *pinned) {
    if (layer < 0 || layer >= rt->cfg.n_layer) return FG_ERR_ARG;
    if (!rt->loaded) return FG_ERR_STATE;
    const fg_cache *C = &rt->layers[layer].cache;
    const int dense = rt->cfg.mode == FG_MODE_DENSE;
    *capacity = dense ? rt->cfg.n_ff : C->capacity;
    *pinned = dense ? rt->cfg.n_ff : C->n_pinned;
    return FG_OK;
}

int fg_runtime_io_backend(const fg_runtime *rt) { return rt->loaded ? rt->io.backend : 0; }

int fg_runtime_direct_io(const fg_runtime *rt) { return rt->reader.direct; }

int fg_runtime_io_alignment(const fg_runtime *rt) {
    return rt->reader.direct ? (int)rt->reader.dio_align : 1;
}

/* ---- FFN arithmetic --------------------------------------------------------------- */

static inline void prefetch_bytes(const uint8_t *p, int64_t n) {
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off);
}

/* Rows [k0, k1) of a list for every token, summed into acc: row k is rows[k] (neuron
 * idx[k]), or with rows == NULL the dense bundle row k. */
static void ffn_rows(const fg_runtime *rt, const fg_layer *L, const uint8_t *const *rows,
                     const int32_t *idx, int64_t k0, int64_t k1, int32_t n_tokens, float *acc,
                     float *gate_vals, float *up_vals) {
    const fg_config *c = &rt->cfg;
    const fg_layout *lay = &L->lay;
    const int64_t embd = c->n_embd;
    for (int64_t k = k0; k < k1; k++) {
        if (k + FG_PREFETCH_ROWS < k1) { /* decode streams the rows from memory */
            const int64_t kp = k + FG_PREFETCH_ROWS;
            if (rows != NULL) {
                prefetch_bytes(rows[kp], lay->stride);
            } else if (lay->up_step == lay->stride) { /* one row holds every part */
                prefetch_bytes(L->bundles + (idx != NULL ? idx[kp] : kp) * lay->stride,
                               lay->stride);
            } else { /* split rows: the up row and the down row */
                const int64_t ip = idx != NULL ? idx[kp] : kp;
                prefetch_bytes(fg_dense_up(L, ip), lay->up_step);
                prefetch_bytes(fg_dense_down(L, ip), lay->down_step);
            }
        }
        const int64_t i = idx != NULL ? idx[k] : k;
        const uint8_t *up_w, *down_w;
        if (rows != NULL) {
            up_w = rows[k] + lay->part_offset[FG_PART_UP];
            down_w = rows[k] + lay->part_offset[FG_PART_DOWN];
        } else {
            up_w = fg_dense_up(L, i);
            down_w = fg_dense_down(L, i);
        }
        const uint8_t *row = rows != NULL ? rows[k] : L->bundles + i * lay->stride;
        for (int32_t t = 0; t < n_tokens; t++) {
            lay->dot_up(up_w, rt->xq_up + (size_t)t * lay->xq_up_row, embd, &up_vals[t]);
        }
        if (L->up_bias != NULL) {
            for (int32_t t = 0; t < n_tokens; t++) up_vals[t] += L->up_bias[i];
        }
        if (c->gated) {
            if (rt->gate_act_now != NULL) { /* FG_MODE_GATE computed act(gate) to choose */
                for (int32_t t = 0; t < n_tokens; t++) {
                    gate_vals[t] = rt->gate_act_now[(size_t)t * (size_t)c->n_ff + (size_t)i];
                }
            } else {
                const uint8_t *gate_w = L->gate_rows != NULL
                                            ? L->gate_rows + (size_t)i * L->gate_row_bytes
                                            : row + lay->part_offset[FG_PART_GATE];
                for (int32_t t = 0; t < n_tokens; t++) {
                    lay->dot_gate(gate_w, rt->xq_gate + (size_t)t * lay->xq_gate_row, embd,
                                  &gate_vals[t]);
                }
                if (L->gate_bias != NULL) {
                    for (int32_t t = 0; t < n_tokens; t++) gate_vals[t] += L->gate_bias[i];
                }
                fg_activate(c->activation, c->activation_threshold, gate_vals, n_tokens);
            }
            if (c->activation == FG_ACT_DRELU) {
                fg_activate(FG_ACT_RELU, 0.0f, up_vals, n_tokens);
            }
            for (int32_t t = 0; t < n_tokens; t++) up_vals[t] *= gate_vals[t];
        } else {
            fg_activate(c->activation, c->activation_threshold, up_vals, n_tokens);
        }
        for (int32_t t = 0; t < n_tokens; t++) {
            if (up_vals[t] != 0.0f) { /* exact zeros (ReLU family) cost nothing */
                lay->axpy_down(down_w, up_vals[t], acc + (size_t)t * (size_t)embd, embd);
            }
        }
    }
}

/* What ffn_rows needs besides the rows: one thread's sums and scratch. */
typedef struct ffn_sums {
    int32_t n_tokens;
    float *acc, *gate_vals, *up_vals;
} ffn_sums;

static void landed_ffn_rows(const fg_runtime *rt, const fg_layer *L, int32_t k0, int32_t k1,
                            void *arg) {
    const ffn_sums *s = arg;
    ffn_rows(rt, L, rt->miss_rows, rt->miss_idx, k0, k1, s->n_tokens, s->acc, s->gate_vals,
             s->up_vals);
}

void fg_partial_clear(fg_runtime *rt, int32_t n_tokens) {
    const size_t embd = (size_t)rt->cfg.n_embd;
    rt->partial_threads = fg_call_threads(&rt->cfg, n_tokens);
    for (int k = 0; k < rt->partial_threads; k++) {
        memset(rt->partial + (size_t)k * (size_t)rt->cfg.max_tokens * embd, 0,
               (size_t)n_tokens * embd * sizeof(float));
    }
}

/* The per-thread partial sums of a call, from zero: n rows of a list split across the
 * threads, then (streaming) every thread computes the engine's reads as they land. Small
 * calls run on the calling thread: a parallel region costs more than it saves there, and
 * on a loaded machine one descheduled thread stalls the others at its barrier. Returns the
 * seconds the calling thread was blocked on the device. */
static double ffn_accumulate(fg_runtime *rt, const fg_layer *L, const uint8_t *const *rows,
                             const int32_t *idx, int64_t n, int64_t n_work, int32_t n_tokens,
                             int with_reads) {
    const fg_config *c = &rt->cfg;
    const size_t embd = (size_t)c->n_embd;
    fg_partial_clear(rt, n_tokens);
    double waited = 0.0;
    int64_t next_chunk = 0;
#ifdef _OPENMP
#pragma omp parallel if (n_work * n_tokens >= FG_MIN_PARALLEL_ROWS) \
    num_threads(rt->partial_threads)
#else
    (void)n_work; /* it only decides whether the OpenMP region forks */
#endif
    {
        const int tid = team_index(), nth = team_size();
        float *acc = rt->partial + (size_t)tid * (size_t)c->max_tokens * embd;
        float *gate_vals = rt->hidden + (size_t)tid * 2 * (size_t)c->max_tokens;
        float *up_vals = gate_vals + c->max_tokens;
        if (!with_reads) { /* all resident: a static split, deterministic like ggml's */
            ffn_rows(rt, L, rows, idx, n * tid / nth, n * (tid + 1) / nth, n_tokens, acc,
                     gate_vals, up_vals);
        } else { /* streaming (landing order varies anyway): chunks taken as threads free
                  * up, so a thread descheduled by other load holds back one chunk, not half
                  * of the resident rows, before everyone waits for it at the join */
            for (;;) {
                const int64_t k0 =
                    __atomic_fetch_add(&next_chunk, FG_CHUNK_ROWS, __ATOMIC_RELAXED);
                if (k0 >= n) break;
                ffn_rows(rt, L, rows, idx, k0, k0 + FG_CHUNK_ROWS < n ? k0 + FG_CHUNK_ROWS : n,
                         n_tokens, acc, gate_vals, up_vals);
            }
            ffn_sums sums = {n_tokens, acc, gate_vals, up_vals};
            const double w = fg_consume_reads(rt, L, (size_t)L->lay.stride, landed_ffn_rows,
                                              &sums);
            if (tid == 0) waited = w;
        }
    }
    return waited;
}

/* y = sum of the partial sums (+ down bias); each thread owns a slice of the output. */
void fg_ffn_reduce(fg_runtime *rt, const fg_layer *L, float *y, int32_t n_tokens) {
    const fg_config *c = &rt->cfg;
    const size_t embd = (size_t)c->n_embd;
    const size_t n_out = (size_t)n_tokens * embd;
    const int parts = rt->partial_threads;
#ifdef _OPENMP
#pragma omp parallel if (n_out >= FG_MIN_PARALLEL_OUT) num_threads(parts)
#endif
    {
        const int tid = team_index(), nth = team_size();
        const size_t e0 = n_out * (size_t)tid / (size_t)nth;
        const size_t e1 = n_out * (size_t)(tid + 1) / (size_t)nth;
        for (size_t e = e0; e < e1; e++) {
            float s = rt->partial[e];
            for (int k = 1; k < parts; k++) s += rt->partial[(size_t)k * c->max_tokens * embd + e];
            if (L->down_bias != NULL) s += L->down_bias[e % embd];
            y[e] = s;
        }
    }
}

/* The FFN input in each part's activation type (ggml's vec_dot_type), for this layer. */
void fg_quantize_inputs(fg_runtime *rt, const fg_layer *L, const float *x, int32_t n_tokens) {
    const fg_config *c = &rt->cfg;
    const fg_layout *lay = &L->lay;
    const size_t embd = (size_t)c->n_embd;
    for (int32_t t = 0; t < n_tokens; t++) {
        lay->quant_up(x + t * embd, rt->xq_up + (size_t)t * lay->xq_up_row, c->n_embd);
        if (c->gated) {
            lay->quant_gate(x + t * embd, rt->xq_gate + (size_t)t * lay->xq_gate_row,
                            c->n_embd);
        }
    }
}

/* ---- streaming: decide, look up, read, compute ------------------------------------ */

int32_t fg_needed_rows(fg_runtime *rt, const fg_layer *L, const float *x, int32_t n_tokens,
                       const uint8_t *mask) {
    const fg_config *c = &rt->cfg;
    int32_t n = 0;
    if (mask != NULL) {
        for (int32_t i = 0; i < c->n_ff; i++) {
            if (mask[i]) rt->need[n++] = i;
        }
        return n;
    }
    if (c->mode != FG_MODE_PREDICTED && c->mode != FG_MODE_GATE) { /* naive, hybrid: all */
        for (int32_t i = 0; i < c->n_ff; i++) rt->need[n++] = i;
        return n;
    }
    const int32_t pinned = L->cache.n_pinned;
    memset(rt->need_mask + pinned, 0, (size_t)(c->n_ff - pinned));
    if (c->mode == FG_MODE_GATE) {
        fg_gate_select(rt, L, n_tokens, pinned, rt->need_mask, 0);
        rt->gate_act_now = rt->gate_act;
    } else {
        fg_predict_rows(rt, L, x, n_tokens, pinned, rt->need_mask, 0);
    }
    for (int32_t i = 0; i < pinned; i++) rt->need[n++] = i;
    for (int32_t i = pinned; i < c->n_ff; i++) {
        if (rt->need_mask[i]) rt->need[n++] = i;
    }
    return n;
}

/* Coalesce rows (ascending) into reads: a row joins the previous read when at most
 * coalesce_gap rows lie between them (coalesce_gap -1: when the bytes read through to reach
 * it are at most coalesce_bytes, a read's fixed cost measured in bytes of transfer), or
 * when its aligned blocks touch the read's (then joining costs no extra bytes), and the
 * read stays within one staging buffer. Direct I/O reads whole aligned blocks around the
 * rows. */
int32_t fg_plan_reads(fg_runtime *rt, uint64_t base, uint64_t step, uint64_t len,
                      const int32_t *rows, const uint8_t *const *dst, int32_t n) {
    const fg_config *c = &rt->cfg;
    const uint64_t align = rt->reader.direct ? rt->reader.dio_align : 1;
    const uint64_t cap = rt->io.staging_cap;
    int32_t n_reads = 0;
    for (int32_t k = 0; k < n; k++) {
        const uint64_t start = base + (uint64_t)rows[k] * step;
        const uint64_t end = start + len;
        const uint64_t end_aligned = (end + align - 1) / align * align;
        const uint64_t first = start / align * align;
        const fg_read *prev = n_reads > 0 ? &rt->reads[n_reads - 1] : NULL;
        int join = 0;
        if (prev != NULL && end_aligned - prev->offset <= cap) {
            const uint64_t prev_end = prev->offset + prev->len;
            join = first <= prev_end ||
                   (c->coalesce_gap >= 0 ? rows[k] - rows[k - 1] - 1 <= c->coalesce_gap
                                         : first - prev_end <= (uint64_t)c->coalesce_bytes);
        }
        if (join) {
            fg_read *rd = &rt->reads[n_reads - 1];
            rd->len = end_aligned - rd->offset;
            rd->need = end - rd->offset;
            rt->copies[k] = (fg_copy){start - rd->offset, (uint8_t *)dst[k]};
            rd->n_copy++;
            continue;
        }
        rt->reads[n_reads++] = (fg_read){first, end_aligned - first, end - first, k, 1};
        rt->copies[k] = (fg_copy){start - first, (uint8_t *)dst[k]};
    }
    return n_reads;
}

/* The reads meant to fill these rows' slots failed: the slots do not hold the rows. */
static void forget_admitted(fg_cache *C, const int32_t *rows, int32_t n) {
    for (int32_t k = 0; k < n; k++) {
        const int32_t s = C->slot_of[rows[k]];
        if (s >= 0) fg_cache_forget(C, s);
    }
}

double fg_consume_reads(fg_runtime *rt, const fg_layer *L, size_t row_bytes,
                        fg_landed_rows_fn compute, void *arg) {
    double waited = 0.0;
    fg_landed got;
    while (fg_io_next_timed(&rt->io, &got, &waited)) {
        if (got.status == FG_OK) {
            const fg_read *rd = &rt->reads[got.read];
            const uint8_t *buf = fg_io_buffer(&rt->io, &got);
            const int32_t k0 = rd->copy0, k1 = rd->copy0 + rd->n_copy;
            for (int32_t k = k0; k < k1; k++) rt->miss_rows[k] = buf + rt->copies[k].src;
            compute(rt, L, k0, k1, arg);
            for (int32_t k = k0; k < k1; k++) {
                if (rt->copies[k].dst != NULL) {
                    memcpy(rt->copies[k].dst, rt->miss_rows[k], row_bytes);
                }
            }
        }
        fg_io_release(&rt->io, &got);
    }
    return waited;
}

int fg_io_next_timed(fg_io *io, fg_landed *got, double *waited) {
    const double t0 = fg_now_seconds();
    const int more = fg_io_next(io, got);
    *waited += fg_now_seconds() - t0;
    return more;
}

/* One call of a streaming layer: the rows it needs are resident (pinned, cache hits) or
 * missed; every miss is read at once (as staging buffers allow) and computed as its read
 * lands, while the resident rows are computed. A miss takes a cache slot only from a row
 * this call does not use: on a layer that needs more rows than its slots, the slots keep
 * a stable share (hits every token) and the rest is computed from the staging buffers
 * without being kept, instead of the LRU cycling through the layer. */
static int ffn_streaming(fg_runtime *rt, int32_t layer, const float *x, float *y,
                         int32_t n_tokens, const uint8_t *mask) {
    const fg_config *c = &rt->cfg;
    fg_layer *L = &rt->layers[layer];
    fg_cache *C = &L->cache;
    const size_t stride = (size_t)L->lay.stride;
    C->clock += (uint64_t)n_tokens;
    const double t0 = fg_now_seconds();
    const int32_t n_need = fg_needed_rows(rt, L, x, n_tokens, mask);
    const double t1 = fg_now_seconds();
    rt->stats.time_predict_s += t1 - t0;

    const uint64_t round = ++rt->round; /* marks the slots this call uses */
    int32_t n_res = 0, n_miss = 0, n_pinned = 0;
    for (int32_t k = 0; k < n_need; k++) {
        const int32_t i = rt->need[k];
        const int32_t s = C->slot_of[i];
        if (s >= 0) {
            fg_cache_touch(C, s, round);
            rt->res_rows[n_res] = C->slots + (size_t)s * stride;
            rt->res_idx[n_res++] = i;
            n_pinned += s < C->n_pinned;
        } else {
            rt->miss_idx[n_miss++] = i;
        }
    }
    for (int32_t k = 0; k < n_miss; k++) { /* admission: a slot or computed in passing */
        int in_window = 0;
        const int32_t s = fg_cache_take(C, rt->miss_idx[k], round, c->window_tokens, &in_window);
        rt->stats.window_evictions += (uint64_t)in_window;
        rt->miss_rows[k] = s >= 0 ? C->slots + (size_t)s * stride : NULL;
    }
    rt->stats.cache_hits += (uint64_t)(n_res - n_pinned);
    rt->stats.cache_misses += (uint64_t)n_miss;
    rt->stats.bytes_needed += (uint64_t)n_miss * stride;

    const int32_t n_reads = fg_plan_reads(rt, L->bundle_offset, (uint64_t)stride, (uint64_t)stride,
                                          rt->miss_idx, rt->miss_rows, n_miss);
    const uint64_t bytes_before = rt->reader.bytes_read;
    int rc = fg_io_submit(&rt->io, rt->reads, n_reads);
    if (rc != FG_OK) {
        forget_admitted(C, rt->miss_idx, n_miss);
        return rc;
    }
    const double waited = ffn_accumulate(rt, L, rt->res_rows, rt->res_idx, n_res, n_need,
                                         n_tokens, 1);
    rc = fg_io_end(&rt->io);
    rt->stats.bytes_read = rt->reader.bytes_read;
    rt->stats.reads = rt->reader.reads;
    if (rc != FG_OK) {
        forget_admitted(C, rt->miss_idx, n_miss);
        return rc;
    }
    fg_ffn_reduce(rt, L, y, n_tokens);
    const double t_ffn = (fg_now_seconds() - t1) - waited;
    rt->stats.time_io_wait_s += waited;
    rt->stats.time_ffn_s += t_ffn;
    rt->stats.neurons_computed += (uint64_t)n_need * (uint64_t)n_tokens;
    if (rt->trace.max_calls > 0) {
        fg_trace_call call = {layer, n_tokens, n_need, n_pinned, n_res - n_pinned, n_miss,
                              n_reads, 0, rt->reader.bytes_read - bytes_before, 0,
                              t1 - t0, waited, t_ffn};
        fg_trace_append(rt, &call);
    }
    return FG_OK;
}

static int ffn_dense(fg_runtime *rt, int32_t layer, const float *x, float *y, int32_t n_tokens,
                     const uint8_t *mask) {
    const fg_config *c = &rt->cfg;
    const fg_layer *L = &rt->layers[layer];
    const double t0 = fg_now_seconds();
    fg_quantize_inputs(rt, L, x, n_tokens);
    int64_t n = c->n_ff;
    const int32_t *idx = NULL;
    if (mask != NULL) {
        n = 0;
        for (int32_t i = 0; i < c->n_ff; i++) {
            if (mask[i]) rt->miss_idx[n++] = i;
        }
        idx = rt->miss_idx;
    }
    ffn_accumulate(rt, L, NULL, idx, n, n, n_tokens, 0);
    fg_ffn_reduce(rt, L, y, n_tokens);
    rt->stats.neurons_computed += (uint64_t)n * (uint64_t)n_tokens;
    rt->stats.time_ffn_s += fg_now_seconds() - t0;
    return FG_OK;
}

int fg_runtime_ffn_masked(fg_runtime *rt, int32_t layer, const float *x, float *y,
                          int32_t n_tokens, const uint8_t *mask) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || n_tokens <= 0 || n_tokens > c->max_tokens) {
        return FG_ERR_ARG;
    }
    if (!rt->loaded) return FG_ERR_STATE;
    const double t0 = fg_now_seconds();
    int rc;
    if (c->mode == FG_MODE_DENSE) {
        rc = ffn_dense(rt, layer, x, y, n_tokens, mask);
    } else {
        fg_quantize_inputs(rt, &rt->layers[layer], x, n_tokens);
        if (!c->split_rows) {
            rc = ffn_streaming(rt, layer, x, y, n_tokens, mask);
        } else {
            rc = mask == NULL ? fg_ffn_two_stage(rt, layer, y, n_tokens) : FG_ERR_STATE;
        }
        rt->gate_act_now = NULL;
    }
    if (rc == FG_OK && layer == 0) rt->stats.tokens += (uint64_t)n_tokens;
    rt->stats.time_total_s += fg_now_seconds() - t0;
    return rc;
}

int fg_runtime_ffn(fg_runtime *rt, int32_t layer, const float *x, float *y, int32_t n_tokens) {
    return fg_runtime_ffn_masked(rt, layer, x, y, n_tokens, NULL);
}

/* ---- errors, stats, inspection ---------------------------------------------------- */

int fg_runtime_take_error(fg_runtime *rt, char *msg, size_t msg_cap) {
    return fg_error_slot_take(&rt->err, msg, msg_cap);
}

void fg_runtime_get_stats(const fg_runtime *rt, fg_stats *out) {
    *out = rt->stats;
    out->bytes_read = rt->reader.bytes_read;
    out->reads = rt->reader.reads;
}

void fg_runtime_reset_stats(fg_runtime *rt) {
    const uint64_t pinned = rt->stats.pinned_neurons;
    memset(&rt->stats, 0, sizeof rt->stats);
    rt->stats.pinned_neurons = pinned;
    rt->reader.bytes_read = 0;
    rt->reader.reads = 0;
}

int fg_runtime_debug_slots(const fg_runtime *rt, int32_t layer, int32_t *row_of_slot,
                           uint64_t *last_used, uint64_t *clock) {
    if (layer < 0 || layer >= rt->cfg.n_layer) return FG_ERR_ARG;
    if (!rt->loaded || rt->cfg.mode == FG_MODE_DENSE) return FG_ERR_STATE;
    const fg_cache *C = &rt->layers[layer].cache;
    memcpy(row_of_slot, C->row_of, (size_t)C->capacity * sizeof *row_of_slot);
    memcpy(last_used, C->last_used, (size_t)C->capacity * sizeof *last_used);
    *clock = C->clock;
    return FG_OK;
}

int fg_runtime_debug_row(const fg_runtime *rt, int32_t layer, int32_t row, void *out) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || row < 0 || row >= c->n_ff) return FG_ERR_ARG;
    if (!rt->loaded) return FG_ERR_STATE;
    const fg_layer *L = &rt->layers[layer];
    const fg_layout *lay = &L->lay;
    const int dense = c->mode == FG_MODE_DENSE;
    const int32_t s = dense ? row : L->cache.slot_of[row];
    if (s < 0) return FG_ERR_ARG;
    if (!c->split_rows) {
        const uint8_t *base = dense ? L->bundles : L->cache.slots;
        memcpy(out, base + (size_t)s * (size_t)lay->stride, (size_t)lay->stride);
    } else { /* the row's parts, side by side */
        memcpy(out, dense ? fg_dense_up(L, s) : fg_pinned_up(L, s), (size_t)lay->up_step);
        memcpy((uint8_t *)out + lay->up_step, dense ? fg_dense_down(L, s) : fg_pinned_down(L, s),
               (size_t)lay->down_step);
    }
    return FG_OK;
}

int64_t fg_runtime_debug_reads(const fg_runtime *rt, uint64_t *offset, uint64_t *len,
                               int64_t cap) {
    const fg_read_log *log = &rt->reader.log;
    const size_t stored = log->n < log->cap ? log->n : log->cap;
    const size_t n = (size_t)cap < stored ? (size_t)cap : stored;
    memcpy(offset, log->offset, n * sizeof *offset);
    memcpy(len, log->len, n * sizeof *len);
    return (int64_t)log->n;
}

void fg_runtime_debug_delay_reads(fg_runtime *rt, int64_t delay_us, int32_t every) {
    if (rt->io.staging == NULL) return; /* no read engine yet (before load, dense mode) */
    pthread_mutex_lock(&rt->io.mu);
    rt->io.delay_us = delay_us > 0 ? delay_us : 0;
    rt->io.delay_every = every > 0 ? every : 0;
    pthread_mutex_unlock(&rt->io.mu);
}

void fg_runtime_debug_transient_reads(fg_runtime *rt, int kind, int64_t every) {
    const int on = every > 0 && (kind == FG_FAULT_SHORT || kind == FG_FAULT_EINTR ||
                                 kind == FG_FAULT_EAGAIN);
    __atomic_store_n(&rt->reader.transient_every, on ? every : 1, __ATOMIC_RELAXED);
    __atomic_store_n(&rt->reader.transient_count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&rt->reader.transient_kind, on ? kind : 0, __ATOMIC_RELAXED);
}

void fg_runtime_debug_fail_reads(fg_runtime *rt, int errno_value, int64_t after) {
    __atomic_store_n(&rt->reader.inject_after, after, __ATOMIC_RELAXED);
    __atomic_store_n(&rt->reader.inject_errno, errno_value, __ATOMIC_RELAXED);
}
