/* io_uring backend of the read engine, through raw syscalls (no liburing). */
#ifndef FLASHGGUF_URING_H
#define FLASHGGUF_URING_H

#include "io.h"

/* Set up a ring of depth entries reading fd. FG_ERR_IO when io_uring is unavailable
 * (no <linux/io_uring.h> at build time, ENOSYS, EPERM under seccomp): use threads then. */
int fg_uring_create(fg_uring **out, int fd, int depth);
void fg_uring_destroy(fg_uring *ring);
/* With io->mu held and nothing landed: submit the job's reads that have a free staging
 * buffer, wait in the kernel for at least one completion and append every completion to
 * the landed list. Returns the reads in flight before waiting (0: nothing to wait for, the
 * caller waits for a buffer to be released). A failed submission fails the job. */
int fg_uring_progress(fg_uring *ring, fg_io *io);

#endif
