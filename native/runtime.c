#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "runtime_internal.h"

/* Large sequential reads for the dense load; also the bounce buffer size. */
#define FG_LOAD_CHUNK (8u << 20)

double fg_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void fg_runtime_set_error(fg_runtime *rt, int code, const char *msg) {
    if (rt->err_code != FG_OK) return; /* keep the first: later ones are consequences */
    rt->err_code = code;
    snprintf(rt->err_msg, sizeof rt->err_msg, "%s", msg);
}

static void *alloc_zeroed(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    memset(p, 0, n);
    return p;
}

static int check_config(const fg_config *c) {
    if (c->n_layer <= 0 || c->n_embd <= 0 || c->n_ff <= 0 || c->max_tokens <= 0 ||
        c->n_threads <= 0 || c->n_threads_batch <= 0 || c->bundle_stride <= 0) {
        return FG_ERR_ARG;
    }
    if (c->activation < FG_ACT_SILU || c->activation > FG_ACT_DRELU) return FG_ERR_ARG;
    if (c->activation == FG_ACT_DRELU && !c->gated) return FG_ERR_ARG;
    if (!isfinite(c->activation_threshold)) return FG_ERR_ARG;
    for (int p = c->gated ? FG_PART_GATE : FG_PART_UP; p <= FG_PART_DOWN; p++) {
        if (fg_vec_dot_ref_fn(c->part_type[p]) == NULL) return FG_ERR_TYPE;
        const size_t bytes = fg_row_size(c->part_type[p], c->n_embd);
        if (bytes == 0) return FG_ERR_ARG;
        if (c->part_offset[p] < 0 || c->part_offset[p] + (int64_t)bytes > c->bundle_stride) {
            return FG_ERR_ARG;
        }
    }
    if (memchr(c->input_node, 0, sizeof c->input_node) == NULL ||
        memchr(c->output_node, 0, sizeof c->output_node) == NULL || c->input_node[0] == 0 ||
        c->output_node[0] == 0) {
        return FG_ERR_ARG;
    }
    return FG_OK;
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
    const int gate_vt = c->gated ? fg_vec_dot_type(c->part_type[FG_PART_GATE]) : FG_TYPE_F32;
    const int up_vt = fg_vec_dot_type(c->part_type[FG_PART_UP]);
    rt->dot_gate = c->gated ? fg_vec_dot_fast_fn(c->part_type[FG_PART_GATE]) : NULL;
    rt->dot_up = fg_vec_dot_fast_fn(c->part_type[FG_PART_UP]);
    rt->quant_gate = fg_quantize_fast_fn(gate_vt);
    rt->quant_up = fg_quantize_fast_fn(up_vt);
    rt->axpy_down = fg_axpy_fast_fn(c->part_type[FG_PART_DOWN]);
    rt->xq_gate_row = fg_row_size(gate_vt, c->n_embd);
    rt->xq_up_row = fg_row_size(up_vt, c->n_embd);

    const size_t rows = (size_t)c->max_tokens;
    const size_t embd = (size_t)c->n_embd;
    const size_t max_threads =
        (size_t)(c->n_threads > c->n_threads_batch ? c->n_threads : c->n_threads_batch);
    rt->layers = calloc((size_t)c->n_layer, sizeof *rt->layers);
    rt->pending_rows = calloc((size_t)c->n_layer, sizeof *rt->pending_rows);
    rt->xq_gate = alloc_zeroed(rows * rt->xq_gate_row);
    rt->xq_up = alloc_zeroed(rows * rt->xq_up_row);
    rt->partial = alloc_zeroed(max_threads * rows * embd * sizeof(float));
    rt->hidden = alloc_zeroed(max_threads * 2 * rows * sizeof(float));
    rt->ffn_out = alloc_zeroed(rows * embd * sizeof(float));
    if (!rt->layers || !rt->pending_rows || !rt->xq_gate || !rt->xq_up || !rt->partial ||
        !rt->hidden || !rt->ffn_out) {
        fg_runtime_destroy(rt);
        return FG_ERR_NOMEM;
    }
    *out = rt;
    return FG_OK;
}

void fg_runtime_destroy(fg_runtime *rt) {
    if (rt == NULL) return;
    if (rt->layers != NULL) {
        for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
            free(rt->layers[l].bundles);
            free(rt->layers[l].up_bias);
            free(rt->layers[l].gate_bias);
            free(rt->layers[l].down_bias);
        }
    }
    free(rt->layers);
    free(rt->pending_rows);
    free(rt->xq_gate);
    free(rt->xq_up);
    free(rt->partial);
    free(rt->hidden);
    free(rt->ffn_out);
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

int fg_runtime_load_all(fg_runtime *rt) {
    const size_t bytes = (size_t)rt->cfg.n_ff * (size_t)rt->cfg.bundle_stride;
    const double t0 = fg_now_seconds();
    for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
        if (!rt->layers[l].has_offset) return FG_ERR_STATE;
    }
    for (int32_t l = 0; l < rt->cfg.n_layer; l++) {
        fg_layer *L = &rt->layers[l];
        if (L->bundles == NULL) {
            void *p = NULL;
            if (posix_memalign(&p, FG_IO_ALIGN, bytes) != 0) return FG_ERR_NOMEM;
            L->bundles = p;
        }
        const int rc = fg_reader_read(&rt->reader, L->bundle_offset, bytes, L->bundles);
        if (rc != FG_OK) return rc;
    }
    rt->loaded = 1;
    rt->stats.bytes_read = rt->reader.bytes_read;
    rt->stats.reads = rt->reader.reads;
    rt->stats.time_io_s += fg_now_seconds() - t0;
    return FG_OK;
}

