/* Payload reads: direct I/O (O_DIRECT / F_NOCACHE) with a buffered fallback. */
#ifndef FLASHGGUF_IO_H
#define FLASHGGUF_IO_H

#include <stddef.h>
#include <stdint.h>

/* Direct I/O needs offsets, lengths and buffers aligned to the logical block size;
 * 4096 covers every device we target (512-byte and 4K sectors). */
#define FG_IO_ALIGN 4096

typedef struct fg_reader {
    int fd;
    int direct;           /* 1 while reads bypass the page cache */
    uint8_t *bounce;      /* FG_IO_ALIGN-aligned staging buffer for unaligned ranges */
    size_t bounce_cap;
    uint64_t bytes_read;  /* bytes transferred from the device (aligned sizes) */
    uint64_t reads;       /* pread calls that returned data */
    int last_errno;
} fg_reader;

/* Open path read-only; want_direct=1 tries direct I/O and falls back to buffered reads
 * where the filesystem refuses it (tmpfs). Returns FG_OK or FG_ERR_IO / FG_ERR_NOMEM. */
int fg_reader_open(fg_reader *r, const char *path, int want_direct, size_t bounce_cap);
void fg_reader_close(fg_reader *r);
/* Read exactly len bytes at offset into dst (any alignment). FG_ERR_SHORT_READ if the file
 * ends first, FG_ERR_IO on a read error (errno in last_errno). */
int fg_reader_read(fg_reader *r, uint64_t offset, size_t len, void *dst);

#endif
