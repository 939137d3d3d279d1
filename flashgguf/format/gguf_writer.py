"""A GGUF v3 writer for a GGUF that starts at any offset of an open file (gguf_stream.py's
counterpart).

A small state machine: keys and tensor infos are declared first, so the GGUF's size is known
before anything is written; then the header, then each tensor's data in declared order. It
records where every key's value lands, so a fixed-size value known only later is written at
that offset: nothing searches the written bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import FormatError, WriterStateError
from .constants import KEY_ALIGNMENT, KEY_ARCHITECTURE
from .gguf_stream import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    NUMPY_DTYPES,
    SCALAR_FORMATS,
    tensor_nbytes,
)

GGUF_VERSION = 3
_HEADER_NBYTES = 24  # magic, version, tensor count, key-value count


class _State(enum.Enum):
    DECLARING = "declaring keys and tensors"
    DATA = "writing tensor data"
    DONE = "done"


def pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def pack_value(key: str, value: Any, vtype: GGUFValueType,
               item_type: GGUFValueType | None = None) -> bytes:
    """A key's value as GGUF stores it after its type (an array: item type, count, items)."""
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype != GGUFValueType.ARRAY:
        try:
            return struct.pack(SCALAR_FORMATS[vtype], value)
        except (struct.error, OverflowError) as exc:
            raise FormatError(f"key {key!r}: {value!r} is not a {vtype.name} ({exc})") from None
    if item_type is None or item_type == GGUFValueType.ARRAY:
        raise FormatError(f"key {key!r}: an array needs a scalar or string item type, "
                          f"got {item_type!r}")
    items = list(value) if item_type == GGUFValueType.STRING else value
    head = struct.pack("<IQ", item_type, len(items))
    if item_type == GGUFValueType.STRING:
        return head + b"".join(_string(s) for s in items)
    dtype = np.dtype(NUMPY_DTYPES[item_type]).newbyteorder("<")
    return head + np.asarray(items, dtype=dtype).tobytes()


@dataclass
class _Key:
    vtype: GGUFValueType
    item_type: GGUFValueType | None
    value: bytes  # packed (pack_value)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order
    ggml_type: GGMLQuantizationType
    nbytes: int


