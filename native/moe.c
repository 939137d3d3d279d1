/*
 * Mixture-of-experts layers from flash: each routed expert is one bundle of the source's own
 * gate, up and down matrices, read whole with the read engine (io.h) into a cache of expert
 * slots, or computed from the staging buffer it landed in when no slot may take it.
 *
 * The routing is llama.cpp's own: the graph still holds the router (and any shared expert),
 * and the eval callback copies the chosen experts (ffn_moe_topk-L) and their final weights
 * (the last of ffn_moe_weights / _softmax / _norm / _scaled -L in graph order) before it
 * replaces the routed experts' sum. The arithmetic follows ggml's mul_mat_id: the input
 * quantized to each matrix's vec_dot type, h = act(gate) * up quantized again for down, each
 * token's experts weighted and summed in top-k order.
 *
 * Eviction: CLOCK with a small use count. A new expert enters with count 0 and is the
 * first to go unless it is used again; each use raises the count (to 3), each pass of the
 * hand lowers it. A burst of one-off experts (a prompt) therefore cannot flush the experts
 * that decode keeps using. Experts used by the current call are never evicted by it, and
 * a one-off of the current token does not make room for another (take_slot).
 *
 * Pinning: the experts given to fg_moe_pin (the caller's choice, by calibrated routing
 * frequency) are read into the first slots at load and never evicted; CLOCK runs over the
 * rest.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ggml_abi.h"
#include "kernels.h"
#include "runtime_internal.h"

#define FG_GGML_TYPE_I32 26
#define FG_MOE_MAX_COUNT 3
/* the use count of a pinned slot: above any CLOCK count, never lowered */
#define FG_MOE_PINNED 255
/* reads for the resident load, and the bounce buffer for unaligned ones */
#define FG_MOE_LOAD_CHUNK (8u << 20)
/* fewer output values than this per matrix are computed on one thread */
#define FG_MOE_MIN_PARALLEL 2048

typedef struct fg_moe_layer {
    uint64_t offset;
    int64_t stride;
    int32_t type[3];
    int64_t part_offset[3];
    int set;
    fg_vec_dot_fn dot[3];
    fg_quantize_fn quant[3];       /* gate/up: the input's; down: h's */
    size_t xq_row[3];              /* bytes of one quantized activation row per part */
    int up_xq;                     /* up's input: m->xq[0] (the gate's, when both take the
                                    * same vec_dot type: quantized once) or m->xq[1] */
    uint64_t hits, misses;
} fg_moe_layer;

struct fg_moe {
    fg_moe_config cfg;
    fg_moe_layer *layers;
    fg_reader reader;
    fg_io io;
    int io_ready;
    int loaded;
    fg_error_slot err;
    fg_moe_stats stats;

    /* expert cache: slot s holds key owner[s] = layer * n_expert + expert, or -1 */
    int64_t slot_bytes;
    int32_t n_slots;
    uint8_t *slots;
    int32_t *slot_of;              /* [n_layer * n_expert] */
    int32_t *owner;                /* [n_slots] */
    uint8_t *count;                /* [n_slots] CLOCK use counts */
    uint64_t *busy;                /* [n_slots] call that uses it (never evicted by it) */
    int32_t *pin_keys;             /* fg_moe_pin's experts, most wanted first */
    int32_t n_pin_keys;
    int32_t hand;
    uint64_t call;

    /* one call's scratch */
    float *x;                      /* [max_tokens x n_embd]: the MoE input, copied */
    int32_t *ids;                  /* [max_tokens x n_used]: llama.cpp's chosen experts */
    float *weights;                /* [max_tokens x n_used] */
    int32_t pending_rows;          /* rows of x waiting for their output node, else 0 */
    int32_t pending_layer;
    int32_t have_ids, have_weights;
    uint8_t *xq[2];                /* the input in the gate's and up's vec_dot types */
    float *gate_out, *up_out;      /* [max_tokens x n_ff_exp] */
    uint8_t *hq;                   /* [max_tokens] rows of h in down's vec_dot type */
    float *expert_out;             /* [max_tokens x n_used x n_embd]: each (t, k) output */
    int32_t *tok_count, *tok_start;/* [n_expert + 1]: the (t, k) pairs of each expert */
    int32_t *pairs;                /* [max_tokens x n_used]: t * n_used + k, by expert */
    int32_t *need;                 /* [n_expert]: experts this call uses */
    fg_read *reads;                /* [n_expert] */
    int32_t *read_expert;          /* [n_expert] */
    int32_t *read_slot;            /* [n_expert]: slot the read is kept in, or -1 */
    int32_t *hit_slot;             /* [n_expert]: slots of the call's resident experts */
    int32_t *hit_expert;
    const uint8_t **token_x;       /* [max_tokens]: per selected token, its quantized rows */

    /* next-layer prediction (fg_moe_set_router): each router as F32 [n_expert x n_embd],
     * the experts predicted for layer pred_layer (-1: none) from the last decode input */
    float *router;                 /* [n_layer x n_expert x n_embd] */
    uint8_t *router_set;           /* [n_layer] */
    float *pred_logits;            /* [n_expert] */
    uint8_t *predicted;            /* [n_expert] */
    int32_t pred_layer;
    /* prefetch (fg_moe_set_prefetch): the guessed experts of prefetch_layer not resident,
     * read as one job between the calls; taken into slots when that layer routes to them */
    int prefetch;
    fg_read *prefetch_reads;       /* [n_expert_used] */
    int32_t *prefetch_expert;      /* [n_expert_used] */
    uint8_t *prefetch_done;        /* [n_expert]: computed from a prefetch in this call */
    int32_t prefetch_n;            /* reads of the job in flight (0: none) */
    int32_t prefetch_layer;

    /* routing record (fg_moe_trace_start) */
    int32_t *trace_layer;          /* [trace_cap] */
    uint8_t *trace_used;           /* [trace_cap x n_expert] */
    int64_t trace_cap, trace_n;
};

