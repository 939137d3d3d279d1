/* What flashgguf reads of llama.cpp's graph nodes: the leading fields of struct ggml_tensor
 * and the "<name>-<layer>" naming of per-layer nodes. Shared by the FFN callback (hook.c)
 * and the calibration capture (capture.c). */
#ifndef FLASHGGUF_GGML_ABI_H
#define FLASHGGUF_GGML_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/*
 * Leading fields of struct ggml_tensor (ggml.h) for the llama.cpp that llama-cpp-python
 * 0.3.36 ships: the Python side refuses any other version, and every tensor we touch is
 * checked (type, strides, name) before its data is used.
 */
#define FG_GGML_MAX_DIMS 4
#define FG_GGML_MAX_OP_PARAMS 64
#define FG_GGML_MAX_SRC 10
#define FG_GGML_MAX_NAME 64
#define FG_GGML_TYPE_F32 0

typedef struct fg_ggml_tensor_abi {
    int32_t type;                            /* enum ggml_type */
    void *buffer;
    int64_t ne[FG_GGML_MAX_DIMS];            /* elements per dimension */
    size_t nb[FG_GGML_MAX_DIMS];             /* strides in bytes */
    int32_t op;                              /* enum ggml_op */
    int32_t op_params[FG_GGML_MAX_OP_PARAMS / sizeof(int32_t)];
    int32_t flags;
    void *src[FG_GGML_MAX_SRC];
    void *view_src;
    size_t view_offs;
    void *data;
    char name[FG_GGML_MAX_NAME];
    void *extra;
    char padding[8];
} fg_ggml_tensor_abi;

/* t holds 1 to max_rows rows of n_embd floats, contiguous: its row count; else -1 with a
 * description in msg (the FFN / MoE input and output nodes, the calibration capture). */
static inline int64_t fg_f32_rows(const fg_ggml_tensor_abi *t, int64_t embd, int64_t max_rows,
                                  char *msg, size_t msg_cap) {
    if (t->type != FG_GGML_TYPE_F32 || t->ne[0] != embd || t->nb[0] != sizeof(float) ||
        t->nb[1] != (size_t)embd * sizeof(float) || t->ne[2] != 1 || t->ne[3] != 1 ||
        t->data == NULL || t->ne[1] < 1) {
        snprintf(msg, msg_cap,
                 "node %.64s: expected contiguous F32 [%lld x rows], got type %d [%lld x %lld x "
                 "%lld x %lld]",
                 t->name, (long long)embd, (int)t->type, (long long)t->ne[0],
                 (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3]);
        return -1;
    }
    if (t->ne[1] > max_rows) {
        snprintf(msg, msg_cap, "node %.64s has %lld rows; the runtime was sized for %lld",
                 t->name, (long long)t->ne[1], (long long)max_rows);
        return -1;
    }
    return t->ne[1];
}

/* "<prefix>-<layer>" -> layer, or -1 if the name is not of that form. */
static inline int32_t fg_node_layer(const char *name, const char *prefix) {
    const size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0 || name[n] != '-') return -1;
    const char *p = name + n + 1;
    if (*p < '0' || *p > '9') return -1;
    int32_t layer = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        layer = layer * 10 + (*p - '0');
        if (layer > 1000000) return -1;
    }
    return *p == 0 ? layer : -1;
}

#endif
