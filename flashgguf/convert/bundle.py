"""Row-column bundling: neuron i's gate row, up row and down column stored side by side."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from .. import constants as C
from ..format import BundleLayout
from ..quants import dequantize_rows, quantize_rows, raw_rows, row_nbytes


def make_layout(n_embd: int, gated: bool, types: dict[str, GGMLQuantizationType],
                align: int) -> BundleLayout:
    parts = (C.PART_GATE, C.PART_UP, C.PART_DOWN) if gated else (C.PART_UP, C.PART_DOWN)
    offsets, pos = [], 0
    for part in parts:
        offsets.append(pos)
        pos += row_nbytes(types[part], n_embd)
    stride = -(-pos // align) * align
    return BundleLayout(parts, tuple(types[p] for p in parts), tuple(offsets), stride)


@dataclass(frozen=True)
class SourceMatrix:
    """One FFN weight as stored in the source: raw data, its type, row length."""

    raw: np.ndarray
    ggml_type: GGMLQuantizationType
    row_len: int

    def rows_as(self, ggml_type: GGMLQuantizationType) -> np.ndarray:
        """Its rows in ggml_type bytes: copied verbatim when the type already matches."""
        if ggml_type == self.ggml_type:
            return raw_rows(self.raw, ggml_type, self.row_len)
        return quantize_rows(self.dense(), ggml_type)

    def dense(self) -> np.ndarray:
        return dequantize_rows(self.raw, self.ggml_type, self.row_len)


@dataclass(frozen=True)
class LayerBundle:
    rows: np.ndarray  # uint8 [n_ff, stride]
    down_rel_error: float  # ||down' - down|| / ||down|| from re-quantizing the columns


def build_layer_bundle(layout: BundleLayout, gate: SourceMatrix | None, up: SourceMatrix,
                       down: SourceMatrix, order: np.ndarray) -> LayerBundle:
    """Bundle rows for neurons in `order` (row k holds original neuron order[k])."""
    n_ff = up.raw.shape[0] if up.raw.ndim == 2 else up.dense().shape[0]
    rows = np.zeros((n_ff, layout.stride), dtype=np.uint8)
    for part, source in ((C.PART_GATE, gate), (C.PART_UP, up)):
        if part not in layout.parts:
            continue
        assert source is not None
        ptype, off = layout.part(part)
        data = source.rows_as(ptype)
        rows[:, off:off + data.shape[1]] = data[order]
    # down is [n_embd rows of n_ff]: neuron i's column becomes a row of n_embd values
    down_dense = down.dense()
    columns = np.ascontiguousarray(down_dense.T[order])
    dtype, off = layout.part(C.PART_DOWN)
    qcols = quantize_rows(columns, dtype)
    rows[:, off:off + qcols.shape[1]] = qcols
    back = dequantize_rows(qcols, dtype, columns.shape[1])
    err = float(np.linalg.norm(back - columns) / max(np.linalg.norm(columns), 1e-30))
    return LayerBundle(rows, err)
