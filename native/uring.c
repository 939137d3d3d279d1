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
    int *free_buf;      /* staging buffers not in flight */
    int n_free;
    int in_flight;
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
    r->free_buf = calloc((size_t)depth, sizeof *r->free_buf);
    if (r->free_buf == NULL) {
        free(r);
        return FG_ERR_NOMEM;
    }
    for (int i = 0; i < depth; i++) r->free_buf[i] = depth - 1 - i;
    r->n_free = depth;
    r->file_fd = fd;
    r->sq_map = r->cq_map = MAP_FAILED;
    r->sqes = MAP_FAILED;
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->ring_fd = sys_setup((unsigned)depth, &p);
    if (r->ring_fd < 0) { /* ENOSYS, EPERM (seccomp, io_uring_disabled): threads then */
        free(r->free_buf);
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
    free(r->free_buf);
    free(r);
}

static void record(fg_io *io, int rc) {
    if (rc != FG_OK && io->err == FG_OK) io->err = rc;
    io->done++;
}

/* Queue reads until depth are in flight or the job has none left; then tell the kernel. */
static int submit_more(fg_uring *r, fg_io *io) {
    unsigned queued = 0;
    unsigned tail = *r->sq_tail;
    while (io->next < io->n_reads && r->n_free > 0) {
        const int32_t k = io->next++;
        const fg_read *rd = &io->reads[k];
        const int injected = fg_reader_injected(io->reader);
        if (injected != 0) { /* test hook: as if the device had failed this read */
            record(io, fg_io_finish_read(io, rd, NULL, -(int64_t)injected));
            continue;
        }
        const int buf = r->free_buf[--r->n_free];
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

/* After a failed submission: wait for what is in flight so that no late completion lands
 * in a staging buffer (or is reaped) during a later job. */
static void drain(fg_uring *r) {
    while (r->in_flight > 0) {
        unsigned head = *r->cq_head;
        while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            const struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            r->free_buf[r->n_free++] = (int)(cqe->user_data & 0xffffffffu);
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

int fg_uring_start(fg_uring *r, fg_io *io) {
    const int rc = submit_more(r, io);
    if (rc != FG_OK) drain(r);
    return rc;
}

int fg_uring_finish(fg_uring *r, fg_io *io) {
    while (io->done < io->n_reads) {
        int rc = submit_more(r, io);
        if (rc != FG_OK) {
            drain(r);
            return rc;
        }
        if (r->in_flight == 0) continue; /* everything left failed by injection */
        unsigned head = *r->cq_head;
        if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            if (sys_enter(r->ring_fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
                io->reader->last_errno = errno;
                drain(r);
                return FG_ERR_IO;
            }
            continue;
        }
        while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            const struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            const int32_t k = (int32_t)(cqe->user_data >> 32);
            const int buf = (int)(cqe->user_data & 0xffffffffu);
            const fg_read *rd = &io->reads[k];
            uint8_t *dst = io->staging + (size_t)buf * io->staging_cap;
            int64_t got = cqe->res;
            if (got >= 0 && (uint64_t)got < rd->need && got % FG_IO_ALIGN == 0) {
                /* a short completion that is not the end of the file: read the rest */
                const int64_t more = fg_reader_pread(io->reader, dst + got,
                                                     (size_t)(rd->len - (uint64_t)got),
                                                     rd->offset + (uint64_t)got);
                got = more < 0 ? more : got + more;
            }
            record(io, fg_io_finish_read(io, rd, dst, got));
            r->free_buf[r->n_free++] = buf;
            r->in_flight--;
            head++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    return FG_OK;
}

#else /* no io_uring at build time */

int fg_uring_create(fg_uring **out, int fd, int depth) {
    (void)fd;
    (void)depth;
    *out = NULL;
    return FG_ERR_IO;
}
void fg_uring_destroy(fg_uring *ring) { (void)ring; }
int fg_uring_start(fg_uring *ring, fg_io *io) {
    (void)ring;
    (void)io;
    return FG_ERR_STATE;
}
int fg_uring_finish(fg_uring *ring, fg_io *io) {
    (void)ring;
    (void)io;
    return FG_ERR_STATE;
}

#endif
