/* io_uring backend of the read engine, through raw syscalls (no liburing). */
#ifndef FLASHGGUF_URING_H
#define FLASHGGUF_URING_H

#include "io.h"

/* Set up a ring of depth entries reading fd. FG_ERR_IO when io_uring is unavailable
 * (no <linux/io_uring.h> at build time, ENOSYS, EPERM under seccomp): use threads then. */
int fg_uring_create(fg_uring **out, int fd, int depth);
void fg_uring_destroy(fg_uring *ring);
/* Submit the first reads of io's job (up to depth). */
int fg_uring_start(fg_uring *ring, fg_io *io);
/* Reap completions and submit the rest until every read of the job has finished. */
int fg_uring_finish(fg_uring *ring, fg_io *io);

#endif
