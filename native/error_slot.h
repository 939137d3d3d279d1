/* The first error raised inside an eval callback, kept until the caller takes it: callbacks
 * cannot return error codes to llama.cpp, so the runtime and the capture each hold one. */
#ifndef FLASHGGUF_ERROR_SLOT_H
#define FLASHGGUF_ERROR_SLOT_H

#include <stddef.h>

typedef struct fg_error_slot {
    int code;       /* FG_OK when empty */
    char msg[256];
} fg_error_slot;

/* Record code/msg unless an error is already held: later ones are its consequences. */
void fg_error_slot_set(fg_error_slot *slot, int code, const char *msg);
/* The held code (FG_OK if none) and its message into msg (may be NULL); empties the slot. */
int fg_error_slot_take(fg_error_slot *slot, char *msg, size_t msg_cap);

#endif
