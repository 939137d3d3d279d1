"""Open and validate a flash GGUF (DESIGN.md section 3): trunk GGUF + payload GGUF.

Every offset, size, type and shape is checked against the file before the runtime maps or
allocates anything; a failed check raises a FormatError that names it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError, NotFlashGGUFError, UnsupportedError, VersionError
from ..gate_keep import GateCurves
from ..predictor import PREDICTOR_BLOCK, LayerPredictor, ThresholdCurve
from . import constants as C
from .gguf_stream import GGUFStream, TensorInfo, map_file, read_gguf, tensor_array, tensor_nbytes
from .keys import all_or_none, per_layer
from .moe import MoEFlashFile, read_moe_payload


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
    layout: BundleLayout  # K-quant mixes give layers different part types and strides
    bundle: TensorInfo
    order: np.ndarray  # int32 [n_ff]: original neuron index of each row
    freq: np.ndarray  # float32 [n_ff]
    up_bias: np.ndarray | None
    gate_bias: np.ndarray | None
    down_bias: np.ndarray | None
    predictor: LayerPredictor | None = None
    # the converter's estimates for this predictor (on its calibration inputs)
    predictor_recall: float | None = None
    predictor_density: float | None = None  # share of neurons predicted active
    predictor_curve: ThresholdCurve | None = None  # optional: thresholds per recall target
    # gate-resident files (version 4): the gate matrix, rows in bundle order, kept in DRAM
    gate_rows: TensorInfo | None = None
    # split files (version 6): each down column's norm, bundle order (float32 [n_ff])
    down_norm: np.ndarray | None = None

    def part_offset(self, part: str, row: int, n_ff: int) -> int:
        """File offset of bundle row `row`'s up or down part: inside the row, or in a split
        file in the part's own run of rows (n_ff up rows first, then n_ff down rows)."""
        offset = self.layout.part(part)[1]
        if self.down_norm is None:
            return self.bundle.offset + row * self.layout.stride + offset
        up_stride = self.layout.part(C.PART_DOWN)[1]
        if part == C.PART_UP:
            return self.bundle.offset + row * up_stride
        return self.bundle.offset + n_ff * up_stride + row * (self.layout.stride - up_stride)


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
    layers: tuple[LayerInfo, ...]
    activation_threshold: float = 0.0  # fatrelu's threshold (0 for the other activations)
    predictor_kind: str | None = None  # flashgguf.predictor.kind, None without a predictor
    predictor_keep: float | None = None
    gate_resident: bool = False  # the gate is not in the bundles: layers[i].gate_rows
    gate_curves: GateCurves | None = None  # per-layer error per share kept (gate_keep.py)
    split: bool = False  # version 6: up rows and down rows apart (LayerInfo.part_offset)

    @property
    def layout(self) -> BundleLayout:
        """The layout every layer shares. A file whose layers differ (K-quant mixes, version 3)
        has none: use layers[i].layout (this raises FormatError there)."""
        first = self.layers[0].layout
        if any(layer.layout != first for layer in self.layers):
            raise FormatError(f"{self.path.name}: layers have different bundle layouts; "
                              "use layers[i].layout")
        return first

    @property
    def payload_nbytes(self) -> int:
        """Bytes of FFN bundles and resident gate matrices (what the DRAM budget is a
        share of)."""
        return sum(layer.bundle.nbytes + (0 if layer.gate_rows is None else
                                          layer.gate_rows.nbytes) for layer in self.layers)


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