static void *alloc_aligned(size_t n, size_t align) {
    void *p = NULL;
    if (posix_memalign(&p, align, n ? n : align) != 0) return NULL;
    memset(p, 0, n);
    return p;
}

static int check_config(const fg_moe_config *c) {
    if (c->n_layer < 1 || c->n_embd < 1 || c->n_ff_exp < 1 || c->n_expert < 1 ||
        c->n_expert_used < 1 || c->n_expert_used > c->n_expert || c->max_tokens < 1 ||
        c->n_threads < 1 || c->n_threads_batch < 1 || c->io_depth < 1 || c->dram_budget < 0) {
        return FG_ERR_ARG;
    }
    if (c->activation != FG_ACT_SILU && c->activation != FG_ACT_GELU) return FG_ERR_ARG;
    if (memchr(c->input_node, 0, sizeof c->input_node) == NULL ||
        memchr(c->output_node, 0, sizeof c->output_node) == NULL) {
        return FG_ERR_ARG;
    }
    return FG_OK;
}

int fg_moe_create(const fg_moe_config *cfg, const char *path, fg_moe **out) {
    *out = NULL;
    int rc = check_config(cfg);
    if (rc != FG_OK) return rc;
    fg_moe *m = calloc(1, sizeof *m);
    if (m == NULL) return FG_ERR_NOMEM;
    m->cfg = *cfg;
    m->reader.fd = -1;
    rc = fg_reader_open(&m->reader, path, cfg->use_direct_io, FG_MOE_LOAD_CHUNK);
    if (rc != FG_OK) {
        free(m);
        return rc;
    }
    const fg_moe_config *c = &m->cfg;
    const size_t rows = (size_t)c->max_tokens, used = (size_t)c->n_expert_used;
    const size_t embd = (size_t)c->n_embd, ff = (size_t)c->n_ff_exp;
    const size_t experts = (size_t)c->n_expert;
    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    m->slot_of = malloc((size_t)c->n_layer * experts * sizeof *m->slot_of);
    m->x = alloc_aligned(rows * embd * sizeof(float), 64);
    m->ids = calloc(rows * used, sizeof *m->ids);
    m->weights = calloc(rows * used, sizeof *m->weights);
    m->gate_out = alloc_aligned(rows * ff * sizeof(float), 64);
    m->up_out = alloc_aligned(rows * ff * sizeof(float), 64);
    m->expert_out = alloc_aligned(rows * used * embd * sizeof(float), 64);
    m->tok_count = calloc(experts + 1, sizeof *m->tok_count);
    m->tok_start = calloc(experts + 1, sizeof *m->tok_start);
    m->pairs = calloc(rows * used, sizeof *m->pairs);
    m->need = calloc(experts, sizeof *m->need);
    m->reads = calloc(experts, sizeof *m->reads);
    m->read_expert = calloc(experts, sizeof *m->read_expert);
    m->read_slot = calloc(experts, sizeof *m->read_slot);
    m->hit_slot = calloc(experts, sizeof *m->hit_slot);
    m->hit_expert = calloc(experts, sizeof *m->hit_expert);
    m->token_x = calloc(rows, sizeof *m->token_x);
    m->router_set = calloc((size_t)c->n_layer, 1);
    m->pred_logits = calloc(experts, sizeof *m->pred_logits);
    m->predicted = calloc(experts, 1);
    m->prefetch_reads = calloc(used, sizeof *m->prefetch_reads);
    m->prefetch_expert = calloc(used, sizeof *m->prefetch_expert);
    m->prefetch_done = calloc(experts, 1);
    if (!m->layers || !m->slot_of || !m->x || !m->ids || !m->weights || !m->gate_out ||
        !m->up_out || !m->expert_out || !m->tok_count || !m->tok_start || !m->pairs ||
        !m->need || !m->reads || !m->read_expert || !m->read_slot || !m->hit_slot ||
        !m->hit_expert || !m->token_x || !m->router_set || !m->pred_logits || !m->predicted ||
        !m->prefetch_reads || !m->prefetch_expert || !m->prefetch_done) {
        fg_moe_destroy(m);
        return FG_ERR_NOMEM;
    }
    for (size_t i = 0; i < (size_t)c->n_layer * experts; i++) m->slot_of[i] = -1;
    m->pred_layer = -1;
    m->prefetch_layer = -1;
    *out = m;
    return FG_OK;
}

static double drain_prefetch(fg_moe *m, int32_t layer);

void fg_moe_destroy(fg_moe *m) {
    if (m == NULL) return;
    if (m->prefetch_n > 0) drain_prefetch(m, -1);
    if (m->io_ready) fg_io_destroy(&m->io);
    fg_reader_close(&m->reader);
    free(m->layers);
    free(m->slot_of);
    free(m->slots);
    free(m->owner);
    free(m->count);
    free(m->busy);
    free(m->pin_keys);
    free(m->x);
    free(m->ids);
    free(m->weights);
    free(m->xq[0]);
    free(m->xq[1]);
    free(m->gate_out);
    free(m->up_out);
    free(m->hq);
    free(m->expert_out);
    free(m->tok_count);
    free(m->tok_start);
    free(m->pairs);
    free(m->need);
    free(m->reads);
    free(m->read_expert);
    free(m->read_slot);
    free(m->hit_slot);
    free(m->hit_expert);
    free(m->token_x);
    free(m->trace_layer);
    free(m->trace_used);
    free(m->router);
    free(m->router_set);
    free(m->pred_logits);
    free(m->predicted);
    free(m->prefetch_reads);
    free(m->prefetch_expert);
    free(m->prefetch_done);
    free(m);
}

