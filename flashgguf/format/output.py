"""Output files that never end half-written: temp files beside the target, renamed at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gguf import GGUFValueType, GGUFWriter

from ..errors import ConvertError

# gguf's writer logs an endianness line per file; the converter prints its own summary.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

GGUFFileWriter = GGUFWriter


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """A temp path in target's folder; renamed onto target on success, removed on failure."""
    tmp = _temp_path(target.parent, f".{target.name}.", ".partial")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600: give it a normal file's mode
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def scratch_file(folder: Path, suffix: str) -> Iterator[Path]:
    """A temp path removed on exit whatever happens."""
    tmp = _temp_path(folder, ".flashgguf-", suffix)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _temp_path(folder: Path, prefix: str, suffix: str) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as exc:
        raise ConvertError(f"cannot create a file in {folder}: {exc.strerror}") from exc
    os.close(fd)
    return Path(name)


def patch_key(path: Path, key: str, vtype: GGUFValueType, raw_value: bytes,
              offset: int = 0) -> None:
    """Overwrite the value of a fixed-size key in a written GGUF header (the GGUF starting at
    `offset` of the file), in place."""
    pattern = struct.pack("<Q", len(key.encode())) + key.encode() + struct.pack("<I", vtype)
    with open(path, "r+b") as f:
        f.seek(offset)
        head = f.read(1 << 20)
        pos = head.find(pattern)
        if pos < 0 or head.find(pattern, pos + 1) >= 0:
            raise ConvertError(f"{path}: cannot locate key {key!r} exactly once to patch it")
        f.seek(offset + pos + len(pattern))
        f.write(raw_value)


def patch_u64_key(path: Path, key: str, value: int) -> None:
    patch_key(path, key, GGUFValueType.UINT64, struct.pack("<Q", value))