def _check_tokenizer(trunk: GGUFStream, what: str) -> None:
    """The tokenizer arrays llama.cpp loads without checking them itself: duplicate token
    strings stop it with GGML_ASSERT (the whole process aborts; found by fuzzing), and a
    scores or types array shorter than the tokens is read past its end."""
    tokens = trunk.get(C.KEY_TOKENIZER_TOKENS)
    if tokens is None:
        return
    if not isinstance(tokens, list):
        raise FormatError(f"{what}: {C.KEY_TOKENIZER_TOKENS} is not an array of strings")
    # llama.cpp takes each token as a C string: its text ends at a NUL
    texts = [t.partition("\0")[0] for t in tokens]
    if len(set(texts)) != len(texts):
        seen: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text in seen:
                raise FormatError(f"{what}: {C.KEY_TOKENIZER_TOKENS} holds {text!r:.40} twice "
                                  f"(ids {seen[text]} and {i}, as llama.cpp reads them: up to a "
                                  "NUL); llama.cpp cannot load it")
            seen[text] = i
    for key in (C.KEY_TOKENIZER_SCORES, C.KEY_TOKENIZER_TOKEN_TYPES):
        values = trunk.get(key)
        if values is not None and len(values) != len(tokens):
            raise FormatError(f"{what}: {key} has {len(values)} entries for {len(tokens)} "
                              "tokens")


def is_flash_gguf(path: str | os.PathLike[str]) -> bool:
    """True when the file's trunk names the flashgguf architecture (no full validation)."""
    try:
        mm = map_file(Path(path))
        _read_trunk(memoryview(mm), len(mm), Path(path))
        return True
    except (OSError, ValueError, FormatError):
        return False