int fg_moe_set_layer(fg_moe *m, int32_t layer, uint64_t offset, int64_t stride,
                     const int32_t *part_type, const int64_t *part_offset) {
    const fg_moe_config *c = &m->cfg;
    if (m->loaded) return FG_ERR_STATE;
    if (layer < 0 || layer >= c->n_layer || stride <= 0 || stride % FG_IO_ALIGN != 0 ||
        offset % FG_IO_ALIGN != 0) {
        return FG_ERR_ARG;
    }
    fg_moe_layer *L = &m->layers[layer];
    /* gate and up: n_ff_exp rows of n_embd; down: n_embd rows of n_ff_exp */
    const int64_t row_len[3] = {c->n_embd, c->n_embd, c->n_ff_exp};
    const int64_t n_rows[3] = {c->n_ff_exp, c->n_ff_exp, c->n_embd};
    for (int p = 0; p < 3; p++) {
        const int t = part_type[p];
        const size_t row = fg_row_size(t, row_len[p]);
        const int act = fg_vec_dot_type(t);
        if (row == 0 || act < 0 || fg_vec_dot_fast_fn(t) == NULL ||
            fg_quantize_fast_fn(act) == NULL || fg_row_size(act, row_len[p]) == 0) {
            return FG_ERR_TYPE;
        }
        if (part_offset[p] < 0 || part_offset[p] + (int64_t)row * n_rows[p] > stride) {
            return FG_ERR_ARG;
        }
        L->type[p] = t;
        L->part_offset[p] = part_offset[p];
        L->dot[p] = fg_vec_dot_fast_fn(t);
        L->quant[p] = fg_quantize_fast_fn(act);
        L->xq_row[p] = fg_row_size(act, row_len[p]);
    }
    L->up_xq = fg_vec_dot_type(L->type[FG_PART_UP]) != fg_vec_dot_type(L->type[FG_PART_GATE]);
    L->offset = offset;
    L->stride = stride;
    L->set = 1;
    return FG_OK;
}

/* ---- the cache ----------------------------------------------------------------------- */

static uint8_t *slot_data(const fg_moe *m, int32_t s) {
    return m->slots + (size_t)s * (size_t)m->slot_bytes;
}

/* A slot for key: a free one, else the CLOCK victim not busy in this call; -1 if none, or
 * if the victim would be an expert first used within the last token (n_layer calls) and
 * not since: a cache smaller than one token's experts then keeps a stable set (hits in
 * proportion to its size) instead of each new expert evicting the previous new one (no
 * hits at all, as LRU gives there). */
static int32_t take_slot(fg_moe *m, int32_t key) {
    if (m->n_slots == 0) return -1;
    int32_t victim = -1;
    const uint64_t window = (uint64_t)m->cfg.n_layer;
    /* each full pass lowers every count by one: after MAX_COUNT + 1 passes any slot not
     * busy in this call has reached 0 */
    for (int64_t step = 0; step < (int64_t)m->n_slots * (FG_MOE_MAX_COUNT + 2); step++) {
        const int32_t s = m->hand;
        m->hand = (m->hand + 1) % m->n_slots;
        if (m->owner[s] < 0) {
            victim = s;
            break;
        }
        if (m->busy[s] == m->call || m->count[s] == FG_MOE_PINNED) continue;
        if (m->count[s] > 0) {
            m->count[s]--;
            continue;
        }
        if (m->busy[s] + window > m->call) return -1;
        victim = s;
        break;
    }
    if (victim < 0) return -1;
    if (m->owner[victim] >= 0) {
        m->slot_of[m->owner[victim]] = -1;
        m->stats.evictions++;
    }
    m->owner[victim] = key;
    m->count[victim] = 0;
    m->busy[victim] = m->call;
    m->slot_of[key] = victim;
    return victim;
}

static uint64_t expert_offset(const fg_moe_layer *L, int32_t e) {
    return L->offset + (uint64_t)e * (uint64_t)L->stride;
}

/* At load: expert key (layer * n_expert + expert) read whole into slot s, which owns it. */
static int load_expert(fg_moe *m, int32_t key, int32_t s) {
    const fg_moe_layer *L = &m->layers[key / m->cfg.n_expert];
    const int rc = fg_reader_read(&m->reader, expert_offset(L, key % m->cfg.n_expert),
                                  (size_t)L->stride, slot_data(m, s));
    m->owner[s] = key;
    m->slot_of[key] = s;
    return rc;
}

static void forget_slot(fg_moe *m, int32_t s) {
    m->slot_of[m->owner[s]] = -1;
    m->owner[s] = -1;
    m->count[s] = 0;
}

int fg_moe_pin(fg_moe *m, const int32_t *keys, int32_t n_keys) {
    const int64_t total = (int64_t)m->cfg.n_layer * m->cfg.n_expert;
    if (m->loaded) return FG_ERR_STATE;
    if (n_keys < 0 || n_keys > total) return FG_ERR_ARG;
    int32_t *copy = malloc((size_t)(n_keys ? n_keys : 1) * sizeof *copy);
    uint8_t *seen = calloc((size_t)total, 1);
    int rc = copy && seen ? FG_OK : FG_ERR_NOMEM;
    for (int32_t i = 0; rc == FG_OK && i < n_keys; i++) {
        if (keys[i] < 0 || keys[i] >= total || seen[keys[i]]) rc = FG_ERR_ARG;
        else seen[keys[i]] = 1;
    }
    free(seen);
    if (rc != FG_OK) {
        free(copy);
        return rc;
    }
    memcpy(copy, keys, (size_t)n_keys * sizeof *copy);
    free(m->pin_keys);
    m->pin_keys = copy;
    m->n_pin_keys = n_keys;
    return FG_OK;
}

/* The first pinned keys that fit, leaving one slot for CLOCK, read into slots 0.. */
static int load_pinned(fg_moe *m) {
    int64_t n = m->n_pin_keys;
    if (n > (int64_t)m->n_slots - 1) n = m->n_slots > 0 ? m->n_slots - 1 : 0;
    int rc = FG_OK;
    for (int32_t s = 0; rc == FG_OK && s < n; s++) {
        rc = load_expert(m, m->pin_keys[s], s);
        m->count[s] = FG_MOE_PINNED;
        m->stats.pinned++;
    }
    return rc;
}

