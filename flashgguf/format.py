"""Open and validate a flash GGUF (DESIGN.md section 3): trunk GGUF + payload GGUF.

Every offset, size, type and shape is checked against the file before the runtime maps or
allocates anything; a failed check raises a FormatError that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from . import constants as C
from .errors import FormatError, NotFlashGGUFError, VersionError
from .gguf_stream import GGUFStream, TensorInfo, map_file, read_gguf, tensor_array, tensor_nbytes


@dataclass(frozen=True)
class BundleLayout:
    """How one neuron's row is laid out: parts, their ggml types and byte offsets."""

    parts: tuple[str, ...]
    types: tuple[GGMLQuantizationType, ...]
    offsets: tuple[int, ...]
    stride: int

    def part(self, name: str) -> tuple[GGMLQuantizationType, int]:
        i = self.parts.index(name)
        return self.types[i], self.offsets[i]


@dataclass(frozen=True)
class LayerInfo:
    index: int
    bundle: TensorInfo
    order: np.ndarray  # int32 [n_ff]: original neuron index of each row
    freq: np.ndarray  # float32 [n_ff]
    up_bias: np.ndarray | None
    gate_bias: np.ndarray | None
    down_bias: np.ndarray | None


@dataclass(frozen=True)
class FlashFile:
    path: Path
    file_size: int
    arch: str
    trunk: GGUFStream
    payload: GGUFStream
    n_layer: int
    n_embd: int
    n_ff: int
    activation: str
    gated: bool
    layout: BundleLayout
    layers: tuple[LayerInfo, ...]
    activation_threshold: float = 0.0  # fatrelu's threshold (0 for the other activations)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of FFN bundles (what the DRAM budget is a share of)."""
        return sum(layer.bundle.nbytes for layer in self.layers)


def _int_key(stream: GGUFStream, key: str, what: str) -> int:
    value = stream.require(key, what)
    if isinstance(value, (bool, np.ndarray, list, str, float)) or not isinstance(value, int):
        raise FormatError(f"{what}: key {key!r} must be an integer, got {value!r}")
    return value


def _read_trunk(buf: memoryview, size: int, path: Path) -> GGUFStream:
    trunk = read_gguf(buf, 0, size, f"{path.name} (trunk)")
    arch_name = trunk.get(C.KEY_ARCHITECTURE)
    if arch_name != C.TRUNK_ARCH:
        raise NotFlashGGUFError(
            f"{path} is a plain GGUF (architecture {arch_name!r}), not a flash GGUF: "
            f"convert it first with `flashgguf-convert {path.name}`"
        )
    return trunk


def is_flash_gguf(path: str | os.PathLike[str]) -> bool:
    """True when the file's trunk names the flashgguf architecture (no full validation)."""
    try:
        mm = map_file(Path(path))
        _read_trunk(memoryview(mm), len(mm), Path(path))
        return True
    except (OSError, ValueError, FormatError):
        return False



def open_flash_file(path: str | os.PathLike[str]) -> FlashFile:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes is too small to be a GGUF")
        mm = map_file(path)
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}") from exc
    return _validate(memoryview(mm), size, path)


def _validate(buf: memoryview, size: int, path: Path) -> FlashFile:
    trunk = _read_trunk(buf, size, path)
    what = f"{path.name} (trunk)"
    version = _int_key(trunk, C.KEY_VERSION, what)
    if version != C.FORMAT_VERSION:
        raise VersionError(
            f"{path}: flash GGUF version {version}, this flashgguf reads version "
            f"{C.FORMAT_VERSION}: convert the source model again with this flashgguf"
        )
    arch = trunk.require(C.KEY_ARCH, what)
    offset = _int_key(trunk, C.KEY_PAYLOAD_OFFSET, what)
    psize = _int_key(trunk, C.KEY_PAYLOAD_SIZE, what)
    if offset % C.PAYLOAD_ALIGNMENT:
        raise FormatError(f"{what}: payload offset {offset} is not {C.PAYLOAD_ALIGNMENT}-aligned")
    if offset < trunk.end:
        raise FormatError(f"{what}: payload offset {offset} overlaps the trunk "
                          f"(ends at {trunk.end})")
    if offset + psize > size:
        raise FormatError(
            f"{what}: payload [{offset}, {offset + psize}) runs past the end of the file "
            f"({size} bytes): truncated file?"
        )
    payload = read_gguf(buf, offset, offset + psize, f"{path.name} (payload)")
    pwhat = f"{path.name} (payload)"
    if payload.get(C.KEY_ARCHITECTURE) != C.PAYLOAD_ARCH:
        raise FormatError(f"{pwhat}: architecture is {payload.get(C.KEY_ARCHITECTURE)!r}")
    if payload.get(C.KEY_VERSION) != C.FORMAT_VERSION:
        raise VersionError(f"{pwhat}: version {payload.get(C.KEY_VERSION)!r} != trunk's")
    if payload.get(C.KEY_ARCH) != arch:
        raise FormatError(f"{pwhat}: architecture {payload.get(C.KEY_ARCH)!r} != trunk's {arch!r}")

    n_layer = _int_key(payload, C.KEY_BLOCK_COUNT, pwhat)
    n_embd = _int_key(payload, C.KEY_EMBEDDING_LENGTH, pwhat)
    n_ff = _int_key(payload, C.KEY_FEED_FORWARD_LENGTH, pwhat)
    if min(n_layer, n_embd, n_ff) <= 0:
        raise FormatError(f"{pwhat}: non-positive dimensions {n_layer=} {n_embd=} {n_ff=}")
    activation = payload.require(C.KEY_ACTIVATION, pwhat)
    if activation not in C.ACTIVATIONS:
        raise FormatError(f"{pwhat}: unknown activation {activation!r}")
    gated = bool(payload.require(C.KEY_GATED, pwhat))
    threshold = 0.0
    if activation in C.THRESHOLD_ACTIVATIONS:
        threshold = payload.require(C.KEY_ACTIVATION_THRESHOLD, pwhat)
        if not isinstance(threshold, float) or not np.isfinite(threshold):
            raise FormatError(
                f"{pwhat}: {activation} threshold {threshold!r} is not a finite float")
    if activation == "drelu" and not gated:
        raise FormatError(f"{pwhat}: activation drelu needs a gated FFN")
    layout = _read_layout(payload, pwhat, n_embd, gated)

    layers = tuple(_read_layer(buf, payload, pwhat, bid, n_embd, n_ff, layout, gated)
                   for bid in range(n_layer))
    return FlashFile(path, size, arch, trunk, payload, n_layer, n_embd, n_ff, activation,
                     gated, layout, layers, threshold)


