"""A strict GGUF v3 reader for a GGUF that starts at any offset inside a file.

gguf.GGUFReader reads a file from byte 0; a flash GGUF holds two GGUFs back to back, so
this reader takes a base offset and a limit. It reuses the gguf package's enums and type
sizes, checks every count, length, offset and size against the limit before using it,
and names the failed check (with its byte offset) in a FormatError.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import FormatError

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dimension (ne0)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass(frozen=True)
class GGUFStream:
    base: int  # absolute offset of the magic
    version: int
    fields: dict[str, Any]  # key -> value (numpy array for numeric arrays, list for strings)
    value_types: dict[str, GGUFValueType]
    array_types: dict[str, GGUFValueType]  # item type of each ARRAY key
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int  # absolute offset where tensor data starts
    end: int  # absolute offset just past the last tensor's data (or data_offset)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str, what: str) -> Any:
        if key not in self.fields:
            raise FormatError(f"{what}: required key {key!r} is missing")
        return self.fields[key]


class _Cursor:
    def __init__(self, buf: memoryview, pos: int, limit: int, what: str) -> None:
        self.buf = buf
        self.pos = pos
        self.limit = limit
        self.what = what

    def fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.what}: {msg} (at byte {self.pos})")

    def need(self, n: int, thing: str) -> None:
        if n < 0 or self.pos + n > self.limit:
            raise self.fail(f"{thing} needs {n} bytes but the file ends at byte {self.limit}")

    def unpack(self, fmt: str, thing: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, thing)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, thing: str) -> str:
        length = self.unpack("<Q", f"{thing} length")
        self.need(length, thing)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{thing} is not valid UTF-8") from exc

    def value_type(self, thing: str) -> GGUFValueType:
        raw = self.unpack("<I", thing)
        try:
            return GGUFValueType(raw)
        except ValueError as exc:
            raise self.fail(f"{thing}: unknown value type {raw}") from exc

    def value(self, vtype: GGUFValueType, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            item_type = self.value_type(f"item type of {key!r}")
            count = self.unpack("<Q", f"item count of {key!r}")
            if item_type == GGUFValueType.ARRAY:
                raise self.fail(f"nested arrays in {key!r} are not supported")
            if item_type == GGUFValueType.STRING:
                # every string needs at least its 8-byte length: bound the count first
                self.need(count * 8, f"array {key!r}")
                return [self.string(f"item of {key!r}") for _ in range(count)]
            dtype = np.dtype(NUMPY_DTYPES[item_type]).newbyteorder("<")
            nbytes = count * dtype.itemsize
            self.need(nbytes, f"array {key!r}")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += nbytes
            return arr
        return self.unpack(SCALAR_FORMATS[vtype], f"value of {key!r}")


def tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block_size * type_size


def read_gguf(buf: memoryview, base: int, limit: int, what: str) -> GGUFStream:
    """Parse the GGUF whose magic is at `base`; nothing it describes may reach past `limit`."""
    cur = _Cursor(buf, base, limit, what)
    cur.need(4, "magic")
    if bytes(buf[base : base + 4]) != GGUF_MAGIC:
        raise cur.fail(f"bad magic {bytes(buf[base:base + 4])!r}, expected {GGUF_MAGIC!r}")
    cur.pos += 4
    version = cur.unpack("<I", "version")
    if version != 3:
        raise cur.fail(f"GGUF version {version} is not supported (only 3)")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key-value count")
    # each key-value takes >= 12 bytes, each tensor info >= 24: reject absurd counts early
    cur.need(n_kv * 12 + n_tensors * 24, "key-values and tensor infos")

    fields: dict[str, Any] = {}
    value_types: dict[str, GGUFValueType] = {}
    array_types: dict[str, GGUFValueType] = {}
    for _ in range(n_kv):
        key = cur.string("key")
        if key in fields:
            raise cur.fail(f"duplicate key {key!r}")
        vtype = cur.value_type(f"type of {key!r}")
        start = cur.pos
        fields[key] = cur.value(vtype, key)  # checks an array's item type first
        value_types[key] = vtype
        if vtype == GGUFValueType.ARRAY:
            array_types[key] = GGUFValueType(struct.unpack_from("<I", buf, start)[0])

    alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")

    infos = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.unpack("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= 4:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        shape = tuple(cur.unpack("<Q", f"dimension of {name!r}") for _ in range(n_dims))
        raw_type = cur.unpack("<I", f"type of {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError as exc:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from exc
        rel_offset = cur.unpack("<Q", f"data offset of {name!r}")
        infos.append((name, shape, ggml_type, rel_offset))

    data_rel = -(-(cur.pos - base) // alignment) * alignment
    data_offset = base + data_rel
    tensors: dict[str, TensorInfo] = {}
    end = data_offset
    for name, shape, ggml_type, rel_offset in infos:
        if name in tensors:
            raise FormatError(f"{what}: duplicate tensor {name!r}")
        if any(d <= 0 for d in shape):
            raise FormatError(f"{what}: tensor {name!r} has a zero dimension {shape}")
        block_size, _ = GGML_QUANT_SIZES[ggml_type]
        if shape[0] % block_size:
            raise FormatError(
                f"{what}: tensor {name!r} row of {shape[0]} is not a whole number of "
                f"{ggml_type.name} blocks ({block_size})"
            )
        if rel_offset % alignment:
            raise FormatError(f"{what}: tensor {name!r} data offset {rel_offset} is unaligned")
        nbytes = tensor_nbytes(ggml_type, shape)
        start = data_offset + rel_offset
        if start + nbytes > limit:
            raise FormatError(
                f"{what}: tensor {name!r} data [{start}, {start + nbytes}) runs past the end "
                f"at byte {limit} (truncated file?)"
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
        end = max(end, start + nbytes)
    return GGUFStream(base, version, fields, value_types, array_types, tensors, alignment,
                      data_offset, end)


_ARRAY_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


def tensor_array(buf: memoryview, t: TensorInfo) -> np.ndarray:
    """Zero-copy view of a tensor's data, shaped like gguf.GGUFReader does: numpy order
    (reversed ggml shape) for plain types, [rows, row_bytes] uint8 for block types."""
    dtype = _ARRAY_DTYPES.get(t.ggml_type)
    if dtype is not None:
        count = t.nbytes // np.dtype(dtype).itemsize
        return np.frombuffer(buf, dtype=dtype, count=count, offset=t.offset).reshape(t.shape[::-1])
    rows = t.nbytes // tensor_nbytes(t.ggml_type, t.shape[:1])
    return np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(rows, -1)


def map_file(path: Path) -> mmap.mmap:
    """Read-only map of a whole file. Not closed explicitly: arrays and error tracebacks may
    still view it; it is unmapped when the last of them goes."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def open_gguf(path: Path) -> tuple[GGUFStream, memoryview]:
    """Parse a plain GGUF file; returns the stream and the buffer its tensors live in."""
    mm = map_file(path)
    buf = memoryview(mm)
    return read_gguf(buf, 0, len(mm), path.name), buf


def release_pages(mm: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop [offset, offset + nbytes) of a read-only map from this process's resident memory
    (the pages stay in the page cache): a converter that has finished with a tensor calls it,
    so that its resident size follows the tensor it works on, not the file it has read."""
    if not hasattr(mmap, "MADV_DONTNEED") or nbytes <= 0:
        return
    start = offset - offset % mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, min(offset + nbytes, len(mm)) - start)
