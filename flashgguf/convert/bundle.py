"""Row-column bundling: neuron i's gate row, up row and down column stored side by side."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedError
from ..format import BundleLayout
from ..format import constants as C
from ..quants import bits_per_weight, dequantize_rows, quantize_rows, raw_rows, row_nbytes

# neurons (or matrix rows) converted per step: bounds the quantizer's temporaries
_CHUNK_ROWS = 1024


_K_QUANTS = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
# float sources (F32, BF16) go to Q8_0, as before K-quant bundles: half F16's bytes, and a
# float FFN in a GGUF is rare (F16 is a bundle type and stays F16)
_FLOAT_SOURCE_TYPE = GGMLQuantizationType.Q8_0


def _fits(ggml_type: GGMLQuantizationType, n: int) -> bool:
    return n % GGML_QUANT_SIZES[ggml_type][0] == 0


def choose_part_type(source_type: GGMLQuantizationType, n_embd: int,
                     requested: str) -> GGMLQuantizationType:
    """The bundle type of a part whose source tensor is source_type.

    requested: a bundle type name, or "auto": the source's own type where it is a bundle
    type whose blocks divide the row (then gate/up rows are copied byte for byte), else the
    supported type of the most bits per weight not above the source's (a K-quant on a tie:
    better quality for the same bytes), else the fewest bits there are."""
    fitting = [t for t in C.BUNDLE_TYPES.values() if _fits(t, n_embd)]
    if requested != C.AUTO_TYPE:
        try:
            t = C.BUNDLE_TYPES[requested.lower()]
        except KeyError:
            raise UnsupportedError(f"bundle type {requested!r} is not supported (choose from "
                                   f"auto, {', '.join(C.BUNDLE_TYPES)})") from None
        if t not in fitting:
            raise UnsupportedError(
                f"bundle type {requested} needs rows of whole {GGML_QUANT_SIZES[t][0]}-value "
                f"blocks; n_embd {n_embd} is not (choose from "
                f"{', '.join(n for n, v in C.BUNDLE_TYPES.items() if v in fitting)})")
        return t
    if source_type in fitting:
        return source_type
    if source_type in (GGMLQuantizationType.F32, GGMLQuantizationType.BF16):
        return _FLOAT_SOURCE_TYPE
    bits = bits_per_weight(source_type)
    below = [t for t in fitting if bits_per_weight(t) <= bits]
    if below:
        return max(below, key=lambda t: (bits_per_weight(t), t in _K_QUANTS))
    return min(fitting, key=lambda t: (bits_per_weight(t), t not in _K_QUANTS))


# Down columns are quantized a second time (the source stored down's rows): measured end to end
# against stock llama.cpp (BENCHMARKS.md; flashgguf-profile quality per --down-type), a K-quant
# column of the source's bits costs little (Qwen2.5-Coder-1.5B Q4_K_M: perplexity 1.004x), while
# 32-block columns of the source's bits do not (SmolLM2 Q4_1 -> Q4_1: 1.087x; Gemma 3's Q6_K/Q4_K ->
# Q5_1/Q4_0, n_embd 640: 1.062x; Q5_0: 1.048x); Q8_0 keeps them within 0.5%.
_DOWN_FALLBACK_TYPE = GGMLQuantizationType.Q8_0


def choose_down_type(source_type: GGMLQuantizationType, n_embd: int,
                     requested: str) -> GGMLQuantizationType:
    """The type of a layer's down columns: as choose_part_type for a requested type; "auto":
    the K-quant choose_part_type gives a K-quant source where K-quant columns fit n_embd,
    else Q8_0 (the measurements above)."""
    t = choose_part_type(source_type, n_embd, requested)
    if requested != C.AUTO_TYPE or t in _K_QUANTS:
        return t
    return _DOWN_FALLBACK_TYPE


def make_layout(n_embd: int, gated: bool, types: dict[str, GGMLQuantizationType],
                align: int, split: bool = False) -> BundleLayout:
    """One neuron's row: its parts side by side, padded to align; split (up and down only,
    their rows stored apart): each part padded to align, so that the down offset is the up
    rows' stride."""
    parts = (C.PART_GATE, C.PART_UP, C.PART_DOWN) if gated else (C.PART_UP, C.PART_DOWN)
    assert not (split and gated)
    offsets, pos = [], 0
    for part in parts:
        offsets.append(pos)
        pos += row_nbytes(types[part], n_embd)
        if split:
            pos = -(-pos // align) * align
    stride = -(-pos // align) * align
    return BundleLayout(parts, tuple(types[p] for p in parts), tuple(offsets), stride)


@dataclass(frozen=True)
class SourceMatrix:
    """One FFN weight as stored in the source: raw data, its type, row length."""

    raw: np.ndarray
    ggml_type: GGMLQuantizationType
    row_len: int

    def rows_as(self, ggml_type: GGMLQuantizationType, index: np.ndarray) -> np.ndarray:
        """Rows `index` in ggml_type bytes: copied verbatim when the type already matches."""
        rows = raw_rows(self.raw, self.ggml_type, self.row_len)[index]
        if ggml_type == self.ggml_type:
            return rows
        return quantize_rows(dequantize_rows(rows, self.ggml_type, self.row_len), ggml_type)

    def dense(self) -> np.ndarray:
        """All rows as float32, dequantized a block of rows at a time."""
        rows = raw_rows(self.raw, self.ggml_type, self.row_len)
        out = np.empty((rows.shape[0], self.row_len), dtype=np.float32)
        for r in range(0, rows.shape[0], _CHUNK_ROWS):
            out[r:r + _CHUNK_ROWS] = dequantize_rows(rows[r:r + _CHUNK_ROWS], self.ggml_type,
                                                     self.row_len)
        return out


@dataclass(frozen=True)
class LayerBundle:
    rows: np.ndarray  # uint8 [n_ff, stride]
    down_rel_error: float  # ||down' - down|| / ||down|| from re-quantizing the columns
    down_norm: np.ndarray  # float32 [n_ff]: each down column's norm (the source's), row order
    gate_rows: np.ndarray | None = None  # uint8 [n_ff, row bytes]: a resident gate's rows


def build_layer_bundle(layout: BundleLayout, gate: SourceMatrix | None, up: SourceMatrix,
                       down: SourceMatrix, order: np.ndarray,
                       gate_type: GGMLQuantizationType | None = None) -> LayerBundle:
    """Bundle rows for neurons in `order` (row k holds original neuron order[k]); with
    gate_type (a resident gate: the layout has no gate part) the gate's rows in that type
    and the same order, apart.

    Works through the neurons a block at a time: besides the bundle rows, only the dense
    down matrix is held whole (its columns are the neurons), so a conversion's memory stays
    near the size of one layer."""
    n_ff = len(order)
    rows = np.zeros((n_ff, layout.stride), dtype=np.uint8)
    gate_rows = None
    if gate_type is not None:
        assert gate is not None and C.PART_GATE not in layout.parts
        gate_rows = np.concatenate([gate.rows_as(gate_type, order[k:k + _CHUNK_ROWS])
                                    for k in range(0, n_ff, _CHUNK_ROWS)])
    # down is [n_embd rows of n_ff]: neuron i's column becomes a row of n_embd values
    down_dense = down.dense()
    dtype, down_off = layout.part(C.PART_DOWN)
    err_sq = norm_sq = 0.0
    down_norm = np.empty(n_ff, dtype=np.float32)
    for k in range(0, n_ff, _CHUNK_ROWS):
        index = order[k:k + _CHUNK_ROWS]
        for part, source in ((C.PART_GATE, gate), (C.PART_UP, up)):
            if part not in layout.parts:
                continue
            assert source is not None
            ptype, off = layout.part(part)
            data = source.rows_as(ptype, index)
            rows[k:k + len(index), off:off + data.shape[1]] = data
        columns = np.ascontiguousarray(down_dense[:, index].T)
        qcols = quantize_rows(columns, dtype)
        rows[k:k + len(index), down_off:down_off + qcols.shape[1]] = qcols
        back = dequantize_rows(qcols, dtype, columns.shape[1])
        err_sq += float(np.sum((back - columns) ** 2, dtype=np.float64))
        col_sq = np.sum(columns.astype(np.float64) ** 2, axis=1)
        down_norm[k:k + len(index)] = np.sqrt(col_sq)
        norm_sq += float(np.sum(col_sq))
    err = float(np.sqrt(err_sq) / max(np.sqrt(norm_sq), 1e-30))
    return LayerBundle(rows, err, down_norm, gate_rows)
