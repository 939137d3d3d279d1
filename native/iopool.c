/*
 * The read engine: many coalesced reads in flight, each landing in its own aligned staging
 * buffer, then its rows copied into their cache slots.
 *
 * Threads backend: depth workers, each owning staging buffer [id]; a worker takes the next
 * read of the job, preads it (blocking), copies its rows and counts it. io_uring backend
 * (uring.c): depth submissions in flight from the calling thread, reaped in fg_io_wait.
 * Either way fg_io_submit returns at once, so the caller computes resident neurons while
 * the misses are being read.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashgguf.h"
#include "io.h"
#include "uring.h"

/* A read's bytes are in buf (got bytes, or -errno): check, copy its rows out, count it.
 * Called with whatever lock guards the reader's counters held by the caller. */
int fg_io_finish_read(fg_io *io, const fg_read *rd, const uint8_t *buf, int64_t got) {
    if (got < 0) {
        io->reader->last_errno = (int)-got;
        return FG_ERR_IO;
    }
    fg_reader_account(io->reader, rd->offset, (uint64_t)got);
    if ((uint64_t)got < rd->need) return FG_ERR_SHORT_READ;
    for (int32_t k = rd->copy0; k < rd->copy0 + rd->n_copy; k++) {
        memcpy(io->copies[k].dst, buf + io->copies[k].src, io->row_bytes);
    }
    return FG_OK;
}

static void *worker_main(void *arg) {
    fg_io *io = arg;
    pthread_mutex_lock(&io->mu);
    const int id = io->sync_ready++;
    uint8_t *buf = io->staging + (size_t)id * io->staging_cap;
    for (;;) {
        while (!io->stop && io->next >= io->n_reads) pthread_cond_wait(&io->cv_work, &io->mu);
        if (io->stop) break;
        const fg_read *rd = &io->reads[io->next++];
        pthread_mutex_unlock(&io->mu);
        const int64_t got = fg_reader_pread(io->reader, buf, (size_t)rd->len, rd->offset);
        pthread_mutex_lock(&io->mu);
        /* the copy runs under the lock: rows are small and this keeps the counters simple */
        const int rc = fg_io_finish_read(io, rd, buf, got);
        if (rc != FG_OK && io->err == FG_OK) io->err = rc;
        if (++io->done == io->n_reads) pthread_cond_signal(&io->cv_done);
    }
    pthread_mutex_unlock(&io->mu);
    return NULL;
}

static void stop_threads(fg_io *io) {
    pthread_mutex_lock(&io->mu);
    io->stop = 1;
    pthread_cond_broadcast(&io->cv_work);
    pthread_mutex_unlock(&io->mu);
    for (int i = 0; i < io->n_threads; i++) pthread_join(io->threads[i], NULL);
    io->n_threads = 0;
}

int fg_io_init(fg_io *io, fg_reader *reader, int backend, int depth, size_t staging_cap) {
    memset(io, 0, sizeof *io);
    if (depth < 1 || staging_cap == 0) return FG_ERR_ARG;
    if (backend != FG_IO_AUTO && backend != FG_IO_THREADS && backend != FG_IO_URING) {
        return FG_ERR_ARG;
    }
    io->reader = reader;
    io->depth = depth;
    io->staging_cap = (staging_cap + FG_IO_ALIGN - 1) / FG_IO_ALIGN * FG_IO_ALIGN;
    void *p = NULL;
    if (posix_memalign(&p, FG_IO_ALIGN, (size_t)depth * io->staging_cap) != 0) {
        return FG_ERR_NOMEM;
    }
    io->staging = p;
    if (pthread_mutex_init(&io->mu, NULL) != 0) {
        free(io->staging);
        return FG_ERR_THREADS;
    }
    pthread_cond_init(&io->cv_work, NULL);
    pthread_cond_init(&io->cv_done, NULL);
    if (backend == FG_IO_URING && fg_uring_create(&io->ring, reader->fd, depth) == FG_OK) {
        io->backend = FG_IO_URING;
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
    pthread_cond_destroy(&io->cv_work);
    pthread_cond_destroy(&io->cv_done);
    pthread_mutex_destroy(&io->mu);
    free(io->staging);
    memset(io, 0, sizeof *io);
}

int fg_io_submit(fg_io *io, const fg_read *reads, int32_t n_reads, const fg_copy *copies,
                 size_t row_bytes) {
    for (int32_t i = 0; i < n_reads; i++) {
        if (reads[i].len > io->staging_cap || reads[i].need > reads[i].len) return FG_ERR_ARG;
    }
    pthread_mutex_lock(&io->mu);
    io->reads = reads;
    io->copies = copies;
    io->row_bytes = row_bytes;
    io->n_reads = n_reads;
    io->next = 0;
    io->done = 0;
    io->err = FG_OK;
    if (io->backend == FG_IO_THREADS) pthread_cond_broadcast(&io->cv_work);
    pthread_mutex_unlock(&io->mu);
    if (io->backend == FG_IO_URING) return fg_uring_start(io->ring, io);
    return FG_OK;
}

int fg_io_wait(fg_io *io) {
    int rc = FG_OK;
    if (io->backend == FG_IO_URING) {
        rc = fg_uring_finish(io->ring, io);
    } else {
        pthread_mutex_lock(&io->mu);
        while (io->done < io->n_reads) pthread_cond_wait(&io->cv_done, &io->mu);
        pthread_mutex_unlock(&io->mu);
    }
    if (rc == FG_OK) rc = io->err;
    io->n_reads = 0;
    io->next = 0;
    io->done = 0;
    io->reads = NULL;
    io->copies = NULL;
    return rc;
}
