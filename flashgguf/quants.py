"""Row quantization helpers over gguf.quants (llama.cpp's numpy port of ggml's formats)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from .errors import UnsupportedError


def row_nbytes(ggml_type: GGMLQuantizationType, n: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if n % block_size:
        raise UnsupportedError(
            f"a row of {n} values is not a whole number of {ggml_type.name} blocks ({block_size})"
        )
    return n // block_size * type_size


def quantize_rows(rows: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """float rows [n_rows, n] -> raw bytes [n_rows, row_nbytes]."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    row_nbytes(ggml_type, rows.shape[-1])
    q = gq.quantize(rows, ggml_type)
    return np.ascontiguousarray(q).view(np.uint8).reshape(rows.shape[0], -1)


def dequantize_rows(raw: np.ndarray, ggml_type: GGMLQuantizationType, n: int) -> np.ndarray:
    """Raw tensor data as the gguf package hands it out -> float32 rows [n_rows, n]."""
    if ggml_type == GGMLQuantizationType.F32:
        return np.asarray(raw, dtype=np.float32).reshape(-1, n)
    if ggml_type == GGMLQuantizationType.F16:
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(-1, n)
    try:
        out = gq.dequantize(np.asarray(raw).view(np.uint8), ggml_type)
    except NotImplementedError as exc:
        raise UnsupportedError(f"cannot dequantize {ggml_type.name} tensors") from exc
    return out.reshape(-1, n)


def raw_rows(raw: np.ndarray, ggml_type: GGMLQuantizationType, n: int) -> np.ndarray:
    """Raw tensor data -> its bytes as [n_rows, row_nbytes] without conversion."""
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1, row_nbytes(ggml_type, n))