int fg_moe_load(fg_moe *m) {
    const fg_moe_config *c = &m->cfg;
    if (m->loaded) return FG_ERR_STATE;
    int64_t slot_bytes = 0;
    size_t hq_row = 0, xq_row[2] = {0, 0};
    for (int32_t l = 0; l < c->n_layer; l++) {
        const fg_moe_layer *L = &m->layers[l];
        if (!L->set) return FG_ERR_STATE;
        if (L->stride > slot_bytes) slot_bytes = L->stride;
        for (int p = 0; p < 2; p++) {
            if (L->xq_row[p] > xq_row[p]) xq_row[p] = L->xq_row[p];
        }
        if (L->xq_row[2] > hq_row) hq_row = L->xq_row[2];
    }
    const size_t rows = (size_t)c->max_tokens;
    for (int p = 0; p < 2; p++) {
        m->xq[p] = alloc_aligned(rows * xq_row[p], 64);
        if (m->xq[p] == NULL) return FG_ERR_NOMEM;
    }
    m->hq = alloc_aligned(rows * hq_row, 64);
    if (m->hq == NULL) return FG_ERR_NOMEM;

    const int64_t total = (int64_t)c->n_layer * c->n_expert;
    int64_t n_slots = c->resident ? total : c->dram_budget / slot_bytes;
    if (n_slots > total) n_slots = total;
    m->slot_bytes = slot_bytes;
    m->n_slots = (int32_t)n_slots;
    if (n_slots > 0) {
        m->slots = alloc_aligned((size_t)n_slots * (size_t)slot_bytes, FG_IO_ALIGN);
        m->owner = malloc((size_t)n_slots * sizeof *m->owner);
        m->count = calloc((size_t)n_slots, 1);
        m->busy = calloc((size_t)n_slots, sizeof *m->busy);
        if (!m->slots || !m->owner || !m->count || !m->busy) return FG_ERR_NOMEM;
        for (int64_t s = 0; s < n_slots; s++) m->owner[s] = -1;
    }
    const double t0 = fg_now_seconds();
    int rc = FG_OK;
    if (c->resident) { /* every expert, in file order: a few large sequential reads */
        for (int32_t s = 0; rc == FG_OK && s < (int32_t)total; s++) rc = load_expert(m, s, s);
    } else {
        rc = load_pinned(m);
        if (rc == FG_OK) {
            rc = fg_io_init(&m->io, &m->reader, c->io_backend, c->io_depth,
                            (size_t)slot_bytes, c->n_expert);
        }
        m->io_ready = rc == FG_OK;
    }
    m->stats.time_io_wait_s += fg_now_seconds() - t0;
    m->stats.bytes_read = m->reader.bytes_read;
    m->stats.reads = m->reader.reads;
    if (rc != FG_OK) return rc;
    fg_reader_drop_bounce(&m->reader);
    m->loaded = 1;
    return FG_OK;
}

int32_t fg_moe_slots(const fg_moe *m) {
    return m->n_slots;
}

int fg_moe_direct_io(const fg_moe *m) {
    return m->reader.direct;
}

/* ---- compute ------------------------------------------------------------------------- */

static int moe_threads(const fg_moe *m, int32_t n_tokens) {
    return n_tokens > 1 ? m->cfg.n_threads_batch : m->cfg.n_threads;
}

/* out[j * out_stride + r] = dot(row r of w, act[j]) for rows [0, n_rows) and the n_act
 * activation rows; the rows are split across the threads. */
static void matvec(fg_vec_dot_fn dot, const uint8_t *w, size_t w_row,
                   int64_t row_len, int64_t n_rows, const uint8_t *const *act, int32_t n_act,
                   float *out, size_t out_stride, int nth_max) {
    const int64_t work = n_rows * n_act;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nth_max) if (work >= FG_MOE_MIN_PARALLEL)
#else
    (void)nth_max;
    (void)work;
#endif
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = w + (size_t)r * w_row;
        for (int32_t j = 0; j < n_act; j++) {
            dot(row, act[j], row_len, out + (size_t)j * out_stride + (size_t)r);
        }
    }
}

/* Expert e of layer L (bundle at data) for its (t, k) pairs: their outputs into
 * expert_out[(t * n_used + k) x n_embd]. */
static void compute_expert(fg_moe *m, const fg_moe_layer *L, int32_t e, const uint8_t *data,
                           int32_t n_tokens) {
    const fg_moe_config *c = &m->cfg;
    const size_t embd = (size_t)c->n_embd, ff = (size_t)c->n_ff_exp;
    const int32_t p0 = m->tok_start[e], n = m->tok_count[e];
    const int nth = moe_threads(m, n_tokens);
    const uint8_t **act = m->token_x;
    /* gate and up */
    for (int p = 0; p < 2; p++) {
        const uint8_t *xq = m->xq[p == 0 ? 0 : L->up_xq];
        for (int32_t j = 0; j < n; j++) {
            const int32_t t = m->pairs[p0 + j] / c->n_expert_used;
            act[j] = xq + (size_t)t * L->xq_row[p];
        }
        const size_t w_row = fg_row_size(L->type[p], c->n_embd);
        matvec(L->dot[p], data + L->part_offset[p], w_row, c->n_embd, c->n_ff_exp, act, n,
               p == 0 ? m->gate_out : m->up_out, ff, nth);
    }
    /* h = act(gate) * up, in down's vec_dot type */
    for (int32_t j = 0; j < n; j++) {
        float *g = m->gate_out + (size_t)j * ff;
        const float *u = m->up_out + (size_t)j * ff;
        fg_activate(c->activation, 0.0f, g, c->n_ff_exp);
        for (size_t i = 0; i < ff; i++) g[i] *= u[i];
        uint8_t *hq = m->hq + (size_t)j * L->xq_row[2];
        L->quant[2](g, hq, c->n_ff_exp);
        act[j] = hq;
    }
    /* down: into each (t, k) pair's own output row (rows not evenly spaced, so not matvec),
     * so that the order experts are computed in (hits first, misses as they land) cannot
     * change the sums */
    const size_t w_row = fg_row_size(L->type[2], c->n_ff_exp);
    float *out = m->expert_out;
    const int64_t work = (int64_t)embd * n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nth) if (work >= FG_MOE_MIN_PARALLEL)