int fg_runtime_direct_io(const fg_runtime *rt) { return rt->reader.direct; }

/* One thread's share of the FFN: neurons [i0, i1) for every token, summed into acc. */
static void ffn_neurons(const fg_runtime *rt, const fg_layer *L, int64_t i0, int64_t i1,
                        int32_t n_tokens, float *acc, float *gate_vals, float *up_vals) {
    const fg_config *c = &rt->cfg;
    const int64_t embd = c->n_embd;
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t *row = L->bundles + i * c->bundle_stride;
        const uint8_t *up_w = row + c->part_offset[FG_PART_UP];
        const uint8_t *down_w = row + c->part_offset[FG_PART_DOWN];
        for (int32_t t = 0; t < n_tokens; t++) {
            rt->dot_up(up_w, rt->xq_up + (size_t)t * rt->xq_up_row, embd, &up_vals[t]);
        }
        if (L->up_bias != NULL) {
            for (int32_t t = 0; t < n_tokens; t++) up_vals[t] += L->up_bias[i];
        }
        if (c->gated) {
            const uint8_t *gate_w = row + c->part_offset[FG_PART_GATE];
            for (int32_t t = 0; t < n_tokens; t++) {
                rt->dot_gate(gate_w, rt->xq_gate + (size_t)t * rt->xq_gate_row, embd,
                             &gate_vals[t]);
            }
            if (L->gate_bias != NULL) {
                for (int32_t t = 0; t < n_tokens; t++) gate_vals[t] += L->gate_bias[i];
            }
            fg_activate(c->activation, c->activation_threshold, gate_vals, n_tokens);
            if (c->activation == FG_ACT_DRELU) {
                fg_activate(FG_ACT_RELU, 0.0f, up_vals, n_tokens);
            }
            for (int32_t t = 0; t < n_tokens; t++) up_vals[t] *= gate_vals[t];
        } else {
            fg_activate(c->activation, c->activation_threshold, up_vals, n_tokens);
        }
        for (int32_t t = 0; t < n_tokens; t++) {
            if (up_vals[t] != 0.0f) { /* exact zeros (ReLU family) cost nothing */
                rt->axpy_down(down_w, up_vals[t], acc + (size_t)t * (size_t)embd, embd);
            }
        }
    }
}

int fg_runtime_ffn(fg_runtime *rt, int32_t layer, const float *x, float *y, int32_t n_tokens) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || n_tokens <= 0 || n_tokens > c->max_tokens) {
        return FG_ERR_ARG;
    }
    if (!rt->loaded) return FG_ERR_STATE;
    const double t0 = fg_now_seconds();
    const fg_layer *L = &rt->layers[layer];
    const size_t embd = (size_t)c->n_embd;
    for (int32_t t = 0; t < n_tokens; t++) {
        rt->quant_up(x + t * embd, rt->xq_up + (size_t)t * rt->xq_up_row, c->n_embd);
        if (c->gated) {
            rt->quant_gate(x + t * embd, rt->xq_gate + (size_t)t * rt->xq_gate_row, c->n_embd);
        }
    }
    const size_t n_out = (size_t)n_tokens * embd;
#ifdef _OPENMP
    const int n_threads = n_tokens > 1 ? c->n_threads_batch : c->n_threads;
#pragma omp parallel num_threads(n_threads)
#endif
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
        const int nth = omp_get_num_threads();
#else
        const int tid = 0;
        const int nth = 1;
#endif
        float *acc = rt->partial + (size_t)tid * (size_t)c->max_tokens * embd;
        float *gate_vals = rt->hidden + (size_t)tid * 2 * (size_t)c->max_tokens;
        float *up_vals = gate_vals + c->max_tokens;
        memset(acc, 0, n_out * sizeof(float));
        const int64_t i0 = (int64_t)c->n_ff * tid / nth;
        const int64_t i1 = (int64_t)c->n_ff * (tid + 1) / nth;
        ffn_neurons(rt, L, i0, i1, n_tokens, acc, gate_vals, up_vals);
#ifdef _OPENMP
#pragma omp barrier
#endif
        /* Sum the per-thread partials; each thread owns a slice of the output. */
        const size_t e0 = n_out * (size_t)tid / (size_t)nth;
        const size_t e1 = n_out * (size_t)(tid + 1) / (size_t)nth;
        for (size_t e = e0; e < e1; e++) {
            float s = rt->partial[e];
            for (int k = 1; k < nth; k++) s += rt->partial[(size_t)k * c->max_tokens * embd + e];
            if (L->down_bias != NULL) s += L->down_bias[e % embd];
            y[e] = s;
        }
    }
    if (layer == 0) rt->stats.tokens += (uint64_t)n_tokens;
    rt->stats.neurons_computed += (uint64_t)c->n_ff * (uint64_t)n_tokens;
    rt->stats.time_ffn_s += fg_now_seconds() - t0;
    return FG_OK;
}

int fg_runtime_take_error(fg_runtime *rt, char *msg, size_t msg_cap) {
    const int code = rt->err_code;
    if (msg != NULL && msg_cap > 0) snprintf(msg, msg_cap, "%s", rt->err_msg);
    rt->err_code = FG_OK;
    rt->err_msg[0] = 0;
    return code;
}

void fg_runtime_get_stats(const fg_runtime *rt, fg_stats *out) { *out = rt->stats; }

void fg_runtime_reset_stats(fg_runtime *rt) { memset(&rt->stats, 0, sizeof rt->stats); }
