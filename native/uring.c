/*
 * io_uring through raw syscalls: one submission queue entry per read (IORING_OP_READ into
 * a staging buffer), depth in flight, completions reaped by the thread that waits.
 * Ring memory ordering: we publish the SQ tail with a release store and read the CQ tail
 * with an acquire load, as the kernel's io_uring(7) documentation describes.
 */
#include "uring.h"

#include <stdlib.h>
#include <string.h>

#include "flashgguf.h"

#if defined(__linux__) && __has_include(<linux/io_uring.h>)
#include <errno.h>
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
    int in_flight;
    fg_landed *deferred; /* test hook: delayed completions held back (depth entries) */
    int n_deferred;
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
    r->deferred = calloc((size_t)depth, sizeof *r->deferred);
    if (r->deferred == NULL) {
        free(r);
        return FG_ERR_NOMEM;
    }
    r->file_fd = fd;
    r->sq_map = r->cq_map = MAP_FAILED;
    r->sqes = MAP_FAILED;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->ring_fd = sys_setup((unsigned)depth, &p);
    if (r->ring_fd < 0) { /* ENOSYS, EPERM (seccomp, io_uring_disabled): threads then */
        free(r->deferred);
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
    free(r->deferred);
    free(r);
}

/* Queue reads while the job has some left and a staging buffer is free; tell the kernel. */
static int submit_more(fg_uring *r, fg_io *io) {
    unsigned queued = 0;
    unsigned tail = *r->sq_tail;
    while (io->next < io->n_reads && io->n_free > 0 && r->in_flight + queued < r->depth) {
        const int32_t k = io->next++;
        const fg_read *rd = &io->reads[k];
        const int injected = fg_reader_injected(io->reader);
        if (injected != 0 || io->err != FG_OK) { /* test hook, or the job already failed */
            const int rc = injected != 0 ? fg_io_check_read(io, rd, -(int64_t)injected) : io->err;
            fg_io_push_landed(io, k, -1, rc);
            continue;
        }
        const int buf = io->free_buf[--io->n_free];
        struct io_uring_sqe *sqe = &r->sqes[tail & *r->sq_mask];
        memset(sqe, 0, sizeof *sqe);
        sqe->opcode = IORING_OP_READ;
        sqe->fd = r->file_fd;
        sqe->addr = (uint64_t)(uintptr_t)(io->staging + (size_t)buf * io->staging_cap);
        sqe->len = (uint32_t)rd->len;
        sqe->off = rd->offset;
        sqe->user_data = ((uint64_t)(uint32_t)k << 32) | (uint32_t)buf;
        r->sq_array[tail & *r->sq_mask] = tail & *r->sq_mask;
        tail++;
        queued++;
    }
    if (queued == 0) return FG_OK;
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    r->in_flight += (int)queued;
    while (queued > 0) {
        const int n = sys_enter(r->ring_fd, queued, 0, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EBUSY) continue;
            io->reader->last_errno = errno;
            return FG_ERR_IO;
        }
        queued -= (unsigned)n;
    }
    return FG_OK;
}

/* Hand a completion to the landed list; the test hook's delayed reads wait in deferred
 * until nothing else can land (that reorders completions as a slow device would). */
static void complete(fg_uring *r, fg_io *io, int32_t k, int buf, int64_t got) {
    const fg_read *rd = &io->reads[k];
    uint8_t *dst = io->staging + (size_t)buf * io->staging_cap;
    if (got >= 0 && (uint64_t)got < rd->need && got % FG_IO_ALIGN == 0) {
        /* a short completion that is not the end of the file: read the rest */
        const int64_t more = fg_reader_pread(io->reader, dst + got,
                                             (size_t)(rd->len - (uint64_t)got),
                                             rd->offset + (uint64_t)got);
        got = more < 0 ? more : got + more;
    }
    const int status = fg_io_check_read(io, rd, got);
    if (fg_io_delay_of(io, k) > 0 && r->n_deferred < io->depth) {
        r->deferred[r->n_deferred++] = (fg_landed){k, buf, status};
        return;
    }
    fg_io_push_landed(io, k, buf, status);
}

/* Wait for what is in flight (after a failed submission) so that no late completion lands
 * in a staging buffer during a later job. */
static void drain(fg_uring *r, fg_io *io) {
    while (r->in_flight > 0) {
        unsigned head = *r->cq_head;
        while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            const struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            fg_io_push_landed(io, (int32_t)(cqe->user_data >> 32),
                              (int)(cqe->user_data & 0xffffffffu), FG_ERR_IO);
            r->in_flight--;
            head++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        if (r->in_flight > 0 && sys_enter(r->ring_fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 &&
            errno != EINTR) {
            return; /* the ring is unusable; fg_uring_destroy closes it */
        }
    }
}

/* Hand out the completions the test hook held back. */
static void land_deferred(fg_uring *r, fg_io *io) {
    for (int i = 0; i < r->n_deferred; i++) {
        fg_io_push_landed(io, r->deferred[i].read, r->deferred[i].buf, r->deferred[i].status);
    }
    r->n_deferred = 0;
}

/* The ring failed (errno in last_errno): every read in flight, held back or not started
 * lands as failed, so that the job's consumers all return. */
static void fail_job(fg_uring *r, fg_io *io) {
    if (io->err == FG_OK) io->err = FG_ERR_IO;
    drain(r, io);
    land_deferred(r, io);
    while (io->next < io->n_reads) fg_io_push_landed(io, io->next++, -1, io->err);
}

int fg_uring_progress(fg_uring *r, fg_io *io) {
    if (submit_more(r, io) != FG_OK) {
        fail_job(r, io);
        return 1;
    }
    const int in_flight = r->in_flight;
    if (in_flight == 0) {
        if (r->n_deferred > 0) { /* nothing else can land now: the delayed reads do */
            fg_io_sleep_us(io->delay_us);
            land_deferred(r, io);
            return 1;
        }
        return io->n_landed > io->n_taken; /* landed by injection: no wait needed */
    }
    unsigned head = *r->cq_head;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) &&
        sys_enter(r->ring_fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
        io->reader->last_errno = errno;
        fail_job(r, io);
        return in_flight;
    }
    while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
        const struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        const int32_t k = (int32_t)(cqe->user_data >> 32);
        const int buf = (int)(cqe->user_data & 0xffffffffu);
        const int64_t got = cqe->res;
        r->in_flight--;
        head++;
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        complete(r, io, k, buf, got);
    }
    return in_flight;
}

#else /* no io_uring at build time */

int fg_uring_create(fg_uring **out, int fd, int depth) {
    (void)fd;
    (void)depth;
    *out = NULL;
    return FG_ERR_IO;
}
void fg_uring_destroy(fg_uring *ring) { (void)ring; }
int fg_uring_progress(fg_uring *ring, fg_io *io) {
    (void)ring;
    (void)io;
    return 0;
}

#endif