#else
    (void)work;
#endif
    for (int64_t r = 0; r < (int64_t)embd; r++) {
        const uint8_t *row = data + L->part_offset[2] + (size_t)r * w_row;
        for (int32_t j = 0; j < n; j++) {
            L->dot[2](row, act[j], c->n_ff_exp, out + (size_t)m->pairs[p0 + j] * embd + (size_t)r);
        }
    }
}

/* Group the (t, k) pairs by expert (tok_start/tok_count/pairs) and list the experts used,
 * ascending, into need; returns how many, or -1 for an id out of range or repeated within
 * a token. */
static int32_t group_pairs(fg_moe *m, int32_t n_tokens) {
    const fg_moe_config *c = &m->cfg;
    const int32_t n_pairs = n_tokens * c->n_expert_used;
    memset(m->tok_count, 0, (size_t)(c->n_expert + 1) * sizeof *m->tok_count);
    for (int32_t q = 0; q < n_pairs; q++) {
        const int32_t e = m->ids[q];
        if (e < 0 || e >= c->n_expert) return -1;
        /* a token's experts are distinct (llama.cpp's top-k): an expert then has at most
         * n_tokens pairs, what its scratch rows hold */
        for (int32_t k = q - q % c->n_expert_used; k < q; k++) {
            if (m->ids[k] == e) return -1;
        }
        m->tok_count[e]++;
    }
    int32_t n_need = 0, start = 0;
    for (int32_t e = 0; e < c->n_expert; e++) {
        m->tok_start[e] = start;
        start += m->tok_count[e];
        if (m->tok_count[e] > 0) m->need[n_need++] = e;
    }
    /* stable placement: pairs of expert e in token order */
    for (int32_t e = 0; e < c->n_expert; e++) m->tok_count[e] = 0;
    for (int32_t q = 0; q < n_pairs; q++) {
        const int32_t e = m->ids[q];
        m->pairs[m->tok_start[e] + m->tok_count[e]++] = q;
    }
    return n_need;
}

/* One read of expert e's whole bundle (aligned for direct I/O), its index k in the job. */
static void expert_read(const fg_moe *m, const fg_moe_layer *L, int32_t e, int32_t k,
                        fg_read *rd) {
    const uint64_t align = (uint64_t)(m->reader.direct ? m->reader.dio_align : 1);
    rd->offset = expert_offset(L, e);
    rd->len = ((uint64_t)L->stride + align - 1) / align * align;
    rd->need = (uint64_t)L->stride;
    rd->copy0 = k;
    rd->n_copy = 1;
}

/* ---- next-layer prediction ------------------------------------------------------------
 * A decode token's experts at layer L + 1, guessed at the end of layer L from L's MoE input
 * and L + 1's router (the hidden state changes little from one layer to the next), and
 * scored when layer L + 1 routes: what a prefetch issued during L + 1's attention would
 * have read for nothing or in time. With fg_moe_set_prefetch the guesses are also read. */

int fg_moe_set_router(fg_moe *m, int32_t layer, const float *w) {
    const fg_moe_config *c = &m->cfg;
    if (layer < 0 || layer >= c->n_layer || w == NULL) return FG_ERR_ARG;
    const size_t per_layer = (size_t)c->n_expert * (size_t)c->n_embd;
    if (m->router == NULL) { /* only when asked for: n_layer x n_expert x n_embd floats */
        m->router = malloc((size_t)c->n_layer * per_layer * sizeof *m->router);
        if (m->router == NULL) return FG_ERR_NOMEM;
    }
    memcpy(m->router + (size_t)layer * per_layer, w, per_layer * sizeof *w);
    m->router_set[layer] = 1;
    return FG_OK;
}

static void predict_next(fg_moe *m, int32_t next, const float *x) {
    const fg_moe_config *c = &m->cfg;
    const float *w = m->router + (size_t)next * (size_t)c->n_expert * (size_t)c->n_embd;
    for (int32_t e = 0; e < c->n_expert; e++) {
        const float *row = w + (size_t)e * (size_t)c->n_embd;
        float sum = 0.0f;
        for (int32_t i = 0; i < c->n_embd; i++) sum += row[i] * x[i];
        m->pred_logits[e] = sum;
    }
    /* top n_expert_used (softmax keeps the order): n_used passes, as the counts are small */
    memset(m->predicted, 0, (size_t)c->n_expert);
    for (int32_t k = 0; k < c->n_expert_used; k++) {
        int32_t best = -1;
        for (int32_t e = 0; e < c->n_expert; e++) {
            if (!m->predicted[e] && (best < 0 || m->pred_logits[e] > m->pred_logits[best])) {
                best = e;
            }
        }
        m->predicted[best] = 1;
    }
    m->pred_layer = next;
}

int fg_moe_set_prefetch(fg_moe *m, int on) {
    const fg_moe_config *c = &m->cfg;
    if (!m->loaded) return FG_ERR_STATE;
    if (!on) {
        if (m->prefetch_n > 0) drain_prefetch(m, -1);
        m->prefetch = 0;
        return FG_OK;
    }
    if (!m->io_ready) return FG_ERR_STATE; /* resident: nothing to read */
    for (int32_t l = 1; l < c->n_layer; l++) {
        if (!m->router_set[l]) return FG_ERR_STATE;
    }
    m->prefetch = 1;
    return FG_OK;
}

/* At the end of a decode call: read the guessed experts of layer next that no slot holds,
 * while llama.cpp computes what comes before that layer's experts (its attention). */
static void issue_prefetch(fg_moe *m, int32_t next) {
    const fg_moe_config *c = &m->cfg;
    int32_t n = 0;
    for (int32_t e = 0; e < c->n_expert; e++) {
        if (!m->predicted[e] || m->slot_of[next * c->n_expert + e] >= 0) continue;
        expert_read(m, &m->layers[next], e, n, &m->prefetch_reads[n]);
        m->prefetch_expert[n++] = e;
    }
    if (n == 0 || fg_io_submit(&m->io, m->prefetch_reads, n) != FG_OK) return;
    m->prefetch_n = n;
    m->prefetch_layer = next;
    m->stats.prefetch_reads += (uint64_t)n;
}

