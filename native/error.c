#include <stdio.h>

#include "error_slot.h"
#include "flashgguf.h"

const char *fg_strerror(int code) {
    switch (code) {
    case FG_OK: return "ok";
    case FG_ERR_NOMEM: return "out of memory";
    case FG_ERR_IO: return "I/O error reading the payload";
    case FG_ERR_SHORT_READ: return "the payload file ended before the bytes it promised (truncated?)";
    case FG_ERR_ARG: return "argument out of range";
    case FG_ERR_TYPE: return "unsupported ggml type";
    case FG_ERR_SHAPE: return "unexpected tensor shape or type in the llama.cpp graph";
    case FG_ERR_STATE: return "call out of order";
    case FG_ERR_THREADS: return "worker threads could not be started";
    case FG_ERR_BUDGET: return "the DRAM budget is too small for the pinned rows and one read round";
    default: return "unknown error";
    }
}

#if defined(__SANITIZE_ADDRESS__)
#define FG_SANITIZE "address"
#elif defined(__SANITIZE_THREAD__)
#define FG_SANITIZE "thread"
#else
#define FG_SANITIZE "none"
#endif
#if defined(_OPENMP)
#define FG_OPENMP "1"
#else
#define FG_OPENMP "0"
#endif

const char *fg_build_info(void) { return "openmp=" FG_OPENMP " sanitize=" FG_SANITIZE; }

void fg_error_slot_set(fg_error_slot *slot, int code, const char *msg) {
    if (slot->code != FG_OK) return;
    slot->code = code;
    snprintf(slot->msg, sizeof slot->msg, "%s", msg);
}

int fg_error_slot_take(fg_error_slot *slot, char *msg, size_t msg_cap) {
    const int code = slot->code;
    if (msg != NULL && msg_cap > 0) snprintf(msg, msg_cap, "%s", slot->msg);
    slot->code = FG_OK;
    slot->msg[0] = 0;
    return code;
}