def open_any_flash_file(path: str | os.PathLike[str]) -> FlashFile | MoEFlashFile:
    """A dense flash GGUF (FlashFile) or a mixture-of-experts one (MoEFlashFile)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes is too small to be a GGUF")
        mm = map_file(path)
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}") from exc
    return _validate(memoryview(mm), size, path)


def open_flash_file(path: str | os.PathLike[str]) -> FlashFile:
    """A dense flash GGUF; a mixture-of-experts one is refused (the tools built on neuron
    bundles do not read experts: flashgguf.Llama runs them, through open_any_flash_file)."""
    flash = open_any_flash_file(path)
    if isinstance(flash, MoEFlashFile):
        raise UnsupportedError(
            f"{flash.path} is a mixture-of-experts flash GGUF ({flash.arch}, {flash.n_expert} "
            "experts): only flashgguf.Llama runs it; this tool reads dense FFN files")
    return flash


def _validate(buf: memoryview, size: int, path: Path) -> FlashFile | MoEFlashFile:
    trunk = _read_trunk(buf, size, path)
    what = f"{path.name} (trunk)"
    version = _int_key(trunk, C.KEY_VERSION, what)
    if version not in C.READABLE_VERSIONS:
        raise VersionError(
            f"{path}: flash GGUF version {version}, this flashgguf reads versions "
            f"{', '.join(map(str, C.READABLE_VERSIONS))}: convert the source model again with "
            "this flashgguf (or upgrade flashgguf)"
        )
    arch = trunk.require(C.KEY_ARCH, what)
    _check_tokenizer(trunk, what)
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
    if payload.get(C.KEY_VERSION) != version:
        raise VersionError(f"{pwhat}: version {payload.get(C.KEY_VERSION)!r} != trunk's")
    if payload.get(C.KEY_ARCH) != arch:
        raise FormatError(f"{pwhat}: architecture {payload.get(C.KEY_ARCH)!r} != trunk's {arch!r}")
    if C.KEY_MOE_EXPERT_COUNT in payload.fields:
        return read_moe_payload(path, size, arch, trunk, payload, version)
    if version == C.MOE_VERSION:
        raise FormatError(f"{pwhat}: a version {version} file without its experts "
                          f"({C.KEY_MOE_EXPERT_COUNT})")

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
    gate_resident = _layout_flag(payload, C.KEY_GATE_RESIDENT, pwhat, version,
                                 C.GATE_RESIDENT_VERSION, "a resident gate")
    if gate_resident and not gated:
        raise FormatError(f"{pwhat}: a resident gate in an FFN that is not gated")
    split = _layout_flag(payload, C.KEY_BUNDLE_SPLIT, pwhat, version, C.SPLIT_VERSION,
                         "split rows")
    if split and not gate_resident:
        raise FormatError(f"{pwhat}: split rows need a resident gate")
    layouts = _read_layouts(payload, pwhat, n_layer, n_embd, gated, version, gate_resident)
    if split and any(la.part(C.PART_UP)[1] != 0 for la in layouts):
        raise FormatError(f"{pwhat}: split rows need the up part at offset 0 (the down "
                          "offset is the up rows' stride)")

    layers = tuple(_read_layer(buf, payload, pwhat, bid, n_embd, n_ff, layouts[bid], gated,
                               gate_resident, split) for bid in range(n_layer))
    gate_curves = _read_gate_curves(payload, pwhat, n_layer, gate_resident)
    keys = _read_predictor_keys(payload, pwhat, n_layer, n_embd)
    if keys is None:
        return FlashFile(path, size, arch, trunk, payload, n_layer, n_embd, n_ff, activation,
                         gated, layers, activation_threshold=threshold,
                         gate_resident=gate_resident, gate_curves=gate_curves, split=split)
    layers = tuple(
        dataclasses.replace(
            layer, predictor=_read_predictor(buf, payload, pwhat, layer.index, n_embd, n_ff,
                                             gated, int(keys.rank[layer.index]),
                                             float(keys.threshold[layer.index]), version),
            predictor_recall=float(keys.recall[layer.index]),
            predictor_density=None if keys.density is None else float(keys.density[layer.index]),
            predictor_curve=None if keys.curves is None else keys.curves[layer.index])
        for layer in layers)
    return FlashFile(path, size, arch, trunk, payload, n_layer, n_embd, n_ff, activation,
                     gated, layers, activation_threshold=threshold,
                     predictor_kind=keys.kind, predictor_keep=keys.keep,
                     gate_resident=gate_resident, gate_curves=gate_curves, split=split)


def _layout_flag(payload: GGUFStream, key: str, what: str, version: int, since: int,
                 name: str) -> bool:
    """An optional bool layout key (absent: False), which only files of version `since` on
    may set."""
    value = payload.get(key, False)
    if not isinstance(value, bool):
        raise FormatError(f"{what}: key {key!r} must be a bool")
    if value and version < since:
        raise FormatError(f"{what}: {name} in a version {version} file (version {since} "
                          "on)")
    return value


def _read_layouts(payload: GGUFStream, what: str, n_layer: int, n_embd: int, gated: bool,
                  version: int, gate_resident: bool) -> tuple[BundleLayout, ...]:
    """Each layer's bundle layout. One layout for every layer: bundle.types and .offsets hold
    one value per part and bundle.stride is an integer. Per layer (version 3, for K-quant
    mixes whose layers differ): types and offsets hold n_layer x n_parts values, layer-major,
    and bundle.stride is an array of n_layer. A resident gate is not a bundle part."""
    parts = tuple(payload.require(C.KEY_BUNDLE_PARTS, what))
    in_bundle = gated and not gate_resident
    want = (C.PART_GATE, C.PART_UP, C.PART_DOWN) if in_bundle else (C.PART_UP, C.PART_DOWN)
    if parts != want:
        raise FormatError(f"{what}: bundle parts {parts} != {want} for gated={gated}, "
                          f"gate resident={gate_resident}")
    per_layer = isinstance(payload.require(C.KEY_BUNDLE_STRIDE, what), np.ndarray)
    if per_layer and version < C.PER_LAYER_LAYOUT_VERSION:
        raise FormatError(f"{what}: per-layer bundle layouts in a version {version} file "
                          f"(they need version {C.PER_LAYER_LAYOUT_VERSION})")
    n_sets = n_layer if per_layer else 1
    raw_types = _int_list(payload, C.KEY_BUNDLE_TYPES, what)
    offsets = _int_list(payload, C.KEY_BUNDLE_OFFSETS, what)
    strides = _int_list(payload, C.KEY_BUNDLE_STRIDE, what) if per_layer \
        else [_int_key(payload, C.KEY_BUNDLE_STRIDE, what)]
    if len(raw_types) != n_sets * len(parts) or len(offsets) != n_sets * len(parts) or \
            len(strides) != n_sets:
        layers = f"{n_layer} layers x " if per_layer else ""
        raise FormatError(f"{what}: bundle types/offsets/strides do not match {layers}"
                          f"{len(parts)} parts")
    k = len(parts)
    layouts = tuple(
        _check_layout(f"{what} layer {i}" if per_layer else what, parts,
                      raw_types[i * k:(i + 1) * k], tuple(offsets[i * k:(i + 1) * k]),
                      strides[i], n_embd)
        for i in range(n_sets))
    return layouts if per_layer else layouts * n_layer


def _int_list(stream: GGUFStream, key: str, what: str) -> list[int]:
    value = stream.require(key, what)
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise FormatError(f"{what}: key {key!r} must be an array of integers")
    return [int(v) for v in value]


def _row_type(what: str, part: str, raw: int, n_embd: int) -> GGMLQuantizationType:
    """A part's ggml type: one the kernels implement, whose blocks divide n_embd."""
    try:
        t = GGMLQuantizationType(raw)
    except ValueError:
        t = None
    if t not in set(C.BUNDLE_TYPES.values()):
        raise FormatError(f"{what}: {part!r} has unsupported type {raw}")
    block = GGML_QUANT_SIZES[t][0]
    if n_embd % block:
        raise FormatError(f"{what}: {part!r} is {t.name}, whose {block}-value "
                          f"blocks do not divide n_embd {n_embd}")
    return t