/* The prefetch job's reads, waited for (returns the wait): those of layer (-1: none) that it
 * routes to are computed (decode: one token) and go into slots as its misses would, marked
 * in prefetch_done; the rest are dropped. A failed read is dropped too: it was a guess, and
 * the layer reads what it still needs. */
static double drain_prefetch(fg_moe *m, int32_t layer) {
    const fg_moe_config *c = &m->cfg;
    const int same = layer >= 0 && m->prefetch_layer == layer;
    const fg_moe_layer *L = same ? &m->layers[layer] : NULL;
    double waited = 0.0;
    fg_landed got;
    while (fg_io_next_timed(&m->io, &got, &waited)) {
        const int32_t e = m->prefetch_expert[got.read];
        if (same && got.status == FG_OK && m->tok_count[e] > 0) {
            const uint8_t *buf = fg_io_buffer(&m->io, &got);
            compute_expert(m, L, e, buf, 1);
            const int32_t s = take_slot(m, layer * c->n_expert + e);
            if (s >= 0) memcpy(slot_data(m, s), buf, (size_t)L->stride);
            m->prefetch_done[e] = 1;
            m->stats.prefetch_used++;
        }
        fg_io_release(&m->io, &got);
    }
    (void)fg_io_end(&m->io);
    m->prefetch_n = 0;
    m->prefetch_layer = -1;
    m->stats.bytes_read = m->reader.bytes_read;
    m->stats.reads = m->reader.reads;
    return waited;
}

/* Before the call's hits and misses are taken: the guess against what layer routes to. */
static void score_prediction(fg_moe *m, int32_t layer, int32_t n_need) {
    const fg_moe_config *c = &m->cfg;
    int32_t right = 0;
    for (int32_t k = 0; k < n_need; k++) {
        const int32_t e = m->need[k];
        if (!m->predicted[e]) continue;
        right++;
        if (m->slot_of[layer * c->n_expert + e] < 0) m->stats.next_right_missed++;
    }
    for (int32_t e = 0; e < c->n_expert; e++) {
        if (m->predicted[e] && m->slot_of[layer * c->n_expert + e] < 0) {
            m->stats.next_missed_predicted++;
        }
    }
    m->stats.next_predicted += (uint64_t)c->n_expert_used;
    m->stats.next_right += (uint64_t)right;
}

static int moe_call(fg_moe *m, int32_t layer, const float *x, float *y, int32_t n_tokens) {
    const fg_moe_config *c = &m->cfg;
    if (!m->loaded) return FG_ERR_STATE;
    if (layer < 0 || layer >= c->n_layer || n_tokens < 1 || n_tokens > c->max_tokens) {
        return FG_ERR_ARG;
    }
    fg_moe_layer *L = &m->layers[layer];
    const double t0 = fg_now_seconds();
    const int32_t n_need = group_pairs(m, n_tokens);
    if (n_need < 0) return FG_ERR_ARG;
    const size_t embd = (size_t)c->n_embd;
    for (int p = 0; p <= L->up_xq; p++) { /* up shares the gate's input when it can */
        for (int32_t t = 0; t < n_tokens; t++) {
            L->quant[p](x + (size_t)t * embd, m->xq[p] + (size_t)t * L->xq_row[p], c->n_embd);
        }
    }
    m->call++;
    if (n_tokens == 1 && m->pred_layer == layer) score_prediction(m, layer, n_need);
    m->pred_layer = -1;
    /* a guess for another layer (a graph cut short) is dropped now; one for this layer is
     * taken below, after the resident experts are computed while it lands */
    double waited = 0.0;
    if (m->prefetch_n > 0 && (m->prefetch_layer != layer || n_tokens != 1)) {
        waited += drain_prefetch(m, -1);
    }
    const int prefetched = m->prefetch_n > 0;
    if (m->trace_n < m->trace_cap) {
        uint8_t *used = m->trace_used + (size_t)m->trace_n * (size_t)c->n_expert;
        memset(used, 0, (size_t)c->n_expert);
        for (int32_t k = 0; k < n_need; k++) used[m->need[k]] = 1;
        m->trace_layer[m->trace_n++] = layer;
    }
    if (layer == 0) m->stats.tokens += (uint64_t)n_tokens;
    m->stats.calls++;

    /* hits are marked busy first, so that no miss of this call evicts them */
    int32_t n_miss = 0, n_hit = 0;
    for (int32_t k = 0; k < n_need; k++) {
        const int32_t e = m->need[k];
        const int32_t s = m->slot_of[layer * c->n_expert + e];
        if (s >= 0) {
            m->busy[s] = m->call;
            if (m->count[s] < FG_MOE_MAX_COUNT) m->count[s]++;
            if (m->count[s] == FG_MOE_PINNED) m->stats.pinned_hits++;
            m->hit_slot[n_hit] = s;
            m->hit_expert[n_hit++] = e;
        } else {
            m->read_expert[n_miss++] = e;
        }
    }
    if (prefetched) {
        for (int32_t k = 0; k < n_hit; k++) {
            compute_expert(m, L, m->hit_expert[k], slot_data(m, m->hit_slot[k]), n_tokens);
        }
        for (int32_t k = 0; k < n_miss; k++) m->prefetch_done[m->read_expert[k]] = 0;
        waited += drain_prefetch(m, layer); /* computes the guesses this layer uses */
        int32_t left = 0;
        for (int32_t k = 0; k < n_miss; k++) {
            const int32_t e = m->read_expert[k];
            if (m->prefetch_done[e]) {
                n_hit++; /* in time: counted as a hit */
            } else {
                m->read_expert[left++] = e;
            }
        }
        n_miss = left;
    }
    for (int32_t k = 0; k < n_miss; k++) {
        const int32_t e = m->read_expert[k];
        expert_read(m, L, e, k, &m->reads[k]);
        m->read_slot[k] = take_slot(m, layer * c->n_expert + e);
    }
    int rc = FG_OK;
    if (n_miss > 0) rc = m->io_ready ? fg_io_submit(&m->io, m->reads, n_miss) : FG_ERR_STATE;
    if (rc != FG_OK) {
        for (int32_t k = 0; k < n_miss; k++) {
            if (m->read_slot[k] >= 0) forget_slot(m, m->read_slot[k]);
        }
        return rc;
    }
    /* the resident experts while the reads are in flight (unless done while a prefetch
     * landed) */
    for (int32_t k = 0; !prefetched && k < n_hit; k++) {
        compute_expert(m, L, m->hit_expert[k], slot_data(m, m->hit_slot[k]), n_tokens);
    }
    if (n_miss > 0) {
        fg_landed got;
        while (fg_io_next_timed(&m->io, &got, &waited)) {
            const int32_t k = m->reads[got.read].copy0;
            const int32_t s = m->read_slot[k];
            if (got.status == FG_OK) {
                const uint8_t *buf = fg_io_buffer(&m->io, &got);
                compute_expert(m, L, m->read_expert[k], buf, n_tokens);
                if (s >= 0) memcpy(slot_data(m, s), buf, (size_t)L->stride);
            } else if (s >= 0) {
                forget_slot(m, s); /* its bytes never arrived */
            }
            fg_io_release(&m->io, &got);
        }
        rc = fg_io_end(&m->io);
    }
    L->hits += (uint64_t)n_hit;
    L->misses += (uint64_t)n_miss;
    m->stats.expert_hits += (uint64_t)n_hit;
    m->stats.expert_misses += (uint64_t)n_miss;
    m->stats.bytes_needed += (uint64_t)n_miss * (uint64_t)L->stride;
    m->stats.bytes_read = m->reader.bytes_read;
    m->stats.reads = m->reader.reads;
    m->stats.time_io_wait_s += waited;
    if (rc != FG_OK) return rc;

    /* each token's experts weighted and summed in top-k order, as ggml adds them */
    const int32_t used = c->n_expert_used;
    for (int32_t t = 0; t < n_tokens; t++) {
        float *yt = y + (size_t)t * embd;
        const float *o = m->expert_out + (size_t)t * (size_t)used * embd;
        const float *w = m->weights + (size_t)t * (size_t)used;
        for (size_t i = 0; i < embd; i++) yt[i] = o[i] * w[0];
        for (int32_t k = 1; k < used; k++) {
            const float *ok = o + (size_t)k * embd;
            for (size_t i = 0; i < embd; i++) yt[i] += ok[i] * w[k];
        }
    }
    if (n_tokens == 1 && layer + 1 < c->n_layer && m->router_set[layer + 1]) {
        predict_next(m, layer + 1, x);
        if (m->prefetch) issue_prefetch(m, layer + 1);
    }
    const double t1 = fg_now_seconds();
    m->stats.time_total_s += t1 - t0;
    m->stats.time_ffn_s += t1 - t0 - waited;
    return FG_OK;
}

