#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "flashgguf.h"

int fg_reader_open(fg_reader *r, const char *path, int want_direct, size_t bounce_cap) {
    memset(r, 0, sizeof *r);
    r->fd = -1;
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
    r->bounce = buf;
    r->bounce_cap = bounce_cap;
    return FG_OK;
}

void fg_reader_close(fg_reader *r) {
    if (r->fd >= 0) close(r->fd);
    free(r->bounce);
    r->fd = -1;
    r->bounce = NULL;
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

/* pread until len bytes or end of file; returns bytes read or -1 (errno set). */
static ssize_t pread_full(int fd, void *dst, size_t len, uint64_t offset) {
    size_t done = 0;
    while (done < len) {
        const ssize_t got = pread(fd, (uint8_t *)dst + done, len - done, (off_t)(offset + done));
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (got == 0) break;
        done += (size_t)got;
    }
    return (ssize_t)done;
}

int fg_reader_read(fg_reader *r, uint64_t offset, size_t len, void *dst) {
    uint8_t *out = dst;
    while (len > 0) {
        if (!r->direct) {
            const ssize_t got = pread_full(r->fd, out, len, offset);
            if (got < 0) {
                r->last_errno = errno;
                return FG_ERR_IO;
            }
            r->reads++;
            r->bytes_read += (uint64_t)got;
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
        const ssize_t got = pread_full(r->fd, r->bounce, span, start);
        if (got < 0) {
            if (errno == EINVAL && drop_direct(r) == 0) continue;
            r->last_errno = errno;
            return FG_ERR_IO;
        }
        r->reads++;
        r->bytes_read += (uint64_t)got;
        if ((size_t)got < lead + chunk) return FG_ERR_SHORT_READ;
        memcpy(out, r->bounce + lead, chunk);
        out += chunk;
        offset += chunk;
        len -= chunk;
    }
    return FG_OK;
}
