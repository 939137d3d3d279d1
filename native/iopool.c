/*
 * The read engine: every read of a job is issued as soon as a staging buffer is free, and
 * handed to a consumer as soon as it lands, in landing order. The consumer computes the
 * rows straight from the staging buffer and gives it back, which lets the next read start:
 * reads and arithmetic overlap for the whole call, not only for its first batch.
 *
 * Threads backend: depth workers, each taking the next read and a free buffer, pread-ing
 * (blocking) and appending the result to the landed list. io_uring backend (the ring is
 * uring.c's): the consumer that finds nothing landed submits what fits and waits in
 * io_uring_enter.
 * Every wait is a blocking one (condition variable, io_uring_enter): a consumer waiting on
 * the device takes no CPU from llama.cpp's threads or the read workers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "flashgguf.h"
#include "io.h"
#include "uring.h"

/* Check a read's result (got bytes or -errno) and count it; FG_OK, FG_ERR_IO or
 * FG_ERR_SHORT_READ. The caller holds io->mu. */
static int check_read(fg_io *io, const fg_read *rd, int64_t got) {
    if (got < 0) {
        io->reader->last_errno = (int)-got;
        return FG_ERR_IO;
    }
    fg_reader_account(io->reader, rd->offset, (uint64_t)got);
    return (uint64_t)got < rd->need ? FG_ERR_SHORT_READ : FG_OK;
}

/* The test hook's delay for read k of the job, in microseconds (0: none). */
static int64_t delay_of(const fg_io *io, int32_t k) {
    return io->delay_every > 0 && k % io->delay_every == 0 ? io->delay_us : 0;
}

