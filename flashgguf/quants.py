"""Row quantization helpers over gguf.quants (llama.cpp's numpy port of ggml's formats), and
ggml's own quantizer for the types gguf.quants cannot write (the K-quants)."""

from __future__ import annotations

import ctypes
import functools

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


def bits_per_weight(ggml_type: GGMLQuantizationType) -> float:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return 8.0 * type_size / block_size


# Types gguf.quants writes (bit for bit as ggml's reference quantizers); the others go to ggml.
_NUMPY_QUANTIZED = (GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0,
                    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1)


def quantize_rows(rows: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """float rows [n_rows, n] -> raw bytes [n_rows, row_nbytes]."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nbytes = row_nbytes(ggml_type, rows.shape[-1])
    if ggml_type in _NUMPY_QUANTIZED:
        q = gq.quantize(rows, ggml_type)
        return np.ascontiguousarray(q).view(np.uint8).reshape(rows.shape[0], -1)
    out = np.empty((rows.shape[0], nbytes), dtype=np.uint8)
    if rows.shape[0]:
        written = _ggml_quantize_chunk()(int(ggml_type), rows.ctypes.data, out.ctypes.data, 0,
                                        rows.shape[0], rows.shape[1], None)
        if written != out.nbytes:
            raise UnsupportedError(f"ggml cannot quantize to {ggml_type.name} "
                                   f"(wrote {written} of {out.nbytes} bytes)")
    return out


@functools.cache
def _ggml_quantize_chunk() -> ctypes._CFuncPtr:
    """ggml_quantize_chunk from the ggml that llama-cpp-python ships (what llama-quantize runs,
    without an importance matrix): the K-quants' scale searches are not in gguf.quants."""
    from llama_cpp import _ggml  # loads llama.cpp's libraries: only when a K-quant is needed

    fn = _ggml.libggml.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return fn


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
