/*
 * Per-layer slot buffer (DESIGN.md section 1, points 3 and 5): allocated once at load,
 * pinned hot rows at the front, the rest a cache of rows read from the payload.
 *
 * Eviction: a free slot if any, else the least recently used unpinned slot. Ordering by
 * last use is exactly "rows used outside the window first, then within the window the
 * least recent": a row used within the last window tokens is only evicted when every
 * unpinned slot holds such a row (counted in fg_stats.window_evictions). Slots used by
 * the running call (its round stamp) are never taken. Every operation is O(1), so a token
 * costs O(rows it touches), never O(n_ff).
 */
#include <stdlib.h>
#include <string.h>

#include "runtime_internal.h"

int fg_cache_alloc(fg_cache *c, int32_t n_ff, int32_t capacity, int32_t n_pinned,
                   size_t stride) {
    memset(c, 0, sizeof *c);
    if (capacity < n_pinned || capacity > n_ff || n_pinned < 0) return FG_ERR_ARG;
    void *p = NULL;
    if (posix_memalign(&p, FG_IO_ALIGN, (size_t)capacity * stride + 1) != 0) {
        return FG_ERR_NOMEM;
    }
    c->slots = p;
    c->capacity = capacity;
    c->n_pinned = n_pinned;
    const size_t cap = (size_t)capacity + 1;
    c->slot_of = malloc((size_t)n_ff * sizeof *c->slot_of);
    c->row_of = malloc(cap * sizeof *c->row_of);
    c->last_used = calloc(cap, sizeof *c->last_used);
    c->busy = calloc(cap, sizeof *c->busy);
    c->prev = malloc(cap * sizeof *c->prev);
    c->next = malloc(cap * sizeof *c->next);
    c->free_list = malloc(cap * sizeof *c->free_list);
    if (!c->slot_of || !c->row_of || !c->last_used || !c->busy || !c->prev || !c->next ||
        !c->free_list) {
        fg_cache_free(c);
        return FG_ERR_NOMEM;
    }
    for (int32_t i = 0; i < n_ff; i++) c->slot_of[i] = i < n_pinned ? i : -1;
    for (int32_t s = 0; s < capacity; s++) c->row_of[s] = s < n_pinned ? s : -1;
    c->head = c->tail = -1;
    c->n_free = 0;
    for (int32_t s = capacity - 1; s >= n_pinned; s--) c->free_list[c->n_free++] = s;
    return FG_OK;
}

void fg_cache_free(fg_cache *c) {
    free(c->slots);
    free(c->slot_of);
    free(c->row_of);
    free(c->last_used);
    free(c->busy);
    free(c->prev);
    free(c->next);
    free(c->free_list);
    memset(c, 0, sizeof *c);
}

static void unlink_slot(fg_cache *c, int32_t s) {
    if (c->prev[s] >= 0) c->next[c->prev[s]] = c->next[s]; else c->head = c->next[s];
    if (c->next[s] >= 0) c->prev[c->next[s]] = c->prev[s]; else c->tail = c->prev[s];
}

static void append_slot(fg_cache *c, int32_t s) {
    c->prev[s] = c->tail;
    c->next[s] = -1;
    if (c->tail >= 0) c->next[c->tail] = s; else c->head = s;
    c->tail = s;
}

void fg_cache_touch(fg_cache *c, int32_t slot, uint64_t round) {
    c->last_used[slot] = c->clock;
    c->busy[slot] = round;
    if (slot < c->n_pinned) return;
    unlink_slot(c, slot);
    append_slot(c, slot);
}

int32_t fg_cache_take(fg_cache *c, int32_t row, uint64_t round, int32_t window,
                      int *in_window) {
    int32_t s;
    *in_window = 0;
    if (c->n_free > 0) {
        s = c->free_list[--c->n_free];
    } else {
        s = c->head;
        /* the LRU list ends with this call's slots: if the head is one, all are */
        if (s < 0 || c->busy[s] == round) return -1;
        unlink_slot(c, s);
        /* a row last used by this call is never evicted (busy above); older ones within
         * the window are window evictions */
        *in_window = window > 0 && c->last_used[s] < c->clock &&
                     c->last_used[s] + (uint64_t)window >= c->clock;
        c->slot_of[c->row_of[s]] = -1;
    }
    c->row_of[s] = row;
    c->slot_of[row] = s;
    c->last_used[s] = c->clock;
    c->busy[s] = round;
    append_slot(c, s);
    return s;
}

void fg_cache_forget(fg_cache *c, int32_t slot) {
    if (slot < c->n_pinned || c->row_of[slot] < 0) return;
    unlink_slot(c, slot);
    c->slot_of[c->row_of[slot]] = -1;
    c->row_of[slot] = -1;
    c->free_list[c->n_free++] = slot;
}
