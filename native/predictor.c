/*
 * The low-rank activity predictor (flashgguf/predictor.py is the reference):
 *   xq = Q8_0(x); z = A xq; zq = Q8_0(z); g = B zq; u = B_up zq (if present)
 *   score_i = |act(g_i)| * |u_i| (or 1) * scale_i; row i is active when score_i > threshold.
 * With residual RMS sigma_g, sigma_u (fitted on calibration inputs), the score is instead the
 * expected contribution when g_i and u_i are off by Gaussian residuals of that size:
 *   E|act(g_i + sigma_g e)| by 3-point Gauss-Hermite (nodes 0, +-sqrt 3; weights 2/3, 1/6),
 *   E|u_i + sigma_u e| ~ sqrt(u_i^2 + sigma_u^2).
 * A neuron the low rank sees poorly then still scores by how large it can be.
 * Dot products are ggml's Q8_0 x Q8_0 (integer block sums times the two scales), so the
 * numpy reference, which dequantizes and multiplies, differs only by float rounding.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "runtime_internal.h"

/* Scoring fewer (rows x rank) than this runs on the calling thread (a region's wake-up
 * costs more; SmolLM2 at rank 32 is 49K). */
#define FG_MIN_PARALLEL_PREDICT 65536
/* 3-point Gauss-Hermite rule for a standard normal: nodes 0 and +-sqrt(3). */
#define FG_GAUSS_HERMITE_NODE 1.7320508f
#define FG_GAUSS_HERMITE_W0 (2.0f / 3.0f)
#define FG_GAUSS_HERMITE_W1 (1.0f / 6.0f)

static void free_predictor(fg_predictor *p) {
    free(p->a);
    free(p->b);
    free(p->b_up);
    free(p->scale);
    free(p->sigma_g);
    free(p->sigma_u);
    memset(p, 0, sizeof *p);
}

static void *copy_of(const void *src, size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) return NULL;
    memcpy(p, src, n);
    return p;
}

int fg_runtime_set_predictor(fg_runtime *rt, int32_t layer, int32_t rank, const void *a,
                             const void *b, const void *b_up, const float *scale,
                             float threshold) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || rank <= 0 || rank % QK8_0 != 0 ||
        c->n_embd % QK8_0 != 0 || a == NULL || b == NULL || scale == NULL ||
        !isfinite(threshold)) {
        return FG_ERR_ARG;
    }
    if (rt->loaded) return FG_ERR_STATE; /* the budget was split at load */
    fg_predictor *p = &rt->layers[layer].pred;
    free_predictor(p);
    const size_t a_bytes = (size_t)rank * fg_row_size(FG_TYPE_Q8_0, c->n_embd);
    const size_t b_bytes = (size_t)c->n_ff * fg_row_size(FG_TYPE_Q8_0, rank);
    const size_t s_bytes = (size_t)c->n_ff * sizeof(float);
    p->a = copy_of(a, a_bytes);
    p->b = copy_of(b, b_bytes);
    p->b_up = b_up != NULL ? copy_of(b_up, b_bytes) : NULL;
    p->scale = copy_of(scale, s_bytes);
    if (!p->a || !p->b || (b_up != NULL && !p->b_up) || !p->scale) {
        free_predictor(p);
        return FG_ERR_NOMEM;
    }
    p->rank = rank;
    p->threshold = threshold;
    p->nbytes = a_bytes + b_bytes * (b_up != NULL ? 2 : 1) + s_bytes;
    if (rank > rt->max_rank) {
        float *z = NULL;
        uint8_t *zq = NULL;
        if (posix_memalign((void **)&z, 64, (size_t)rank * sizeof(float)) != 0 ||
            posix_memalign((void **)&zq, 64, fg_row_size(FG_TYPE_Q8_0, rank)) != 0) {
            free(z);
            free_predictor(p);
            return FG_ERR_NOMEM;
        }
        free(rt->pred_z);
        free(rt->pred_zq);
        rt->pred_z = z;
        rt->pred_zq = zq;
        rt->max_rank = rank;
    }
    return FG_OK;
}