def _check_layout(what: str, parts: tuple[str, ...], raw_types: list[int],
                  offsets: tuple[int, ...], stride: int, n_embd: int) -> BundleLayout:
    types = [_row_type(what, f"bundle part {part}", raw, n_embd)
             for part, raw in zip(parts, raw_types, strict=True)]
    if stride <= 0:
        raise FormatError(f"{what}: bundle stride {stride} is not positive")
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
                n_ff: int, layout: BundleLayout, gated: bool, gate_resident: bool,
                split: bool) -> LayerInfo:
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
    name = C.TENSOR_GATE_ROWS.format(bid=bid)
    gate_rows = payload.tensors.get(name)
    if gate_rows is not None and not gate_resident:
        raise FormatError(f"{what}: {name!r} in a file whose gate is not resident")
    if gate_resident:
        if gate_rows is None:
            raise FormatError(f"{what}: tensor {name!r} is missing")
        t = _row_type(what, name, int(gate_rows.ggml_type), n_embd)
        _expect(gate_rows, name, what, (n_embd, n_ff), t)
    name = C.TENSOR_DOWN_NORM.format(bid=bid)
    norm = payload.tensors.get(name)
    if norm is not None and not split:
        raise FormatError(f"{what}: {name!r} in a file whose rows are not split")
    down_norm = None
    if split:
        down_norm = _f32(buf, _expect(norm, name, what, (n_ff,), F32))
        if not np.all(np.isfinite(down_norm)) or np.any(down_norm < 0):
            raise FormatError(f"{what}: {name!r} holds a negative or non-finite norm")
    return LayerInfo(bid, layout, bundle, order, freq, bias(C.TENSOR_UP_BIAS, n_ff), gate_bias,
                     bias(C.TENSOR_DOWN_BIAS, n_embd), gate_rows=gate_rows, down_norm=down_norm)


# ---- the activity predictor (flashgguf/predictor.py) ---------------------------------

@dataclass(frozen=True)
class _PredictorKeys:
    kind: str
    keep: float
    rank: np.ndarray
    threshold: np.ndarray
    recall: np.ndarray
    density: np.ndarray | None
    curves: tuple[ThresholdCurve, ...] | None