/* A blocking sleep: no CPU while it lasts. */
static void sleep_us(int64_t us) {
    struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Append a finished read (buffer -1 when it has none) to the landed list and wake a
 * consumer; the first failure becomes the job's error. The caller holds io->mu. */
static void push_landed(fg_io *io, int32_t k, int buf, int status) {
    if (status != FG_OK && io->err == FG_OK) io->err = status;
    io->landed[io->n_landed++] = (fg_landed){k, buf, status};
    pthread_cond_signal(&io->cv_landed);
}

static void *worker_main(void *arg) {
    fg_io *io = arg;
    pthread_mutex_lock(&io->mu);
    for (;;) {
        while (!io->stop && (io->next >= io->n_reads || io->n_free == 0)) {
            pthread_cond_wait(&io->cv_work, &io->mu);
        }
        if (io->stop) break;
        const int32_t k = io->next++;
        const fg_read *rd = &io->reads[k];
        if (io->err != FG_OK) { /* the job has failed: hand the rest out unread */
            push_landed(io, k, -1, io->err);
            continue;
        }
        const int buf = io->free_buf[--io->n_free];
        const int64_t delay = delay_of(io, k);
        pthread_mutex_unlock(&io->mu);
        if (delay > 0) sleep_us(delay);
        const int64_t got = fg_reader_pread(io->reader, io->staging + (size_t)buf * io->staging_cap,
                                            (size_t)rd->len, rd->offset);
        pthread_mutex_lock(&io->mu);
        push_landed(io, k, buf, check_read(io, rd, got));
    }
    pthread_mutex_unlock(&io->mu);
    return NULL;
}


/* ---- io_uring backend: the job driven through the ring ---------------------------- */

/* A read's ring tag: its index in the job and its staging buffer. */
static uint64_t uring_tag(int32_t k, int buf) {
    return ((uint64_t)(uint32_t)k << 32) | (uint32_t)buf;
}

static int32_t tag_read(uint64_t tag) { return (int32_t)(tag >> 32); }
static int tag_buf(uint64_t tag) { return (int)(tag & 0xffffffffu); }

/* Queue reads while the job has some left, a staging buffer is free and the ring has
 * room; tell the kernel. 0 or -errno. */
static int uring_submit_more(fg_io *io) {
    while (io->next < io->n_reads && io->n_free > 0 && fg_uring_room(io->ring) > 0) {
        const int32_t k = io->next++;
        const fg_read *rd = &io->reads[k];
        const int injected = fg_reader_injected(io->reader);
        if (injected != 0 || io->err != FG_OK) { /* test hook, or the job already failed */
            push_landed(io, k, -1,
                        injected != 0 ? check_read(io, rd, -(int64_t)injected) : io->err);
            continue;
        }
        const int buf = io->free_buf[--io->n_free];
        fg_uring_queue(io->ring, io->staging + (size_t)buf * io->staging_cap, (uint32_t)rd->len,
                       rd->offset, uring_tag(k, buf));
    }
    return fg_uring_submit(io->ring);
}

/* Hand a completion to the landed list; the test hook's delayed reads wait in deferred
 * until nothing else can land (that reorders completions as a slow device would). */
static void uring_complete(fg_io *io, int32_t k, int buf, int64_t got) {
    const fg_read *rd = &io->reads[k];
    uint8_t *dst = io->staging + (size_t)buf * io->staging_cap;
    const int fault = fg_reader_transient(io->reader);
    if (fault == FG_FAULT_SHORT && got >= 2 * (int64_t)io->reader->dio_align) {
        got = got / 2 / io->reader->dio_align * io->reader->dio_align;
    } else if (fault == FG_FAULT_EINTR || fault == FG_FAULT_EAGAIN) {
        got = fault == FG_FAULT_EINTR ? -EINTR : -EAGAIN;
    }
    if (got == -EINTR || got == -EAGAIN) { /* transient: read it again, synchronously */
        got = fg_reader_pread(io->reader, dst, (size_t)rd->len, rd->offset);
    }
    if (got >= 0 && (uint64_t)got < rd->need && got % io->reader->dio_align == 0) {
        /* a short completion that is not the end of the file: read the rest */
        const int64_t more = fg_reader_pread(io->reader, dst + got,
                                             (size_t)(rd->len - (uint64_t)got),
                                             rd->offset + (uint64_t)got);
        got = more < 0 ? more : got + more;
    }
    const int status = check_read(io, rd, got);
    if (delay_of(io, k) > 0 && io->n_deferred < io->depth) {
        io->deferred[io->n_deferred++] = (fg_landed){k, buf, status};
        return;
    }
    push_landed(io, k, buf, status);
}

/* Hand out the completions the test hook held back. */
static void uring_land_deferred(fg_io *io) {
    for (int i = 0; i < io->n_deferred; i++) {
        push_landed(io, io->deferred[i].read, io->deferred[i].buf, io->deferred[i].status);
    }
    io->n_deferred = 0;
}

/* The ring failed with -err: every read in flight (waited for, so that no late completion
 * lands in a staging buffer during a later job), held back or not started lands as failed,
 * so that the job's consumers all return. */
static void uring_fail_job(fg_io *io, int err) {
    io->reader->last_errno = -err;
    if (io->err == FG_OK) io->err = FG_ERR_IO;
    uint64_t tag;
    int32_t res;
    while (fg_uring_in_flight(io->ring) > 0) {
        while (fg_uring_reap(io->ring, &tag, &res)) {
            push_landed(io, tag_read(tag), tag_buf(tag), FG_ERR_IO);
        }
        if (fg_uring_in_flight(io->ring) > 0 && fg_uring_wait(io->ring) != 0) {
            break; /* the ring is unusable; fg_uring_destroy closes it */
        }
    }
    uring_land_deferred(io);
    while (io->next < io->n_reads) push_landed(io, io->next++, -1, io->err);
}

/* With io->mu held and nothing landed: submit the job's reads that have a free staging
 * buffer, wait in the kernel for at least one completion and land every completion.
 * Returns the reads in flight before waiting (0: nothing to wait for, the caller waits for
 * a buffer to be released). */
static int uring_progress(fg_io *io) {
    int err = uring_submit_more(io);
    if (err != 0) {
        uring_fail_job(io, err);
        return 1;
    }
    const int in_flight = fg_uring_in_flight(io->ring);
    if (in_flight == 0) {
        if (io->n_deferred > 0) { /* nothing else can land now: the delayed reads do */
            sleep_us(io->delay_us);
            uring_land_deferred(io);
            return 1;
        }
        return io->n_landed > io->n_taken; /* landed by injection: no wait needed */
    }
    err = fg_uring_wait(io->ring);
    if (err != 0) {
        uring_fail_job(io, err);
        return in_flight;
    }
    uint64_t tag;
    int32_t res;
    while (fg_uring_reap(io->ring, &tag, &res)) {
        uring_complete(io, tag_read(tag), tag_buf(tag), res);
    }
    return in_flight;
}

/* ---- the engine --------------------------------------------------------------------- */

static void stop_threads(fg_io *io) {
    pthread_mutex_lock(&io->mu);
    io->stop = 1;
    pthread_cond_broadcast(&io->cv_work);
    pthread_mutex_unlock(&io->mu);
    for (int i = 0; i < io->n_threads; i++) pthread_join(io->threads[i], NULL);
    io->n_threads = 0;
}

static void free_buffers(fg_io *io) {
    free(io->landed);
    free(io->free_buf);
    free(io->staging);
    memset(io, 0, sizeof *io);
}

int fg_io_init(fg_io *io, fg_reader *reader, int backend, int depth, size_t staging_cap,
               int32_t max_reads) {
    memset(io, 0, sizeof *io);
    if (depth < 1 || staging_cap == 0 || max_reads < 1) return FG_ERR_ARG;
    if (backend != FG_IO_AUTO && backend != FG_IO_THREADS && backend != FG_IO_URING) {
        return FG_ERR_ARG;
    }
    io->reader = reader;
    io->depth = depth;
    io->max_reads = max_reads;
    io->staging_cap = (staging_cap + FG_IO_ALIGN - 1) / FG_IO_ALIGN * FG_IO_ALIGN;
    void *p = NULL;
    if (posix_memalign(&p, FG_IO_ALIGN, (size_t)depth * io->staging_cap) != 0) {
        return FG_ERR_NOMEM;
    }
    io->staging = p;
    io->landed = malloc((size_t)max_reads * sizeof *io->landed);
    io->free_buf = malloc((size_t)depth * sizeof *io->free_buf);
    int rc = io->landed == NULL || io->free_buf == NULL ? FG_ERR_NOMEM : FG_OK;
    if (rc == FG_OK && pthread_mutex_init(&io->mu, NULL) != 0) rc = FG_ERR_THREADS;
    if (rc != FG_OK) { /* nothing started yet: free what was allocated */
        free_buffers(io);
        return rc;
    }
    for (int i = 0; i < depth; i++) io->free_buf[i] = depth - 1 - i;
    io->n_free = depth;
    pthread_cond_init(&io->cv_work, NULL);
    pthread_cond_init(&io->cv_landed, NULL);
    if (backend == FG_IO_URING && fg_uring_create(&io->ring, reader->fd, depth) == FG_OK) {
        io->backend = FG_IO_URING;
        io->deferred = calloc((size_t)depth, sizeof *io->deferred);
        if (io->deferred == NULL) {
            fg_io_destroy(io);
            return FG_ERR_NOMEM;
        }
        return FG_OK;
    }
    io->backend = FG_IO_THREADS;
    io->threads = calloc((size_t)depth, sizeof *io->threads);
    if (io->threads == NULL) {
        fg_io_destroy(io);
        return FG_ERR_NOMEM;
    }
    for (int i = 0; i < depth; i++) {
        if (pthread_create(&io->threads[i], NULL, worker_main, io) != 0) {
            fg_io_destroy(io);
            return FG_ERR_THREADS;
        }
        io->n_threads++;
    }
    return FG_OK;
}

void fg_io_destroy(fg_io *io) {
    if (io->staging == NULL) return; /* never initialised */
    stop_threads(io);
    free(io->threads);
    fg_uring_destroy(io->ring);
    free(io->deferred);
    pthread_cond_destroy(&io->cv_work);
    pthread_cond_destroy(&io->cv_landed);
    pthread_mutex_destroy(&io->mu);
    free_buffers(io);
}

int fg_io_submit(fg_io *io, const fg_read *reads, int32_t n_reads) {
    if (n_reads < 0 || n_reads > io->max_reads) return FG_ERR_ARG;
    for (int32_t i = 0; i < n_reads; i++) {
        if (reads[i].len > io->staging_cap || reads[i].need > reads[i].len) return FG_ERR_ARG;
    }
    pthread_mutex_lock(&io->mu);
    io->reads = reads;
    io->n_reads = n_reads;
    io->next = 0;
    io->n_landed = 0;
    io->n_taken = 0;
    io->err = FG_OK;
    if (io->backend == FG_IO_THREADS) pthread_cond_broadcast(&io->cv_work);
    pthread_mutex_unlock(&io->mu);
    return FG_OK;
}

int fg_io_next(fg_io *io, fg_landed *out) {
    pthread_mutex_lock(&io->mu);
    while (io->n_taken == io->n_landed && io->n_taken < io->n_reads) {
        /* io_uring: submit what fits and wait in the kernel; when nothing is in flight
         * (every buffer is being computed), wait for a release like the threads do */
        if (io->backend != FG_IO_URING || uring_progress(io) == 0) {
            pthread_cond_wait(&io->cv_landed, &io->mu);
        }
    }
    int got = 0;
    if (io->n_taken < io->n_reads) {
        *out = io->landed[io->n_taken++];
        got = 1;
        /* the last read is handed out: consumers still waiting have nothing to wait for */
        if (io->n_taken == io->n_reads) pthread_cond_broadcast(&io->cv_landed);
    }
    pthread_mutex_unlock(&io->mu);
    return got;
}

const uint8_t *fg_io_buffer(const fg_io *io, const fg_landed *l) {
    return l->buf < 0 ? NULL : io->staging + (size_t)l->buf * io->staging_cap;
}

void fg_io_release(fg_io *io, const fg_landed *l) {
    if (l->buf < 0) return;
    pthread_mutex_lock(&io->mu);
    io->free_buf[io->n_free++] = l->buf;
    if (io->backend == FG_IO_THREADS) {
        pthread_cond_signal(&io->cv_work);
    } else {
        pthread_cond_broadcast(&io->cv_landed);
    }
    pthread_mutex_unlock(&io->mu);
}

int fg_io_end(fg_io *io) {
    pthread_mutex_lock(&io->mu);
    const int rc = io->err;
    io->reads = NULL;
    io->n_reads = 0;
    io->next = 0;
    io->n_landed = 0;
    io->n_taken = 0;
    io->err = FG_OK;
    pthread_mutex_unlock(&io->mu);
    return rc;
}
