"""Corrupt a written GGUF header in place (the validation tests' tool; the writer itself
never edits bytes it has not laid out)."""

from __future__ import annotations

import struct
from pathlib import Path

from gguf import GGUFValueType


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
            raise AssertionError(f"{path}: cannot locate key {key!r} exactly once to patch it")
        f.seek(offset + pos + len(pattern))
        f.write(raw_value)


def patch_u64_key(path: Path, key: str, value: int) -> None:
    patch_key(path, key, GGUFValueType.UINT64, struct.pack("<Q", value))


def set_flash_version(path: Path, version: int) -> None:
    """Make a flash GGUF claim another format version, in the trunk's header and the
    payload's (in place)."""
    from flashgguf.format import constants as C
    from flashgguf.format import open_any_flash_file

    base = open_any_flash_file(path).payload.base
    for offset in (0, base):
        patch_key(path, C.KEY_VERSION, GGUFValueType.UINT32, struct.pack("<I", version), offset)


def copy_to(path: Path, folder: Path) -> Path:
    """A copy of path in folder, to be corrupted (bad.flash.gguf)."""
    dst = folder / "bad.flash.gguf"
    dst.write_bytes(path.read_bytes())
    return dst


def rename_in_payload(path: Path, old: bytes, new: bytes) -> None:
    """Rename a key or tensor of a flash GGUF's payload header in place (same length)."""
    from flashgguf.format import open_any_flash_file

    data = bytearray(path.read_bytes())
    pos = data.find(old, open_any_flash_file(path).payload.base)
    assert pos > 0 and len(old) == len(new)
    data[pos:pos + len(old)] = new
    path.write_bytes(bytes(data))