def _read_predictor_keys(payload: GGUFStream, what: str, n_layer: int,
                         n_embd: int) -> _PredictorKeys | None:
    kind = payload.get(C.KEY_PREDICTOR_KIND)
    if kind is None:
        stray = [n for n in payload.tensors if n.endswith(C.PREDICTOR_TENSOR_SUFFIXES)]
        if stray:
            raise FormatError(f"{what}: tensor {stray[0]!r} but no key "
                              f"{C.KEY_PREDICTOR_KIND!r}")
        return None
    if kind not in C.PREDICTOR_KINDS:
        raise FormatError(f"{what}: unknown predictor kind {kind!r} "
                          f"(this flashgguf reads {', '.join(C.PREDICTOR_KINDS)})")
    if n_embd % PREDICTOR_BLOCK:
        raise FormatError(f"{what}: a predictor needs n_embd ({n_embd}) to be a multiple of "
                          f"{PREDICTOR_BLOCK}")
    keep = payload.require(C.KEY_PREDICTOR_KEEP, what)
    if not isinstance(keep, float) or not 0.0 < keep <= 1.0:
        raise FormatError(f"{what}: key {C.KEY_PREDICTOR_KEEP!r} is {keep!r}, not in (0, 1]")
    rank = per_layer(payload, C.KEY_PREDICTOR_RANK, what, n_layer, "u")
    threshold = per_layer(payload, C.KEY_PREDICTOR_THRESHOLD, what, n_layer, "f")
    recall = per_layer(payload, C.KEY_PREDICTOR_RECALL, what, n_layer, "f")
    density = per_layer(payload, C.KEY_PREDICTOR_DENSITY, what, n_layer, "f", required=False)
    assert rank is not None and threshold is not None and recall is not None
    for key, values in ((C.KEY_PREDICTOR_RECALL, recall), (C.KEY_PREDICTOR_DENSITY, density)):
        if values is not None and not np.all((values >= 0.0) & (values <= 1.0)):
            raise FormatError(f"{what}: key {key!r} has a value outside [0, 1]")
    for bid, r in enumerate(rank):
        if r <= 0 or r % PREDICTOR_BLOCK:
            raise FormatError(f"{what}: predictor rank {int(r)} of layer {bid} is not a positive "
                              f"multiple of {PREDICTOR_BLOCK}")
    return _PredictorKeys(kind, keep, rank, threshold, recall, density,
                          _read_curves(payload, what, n_layer))


def _read_curves(payload: GGUFStream, what: str, n_layer: int) -> tuple[ThresholdCurve, ...] | None:
    """The optional threshold curves: all four keys or none."""
    keys = (C.KEY_PREDICTOR_CURVE_RECALL, C.KEY_PREDICTOR_CURVE_THRESHOLD,
            C.KEY_PREDICTOR_CURVE_DENSITY, C.KEY_PREDICTOR_CURVE_ERROR)
    if not all_or_none(payload, keys, what):
        return None
    targets = _ascending_shares(payload, keys[0], what, "recall targets")
    k = targets.size
    tables = []
    for key in keys[1:]:
        values = per_layer(payload, key, what, n_layer * k, "f",
                           count="one per layer and recall target")
        assert values is not None
        tables.append(values.reshape(n_layer, k).astype(np.float32))
    threshold, density, error = tables
    if np.any(threshold < 0.0) or np.any(np.diff(threshold, axis=1) > 0.0):
        raise FormatError(f"{what}: key {keys[1]!r}: thresholds must be >= 0 and not rise "
                          "with the recall target")
    if np.any((density < 0.0) | (density > 1.0)) or np.any(error < 0.0):
        raise FormatError(f"{what}: keys {keys[2]!r}/{keys[3]!r}: densities must be in [0, 1] "
                          "and errors >= 0")
    return tuple(ThresholdCurve(targets.astype(np.float32), threshold[i], density[i], error[i])
                 for i in range(n_layer))


def _ascending_shares(payload: GGUFStream, key: str, what: str, name: str) -> np.ndarray:
    """A grid key: a non-empty float array in (0, 1], strictly ascending."""
    values = payload.get(key)
    if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind != "f" \
            or values.size == 0 or not np.all((values > 0.0) & (values <= 1.0)) \
            or np.any(np.diff(values) <= 0.0):  # (NaN fails the range test)
        raise FormatError(f"{what}: key {key!r} must be {name} in (0, 1], ascending")
    return values


def _read_gate_curves(payload: GGUFStream, what: str, n_layer: int,
                      gate_resident: bool) -> GateCurves | None:
    """The optional gate error curves: both keys or neither, and only with a resident gate."""
    keys = (C.KEY_GATE_CURVE_KEEP, C.KEY_GATE_CURVE_ERROR)
    if not all_or_none(payload, keys, what):
        return None
    if not gate_resident:
        raise FormatError(f"{what}: gate error curves ({keys[0]!r}) in a file whose gate is "
                          "not resident")
    keep = _ascending_shares(payload, keys[0], what, "shares of rows kept")
    error = per_layer(payload, keys[1], what, n_layer * keep.size, "f",
                      count="one per layer and share")
    assert error is not None
    if np.any(error < 0.0):
        raise FormatError(f"{what}: key {keys[1]!r}: errors must be >= 0")
    return GateCurves(keep.astype(np.float32), error.reshape(n_layer, keep.size).astype(np.float32))


