/* Payload reads: direct I/O (O_DIRECT / F_NOCACHE) with a buffered fallback, and an engine
 * that keeps many coalesced reads in flight (a pthread pool issuing pread, or io_uring). */
#ifndef FLASHGGUF_IO_H
#define FLASHGGUF_IO_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* Direct I/O needs offsets, lengths and buffers aligned to the logical block size;
 * 4096 covers every device we target (512-byte and 4K sectors). */
#define FG_IO_ALIGN 4096

/* Every read issued (offset, length), kept when the runtime is asked to log them (tests). */
typedef struct fg_read_log {
    uint64_t *offset;
    uint64_t *len;
    size_t cap, n;        /* entries past cap are counted in n but not stored */
} fg_read_log;

typedef struct fg_reader {
    int fd;
    int direct;           /* 1 while reads bypass the page cache */
    uint32_t dio_align;   /* offset and length alignment of direct reads: the file's
                           * (statx STATX_DIOALIGN, e.g. 512 on disks with 512-byte logical
                           * sectors), else FG_IO_ALIGN */
    uint8_t *bounce;      /* FG_IO_ALIGN-aligned staging buffer for unaligned ranges */
    size_t bounce_cap;
    uint64_t bytes_read;  /* bytes transferred from the device (aligned sizes) */
    uint64_t reads;       /* pread calls that returned data */
    int last_errno;
    int inject_errno;     /* test hook: reads fail with this errno once inject_after ... */
    int64_t inject_after; /* ... more reads have succeeded (-1: never) */
    int transient_kind;   /* test hook: FG_FAULT_* on every transient_every-th read */
    int64_t transient_every;
    int64_t transient_count;
    fg_read_log log;
} fg_reader;

/* Open path read-only; want_direct=1 tries direct I/O and falls back to buffered reads
 * where the filesystem refuses it (tmpfs). Returns FG_OK or FG_ERR_IO / FG_ERR_NOMEM. */
int fg_reader_open(fg_reader *r, const char *path, int want_direct, size_t bounce_cap);
void fg_reader_close(fg_reader *r);
/* Read exactly len bytes at offset into dst (any alignment). FG_ERR_SHORT_READ if the file
 * ends first, FG_ERR_IO on a read error (errno in last_errno). */
int fg_reader_read(fg_reader *r, uint64_t offset, size_t len, void *dst);
/* Free the bounce buffer once the loads are done (fg_reader_read then refuses direct reads
 * with FG_ERR_STATE): it is as large as the load chunk and not needed afterwards. */
void fg_reader_drop_bounce(fg_reader *r);
/* pread of [offset, offset + len) into dst, retried until done or end of file, through the
 * error-injection hook; returns bytes read or -errno. */
int64_t fg_reader_pread(fg_reader *r, void *dst, size_t len, uint64_t offset);
/* The test hook's errno when this read must fail, else 0 (thread-safe). */
int fg_reader_injected(fg_reader *r);
/* The transient fault (FG_FAULT_*) this read gets from the test hook, else 0. */
int fg_reader_transient(fg_reader *r);
/* Count (and log) one read; the caller holds whatever lock guards r's counters. */
void fg_reader_account(fg_reader *r, uint64_t offset, uint64_t len);

/* ---- the read engine -------------------------------------------------------------- */

#define FG_IO_AUTO     0
#define FG_IO_THREADS  1
#define FG_IO_URING    2

/* One read of a layer's rows (one coalesced run of misses, possibly with gap rows read
 * through); the rows it carries are the caller's business (fg_copy tables in runtime.c). */
typedef struct fg_read {
    uint64_t offset;      /* file offset of the read (aligned for direct I/O) */
    uint64_t len;         /* bytes to read (aligned for direct I/O) */
    uint64_t need;        /* bytes that must arrive: up to the end of the last row */
    int32_t copy0;        /* its rows in the caller's copy table: [copy0, copy0 + n_copy) */
    int32_t n_copy;
} fg_read;

/* Where a row of a read goes: bytes [src, src + row_bytes) of the read are the row, kept
 * in cache slot dst afterwards (NULL: computed from the staging buffer, not kept). */
typedef struct fg_copy {
    uint64_t src;
    uint8_t *dst;
} fg_copy;

/* A read that has landed (or failed), handed to one consumer by fg_io_next. */
typedef struct fg_landed {
    int32_t read;         /* index in the job's reads */
    int32_t buf;          /* staging buffer holding its bytes, -1 if it failed before one */
    int status;           /* FG_OK, FG_ERR_IO or FG_ERR_SHORT_READ */
} fg_landed;

typedef struct fg_uring fg_uring;

typedef struct fg_io {
    fg_reader *reader;
    int backend;               /* FG_IO_THREADS or FG_IO_URING after init */
    int depth;                 /* staging buffers: reads in flight or being computed */
    size_t staging_cap;        /* bytes of one staging buffer (largest read) */
    uint8_t *staging;          /* depth buffers of staging_cap bytes, FG_IO_ALIGN-aligned */
    int32_t max_reads;         /* most reads one job may have */

    /* the current job, guarded by mu */
    const fg_read *reads;
    int32_t n_reads, next;     /* reads in the job, next one to start */
    fg_landed *landed;         /* max_reads: reads in the order they landed */
    int32_t n_landed, n_taken; /* landed so far, handed to consumers so far */
    int *free_buf;             /* staging buffers neither in flight nor being computed */
    int n_free;
    int err;                   /* first error of the job (FG_OK if none) */
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_landed;

    /* test hook: every delay_every-th read of a job (from its first) lands delay_us late */
    int64_t delay_us;
    int32_t delay_every;

    /* threads backend */
    pthread_t *threads;
    int n_threads;
    int stop;

    /* io_uring backend */
    fg_uring *ring;
    fg_landed *deferred;       /* test hook: delayed completions held back (depth entries) */
    int n_deferred;
} fg_io;

/* Start the engine: backend FG_IO_AUTO picks the default (threads; see BENCHMARKS.md),
 * FG_IO_URING falls back to threads when the kernel refuses io_uring (EPERM/ENOSYS in
 * containers). depth staging buffers of staging_cap bytes; jobs of up to max_reads. */
int fg_io_init(fg_io *io, fg_reader *reader, int backend, int depth, size_t staging_cap,
               int32_t max_reads);
void fg_io_destroy(fg_io *io);
/* Start a job: every read is issued as soon as a staging buffer is free; returns at once.
 * reads must stay valid until fg_io_end. */
int fg_io_submit(fg_io *io, const fg_read *reads, int32_t n_reads);
/* The next read of the job to land, in landing order; blocks (never spins) until one has.
 * Returns 1 with *out filled, 0 when every read of the job has been handed out. Any number
 * of threads may call it; each read goes to one. Its staging buffer (fg_io_buffer) is the
 * caller's until fg_io_release. */
int fg_io_next(fg_io *io, fg_landed *out);
const uint8_t *fg_io_buffer(const fg_io *io, const fg_landed *l);
/* Give a landed read's staging buffer back: the next read can start in it. */
void fg_io_release(fg_io *io, const fg_landed *l);
/* After every read has been handed out and released: the job's first error (FG_ERR_IO
 * with errno in reader->last_errno, FG_ERR_SHORT_READ) or FG_OK; the engine is idle. */
int fg_io_end(fg_io *io);
#endif
