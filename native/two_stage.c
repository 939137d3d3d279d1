/* FG_MODE_GATE on split rows (cfg.split_rows): two dependent reads per layer (issue 11).
 *
 * Stage 1: the exact gate picks the rows (fg_gate_select); their up rows are read and
 * h = act(gate) x up computed exactly, in place of act(gate) in rt->gate_act. Stage 2:
 * among those rows, each token's top down_keep x n_ff by |h| x ||down|| (fg_gate_select_down)
 * have their down rows read and summed. A down row costs as many bytes as an up row, and
 * once h is exact the second cut needs no more rows than an oracle's; the price is a second
 * round trip to the device per layer. Each stage computes its resident rows while its reads
 * land.
 *
 * Residency: every slot is pinned (as gate mode on whole rows), hottest rows first; the
 * slot buffer holds the n_pinned up rows, then their n_pinned down rows. */
#include <string.h>

#include "runtime_internal.h"

enum { STAGE_UP, STAGE_DOWN };

/* Rows [k0, k1) of a list: row k is neuron idx[k], its bytes rows[k] (read) or, when rows
 * is NULL, its pinned copy. STAGE_UP: h[t][i] = act(gate) x up, in place in rt->gate_act;
 * STAGE_DOWN: acc[t] += h[t][i] x down. */
static void stage_rows(const fg_runtime *rt, const fg_layer *L, int stage,
                       const uint8_t *const *rows, const int32_t *idx, int32_t k0, int32_t k1,
                       int32_t n_tokens, float *acc) {
    const fg_config *c = &rt->cfg;
    const fg_layout *lay = &L->lay;
    const size_t n_ff = (size_t)c->n_ff, embd = (size_t)c->n_embd;
    float *h = rt->gate_act;
    for (int32_t k = k0; k < k1; k++) {
        const size_t i = (size_t)idx[k];
        if (stage == STAGE_UP) {
            const uint8_t *w = rows != NULL ? rows[k] : fg_pinned_up(L, (int64_t)i);
            for (int32_t t = 0; t < n_tokens; t++) {
                float u;
                lay->dot_up(w, rt->xq_up + (size_t)t * lay->xq_up_row, c->n_embd, &u);
                if (L->up_bias != NULL) u += L->up_bias[i];
                if (c->activation == FG_ACT_DRELU && u < 0.0f) u = 0.0f;
                h[(size_t)t * n_ff + i] *= u;
            }
        } else {
            const uint8_t *w = rows != NULL ? rows[k] : fg_pinned_down(L, (int64_t)i);
            for (int32_t t = 0; t < n_tokens; t++) {
                const float v = h[(size_t)t * n_ff + i];
                if (v != 0.0f) lay->axpy_down(w, v, acc + (size_t)t * embd, c->n_embd);
            }
        }
    }
}

typedef struct stage_args {
    int stage;
    int32_t n_tokens;
    float *acc;
} stage_args;

static void landed_stage_rows(const fg_runtime *rt, const fg_layer *L, int32_t k0, int32_t k1,
                              void *arg) {
    const stage_args *a = arg;
    stage_rows(rt, L, a->stage, rt->miss_rows, rt->miss_idx, k0, k1, a->n_tokens, a->acc);
}

/* One stage over need[0, n): need[0, n_res) are pinned, the rest are read from the stage's
 * run of rows while the pinned ones are computed, each read computed as it lands. Returns
 * an error code; *waited gets the seconds the calling thread was blocked on the device. */
