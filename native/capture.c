/*
 * Calibration capture: an eval callback that records the rows of one per-layer graph node
 * ("<node>-L", F32 [n_embd x rows]) while llama.cpp runs a model, e.g. each layer's FFN
 * input. Rows accumulate per layer in a buffer sized at creation (max_rows per layer);
 * the caller drains them with fg_capture_take after each decode. Rows past the capacity
 * are not recorded and raise FG_ERR_ARG on the next take, so nothing is lost silently.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error_slot.h"
#include "flashgguf.h"
#include "ggml_abi.h"

struct fg_capture {
    int32_t n_layer;
    int32_t n_embd;
    int32_t max_rows;
    char node[32];
    float *rows;        /* n_layer x max_rows x n_embd */
    int32_t *n_rows;    /* per layer: rows recorded since the last take */
    fg_error_slot err;  /* first error inside the callback */
};

int fg_capture_create(int32_t n_layer, int32_t n_embd, const char *node, int32_t max_rows,
                      fg_capture **out) {
    *out = NULL;
    if (n_layer <= 0 || n_embd <= 0 || max_rows <= 0 || node == NULL || node[0] == 0 ||
        strlen(node) >= sizeof((fg_capture *)0)->node) {
        return FG_ERR_ARG;
    }
    fg_capture *c = calloc(1, sizeof *c);
    if (c == NULL) return FG_ERR_NOMEM;
    c->n_layer = n_layer;
    c->n_embd = n_embd;
    c->max_rows = max_rows;
    snprintf(c->node, sizeof c->node, "%s", node);
    c->rows = malloc((size_t)n_layer * (size_t)max_rows * (size_t)n_embd * sizeof(float));
    c->n_rows = calloc((size_t)n_layer, sizeof *c->n_rows);
    if (c->rows == NULL || c->n_rows == NULL) {
        fg_capture_destroy(c);
        return FG_ERR_NOMEM;
    }
    *out = c;
    return FG_OK;
}

void fg_capture_destroy(fg_capture *c) {
    if (c == NULL) return;
    free(c->rows);
    free(c->n_rows);
    free(c);
}

static void record(fg_capture *c, const fg_ggml_tensor_abi *t, int32_t layer) {
    const int64_t embd = c->n_embd;
    char msg[200];
    if (fg_f32_rows(t, embd, INT64_MAX, msg, sizeof msg) < 0) {
        fg_error_slot_set(&c->err, FG_ERR_SHAPE, msg);
        return;
    }
    const int64_t have = c->n_rows[layer];
    if (have + t->ne[1] > c->max_rows) {
        snprintf(msg, sizeof msg, "layer %d: %lld rows arrived with %lld of %d recorded; take "
                 "them after each decode", (int)layer, (long long)t->ne[1], (long long)have,
                 (int)c->max_rows);
        fg_error_slot_set(&c->err, FG_ERR_ARG, msg);
        return;
    }
    float *dst = c->rows + ((size_t)layer * (size_t)c->max_rows + (size_t)have) * (size_t)embd;
    memcpy(dst, t->data, (size_t)t->ne[1] * (size_t)embd * sizeof(float));
    c->n_rows[layer] = (int32_t)(have + t->ne[1]);
}

bool fg_capture_callback(void *tensor, bool ask, void *user_data) {
    fg_capture *c = user_data;
    const fg_ggml_tensor_abi *t = tensor;
    if (c == NULL || t == NULL) return true;
    const int32_t layer = fg_node_layer(t->name, c->node);
    if (layer >= 0 && layer < c->n_layer) {
        if (!ask) record(c, t, layer);
        return true;
    }
    return !ask; /* false on ask=false would stop the graph */
}

int32_t fg_capture_rows(const fg_capture *c, int32_t layer) {
    return layer >= 0 && layer < c->n_layer ? c->n_rows[layer] : 0;
}

int fg_capture_take(fg_capture *c, int32_t layer, float *out, int32_t out_rows) {
    if (c->err.code != FG_OK) return c->err.code;
    if (layer < 0 || layer >= c->n_layer || out_rows < c->n_rows[layer]) return FG_ERR_ARG;
    const size_t n = (size_t)c->n_rows[layer] * (size_t)c->n_embd;
    memcpy(out, c->rows + (size_t)layer * (size_t)c->max_rows * (size_t)c->n_embd,
           n * sizeof(float));
    c->n_rows[layer] = 0;
    return FG_OK;
}

int fg_capture_take_error(fg_capture *c, char *msg, size_t msg_cap) {
    return fg_error_slot_take(&c->err, msg, msg_cap);
}
