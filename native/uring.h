/* io_uring through raw syscalls (no liburing): a ring of reads of one file. It knows
 * rings, not jobs (the read engine, iopool.c, drives it). Not thread-safe: the caller
 * serialises every call on a ring. */
#ifndef FLASHGGUF_URING_H
#define FLASHGGUF_URING_H

#include <stdint.h>

typedef struct fg_uring fg_uring;

/* Set up a ring of depth entries reading fd. FG_ERR_IO when io_uring is unavailable
 * (no <linux/io_uring.h> at build time, ENOSYS, EPERM under seccomp): use threads then. */
int fg_uring_create(fg_uring **out, int fd, int depth);
void fg_uring_destroy(fg_uring *ring);
/* Reads that can still be queued: the depth minus those queued or in flight. */
int fg_uring_room(const fg_uring *ring);
/* Reads submitted to the kernel whose completion has not been reaped. */
int fg_uring_in_flight(const fg_uring *ring);
/* Queue a read of len bytes at offset into buf (needs room); user_data comes back with its
 * completion. Nothing reaches the kernel before fg_uring_submit. */
void fg_uring_queue(fg_uring *ring, void *buf, uint32_t len, uint64_t offset,
                    uint64_t user_data);
/* Hand the queued reads to the kernel (they count as in flight from here): 0 or -errno. */
int fg_uring_submit(fg_uring *ring);
/* Block until a completion is ready (at once if one is): 0 or -errno. */
int fg_uring_wait(fg_uring *ring);
/* Pop one completion: 1 with its user_data and res (bytes read or -errno), 0 if none is
 * ready. */
int fg_uring_reap(fg_uring *ring, uint64_t *user_data, int32_t *res);

#endif