class GGUFWriter:
    """One GGUF written at `base` of `f` (opened for writing and seeking)."""

    def __init__(self, f: BinaryIO, base: int, arch: str, what: str) -> None:
        self._f = f
        self.base = base
        self.what = what
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self._keys: dict[str, _Key] = {}
        self._tensors: list[_Tensor] = []
        self._value_offsets: dict[str, int] = {}  # absolute offset of each value, once written
        self._next = 0  # index of the next tensor whose data is due
        self._state = _State.DECLARING
        self.add_key(KEY_ARCHITECTURE, arch, GGUFValueType.STRING)

    def _expect(self, state: _State, step: str) -> None:
        if self._state is not state:
            raise WriterStateError(f"{self.what}: {step} while {self._state.value} "
                                   f"(allowed while {state.value})")

    # ---- declaring ----------------------------------------------------------------------

    def add_key(self, key: str, value: Any, vtype: GGUFValueType,
                item_type: GGUFValueType | None = None) -> None:
        self._expect(_State.DECLARING, f"adding key {key!r}")
        if key in self._keys:
            raise FormatError(f"{self.what}: duplicate key {key!r}")
        self._keys[key] = _Key(vtype, item_type, pack_value(key, value, vtype, item_type))

    def set_alignment(self, alignment: int) -> None:
        """Tensor data alignment, stored as general.alignment at this point of the keys."""
        if alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{self.what}: alignment {alignment} is not a power of two")
        self.add_key(KEY_ALIGNMENT, alignment, GGUFValueType.UINT32)
        self.alignment = alignment

    def add_tensor(self, name: str, shape: tuple[int, ...],
                   ggml_type: GGMLQuantizationType) -> None:
        """Declare a tensor; shape in ggml order (shape[0] is the contiguous dimension)."""
        self._expect(_State.DECLARING, f"adding tensor {name!r}")
        if any(t.name == name for t in self._tensors):
            raise FormatError(f"{self.what}: duplicate tensor {name!r}")
        self._tensors.append(_Tensor(name, tuple(shape), ggml_type,
                                     tensor_nbytes(ggml_type, tuple(shape))))

    def set_value(self, key: str, value: Any) -> None:
        """Give a declared key its value: before the header, in the declaration; after, at the
        offset the header put it. The value keeps its type and size (the size is laid out)."""
        k = self._keys.get(key)
        if k is None:
            raise WriterStateError(f"{self.what}: key {key!r} was not declared")
        packed = pack_value(key, value, k.vtype, k.item_type)
        if len(packed) != len(k.value):
            raise FormatError(f"{self.what}: the new value of {key!r} takes {len(packed)} "
                              f"bytes, its declared one {len(k.value)}")
        k.value = packed
        if self._state is not _State.DECLARING:
            pos = self._f.tell()
            self._f.seek(self._value_offsets[key])
            self._f.write(packed)
            self._f.seek(pos)

    # ---- sizes (known once declared) ----------------------------------------------------

    def _kv_bytes(self) -> list[tuple[str, bytes, int]]:
        """(key, its bytes, where its value starts within them) in declared order."""
        out = []
        for key, k in self._keys.items():
            head = _string(key) + struct.pack("<I", k.vtype)
            out.append((key, head + k.value, len(head)))
        return out

    def _info_bytes(self) -> bytes:
        parts, rel = [], 0
        for t in self._tensors:
            parts.append(_string(t.name) + struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape),
                                                       *t.shape, t.ggml_type, rel))
            rel += pad(t.nbytes, self.alignment)
        return b"".join(parts)

    @property
    def data_offset(self) -> int:
        """Absolute offset of the first tensor's data."""
        meta = _HEADER_NBYTES + sum(len(b) for _, b, _ in self._kv_bytes()) + \
            len(self._info_bytes())
        return self.base + pad(meta, self.alignment)

    @property
    def nbytes(self) -> int:
        """The whole GGUF's size: every tensor's data is padded to the alignment, the last's
        too (as gguf-py writes it)."""
        return self.data_offset - self.base + sum(pad(t.nbytes, self.alignment)
                                                  for t in self._tensors)

    # ---- writing ------------------------------------------------------------------------

    def write_header(self) -> None:
        """Header, keys and tensor infos at base, padded to the first tensor's data."""
        self._expect(_State.DECLARING, "writing the header")
        data_offset = self.data_offset
        self._f.seek(self.base)
        self._f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(self._tensors),
                                               len(self._keys)))
        for key, raw, value_at in self._kv_bytes():
            self._value_offsets[key] = self._f.tell() + value_at
            self._f.write(raw)
        self._f.write(self._info_bytes())
        self._f.write(bytes(data_offset - self._f.tell()))
        self._state = _State.DATA if self._tensors else _State.DONE

    def write_tensor(self, data: np.ndarray) -> None:
        """The next declared tensor's data (its bytes, in ggml's layout), then padding."""
        self._expect(_State.DATA, "writing tensor data")
        t = self._tensors[self._next]
        if data.nbytes != t.nbytes:
            raise FormatError(f"{self.what}: tensor {t.name!r} is {t.nbytes} bytes, "
                              f"got {data.nbytes}")
        np.ascontiguousarray(data).tofile(self._f)
        self._f.write(bytes(pad(t.nbytes, self.alignment) - t.nbytes))
        self._next += 1
        if self._next == len(self._tensors):
            self._state = _State.DONE

    @property
    def next_tensor(self) -> str | None:
        """The name of the tensor whose data is due next (None: all written)."""
        return self._tensors[self._next].name if self._next < len(self._tensors) else None

    def check_done(self) -> None:
        self._expect(_State.DONE, f"finishing (tensor {self.next_tensor!r} is due)")
