/* Gate-resident selection (FG_MODE_GATE): the gate matrix stays in DRAM, so each token's
 * act(gate) is exact, and the rows whose |act(gate)| is in the token's top share are the
 * ones whose up rows and down columns are fetched (CATS's criterion, with a top-k per token
 * instead of a calibrated threshold: BENCHMARKS.md, issue 11). The values computed here are
 * reused by the FFN, which then never computes a gate dot product again. */
#include <math.h>
#include <string.h>

#include "runtime_internal.h"

/* Fewer rows x tokens than this are computed on one thread (as in runtime.c). */
#define FG_GATE_MIN_PARALLEL 128

/* The k-th largest of v[0..n) (k in [1, n]); v is reordered. Iterative quickselect with a
 * median-of-three pivot: linear on average, and the result does not depend on the pivots. */
static float kth_largest(float *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    const int64_t want = k - 1; /* index in descending order */
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], c = v[hi];
        const float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) { /* descending: values > pivot to the left */
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                const float t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (want <= j) {
            hi = j;
        } else if (want >= i) {
            lo = i;
        } else {
            return pivot; /* between j and i every value equals the pivot */
        }
    }
    return v[want];
}

/* Rows of n_ff a share keeps: ceil(share x n_ff), less the float32 rounding of share (0.3f x 160
 * is 48.000002), in [1, n_ff]. */
static int64_t share_rows(float share, int64_t n_ff) {
    int64_t k = (int64_t)ceil((double)share * (double)n_ff - 0.01);
    return k < 1 ? 1 : k > n_ff ? n_ff : k;
}

/* A row's score factor: 1 + bonus when it is in DRAM (pinned or cached), else 1. */
static inline float resident_boost(const fg_layer *L, float bonus, int64_t i) {
    return L->cache.slot_of != NULL && L->cache.slot_of[i] >= 0 ? bonus : 1.0f;
}

void fg_gate_select(fg_runtime *rt, const fg_layer *L, int32_t n_tokens, int32_t from,
                    uint8_t *mask, int32_t mask_stride) {
    const fg_config *c = &rt->cfg;
    const fg_layout *lay = &L->lay;
    const int64_t n_ff = c->n_ff;
    const int nth = fg_call_threads(c, n_tokens);
    const int64_t keep = share_rows(L->gate_keep, n_ff);
    float *act = rt->gate_act;
    const float bonus = 1.0f + c->gate_cache_bonus;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (n_ff * n_tokens >= FG_GATE_MIN_PARALLEL)
#else
    (void)nth;
#endif
    {
        const int tid = team_index(), team = team_size();
        /* act(gate) of every row: a static split of the rows, one token after another */
        const int64_t i0 = n_ff * tid / team, i1 = n_ff * (tid + 1) / team;
        for (int32_t t = 0; t < n_tokens; t++) {
            const uint8_t *xq = rt->xq_gate + (size_t)t * lay->xq_gate_row;
            float *a = act + (size_t)t * (size_t)n_ff;
            for (int64_t i = i0; i < i1; i++) {
                lay->dot_gate(L->gate_rows + (size_t)i * L->gate_row_bytes, xq, c->n_embd, &a[i]);
            }
            if (L->gate_bias != NULL) {
                for (int64_t i = i0; i < i1; i++) a[i] += L->gate_bias[i];
            }
            fg_activate(c->activation, c->activation_threshold, a + i0, i1 - i0);
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        /* each token's cut: its keep-th largest score, |act| or for a row in DRAM
         * (1 + bonus) |act|; tokens split across the team */
        float *mag = rt->select_scratch + (size_t)tid * (size_t)n_ff;
        for (int32_t t = (int32_t)tid; t < n_tokens; t += team) {
            const float *a = act + (size_t)t * (size_t)n_ff;
            for (int64_t i = 0; i < n_ff; i++) mag[i] = fabsf(a[i]) * resident_boost(L, bonus, i);
            const float cut = kth_largest(mag, n_ff, keep);
            uint8_t *m = mask + (size_t)t * (size_t)mask_stride;
            for (int64_t i = from; i < n_ff; i++) {
                /* stride 0: every token ORs into one mask; a byte store of 1 races benignly
                 * in practice but not by the C memory model, hence the atomic store */
                if (a[i] != 0.0f && fabsf(a[i]) * resident_boost(L, bonus, i) >= cut) {
                    __atomic_store_n(&m[i], 1, __ATOMIC_RELAXED);
                }
            }
        }
    }
}

void fg_gate_select_down(fg_runtime *rt, const fg_layer *L, int32_t n_tokens,
                         const int32_t *rows, int32_t n, int32_t from, uint8_t *mask) {
    const fg_config *c = &rt->cfg;
    const int64_t n_ff = c->n_ff;
    const int64_t keep = share_rows(c->down_keep, n_ff);
    const int nth = fg_call_threads(c, n_tokens);
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if ((int64_t)n * n_tokens >= FG_GATE_MIN_PARALLEL)
#else
    (void)nth;
#endif
    {
        const int tid = team_index(), team = team_size();
        float *score = rt->select_scratch + (size_t)tid * (size_t)n_ff;
        for (int32_t t = (int32_t)tid; t < n_tokens; t += team) {
            const float *h = rt->gate_act + (size_t)t * (size_t)n_ff;
            for (int32_t k = 0; k < n; k++) score[k] = fabsf(h[rows[k]]) * L->down_norm[rows[k]];
            /* fewer candidates than the keep: every one with an h that is not 0 */
            const float cut = keep < n ? kth_largest(score, n, keep) : 0.0f;
            for (int32_t k = 0; k < n; k++) {
                const int32_t i = rows[k];
                if (i >= from && h[i] != 0.0f && fabsf(h[i]) * L->down_norm[i] >= cut) {
                    __atomic_store_n(&mask[i], 1, __ATOMIC_RELAXED); /* as fg_gate_select */
                }
            }
        }
    }
}