int fg_runtime_set_predictor_sigma(fg_runtime *rt, int32_t layer, const float *sigma_g,
                                   const float *sigma_u) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || sigma_g == NULL) return FG_ERR_ARG;
    fg_predictor *p = &rt->layers[layer].pred;
    if (rt->loaded || p->rank == 0) return FG_ERR_STATE;
    if ((sigma_u != NULL) != (p->b_up != NULL)) return FG_ERR_ARG;
    for (int32_t i = 0; i < c->n_ff; i++) {
        if (!(sigma_g[i] >= 0.0f) || !isfinite(sigma_g[i]) ||
            (sigma_u != NULL && (!(sigma_u[i] >= 0.0f) || !isfinite(sigma_u[i])))) {
            return FG_ERR_ARG;
        }
    }
    const size_t bytes = (size_t)c->n_ff * sizeof(float);
    float *g = copy_of(sigma_g, bytes);
    float *u = sigma_u != NULL ? copy_of(sigma_u, bytes) : NULL;
    if (g == NULL || (sigma_u != NULL && u == NULL)) {
        free(g);
        free(u);
        return FG_ERR_NOMEM;
    }
    if (p->sigma_g != NULL) p->nbytes -= bytes * (p->sigma_u != NULL ? 2 : 1);
    free(p->sigma_g);
    free(p->sigma_u);
    p->sigma_g = g;
    p->sigma_u = u;
    p->nbytes += bytes * (u != NULL ? 2 : 1);
    return FG_OK;
}

void fg_predictor_release(fg_predictor *p) { free_predictor(p); }

/* The score's g factor: |act(g)|, or its expectation under a residual of RMS sigma. */
static float g_factor(const fg_config *c, float g, const float *sigma_g, int32_t i) {
    if (sigma_g == NULL) {
        fg_activate(c->activation, c->activation_threshold, &g, 1);
        return fabsf(g);
    }
    const float d = FG_GAUSS_HERMITE_NODE * sigma_g[i];
    float v[3] = {g, g + d, g - d};
    fg_activate(c->activation, c->activation_threshold, v, 3);
    return FG_GAUSS_HERMITE_W0 * fabsf(v[0]) + FG_GAUSS_HERMITE_W1 * (fabsf(v[1]) + fabsf(v[2]));
}

void fg_predict_rows(fg_runtime *rt, const fg_layer *L, const float *x, int32_t n_tokens,
                     int32_t from, uint8_t *mask, int32_t mask_stride) {
    const fg_config *c = &rt->cfg;
    const fg_predictor *p = &L->pred;
    const size_t a_row = fg_row_size(FG_TYPE_Q8_0, c->n_embd);
    const size_t b_row = fg_row_size(FG_TYPE_Q8_0, p->rank);
    for (int32_t t = 0; t < n_tokens; t++) {
        rt->quant_q8(x + (size_t)t * (size_t)c->n_embd, rt->pred_xq, c->n_embd);
        for (int32_t j = 0; j < p->rank; j++) {
            rt->dot_q8(p->a + (size_t)j * a_row, rt->pred_xq, c->n_embd, &rt->pred_z[j]);
        }
        rt->quant_q8(rt->pred_z, rt->pred_zq, p->rank);
        uint8_t *m = mask + (size_t)t * (size_t)mask_stride;
        const uint8_t *zq = rt->pred_zq;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((int64_t)(c->n_ff - from) * p->rank >= \
                                              FG_MIN_PARALLEL_PREDICT) \
    num_threads(fg_call_threads(c, n_tokens))
#endif
        for (int32_t i = from; i < c->n_ff; i++) {
            if (mask_stride == 0 && m[i]) continue; /* union: an earlier token chose it */
            float g, u = 1.0f;
            rt->dot_q8(p->b + (size_t)i * b_row, zq, p->rank, &g);
            const float gf = g_factor(c, g, p->sigma_g, i);
            if (p->b_up != NULL) {
                rt->dot_q8(p->b_up + (size_t)i * b_row, zq, p->rank, &u);
                if (c->activation == FG_ACT_DRELU && u < 0.0f) u = 0.0f; /* relu on up too */
                u = p->sigma_u != NULL ? sqrtf(u * u + p->sigma_u[i] * p->sigma_u[i]) : fabsf(u);
            }
            if (gf * u * p->scale[i] > p->threshold) m[i] = 1;
        }
    }
}

int fg_runtime_predict(fg_runtime *rt, int32_t layer, const float *x, int32_t n_tokens,
                       uint8_t *out) {
    const fg_config *c = &rt->cfg;
    if (layer < 0 || layer >= c->n_layer || n_tokens <= 0) return FG_ERR_ARG;
    const fg_layer *L = &rt->layers[layer];
    if (c->mode == FG_MODE_GATE) { /* the gate's choice, from the resident gate matrix */
        if (!rt->loaded) return FG_ERR_STATE;
        if (n_tokens > c->max_tokens) return FG_ERR_ARG;
        fg_quantize_inputs(rt, L, x, n_tokens);
        memset(out, 0, (size_t)n_tokens * (size_t)c->n_ff);
        fg_gate_select(rt, L, n_tokens, 0, out, c->n_ff);
        return FG_OK;
    }
    if (L->pred.rank == 0 || rt->pred_xq == NULL) return FG_ERR_STATE;
    memset(out, 0, (size_t)n_tokens * (size_t)c->n_ff);
    fg_predict_rows(rt, L, x, n_tokens, 0, out, c->n_ff);
    return FG_OK;
}