int fg_moe_forward(fg_moe *m, int32_t layer, const float *x, const int32_t *ids,
                   const float *weights, float *y, int32_t n_tokens) {
    const fg_moe_config *c = &m->cfg;
    if (n_tokens < 1 || n_tokens > c->max_tokens) return FG_ERR_ARG;
    const size_t n = (size_t)n_tokens * (size_t)c->n_expert_used;
    memcpy(m->ids, ids, n * sizeof *ids);
    memcpy(m->weights, weights, n * sizeof *weights);
    return moe_call(m, layer, x, y, n_tokens);
}

/* ---- the eval callback --------------------------------------------------------------- */

static void set_error(fg_moe *m, int code, const char *msg) {
    fg_error_slot_set(&m->err, code, msg);
}

/* Copy a tensor of n_expert_used x rows values (any shape and strides that hold them, the
 * first dimensions running fastest) into dst as 32-bit values; rows or -1. */
static int32_t gather_routing(fg_moe *m, const fg_ggml_tensor_abi *t, int32_t type,
                              void *dst) {
    const int64_t used = m->cfg.n_expert_used;
    const int64_t total = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    char msg[200];
    if (t->type != type || t->data == NULL || total % used != 0 || total / used < 1 ||
        total / used > m->cfg.max_tokens) {
        snprintf(msg, sizeof msg,
                 "node %.64s: expected %s [%lld x rows], got type %d [%lld x %lld x %lld x %lld]",
                 t->name, type == FG_GGML_TYPE_I32 ? "I32" : "F32", (long long)used,
                 (int)t->type, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
                 (long long)t->ne[3]);
        set_error(m, FG_ERR_SHAPE, msg);
        return -1;
    }
    int32_t *out = dst;
    int64_t q = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++) {
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++) {
            for (int64_t i1 = 0; i1 < t->ne[1]; i1++) {
                for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
                    const char *src = (const char *)t->data + i0 * t->nb[0] + i1 * t->nb[1] +
                                      i2 * t->nb[2] + i3 * t->nb[3];
                    memcpy(&out[q++], src, sizeof(int32_t)); /* F32 and I32 alike */
                }
            }
        }
    }
    return (int32_t)(total / used);
}

/* A contiguous F32 [n_embd x rows] tensor of at most max_tokens rows: rows, or -1 (error
 * recorded). */
static int32_t checked_rows(fg_moe *m, const fg_ggml_tensor_abi *t) {
    char msg[200];
    const int64_t rows = fg_f32_rows(t, m->cfg.n_embd, m->cfg.max_tokens, msg, sizeof msg);
    if (rows < 0) set_error(m, FG_ERR_SHAPE, msg);
    return (int32_t)rows;
}

/* The nodes that hold the final expert weights, in the order build_moe_ffn makes them. */
static const char *const weight_nodes[] = {"ffn_moe_weights", "ffn_moe_weights_softmax",
                                           "ffn_moe_weights_norm", "ffn_moe_weights_scaled"};

