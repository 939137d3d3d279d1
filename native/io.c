#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashgguf.h"

/* The alignment direct reads of path need: the filesystem's own where it says (Linux 6.1+:
 * a disk with 512-byte logical sectors takes 512-aligned reads, so a 1 KiB row costs 1.5 KiB
 * of transfer at most instead of 8 KiB), else FG_IO_ALIGN, which every device accepts. */
static uint32_t direct_alignment(const char *path) {
#if defined(STATX_DIOALIGN)
    struct statx stx;
    if (statx(AT_FDCWD, path, 0, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN)) {
        const uint32_t a = stx.stx_dio_offset_align;
        const uint32_t m = stx.stx_dio_mem_align;
        /* staging buffers are FG_IO_ALIGN-aligned: any memory alignment up to it holds */
        if (a > 0 && a <= FG_IO_ALIGN && (a & (a - 1)) == 0 && m <= FG_IO_ALIGN) return a;
    }
#else
    (void)path;
#endif
    return FG_IO_ALIGN;
}

int fg_reader_open(fg_reader *r, const char *path, int want_direct, size_t bounce_cap) {
    memset(r, 0, sizeof *r);
    r->fd = -1;
    r->inject_after = -1;
    int fd = -1;
    int direct = 0;
#if defined(O_DIRECT)
    if (want_direct) {
        fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (fd >= 0) {
            direct = 1;
        } else if (errno != EINVAL) { /* EINVAL: this filesystem has no direct I/O */
            r->last_errno = errno;
            return FG_ERR_IO;
        }
    }
#endif
    if (fd < 0) {
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            r->last_errno = errno;
            return FG_ERR_IO;
        }
#if defined(__APPLE__) && defined(F_NOCACHE)
        if (want_direct && fcntl(fd, F_NOCACHE, 1) == 0) {
            direct = 1;
        }
#endif
    }
    bounce_cap = (bounce_cap + FG_IO_ALIGN - 1) / FG_IO_ALIGN * FG_IO_ALIGN;
    if (bounce_cap < FG_IO_ALIGN) bounce_cap = FG_IO_ALIGN;
    void *buf = NULL;
    if (posix_memalign(&buf, FG_IO_ALIGN, bounce_cap) != 0) {
        close(fd);
        return FG_ERR_NOMEM;
    }
    r->fd = fd;
    r->direct = direct;
    r->dio_align = direct ? direct_alignment(path) : FG_IO_ALIGN;
    r->bounce = buf;
    r->bounce_cap = bounce_cap;
    return FG_OK;
}

void fg_reader_close(fg_reader *r) {
    if (r->fd >= 0) close(r->fd);
    free(r->bounce);
    free(r->log.offset);
    free(r->log.len);
    r->fd = -1;
    r->bounce = NULL;
    r->log.offset = NULL;
    r->log.len = NULL;
}

/* The file system accepted O_DIRECT at open but refuses this read: drop to buffered. */
static int drop_direct(fg_reader *r) {
#if defined(O_DIRECT)
    const int flags = fcntl(r->fd, F_GETFL);
    if (flags < 0 || fcntl(r->fd, F_SETFL, flags & ~O_DIRECT) < 0) return -1;
#endif
    r->direct = 0;
    return 0;
}

int fg_reader_injected(fg_reader *r) {
    const int e = __atomic_load_n(&r->inject_errno, __ATOMIC_RELAXED);
    if (e == 0) return 0;
    if (__atomic_fetch_sub(&r->inject_after, 1, __ATOMIC_RELAXED) > 0) return 0;
    __atomic_store_n(&r->inject_after, 0, __ATOMIC_RELAXED);
    return e;
}

int fg_reader_transient(fg_reader *r) {
    const int kind = __atomic_load_n(&r->transient_kind, __ATOMIC_RELAXED);
    if (kind == 0) return 0;
    const int64_t n = __atomic_add_fetch(&r->transient_count, 1, __ATOMIC_RELAXED);
    return n % __atomic_load_n(&r->transient_every, __ATOMIC_RELAXED) == 0 ? kind : 0;
}

int64_t fg_reader_pread(fg_reader *r, void *dst, size_t len, uint64_t offset) {
    const int injected = fg_reader_injected(r);
    if (injected != 0) return -(int64_t)injected;
    int fault = fg_reader_transient(r);
    size_t done = 0;
    while (done < len) {
        size_t ask = len - done;
        if (fault == FG_FAULT_SHORT && ask >= 2 * (size_t)r->dio_align) {
            ask = ask / 2 / r->dio_align * r->dio_align; /* comes back short: read on */
        }
        ssize_t got;
        if (fault == FG_FAULT_EINTR || fault == FG_FAULT_EAGAIN) {
            got = -1;
            errno = fault == FG_FAULT_EINTR ? EINTR : EAGAIN;
        } else {
            got = pread(r->fd, (uint8_t *)dst + done, ask, (off_t)(offset + done));
        }
        fault = 0;
        if (got < 0) {
            /* interrupted, or a device that asks to try again: retry (EAGAIN is not
             * expected from a blocking read of a regular file, but costs nothing here) */
            if (errno == EINTR || errno == EAGAIN) continue;
            return -(int64_t)errno;
        }
        if (got == 0) break;
        done += (size_t)got;
    }
    return (int64_t)done;
}

void fg_reader_account(fg_reader *r, uint64_t offset, uint64_t len) {
    r->reads++;
    r->bytes_read += len;
    fg_read_log *log = &r->log;
    if (log->n < log->cap) {
        log->offset[log->n] = offset;
        log->len[log->n] = len;
    }
    if (log->cap > 0) log->n++;
}

void fg_reader_drop_bounce(fg_reader *r) {
    free(r->bounce);
    r->bounce = NULL;
    r->bounce_cap = 0;
}

int fg_reader_read(fg_reader *r, uint64_t offset, size_t len, void *dst) {
    uint8_t *out = dst;
    if (r->direct && r->bounce == NULL) return FG_ERR_STATE;
    while (len > 0) {
        if (!r->direct) {
            const int64_t got = fg_reader_pread(r, out, len, offset);
            if (got < 0) {
                r->last_errno = (int)-got;
                return FG_ERR_IO;
            }
            fg_reader_account(r, offset, (uint64_t)got);
            if ((size_t)got < len) return FG_ERR_SHORT_READ;
            return FG_OK;
        }
        /* Direct: read the aligned range that covers [offset, offset + chunk) through the
         * bounce buffer; the device only takes whole aligned blocks. */
        const uint64_t start = offset / FG_IO_ALIGN * FG_IO_ALIGN;
        const size_t lead = (size_t)(offset - start);
        size_t chunk = len;
        if (lead + chunk > r->bounce_cap) chunk = r->bounce_cap - lead;
        const size_t span = (lead + chunk + FG_IO_ALIGN - 1) / FG_IO_ALIGN * FG_IO_ALIGN;
        const int64_t got = fg_reader_pread(r, r->bounce, span, start);
        if (got < 0) {
            if (got == -EINVAL && drop_direct(r) == 0) continue;
            r->last_errno = (int)-got;
            return FG_ERR_IO;
        }
        fg_reader_account(r, start, (uint64_t)got);
        if ((size_t)got < lead + chunk) return FG_ERR_SHORT_READ;
        memcpy(out, r->bounce + lead, chunk);
        out += chunk;
        offset += chunk;
        len -= chunk;
    }
    return FG_OK;
}
