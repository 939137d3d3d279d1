"""Helpers shared by the tests: relative error, quiet conversion of a source GGUF to a flash
GGUF, a runtime on it, its bundle rows as the file holds them, and predictors built from the
weights (until files store their own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from flashgguf.archs import get_arch
from flashgguf.convert import ConvertOptions, convert_gguf
from flashgguf.format import FlashFile, open_flash_file
from flashgguf.options import FlashOptions
from flashgguf.predictor import LayerPredictor, predictor_scores
from flashgguf.quants import dequantize_rows, quantize_rows, row_nbytes
from flashgguf.runtime import Runtime

Q8_0 = GGMLQuantizationType.Q8_0


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """|a - b| / |b| (Frobenius norms): b is the reference."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def convert(src: Path, out: Path, **convert_kw) -> Path:
    """Convert the GGUF src to the flash GGUF out without progress or log output."""
    convert_gguf(src, out, ConvertOptions(progress=False, log=lambda _m: None, **convert_kw))
    return out


def convert_open(src: Path, folder: Path, **convert_kw) -> FlashFile:
    """Convert src to a new file in folder (m-0, m-1, ...) and open it."""
    out = folder / f"m-{len(list(folder.iterdir()))}.flash.gguf"
    return open_flash_file(convert(src, out, **convert_kw))


def bundle_rows(flash: FlashFile, layer: int) -> np.ndarray:
    """uint8 [n_ff, stride]: the layer's rows as stored in the file (a split file's up rows
    and down rows side by side again)."""
    info, layout = flash.layers[layer].bundle, flash.layers[layer].layout
    raw = np.fromfile(flash.path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    if not flash.split:
        return raw.reshape(flash.n_ff, layout.stride)
    up_stride = layout.part("down")[1]
    up = raw[:flash.n_ff * up_stride].reshape(flash.n_ff, up_stride)
    return np.concatenate([up, raw[flash.n_ff * up_stride:].reshape(flash.n_ff, -1)], axis=1)


def part_weights(flash: FlashFile, layer: int, part: str) -> np.ndarray:
    """float32 [n_ff, n_embd]: one part of every row, dequantized (row order)."""
    ggml_type, off = flash.layers[layer].layout.part(part)
    rows = bundle_rows(flash, layer)
    width = row_nbytes(ggml_type, flash.n_embd)
    return dequantize_rows(np.ascontiguousarray(rows[:, off:off + width]), ggml_type, flash.n_embd)


def svd_predictor(flash: FlashFile, layer: int, rank: int, keep: float,
                  with_up: bool = True, seed: int = 0,
                  input_scale: np.ndarray | None = None) -> LayerPredictor:
    """A weight-only low-rank predictor whose threshold keeps about `keep` of the rows on
    random inputs (standard normal, times input_scale per dimension when given)."""
    decide = "gate" if flash.gated else "up"
    w = part_weights(flash, layer, decide).astype(np.float64)
    _, _, vt = np.linalg.svd(w, full_matrices=False)
    v = vt[:rank]
    a = quantize_rows(v.astype(np.float32), Q8_0)
    b = quantize_rows((w @ v.T).astype(np.float32), Q8_0)
    b_up = None
    if with_up and flash.gated:
        up = part_weights(flash, layer, "up").astype(np.float64)
        b_up = quantize_rows((up @ v.T).astype(np.float32), Q8_0)
    down = part_weights(flash, layer, "down")
    scale = np.linalg.norm(down, axis=1).astype(np.float32)
    pred = LayerPredictor(rank, a, b, b_up, scale, 0.0)
    x = np.random.default_rng(seed).standard_normal((64, flash.n_embd)).astype(np.float32)
    if input_scale is not None:
        x *= input_scale.astype(np.float32)
    threshold = float(np.quantile(predictor_scores(pred, flash.activation, x), 1.0 - keep))
    return LayerPredictor(rank, a, b, b_up, scale, threshold)


def exact_relu_predictor(flash: FlashFile, layer: int) -> LayerPredictor:
    """Full rank (A = identity, B = the deciding rows): predicts g > 0 from the same Q8_0
    arithmetic the FFN uses, so it misses only rows whose pre-activation rounds across 0."""
    decide = "gate" if flash.gated else "up"
    w = part_weights(flash, layer, decide)
    a = quantize_rows(np.eye(flash.n_embd, dtype=np.float32), Q8_0)
    b = quantize_rows(w, Q8_0)
    return LayerPredictor(flash.n_embd, a, b, None, np.ones(flash.n_ff, np.float32), 0.0)


def runtime(flash: FlashFile, predictors=None, layer_weights=None, **opts) -> Runtime:
    base = dict(max_tokens=64, n_threads=2, n_threads_batch=2, direct_io=True)
    base.update(opts)
    return Runtime(flash, get_arch(flash.arch), FlashOptions(**base), predictors=predictors,
                   layer_weights=layer_weights)
