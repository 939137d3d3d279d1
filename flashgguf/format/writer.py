"""Write a flash GGUF (DESIGN.md section 3): the trunk GGUF, then the payload GGUF at the next
PAYLOAD_ALIGNMENT offset, in one file.

The caller describes both GGUFs with plain records (which source keys and tensors the trunk
copies, the payload's layers and predictor), so their sizes, the payload's offset and every
header value are known before the first byte is written. Then it hands over tensor data in
order: the trunk's source tensors, then each layer's bundle rows. Two payload values are
known only at the end, each written at the offset its key was laid out at: the down columns'
re-quantization error (after the last layer) and the expected read per token (measured on
the finished file).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import ConvertError, FormatError, WriterStateError
from ..gate_keep import GateCurves
from ..predictor import LayerPredictor, ThresholdCurve
from . import constants as C
from .gguf_writer import GGUFWriter, pad
from .moe import MoEPayloadRecord
from .reader import BundleLayout

Q = GGMLQuantizationType
U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32

# Keys the trunk does not copy from the source: the writer adds its own.
_SKIPPED_KEYS = ("GGUF.", C.KEY_ARCHITECTURE, C.KEY_ALIGNMENT)


@dataclass(frozen=True)
class SourceKey:
    """A key-value of the source GGUF, as read (gguf_stream.GGUFStream's fields and types)."""

    key: str
    value: Any
    vtype: GGUFValueType
    item_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TrunkTensor:
    name: str
    shape: tuple[int, ...]  # ggml order
    ggml_type: GGMLQuantizationType
    # The bundle part (C.PART_*) of one of llama.cpp's own FFN tensors (weight or bias): the
    # trunk stores zeros of the dummy width instead (llama.cpp computes nothing of value).
    ffn_part: str | None = None


@dataclass(frozen=True)
class TrunkRecord:
    arch: str  # the source's llama.cpp architecture
    keys: tuple[SourceKey, ...]  # the source's, in order
    tensors: tuple[TrunkTensor, ...]  # the source's, in order
    alignment: int | None = None  # the source's general.alignment, when it sets one
    # the key that sizes the FFN tensors the trunk replaces by dummies, and their width:
    # <arch>.feed_forward_length for dense FFNs; a MoE's expert width key (converter's choice
    # from the architecture registry) with DUMMY_EXPERT_WIDTH
    ffn_width_key: str | None = None  # None: <arch>.feed_forward_length
    dummy_width: int = C.DUMMY_FFN_WIDTH


@dataclass(frozen=True)
class PayloadLayer:
    layout: BundleLayout
    up_bias: np.ndarray | None = None  # float32 [n_ff]
    gate_bias: np.ndarray | None = None  # float32 [n_ff], gated FFNs only
    down_bias: np.ndarray | None = None  # float32 [n_embd]
    predictor: LayerPredictor | None = None  # stored form, rows in bundle order
    # the predictor's estimates on held-out inputs (as the reader's LayerInfo names them)
    predictor_recall: float = 0.0
    predictor_density: float = 0.0
    predictor_precision: float = 0.0  # stored for calibrated predictors
    predictor_curve: ThresholdCurve | None = None
    # the resident gate matrix's type (PayloadRecord.gate_resident); its rows come with
    # write_layer
    gate_type: GGMLQuantizationType | None = None


@dataclass(frozen=True)
class CalibrationRecord:
    tokens: int
    text_sha256: str


@dataclass(frozen=True)
class PredictorRecord:
    keep: float
    calibration: CalibrationRecord | None = None  # None: the weight-only predictor


@dataclass(frozen=True)
class PayloadRecord:
    arch: str
    n_embd: int
    n_ff: int
    activation: str
    gated: bool
    layers: tuple[PayloadLayer, ...]
    source_name: str
    source_sha256: str
    activation_threshold: float = 0.0
    predictor: PredictorRecord | None = None  # every layer has one exactly when set
    # the gate is kept apart from the bundles (ffn_gate_rows), resident at run time
    gate_resident: bool = False
    gate_curves: GateCurves | None = None  # gate_resident, calibrated: per-layer error curves
    # gate_resident: each layer's up rows, then its down rows (version 6), read apart
    split: bool = False


def dummy_shape(part: str, shape: tuple[int, ...],
                dummy: int = C.DUMMY_FFN_WIDTH) -> tuple[int, ...]:
    """ggml shape of an FFN tensor of the dummy width: gate/up [n_embd, n_ff] and their
    biases [n_ff], down [n_ff, n_embd]; the down bias [n_embd] keeps its shape. Expert
    tensors keep their third dimension (n_expert)."""
    if part == C.PART_DOWN:
        return (dummy, *shape[1:]) if len(shape) >= 2 else shape
    return (shape[0], dummy, *shape[2:]) if len(shape) >= 2 else (dummy,)


class _State(enum.Enum):
    TRUNK = "writing the trunk's tensors"
    PAYLOAD = "writing the payload's layers"
    FINISHED = "finished"
    CLOSED = "closed"


class FlashWriter:
    """with FlashWriter(path, trunk, payload) as w: w.write_trunk_tensor(...) for each trunk
    tensor that is not an FFN tensor, w.write_layer(...) for each layer, w.finish(...),
    optionally w.set_expected_read(...). Steps out of order raise WriterStateError."""

    def __init__(self, path: Path, trunk: TrunkRecord,
                 payload: PayloadRecord | MoEPayloadRecord) -> None:
        self.path = path
        self._trunk_record = trunk
        self._payload_record = payload
        self._moe = isinstance(payload, MoEPayloadRecord)
        self._version = C.MOE_VERSION if self._moe else \
            C.SPLIT_VERSION if payload.split else C.FORMAT_VERSION
        if isinstance(payload, PayloadRecord):
            self._check(payload)
        try:
            self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise ConvertError(f"cannot write {path}: {exc.strerror}") from exc
        self._state = _State.TRUNK
        self._next_trunk = 0
        self._next_layer = 0
        try:
            self._trunk = self._declare_trunk(trunk)
            self.trunk_nbytes = self._trunk.nbytes
            self.payload_offset = pad(self.trunk_nbytes, C.PAYLOAD_ALIGNMENT)
            self._payload = self._declare_moe_payload(payload, self.payload_offset) \
                if self._moe else self._declare_payload(payload, self.payload_offset)
            self.payload_nbytes = self._payload.nbytes
            self._trunk.set_value(C.KEY_PAYLOAD_OFFSET, self.payload_offset)
            self._trunk.set_value(C.KEY_PAYLOAD_SIZE, self.payload_nbytes)
            self._trunk.write_header()
            self._skip_dummies()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FlashWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._state is not _State.CLOSED:
            self._f.close()
            self._state = _State.CLOSED

    def _expect_layer(self, bid: int) -> None:
        """Layers are written in order."""
        if bid != self._next_layer:
            raise WriterStateError(f"{self.path.name}: layer {bid} written where layer "
                                   f"{self._next_layer} is due")

    def _expect(self, state: _State, step: str) -> None:
        if self._state is not state:
            raise WriterStateError(f"{self.path.name}: {step} while {self._state.value} "
                                   f"(allowed while {state.value})")

    @staticmethod
    def _check(payload: PayloadRecord) -> None:
        if payload.activation not in C.ACTIVATIONS:
            raise FormatError(f"unknown activation {payload.activation!r}")
        has_predictor = [layer.predictor is not None for layer in payload.layers]
        if (payload.predictor is not None) != all(has_predictor) or \
                (payload.predictor is None and any(has_predictor)):
            raise FormatError("predictors need the predictor record and one for every layer")
        if not payload.gated and any(la.gate_bias is not None for la in payload.layers):
            raise FormatError("a gate bias in an FFN that is not gated")
        if payload.gate_resident and not payload.gated:
            raise FormatError("a resident gate in an FFN that is not gated")
        if payload.split and not payload.gate_resident:
            raise FormatError("split rows need a resident gate")
        if payload.split and any(la.layout.part(C.PART_UP)[1] != 0 for la in payload.layers):
            raise FormatError("split rows need the up part at offset 0")
        if any((la.gate_type is not None) != payload.gate_resident for la in payload.layers):
            raise FormatError("a resident gate needs a gate type for every layer, and only then")
        curves = payload.gate_curves
        if curves is not None and (not payload.gate_resident or curves.error.shape !=
                                   (len(payload.layers), len(curves.keep))):
            raise FormatError("gate error curves need a resident gate and one curve per layer")

    # ---- the trunk ----------------------------------------------------------------------

    def _declare_trunk(self, trunk: TrunkRecord) -> GGUFWriter:
        w = GGUFWriter(self._f, 0, C.TRUNK_ARCH, f"{self.path.name} (trunk)")
        # the payload's location first; its values are set once the payload is laid out
        w.add_key(C.KEY_PAYLOAD_OFFSET, 0, GGUFValueType.UINT64)
        w.add_key(C.KEY_PAYLOAD_SIZE, 0, GGUFValueType.UINT64)
        w.add_key(C.KEY_VERSION, self._version, U32)
        w.add_key(C.KEY_ARCH, trunk.arch, GGUFValueType.STRING)
        if trunk.alignment is not None:
            w.set_alignment(trunk.alignment)
        ffn_width = trunk.ffn_width_key or f"{trunk.arch}.feed_forward_length"
        for k in trunk.keys:
            if k.key.startswith(_SKIPPED_KEYS):
                continue
            value = trunk.dummy_width if k.key == ffn_width else k.value
            w.add_key(k.key, value, k.vtype, k.item_type)
        for t in trunk.tensors:
            if t.ffn_part is None:
                w.add_tensor(t.name, t.shape, t.ggml_type)
            else:
                w.add_tensor(t.name, dummy_shape(t.ffn_part, t.shape, trunk.dummy_width), Q.F32)
        return w

    def _skip_dummies(self) -> None:
        """Write the FFN dummies that are due (the caller has no data for them)."""
        tensors = self._trunk_record.tensors
        while self._next_trunk < len(tensors) and tensors[self._next_trunk].ffn_part is not None:
            t = tensors[self._next_trunk]
            shape = dummy_shape(t.ffn_part, t.shape, self._trunk_record.dummy_width)
            self._trunk.write_tensor(np.zeros(shape[::-1], np.float32))
            self._next_trunk += 1
        if self._next_trunk == len(tensors):
            self._trunk.check_done()
            self._f.write(bytes(self.payload_offset - self.trunk_nbytes))
            self._payload.write_header()
            self._state = _State.PAYLOAD

    @property
    def next_trunk_tensor(self) -> TrunkTensor | None:
        """The source tensor whose data write_trunk_tensor takes next (None: trunk done)."""
        tensors = self._trunk_record.tensors
        return tensors[self._next_trunk] if self._next_trunk < len(tensors) else None

    def write_trunk_tensor(self, data: np.ndarray) -> None:
        """The next non-FFN source tensor's data, as the source stores it."""
        self._expect(_State.TRUNK, "writing a trunk tensor")
        self._trunk.write_tensor(data)
        self._next_trunk += 1
        self._skip_dummies()

    # ---- the payload --------------------------------------------------------------------

    def _payload_writer(self, base: int, arch: str, n_layer: int, n_embd: int,
                        n_ff: int, activation: str) -> GGUFWriter:
        """The payload GGUF with the keys every payload starts with."""
        w = GGUFWriter(self._f, base, C.PAYLOAD_ARCH, f"{self.path.name} (payload)")
        w.set_alignment(C.PAYLOAD_ALIGNMENT)
        w.add_key(C.KEY_VERSION, self._version, U32)
        w.add_key(C.KEY_ARCH, arch, GGUFValueType.STRING)
        w.add_key(C.KEY_BLOCK_COUNT, n_layer, U32)
        w.add_key(C.KEY_EMBEDDING_LENGTH, n_embd, U32)
        w.add_key(C.KEY_FEED_FORWARD_LENGTH, n_ff, U32)
        w.add_key(C.KEY_ACTIVATION, activation, GGUFValueType.STRING)
        return w

    def _declare_payload(self, p: PayloadRecord, base: int) -> GGUFWriter:
        w = self._payload_writer(base, p.arch, len(p.layers), p.n_embd, p.n_ff, p.activation)
        if p.activation in C.THRESHOLD_ACTIVATIONS:
            w.add_key(C.KEY_ACTIVATION_THRESHOLD, p.activation_threshold, F32)
        w.add_key(C.KEY_GATED, p.gated, GGUFValueType.BOOL)
        if p.gate_resident:
            w.add_key(C.KEY_GATE_RESIDENT, True, GGUFValueType.BOOL)
        if p.split:
            w.add_key(C.KEY_BUNDLE_SPLIT, True, GGUFValueType.BOOL)
        if p.gate_curves is not None:
            for key, values in ((C.KEY_GATE_CURVE_KEEP, p.gate_curves.keep),
                                (C.KEY_GATE_CURVE_ERROR, p.gate_curves.error.reshape(-1))):
                w.add_key(key, [float(v) for v in values], GGUFValueType.ARRAY, F32)
        self._add_layout_keys(w, [layer.layout for layer in p.layers])
        w.add_key(C.KEY_SOURCE_NAME, p.source_name, GGUFValueType.STRING)
        w.add_key(C.KEY_SOURCE_SHA256, p.source_sha256, GGUFValueType.STRING)
        w.add_key(C.KEY_DOWN_REQUANT_ERROR, 0.0, F32)  # known after the last layer: finish()
        if p.predictor is not None:
            self._add_predictor_keys(w, p.predictor, p.layers)
        for bid, layer in enumerate(p.layers):
            for name, shape, ggml_type, _data in self._layer_tensors(bid, layer, None, None,
                                                                     None, None, None):
                w.add_tensor(name, shape, ggml_type)
        return w

    def _declare_moe_payload(self, p: MoEPayloadRecord, base: int) -> GGUFWriter:
        w = self._payload_writer(base, p.arch, len(p.layers), p.n_embd, p.n_ff_exp,
                                 p.activation)
        w.add_key(C.KEY_GATED, True, GGUFValueType.BOOL)
        w.add_key(C.KEY_MOE_EXPERT_COUNT, p.n_expert, U32)
        w.add_key(C.KEY_MOE_EXPERT_USED_COUNT, p.n_expert_used, U32)
        w.add_key(C.KEY_MOE_TYPES, [int(t) for la in p.layers for t in la.types],
                  GGUFValueType.ARRAY, U32)
        w.add_key(C.KEY_MOE_OFFSETS, [o for la in p.layers for o in la.offsets],
                  GGUFValueType.ARRAY, U32)
        w.add_key(C.KEY_MOE_STRIDE, [la.stride for la in p.layers], GGUFValueType.ARRAY, U32)
        if p.frequency is not None:
            assert p.calibration is not None and p.frequency.shape == (len(p.layers),
                                                                        p.n_expert)
            w.add_key(C.KEY_MOE_FREQUENCY, [float(v) for v in p.frequency.reshape(-1)],
                      GGUFValueType.ARRAY, F32)
            w.add_key(C.KEY_MOE_PINNED_SHARE, float(p.pinned_share), F32)
            self._add_calibration_keys(w, p.calibration)
        w.add_key(C.KEY_SOURCE_NAME, p.source_name, GGUFValueType.STRING)
        w.add_key(C.KEY_SOURCE_SHA256, p.source_sha256, GGUFValueType.STRING)
        for bid, layout in enumerate(p.layers):
            w.add_tensor(C.TENSOR_EXPERTS.format(bid=bid), (layout.stride, p.n_expert), Q.I8)
        return w

    def write_experts(self, bid: int, bundles: np.ndarray) -> None:
        """Layer bid's expert bundles, uint8 [n_expert, stride] (MoE files); layers in order."""
        self._expect(_State.PAYLOAD, f"writing the experts of layer {bid}")
        p = self._payload_record
        if not isinstance(p, MoEPayloadRecord):
            raise WriterStateError(f"{self.path.name}: experts written to a dense payload")
        self._expect_layer(bid)
        if bundles.dtype != np.uint8 or bundles.shape != (p.n_expert, p.layers[bid].stride):
            raise FormatError(f"layer {bid}: expert bundles {bundles.dtype} {bundles.shape}, "
                              f"expected uint8 {(p.n_expert, p.layers[bid].stride)}")
        self._payload.write_tensor(bundles)
        self._next_layer += 1

    @staticmethod
    def _add_layout_keys(w: GGUFWriter, layouts: list[BundleLayout]) -> None:
        # one layout for all layers as before version 3, else per layer (layer-major)
        uniform = all(la == layouts[0] for la in layouts)
        stored = layouts[:1] if uniform else layouts
        w.add_key(C.KEY_BUNDLE_PARTS, list(layouts[0].parts), GGUFValueType.ARRAY,
                  GGUFValueType.STRING)
        w.add_key(C.KEY_BUNDLE_TYPES, [int(t) for la in stored for t in la.types],
                  GGUFValueType.ARRAY, U32)
        w.add_key(C.KEY_BUNDLE_OFFSETS, [o for la in stored for o in la.offsets],
                  GGUFValueType.ARRAY, U32)
        if uniform:
            w.add_key(C.KEY_BUNDLE_STRIDE, layouts[0].stride, U32)
        else:
            w.add_key(C.KEY_BUNDLE_STRIDE, [la.stride for la in layouts], GGUFValueType.ARRAY,
                      U32)

    @staticmethod
    def _add_calibration_keys(w: GGUFWriter, rec: CalibrationRecord) -> None:
        w.add_key(C.KEY_CALIBRATION_TOKENS, rec.tokens, U32)
        w.add_key(C.KEY_CALIBRATION_TEXT_SHA256, rec.text_sha256, GGUFValueType.STRING)

    @staticmethod
    def _add_predictor_keys(w: GGUFWriter, rec: PredictorRecord,
                            layers: tuple[PayloadLayer, ...]) -> None:
        def f32_array(key: str, values: list[float]) -> None:
            w.add_key(key, [float(v) for v in values], GGUFValueType.ARRAY, F32)

        predictors = [layer.predictor for layer in layers]
        assert all(p is not None for p in predictors)  # _check
        if rec.calibration is not None:
            w.add_key(C.KEY_PREDICTOR_KIND, C.PREDICTOR_CALIBRATED_SVD, GGUFValueType.STRING)
            FlashWriter._add_calibration_keys(w, rec.calibration)
            f32_array(C.KEY_PREDICTOR_PRECISION, [la.predictor_precision for la in layers])
        else:
            w.add_key(C.KEY_PREDICTOR_KIND, C.PREDICTOR_WEIGHT_SVD, GGUFValueType.STRING)
        w.add_key(C.KEY_PREDICTOR_KEEP, rec.keep, F32)
        w.add_key(C.KEY_PREDICTOR_RANK, [p.rank for p in predictors if p is not None],
                  GGUFValueType.ARRAY, U32)
        f32_array(C.KEY_PREDICTOR_THRESHOLD, [p.threshold for p in predictors if p is not None])
        f32_array(C.KEY_PREDICTOR_RECALL, [la.predictor_recall for la in layers])
        f32_array(C.KEY_PREDICTOR_DENSITY, [la.predictor_density for la in layers])
        w.add_key(C.KEY_PREDICTOR_EXPECTED_BUDGET, C.REPORT_BUDGET_SHARE, F32)
        # measured on the finished file: set_expected_read()
        f32_array(C.KEY_PREDICTOR_EXPECTED_READ, [0.0] * len(layers))
        curves = [la.predictor_curve for la in layers]
        if all(c is not None for c in curves):
            f32_array(C.KEY_PREDICTOR_CURVE_RECALL, list(C.PREDICTOR_CURVE_RECALLS))
            for key, field_name in ((C.KEY_PREDICTOR_CURVE_THRESHOLD, "threshold"),
                                    (C.KEY_PREDICTOR_CURVE_DENSITY, "density"),
                                    (C.KEY_PREDICTOR_CURVE_ERROR, "error")):
                f32_array(key, list(np.concatenate([getattr(c, field_name) for c in curves])))

    def _layer_tensors(self, bid: int, layer: PayloadLayer, rows: np.ndarray | None,
                       gate_rows: np.ndarray | None, order: np.ndarray | None,
                       freq: np.ndarray | None, down_norm: np.ndarray | None
                       ) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType,
                                       np.ndarray | None]]:
        """(name, ggml shape, type, data) of a layer's tensors, in the order they are
        written; the bundle rows, gate rows, order, frequencies and (split) down norms come
        with write_layer."""
        record = self._payload_record
        n_ff, n_embd = record.n_ff, record.n_embd
        if rows is not None and record.split:  # the up rows, then the down rows
            up_stride = layer.layout.part(C.PART_DOWN)[1]
            rows = np.concatenate([rows[:, :up_stride].reshape(-1),
                                   rows[:, up_stride:].reshape(-1)])
        out = [(C.TENSOR_BUNDLE.format(bid=bid), (layer.layout.stride, n_ff), Q.I8, rows)]
        if layer.gate_type is not None:
            out.append((C.TENSOR_GATE_ROWS.format(bid=bid), (n_embd, n_ff), layer.gate_type,
                        gate_rows))
        if record.split:
            out.append((C.TENSOR_DOWN_NORM.format(bid=bid), (n_ff,), Q.F32, down_norm))
        out += [(C.TENSOR_ORDER.format(bid=bid), (n_ff,), Q.I32, order),
                (C.TENSOR_FREQ.format(bid=bid), (n_ff,), Q.F32, freq)]
        for template, bias, n in ((C.TENSOR_UP_BIAS, layer.up_bias, n_ff),
                                  (C.TENSOR_GATE_BIAS, layer.gate_bias, n_ff),
                                  (C.TENSOR_DOWN_BIAS, layer.down_bias, n_embd)):
            if bias is not None:
                out.append((template.format(bid=bid), (n,), Q.F32, bias))
        p = layer.predictor
        if p is None:
            return out
        out.append((C.TENSOR_PRED_A.format(bid=bid), (n_embd, p.rank), Q.Q8_0, p.a))
        out.append((C.TENSOR_PRED_B.format(bid=bid), (p.rank, n_ff), Q.Q8_0, p.b))
        if p.b_up is not None:
            out.append((C.TENSOR_PRED_B_UP.format(bid=bid), (p.rank, n_ff), Q.Q8_0, p.b_up))
        out.append((C.TENSOR_PRED_SCALE.format(bid=bid), (n_ff,), Q.F32, p.scale))
        for template, sigma in ((C.TENSOR_PRED_SIGMA_G, p.sigma_g),
                                (C.TENSOR_PRED_SIGMA_U, p.sigma_u)):
            if sigma is not None:
                out.append((template.format(bid=bid), (n_ff,), Q.F32, sigma))
        return out

    def write_layer(self, bid: int, rows: np.ndarray, order: np.ndarray,
                    freq: np.ndarray, gate_rows: np.ndarray | None = None,
                    down_norm: np.ndarray | None = None) -> None:
        """Layer bid's bundle rows [n_ff, stride], row order (int32) and frequencies
        (float32), with a resident gate its gate rows (uint8 [n_ff, row bytes], bundle
        order), and with split rows the down columns' norms (float32 [n_ff], bundle order);
        its biases and predictor come from the record. Layers go in order."""
        self._expect(_State.PAYLOAD, f"writing layer {bid}")
        if not isinstance(self._payload_record, PayloadRecord):
            raise WriterStateError(f"{self.path.name}: bundle rows written to a MoE payload")
        self._expect_layer(bid)
        layer = self._payload_record.layers[bid]
        if (gate_rows is None) != (layer.gate_type is None):
            raise FormatError(f"layer {bid}: gate rows are given exactly when the gate is "
                              "resident")
        if (down_norm is None) == self._payload_record.split:
            raise FormatError(f"layer {bid}: down norms are given exactly when rows are split")
        for name, _shape, ggml_type, data in self._layer_tensors(bid, layer, rows, gate_rows,
                                                                 order, freq, down_norm):
            assert data is not None
            if ggml_type in (Q.I32, Q.F32) and data.dtype != (np.int32 if ggml_type == Q.I32
                                                              else np.float32):
                raise FormatError(f"{name!r}: {data.dtype} data for a {ggml_type.name} tensor")
            self._payload.write_tensor(data)
        self._next_layer += 1

    def finish(self, down_rel_error: float = 0.0) -> None:
        """After the last layer: the down columns' max relative re-quantization error (dense
        files; MoE experts keep the source's bytes)."""
        self._expect(_State.PAYLOAD, "finishing")
        self._payload.check_done()
        if not self._moe:
            self._payload.set_value(C.KEY_DOWN_REQUANT_ERROR, down_rel_error)
        self._f.flush()
        self._state = _State.FINISHED

    def set_expected_read(self, per_layer: list[float]) -> None:
        """The expected FFN bytes read per token of each layer, measured on the finished file
        (the budget split needs it whole)."""
        self._expect(_State.FINISHED, "setting the expected read")
        if not isinstance(self._payload_record, PayloadRecord) or \
                self._payload_record.predictor is None:
            raise WriterStateError(f"{self.path.name}: an expected read without a predictor")
        self._payload.set_value(C.KEY_PREDICTOR_EXPECTED_READ, [float(v) for v in per_layer])
        self._f.flush()