def _read_layout(payload: GGUFStream, what: str, n_embd: int, gated: bool) -> BundleLayout:
    parts = tuple(payload.require(C.KEY_BUNDLE_PARTS, what))
    want = (C.PART_GATE, C.PART_UP, C.PART_DOWN) if gated else (C.PART_UP, C.PART_DOWN)
    if parts != want:
        raise FormatError(f"{what}: bundle parts {parts} != {want} for gated={gated}")
    raw_types = [int(t) for t in payload.require(C.KEY_BUNDLE_TYPES, what)]
    offsets = tuple(int(o) for o in payload.require(C.KEY_BUNDLE_OFFSETS, what))
    stride = _int_key(payload, C.KEY_BUNDLE_STRIDE, what)
    if len(raw_types) != len(parts) or len(offsets) != len(parts):
        raise FormatError(f"{what}: bundle types/offsets do not match the {len(parts)} parts")
    allowed = set(C.BUNDLE_TYPES.values())
    types = []
    for part, raw in zip(parts, raw_types, strict=True):
        try:
            t = GGMLQuantizationType(raw)
        except ValueError:
            t = None
        if t not in allowed:
            raise FormatError(f"{what}: bundle part {part!r} has unsupported type {raw}")
        types.append(t)
    spans = sorted((off, off + tensor_nbytes(t, (n_embd,)), part)
                   for part, t, off in zip(parts, types, offsets, strict=True))
    prev_end = 0
    for start, end, part in spans:
        if start < prev_end or end > stride:
            raise FormatError(
                f"{what}: bundle part {part!r} at [{start}, {end}) overlaps another part or "
                f"passes the stride {stride}"
            )
        prev_end = end
    return BundleLayout(parts, tuple(types), offsets, stride)


def _expect(t: TensorInfo | None, name: str, what: str, shape: tuple[int, ...],
            ggml_type: GGMLQuantizationType) -> TensorInfo:
    if t is None:
        raise FormatError(f"{what}: tensor {name!r} is missing")
    if t.shape != shape or t.ggml_type != ggml_type:
        raise FormatError(
            f"{what}: tensor {name!r} is {t.ggml_type.name} {list(t.shape)}, "
            f"expected {ggml_type.name} {list(shape)}"
        )
    return t


def _f32(buf: memoryview, t: TensorInfo, dtype: type = np.float32) -> np.ndarray:
    return tensor_array(buf, t).astype(dtype)


def _read_layer(buf: memoryview, payload: GGUFStream, what: str, bid: int, n_embd: int,
                n_ff: int, layout: BundleLayout, gated: bool) -> LayerInfo:
    F32, I32 = GGMLQuantizationType.F32, GGMLQuantizationType.I32
    name = C.TENSOR_BUNDLE.format(bid=bid)
    bundle = _expect(payload.tensors.get(name), name, what, (layout.stride, n_ff),
                     GGMLQuantizationType.I8)
    name = C.TENSOR_ORDER.format(bid=bid)
    order = _f32(buf, _expect(payload.tensors.get(name), name, what, (n_ff,), I32), np.int32)
    if not np.array_equal(np.sort(order), np.arange(n_ff, dtype=np.int32)):
        raise FormatError(f"{what}: {name!r} is not a permutation of 0..{n_ff - 1}")
    name = C.TENSOR_FREQ.format(bid=bid)
    freq = _f32(buf, _expect(payload.tensors.get(name), name, what, (n_ff,), F32))

    def bias(template: str, n: int) -> np.ndarray | None:
        bname = template.format(bid=bid)
        t = payload.tensors.get(bname)
        return None if t is None else _f32(buf, _expect(t, bname, what, (n,), F32))

    gate_bias = bias(C.TENSOR_GATE_BIAS, n_ff)
    if gate_bias is not None and not gated:
        raise FormatError(f"{what}: layer {bid} has a gate bias but the FFN is not gated")
    return LayerInfo(bid, bundle, order, freq, bias(C.TENSOR_UP_BIAS, n_ff), gate_bias,
                     bias(C.TENSOR_DOWN_BIAS, n_embd))