static int run_stage(fg_runtime *rt, const fg_layer *L, int stage, const int32_t *need,
                     int32_t n, int32_t n_res, int32_t n_tokens, double *waited) {
    const fg_config *c = &rt->cfg;
    const fg_layout *lay = &L->lay;
    const int32_t n_miss = n - n_res;
    const uint64_t step = (uint64_t)(stage == STAGE_UP ? lay->up_step : lay->down_step);
    const uint64_t base = L->bundle_offset + (uint64_t)(stage == STAGE_UP ? lay->up_start
                                                                          : lay->down_start);
    for (int32_t k = 0; k < n_miss; k++) {
        rt->miss_idx[k] = need[n_res + k];
        rt->miss_rows[k] = NULL; /* every slot is pinned: misses are computed in passing */
    }
    rt->stats.cache_misses += (uint64_t)n_miss;
    rt->stats.bytes_needed += (uint64_t)n_miss * step;
    const int32_t n_reads = fg_plan_reads(rt, base, step, step, rt->miss_idx, rt->miss_rows,
                                          n_miss);
    int rc = fg_io_submit(&rt->io, rt->reads, n_reads);
    if (rc != FG_OK) return rc;
    if (stage == STAGE_DOWN) fg_partial_clear(rt, n_tokens);
    const int nth = fg_call_threads(c, n_tokens);
    double w = 0.0;
    int32_t next_chunk = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if ((int64_t)n * n_tokens >= FG_MIN_PARALLEL_ROWS)
#else
    (void)nth;
#endif
    {
        const int tid = team_index();
        float *acc = rt->partial + (size_t)tid * (size_t)c->max_tokens * (size_t)c->n_embd;
        for (;;) { /* pinned rows in chunks taken as threads free up (as ffn_accumulate) */
            const int32_t k0 = __atomic_fetch_add(&next_chunk, FG_CHUNK_ROWS, __ATOMIC_RELAXED);
            if (k0 >= n_res) break;
            const int32_t k1 = k0 + FG_CHUNK_ROWS < n_res ? k0 + FG_CHUNK_ROWS : n_res;
            stage_rows(rt, L, stage, NULL, need, k0, k1, n_tokens, acc);
        }
        stage_args args = {stage, n_tokens, acc};
        const double my_wait =
            fg_consume_reads(rt, L, (size_t)step, landed_stage_rows, &args);
        if (tid == 0) w = my_wait;
    }
    *waited += w;
    rc = fg_io_end(&rt->io);
    rt->stats.bytes_read = rt->reader.bytes_read;
    rt->stats.reads = rt->reader.reads;
    return rc;
}

int fg_ffn_two_stage(fg_runtime *rt, int32_t layer, float *y, int32_t n_tokens) {
    const fg_config *c = &rt->cfg;
    fg_layer *L = &rt->layers[layer];
    const int32_t n_ff = c->n_ff, pinned = L->cache.n_pinned;
    L->cache.clock += (uint64_t)n_tokens;
    const double t0 = fg_now_seconds();
    int32_t n = fg_needed_rows(rt, L, NULL, n_tokens, NULL); /* the gate's choice */
    double t_select = fg_now_seconds() - t0, waited = 0.0;
    int rc = run_stage(rt, L, STAGE_UP, rt->need, n, pinned, n_tokens, &waited);
    if (rc != FG_OK) return rc;
    rt->stats.neurons_computed += (uint64_t)n * (uint64_t)n_tokens;

    /* stage 2: the chosen rows whose down rows are worth reading, ascending, in place */
    const double t1 = fg_now_seconds();
    if (c->down_keep < L->gate_keep) {
        memset(rt->need_mask + pinned, 0, (size_t)(n_ff - pinned));
        fg_gate_select_down(rt, L, n_tokens, rt->need, n, pinned, rt->need_mask);
        int32_t kept = pinned;
        for (int32_t k = pinned; k < n; k++) {
            if (rt->need_mask[rt->need[k]]) rt->need[kept++] = rt->need[k];
        }
        n = kept;
    }
    t_select += fg_now_seconds() - t1;
    rc = run_stage(rt, L, STAGE_DOWN, rt->need, n, pinned, n_tokens, &waited);
    if (rc != FG_OK) return rc;
    rt->stats.down_computed += (uint64_t)n * (uint64_t)n_tokens;
    fg_ffn_reduce(rt, L, y, n_tokens);
    const double total = fg_now_seconds() - t0;
    rt->stats.time_predict_s += t_select;
    rt->stats.time_io_wait_s += waited;
    rt->stats.time_ffn_s += total - t_select - waited;
    return FG_OK;
}
