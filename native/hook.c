/*
 * The ggml eval callback (ggml_backend_sched_eval_callback) installed on a llama.cpp
 * context. llama.cpp asks about every graph node (ask=true); for the FFN input node of
 * layer L we say yes, and when it has been computed (ask=false) we run the FFN ourselves.
 * The result waits in rt->ffn_out until the FFN output node of layer L is computed, and is
 * written over it. llama.cpp's own FFN has a dummy width and zero weights (see the trunk
 * in the flash GGUF format), so what it computed there is thrown away.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml_abi.h"
#include "runtime_internal.h"

/* A contiguous F32 tensor of n_embd x rows (rows <= max_tokens); rows or -1. */
static int32_t checked_rows(fg_runtime *rt, const fg_ggml_tensor_abi *t) {
    char msg[200];
    const int64_t rows = fg_f32_rows(t, rt->cfg.n_embd, rt->cfg.max_tokens, msg, sizeof msg);
    if (rows < 0) fg_runtime_set_error(rt, FG_ERR_SHAPE, msg);
    return (int32_t)rows;
}

static void on_ffn_input(fg_runtime *rt, const fg_ggml_tensor_abi *t, int32_t layer) {
    rt->pending_rows[layer] = 0;
    const int32_t rows = checked_rows(rt, t);
    if (rows < 0) return;
    const int rc = fg_runtime_ffn(rt, layer, t->data, rt->ffn_out, rows);
    if (rc != FG_OK) {
        char msg[160];
        snprintf(msg, sizeof msg, "FFN of layer %d: %s", (int)layer, fg_strerror(rc));
        fg_runtime_set_error(rt, rc, msg);
        return;
    }
    rt->pending_rows[layer] = rows;
}

static void on_ffn_output(fg_runtime *rt, fg_ggml_tensor_abi *t, int32_t layer) {
    const int32_t rows = checked_rows(rt, t);
    const int32_t want = rt->pending_rows[layer];
    rt->pending_rows[layer] = 0;
    if (rows < 0) return;
    if (rows != want) {
        char msg[160];
        snprintf(msg, sizeof msg, "layer %d: FFN output has %d rows, its input had %d",
                 (int)layer, (int)rows, (int)want);
        fg_runtime_set_error(rt, FG_ERR_SHAPE, msg);
        return;
    }
    memcpy(t->data, rt->ffn_out, (size_t)rows * (size_t)rt->cfg.n_embd * sizeof(float));
}

bool fg_eval_callback(void *tensor, bool ask, void *user_data) {
    fg_runtime *rt = user_data;
    fg_ggml_tensor_abi *t = tensor;
    if (rt == NULL || t == NULL) return true;
    const int32_t in_layer = fg_node_layer(t->name, rt->cfg.input_node);
    if (in_layer >= 0 && in_layer < rt->cfg.n_layer) {
        if (!ask) on_ffn_input(rt, t, in_layer);
        return true;
    }
    const int32_t out_layer = fg_node_layer(t->name, rt->cfg.output_node);
    if (out_layer >= 0 && out_layer < rt->cfg.n_layer) {
        /* Some graphs give the name to more than one node (llama: the FFN result, then the
         * residual sum): only the first one after the input has a result waiting. */
        if (ask) return rt->pending_rows[out_layer] > 0;
        if (rt->pending_rows[out_layer] > 0) on_ffn_output(rt, t, out_layer);
        return true;
    }
    /* Returning false on ask=false would stop the graph: only ever say false to asks. */
    return !ask;
}