static int32_t routing_layer(const char *name, int *is_ids) {
    int32_t l = fg_node_layer(name, "ffn_moe_topk");
    if (l >= 0) {
        *is_ids = 1;
        return l;
    }
    *is_ids = 0;
    for (size_t i = 0; i < sizeof weight_nodes / sizeof *weight_nodes; i++) {
        l = fg_node_layer(name, weight_nodes[i]);
        if (l >= 0) return l;
    }
    return -1;
}

static void on_output(fg_moe *m, fg_ggml_tensor_abi *t, int32_t layer) {
    const int32_t rows = checked_rows(m, t);
    const int32_t want = m->pending_rows;
    m->pending_rows = 0;
    if (rows < 0) return;
    char msg[200];
    if (rows != want || m->have_ids != want || m->have_weights != want) {
        snprintf(msg, sizeof msg,
                 "layer %d: MoE output has %d rows; input %d, routing %d ids and %d weights",
                 (int)layer, (int)rows, (int)want, (int)m->have_ids, (int)m->have_weights);
        set_error(m, FG_ERR_SHAPE, msg);
        return;
    }
    const int rc = moe_call(m, layer, m->x, t->data, rows);
    if (rc != FG_OK) {
        snprintf(msg, sizeof msg, "experts of layer %d: %s", (int)layer, fg_strerror(rc));
        set_error(m, rc, msg);
    }
}

bool fg_moe_eval_callback(void *tensor, bool ask, void *user_data) {
    fg_moe *m = user_data;
    fg_ggml_tensor_abi *t = tensor;
    if (m == NULL || t == NULL) return true;
    const int32_t n_layer = m->cfg.n_layer;
    int32_t l = fg_node_layer(t->name, m->cfg.input_node);
    if (l >= 0 && l < n_layer) {
        if (ask) return true;
        m->pending_rows = 0;
        m->have_ids = m->have_weights = 0;
        const int32_t rows = checked_rows(m, t);
        if (rows > 0) {
            memcpy(m->x, t->data, (size_t)rows * (size_t)m->cfg.n_embd * sizeof(float));
            m->pending_rows = rows;
            m->pending_layer = l;
        }
        return true;
    }
    int is_ids = 0;
    l = routing_layer(t->name, &is_ids);
    if (l >= 0 && l < n_layer) {
        if (ask) return m->pending_rows > 0 && l == m->pending_layer;
        if (m->pending_rows > 0 && l == m->pending_layer) {
            const int32_t rows = is_ids
                ? gather_routing(m, t, FG_GGML_TYPE_I32, m->ids)
                : gather_routing(m, t, FG_GGML_TYPE_F32, m->weights);
            if (rows < 0) {
                m->pending_rows = 0;
            } else if (is_ids) {
                m->have_ids = rows;
            } else {
                m->have_weights = rows;
            }
        }
        return true;
    }
    l = fg_node_layer(t->name, m->cfg.output_node);
    if (l >= 0 && l < n_layer) {
        /* the name may be given to more than one node: the first after the input is ours */
        if (ask) return m->pending_rows > 0 && l == m->pending_layer;
        if (m->pending_rows > 0 && l == m->pending_layer) on_output(m, t, l);
        return true;
    }
    return !ask;
}

/* ---- stats and tests ----------------------------------------------------------------- */

void fg_moe_layer_stats(const fg_moe *m, uint64_t *hits, uint64_t *misses) {
    for (int32_t l = 0; l < m->cfg.n_layer; l++) {
        hits[l] = m->layers[l].hits;
        misses[l] = m->layers[l].misses;
    }
}

void fg_moe_resident(const fg_moe *m, uint8_t *out) {
    const size_t n = (size_t)m->cfg.n_layer * (size_t)m->cfg.n_expert;
    for (size_t i = 0; i < n; i++) out[i] = m->slot_of[i] >= 0;
}

void fg_moe_get_stats(const fg_moe *m, fg_moe_stats *out) {
    *out = m->stats;
}

void fg_moe_reset_stats(fg_moe *m) {
    const uint64_t pinned = m->stats.pinned;
    memset(&m->stats, 0, sizeof m->stats);
    m->stats.pinned = pinned;
    for (int32_t l = 0; l < m->cfg.n_layer; l++) m->layers[l].hits = m->layers[l].misses = 0;
    m->reader.bytes_read = 0;
    m->reader.reads = 0;
}

int fg_moe_take_error(fg_moe *m, char *msg, size_t msg_cap) {
    return fg_error_slot_take(&m->err, msg, msg_cap);
}

void fg_moe_trace_stop(fg_moe *m) {
    free(m->trace_layer);
    free(m->trace_used);
    m->trace_layer = NULL;
    m->trace_used = NULL;
    m->trace_cap = m->trace_n = 0;
}

int fg_moe_trace_start(fg_moe *m, int64_t max_calls) {
    fg_moe_trace_stop(m);
    if (max_calls < 0) return FG_ERR_ARG;
    if (max_calls == 0) return FG_OK;
    m->trace_layer = malloc((size_t)max_calls * sizeof *m->trace_layer);
    m->trace_used = malloc((size_t)max_calls * (size_t)m->cfg.n_expert);
    if (m->trace_layer == NULL || m->trace_used == NULL) {
        fg_moe_trace_stop(m);
        return FG_ERR_NOMEM;
    }
    m->trace_cap = max_calls;
    return FG_OK;
}

int64_t fg_moe_trace_count(const fg_moe *m) {
    return m->trace_n;
}

int64_t fg_moe_trace_copy(const fg_moe *m, int32_t *layer, uint8_t *used) {
    if (m->trace_n == 0) return 0;
    memcpy(layer, m->trace_layer, (size_t)m->trace_n * sizeof *layer);
    memcpy(used, m->trace_used, (size_t)m->trace_n * (size_t)m->cfg.n_expert);
    return m->trace_n;
}

void fg_moe_debug_fail_reads(fg_moe *m, int errno_value, int64_t after) {
    __atomic_store_n(&m->reader.inject_after, after, __ATOMIC_RELAXED);
    __atomic_store_n(&m->reader.inject_errno, errno_value, __ATOMIC_RELAXED);
}