def _q8_0_rows(buf: memoryview, t: TensorInfo, name: str, what: str) -> np.ndarray:
    """The tensor's rows as raw Q8_0 bytes, after checking every block's scale is finite."""
    rows = tensor_array(buf, t)
    # a Q8_0 block: f16 scale d, then 32 int8 quants
    _, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    d = rows.reshape(-1, block_bytes)[:, :2].copy().view(np.float16)
    if not np.all(np.isfinite(d)):
        raise FormatError(f"{what}: tensor {name!r} has a non-finite Q8_0 block scale")
    return rows


def _read_predictor(buf: memoryview, payload: GGUFStream, what: str, bid: int, n_embd: int,
                    n_ff: int, gated: bool, rank: int, threshold: float,
                    version: int) -> LayerPredictor:
    Q8_0 = GGMLQuantizationType.Q8_0
    found = {}
    for template, shape, required in ((C.TENSOR_PRED_A, (n_embd, rank), True),
                                      (C.TENSOR_PRED_B, (rank, n_ff), True),
                                      (C.TENSOR_PRED_B_UP, (rank, n_ff), False)):
        name = template.format(bid=bid)
        t = payload.tensors.get(name)
        if t is None and not required:
            continue
        found[template] = _q8_0_rows(buf, _expect(t, name, what, shape, Q8_0), name, what)
    if C.TENSOR_PRED_B_UP in found and not gated:
        raise FormatError(f"{what}: layer {bid} has {C.TENSOR_PRED_B_UP.format(bid=bid)!r} but "
                          "the FFN is not gated")
    name = C.TENSOR_PRED_SCALE.format(bid=bid)
    scale = tensor_array(buf, _expect(payload.tensors.get(name), name, what, (n_ff,),
                                      GGMLQuantizationType.F32))
    if not np.all(np.isfinite(scale) & (scale >= 0)):
        raise FormatError(f"{what}: tensor {name!r} has a negative or non-finite value")
    sigmas = {}
    for template in (C.TENSOR_PRED_SIGMA_G, C.TENSOR_PRED_SIGMA_U):
        name = template.format(bid=bid)
        t = payload.tensors.get(name)
        if t is None:
            continue
        if version < 2:
            raise FormatError(f"{what}: tensor {name!r} in a version {version} file")
        sigma = tensor_array(buf, _expect(t, name, what, (n_ff,), GGMLQuantizationType.F32))
        if not np.all(np.isfinite(sigma) & (sigma >= 0)):
            raise FormatError(f"{what}: tensor {name!r} has a negative or non-finite value")
        sigmas[template] = sigma
    g_name, u_name = C.TENSOR_PRED_SIGMA_G.format(bid=bid), C.TENSOR_PRED_SIGMA_U.format(bid=bid)
    if C.TENSOR_PRED_SIGMA_U in sigmas and C.TENSOR_PRED_SIGMA_G not in sigmas:
        raise FormatError(f"{what}: {u_name!r} without {g_name!r}")
    if C.TENSOR_PRED_SIGMA_G in sigmas and \
            (C.TENSOR_PRED_SIGMA_U in sigmas) != (C.TENSOR_PRED_B_UP in found):
        raise FormatError(f"{what}: layer {bid} needs {u_name!r} exactly when it has "
                          f"{C.TENSOR_PRED_B_UP.format(bid=bid)!r}")
    return LayerPredictor(rank, found[C.TENSOR_PRED_A], found[C.TENSOR_PRED_B],
                          found.get(C.TENSOR_PRED_B_UP), scale, threshold,
                          sigmas.get(C.TENSOR_PRED_SIGMA_G), sigmas.get(C.TENSOR_PRED_SIGMA_U))
