/* The trace: per streaming FFN call, the rows it needed, what the cache held and what was
 * read (flashgguf-profile run --trace records it, replay feeds it back). Off by default:
 * the hot path pays one branch. */
#include <stdlib.h>
#include <string.h>

#include "runtime_internal.h"

static void trace_free(fg_trace *t) {
    free(t->calls);
    free(t->needed);
    free(t->read_offset);
    free(t->read_len);
    memset(t, 0, sizeof *t);
}

int fg_runtime_trace_start(fg_runtime *rt, int64_t max_calls, int64_t max_reads) {
    if (max_calls < 0 || max_reads < 0) return FG_ERR_ARG;
    /* split rows' two stages are not traced: a call there is two reads of other rows */
    if (!rt->loaded || rt->cfg.mode == FG_MODE_DENSE || rt->cfg.split_rows) return FG_ERR_STATE;
    fg_trace *t = &rt->trace;
    trace_free(t);
    t->row_bytes = ((size_t)rt->cfg.n_ff + 7) / 8;
    if (max_calls > 0) {
        t->calls = calloc((size_t)max_calls, sizeof *t->calls);
        t->needed = calloc((size_t)max_calls, t->row_bytes);
    }
    if (max_reads > 0) {
        t->read_offset = calloc((size_t)max_reads, sizeof *t->read_offset);
        t->read_len = calloc((size_t)max_reads, sizeof *t->read_len);
    }
    if ((max_calls > 0 && (t->calls == NULL || t->needed == NULL)) ||
        (max_reads > 0 && (t->read_offset == NULL || t->read_len == NULL))) {
        trace_free(t);
        return FG_ERR_NOMEM;
    }
    t->max_calls = max_calls;
    t->max_reads = max_reads;
    return FG_OK;
}

void fg_trace_append(fg_runtime *rt, fg_trace_call *call) {
    fg_trace *t = &rt->trace;
    if (t->max_calls == 0) return;
    call->first_read = (uint64_t)t->seen_reads;
    for (int32_t r = 0; r < call->reads; r++, t->seen_reads++) {
        if (t->n_reads < t->max_reads) {
            t->read_offset[t->n_reads] = rt->reads[r].offset;
            t->read_len[t->n_reads++] = rt->reads[r].len;
        }
    }
    t->seen_calls++;
    if (t->n_calls >= t->max_calls) return;
    uint8_t *bits = t->needed + (size_t)t->n_calls * t->row_bytes;
    for (int32_t k = 0; k < call->needed; k++) {
        const int32_t i = rt->need[k];
        bits[i >> 3] |= (uint8_t)(1u << (i & 7));
    }
    t->calls[t->n_calls++] = *call;
}

void fg_runtime_trace_counts(const fg_runtime *rt, int64_t *counts) {
    const fg_trace *t = &rt->trace;
    counts[0] = t->n_calls;
    counts[1] = t->n_reads;
    counts[2] = t->seen_calls;
    counts[3] = t->seen_reads;
}

void fg_runtime_trace_copy(const fg_runtime *rt, fg_trace_call *calls, uint8_t *needed,
                           uint64_t *read_offset, uint64_t *read_len) {
    const fg_trace *t = &rt->trace;
    const size_t n = (size_t)t->n_calls, m = (size_t)t->n_reads;
    if (n > 0) {
        memcpy(calls, t->calls, n * sizeof *calls);
        memcpy(needed, t->needed, n * t->row_bytes);
    }
    if (m > 0) {
        memcpy(read_offset, t->read_offset, m * sizeof *read_offset);
        memcpy(read_len, t->read_len, m * sizeof *read_len);
    }
}

void fg_runtime_trace_stop(fg_runtime *rt) { trace_free(&rt->trace); }
