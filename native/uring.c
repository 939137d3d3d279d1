/*
 * io_uring through raw syscalls: one submission queue entry per read (IORING_OP_READ),
 * completions reaped by the thread that waits. This file knows rings, not jobs: which read
 * goes next and where its completion lands is the read engine's (iopool.c).
 * Ring memory ordering: we publish the SQ tail with a release store and read the CQ tail
 * with an acquire load, as the kernel's io_uring(7) documentation describes.
 */
#include "uring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashgguf.h"

#if defined(__linux__) && __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FG_HAVE_URING 1
#else
#define FG_HAVE_URING 0
#endif

#if FG_HAVE_URING

struct fg_uring {
    int ring_fd;
    int file_fd;
    unsigned depth;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    int in_flight;  /* submitted to the kernel, not reaped */
    unsigned queued; /* in the submission queue, not yet told to the kernel */
};

static int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

int fg_uring_create(fg_uring **out, int fd, int depth) {
    *out = NULL;
    fg_uring *r = calloc(1, sizeof *r);
    if (r == NULL) return FG_ERR_NOMEM;
    r->file_fd = fd;
    r->sq_map = r->cq_map = MAP_FAILED;
    r->sqes = MAP_FAILED;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->ring_fd = sys_setup((unsigned)depth, &p);
    if (r->ring_fd < 0) { /* ENOSYS, EPERM (seccomp, io_uring_disabled): threads then */
        free(r);
        return FG_ERR_IO;
    }
    r->depth = p.sq_entries;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    const int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->ring_fd, IORING_OFF_SQ_RING);
    if (r->sq_map != MAP_FAILED) {
        r->cq_map = single ? r->sq_map
                           : mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_POPULATE, r->ring_fd, IORING_OFF_CQ_RING);
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    if (r->cq_map != MAP_FAILED) {
        r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       r->ring_fd, IORING_OFF_SQES);
    }
    if (r->sqes == MAP_FAILED) {
        fg_uring_destroy(r);
        return FG_ERR_IO;
    }
    uint8_t *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    *out = r;
    return FG_OK;
}

void fg_uring_destroy(fg_uring *r) {
    if (r == NULL) return;
    if (r->sqes != MAP_FAILED) munmap(r->sqes, r->sqes_len);
    if (r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_map_len);
    if (r->ring_fd >= 0) close(r->ring_fd);
    free(r);
}

int fg_uring_room(const fg_uring *r) {
    return (int)r->depth - r->in_flight - (int)r->queued;
}

int fg_uring_in_flight(const fg_uring *r) { return r->in_flight; }

void fg_uring_queue(fg_uring *r, void *buf, uint32_t len, uint64_t offset, uint64_t user_data) {
    const unsigned tail = *r->sq_tail + r->queued;
    struct io_uring_sqe *sqe = &r->sqes[tail & *r->sq_mask];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_READ;
    sqe->fd = r->file_fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = len;
    sqe->off = offset;
    sqe->user_data = user_data;
    r->sq_array[tail & *r->sq_mask] = tail & *r->sq_mask;
    r->queued++;
}

int fg_uring_submit(fg_uring *r) {
    unsigned queued = r->queued;
    if (queued == 0) return 0;
    __atomic_store_n(r->sq_tail, *r->sq_tail + queued, __ATOMIC_RELEASE);
    r->in_flight += (int)queued;
    r->queued = 0;
    while (queued > 0) {
        const int n = sys_enter(r->ring_fd, queued, 0, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EBUSY) continue;
            return -errno;
        }
        queued -= (unsigned)n;
    }
    return 0;
}

int fg_uring_wait(fg_uring *r) {
    if (*r->cq_head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) return 0;
    if (sys_enter(r->ring_fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
        return -errno;
    }
    return 0;
}

int fg_uring_reap(fg_uring *r, uint64_t *user_data, int32_t *res) {
    const unsigned head = *r->cq_head;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) return 0;
    const struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
    *user_data = cqe->user_data;
    *res = cqe->res;
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    r->in_flight--;
    return 1;
}

#else /* no io_uring at build time: create fails, so nothing else is ever called */

int fg_uring_create(fg_uring **out, int fd, int depth) {
    (void)fd;
    (void)depth;
    *out = NULL;
    return FG_ERR_IO;
}
void fg_uring_destroy(fg_uring *r) { (void)r; }
int fg_uring_room(const fg_uring *r) { (void)r; return 0; }
int fg_uring_in_flight(const fg_uring *r) { (void)r; return 0; }
void fg_uring_queue(fg_uring *r, void *buf, uint32_t len, uint64_t offset, uint64_t user_data) {
    (void)r;
    (void)buf;
    (void)len;
    (void)offset;
    (void)user_data;
}
int fg_uring_submit(fg_uring *r) { (void)r; return -ENOSYS; }
int fg_uring_wait(fg_uring *r) { (void)r; return -ENOSYS; }
int fg_uring_reap(fg_uring *r, uint64_t *user_data, int32_t *res) {
    (void)r;
    (void)user_data;
    (void)res;
    return 0;
}

#endif
