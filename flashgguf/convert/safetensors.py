"""A strict reader for Hugging Face safetensors checkpoints, one tensor at a time.

A checkpoint is a single `.safetensors` file, a sharded set listed by
`model.safetensors.index.json`, or a folder holding either. Every header is checked against
its file before anything is read: a header length past the end of the file, bad JSON, data
offsets outside the data section or not matching the shape and dtype all raise a FormatError
that names the file and the check.

Tensors are read from a memory map, as stored (bfloat16 widened to float32 only a block of
rows at a time by the writer); `release()` drops the mapped pages once a tensor is written
(madvise DONTNEED), so the converter's resident memory follows the tensor it works on, not
the size of the model.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConvertError, FormatError, UnsupportedError
from ..format import release_pages

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HEADER_LEN_BYTES = 8
# safetensors caps the JSON header at 100 MB; a larger claim is a corrupt file.
_MAX_HEADER_BYTES = 100 * 2**20

# dtypes the converter reads, with their item size; "BF16" is widened to float32 by hand.
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name ("BF16", "F16", "F32", ...)
    shape: tuple[int, ...]  # numpy order (row-major, as PyTorch stores it)
    shard: Path
    offset: int  # absolute byte offset in the shard
    nbytes: int


@dataclass
class _Shard:
    path: Path
    mm: mmap.mmap | None = None

    def map(self) -> mmap.mmap:
        if self.mm is None:
            with open(self.path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self.mm


@dataclass
class Checkpoint:
    """The tensors of a checkpoint (every shard's header read and validated)."""

    folder: Path  # where config.json and the tokenizer files are
    tensors: dict[str, TensorEntry]
    _shards: dict[Path, _Shard] = field(default_factory=dict, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"the checkpoint has no tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's data as stored, a read-only view of the map: float32, float16, or
        uint16 holding bfloat16 bits (widen() turns any of them into float32)."""
        t = self.entry(name)
        if t.dtype not in DTYPE_SIZES:
            raise UnsupportedError(
                f"{t.shard.name}: tensor {name!r} has dtype {t.dtype}; the converter reads "
                f"{', '.join(DTYPE_SIZES)}"
            )
        mm = self._shards.setdefault(t.shard, _Shard(t.shard)).map()
        count = int(np.prod(t.shape, dtype=np.int64))
        dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[t.dtype]
        return np.frombuffer(mm, dtype=dtype, count=count, offset=t.offset).reshape(t.shape)

    def load(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array."""
        return widen(self.raw(name))

    def release(self) -> None:
        """Drop every mapped page from resident memory (they stay in the page cache): the
        converter calls it after each tensor, so its footprint follows that tensor."""
        for shard in self._shards.values():
            if shard.mm is not None:
                release_pages(shard.mm, 0, len(shard.mm))

    def close(self) -> None:
        for shard in self._shards.values():
            if shard.mm is not None:
                # arrays still viewing the map (a traceback's frames) keep it: it is unmapped
                # when the last of them goes
                with contextlib.suppress(BufferError):
                    shard.mm.close()
                shard.mm = None


def widen(raw: np.ndarray) -> np.ndarray:
    """float32 copy of data as Checkpoint.raw returns it (uint16 = bfloat16 bits)."""
    if raw.dtype == np.uint16:  # bfloat16 is the top half of a float32
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return raw.astype(np.float32)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER_LEN_BYTES)
            if len(head) < _HEADER_LEN_BYTES:
                raise FormatError(f"{path}: {size} bytes is too short for a safetensors header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - _HEADER_LEN_BYTES:
                raise FormatError(
                    f"{path}: the header claims {hlen} bytes but the file has only "
                    f"{size - _HEADER_LEN_BYTES} after the length field: truncated file?"
                )
            if hlen > _MAX_HEADER_BYTES:
                raise FormatError(f"{path}: header of {hlen} bytes is past the 100 MB limit")
            raw = f.read(hlen)
    except OSError as exc:
        raise ConvertError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the header is not a JSON object")
    data_start = _HEADER_LEN_BYTES + hlen
    data_size = size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _entry(path, name, info, data_start, data_size)
    return tensors


def _entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise FormatError(f"{where}: missing dtype")
    if (not isinstance(shape, list) or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise FormatError(f"{where}: shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
            not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise FormatError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise FormatError(
            f"{where}: data [{begin}, {end}) lies outside the data section of {data_size} "
            "bytes: truncated file?"
        )
    nbytes = end - begin
    item = DTYPE_SIZES.get(dtype)
    if item is not None and nbytes != int(np.prod(shape, dtype=np.int64)) * item:
        raise FormatError(f"{where}: {nbytes} bytes do not hold a {dtype} tensor of shape {shape}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, nbytes)


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for what open_checkpoint takes: a .safetensors file, an index, or a folder."""
    p = Path(path)
    return p.is_dir() or p.suffix == ".safetensors" or p.name.endswith(".index.json")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p} does not exist")
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return _open_index(p / INDEX_NAME)
        if (p / SINGLE_NAME).is_file():
            return Checkpoint(p, read_header(p / SINGLE_NAME))
        found = sorted(p.glob("*.safetensors"))
        if len(found) != 1:
            raise ConvertError(
                f"{p}: no {INDEX_NAME} or {SINGLE_NAME}, and {len(found)} other .safetensors "
                "files: pass the file or the index to convert"
            )
        return Checkpoint(p, read_header(found[0]))
    if p.name.endswith(".index.json"):
        return _open_index(p)
    return Checkpoint(p.parent, read_header(p))


def _open_index(index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: weight_map is not an object")
    tensors: dict[str, TensorEntry] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index.parent / str(shard_name)
        if not shard.is_file():
            raise ConvertError(f"{index}: shard {shard_name!r} is missing")
        for name, entry in read_header(shard).items():
            if name in tensors:
                raise FormatError(f"{index}: tensor {name!r} is in two shards")
            tensors[name] = entry
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise FormatError(f"{index}: tensors {missing[:3]} are listed but in no shard")
    return Checkpoint(index.parent, tensors)
