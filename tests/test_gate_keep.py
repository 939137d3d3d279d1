"""Per-layer gate keeps (issue 11, part 4): the converter's error curves, their allocation,
the format keys, and the runtime keeping each layer's own share."""

from __future__ import annotations

import math
import struct
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from gguf_patch import copy_to, patch_key, rename_in_payload
from model_factory import TinyModel
from test_gate_resident import gate_runtime

from flashgguf.convert import ConvertOptions, convert_gguf
from flashgguf.convert.gate_order import gate_error_curve, kept_count
from flashgguf.errors import FormatError, OptionError
from flashgguf.format import constants as C
from flashgguf.format import open_flash_file
from flashgguf.gate_keep import GateCurves
from flashgguf.options import DEFAULT_GATE_KEEP, DEFAULT_GATE_PER_LAYER

KEEPS = np.asarray(C.GATE_CURVE_KEEPS, dtype=np.float32)


def _silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


# ---- allocation ----------------------------------------------------------------------

def _curve(slope: float) -> np.ndarray:
    """An error curve that falls to 0 at keep 1, steeper for larger slopes."""
    return (slope * (1.0 - KEEPS) ** 1.5).astype(np.float32)


def _sq_error(curves: GateCurves, keeps) -> float:
    return sum(curves.uniform_error(i, k) ** 2 for i, k in enumerate(keeps))


def test_identical_layers_keep_the_uniform_share():
    curves = GateCurves(KEEPS, np.stack([_curve(1.0)] * 4))
    assert curves.layer_keeps(0.8, [100] * 4) == pytest.approx((0.8,) * 4)


def test_insensitive_layers_keep_fewer_rows_at_no_more_error_and_fewer_bytes():
    curves = GateCurves(KEEPS, np.stack([_curve(s) for s in (0.2, 0.5, 1.0, 3.0)]))
    row_bytes = [100, 100, 140, 100]
    keeps = curves.layer_keeps(0.8, row_bytes)
    assert keeps[0] < 0.8 < keeps[3]
    assert _sq_error(curves, keeps) <= _sq_error(curves, [0.8] * 4) * (1 + 1e-6)
    spent = sum(k * b for k, b in zip(keeps, row_bytes, strict=True))
    assert spent < 0.8 * sum(row_bytes)
    # no allocation on the grid within the budget is cheaper by more than one step's bytes
    budget = _sq_error(curves, [0.8] * 4) * (1 + 1e-6)
    grid = [float(k) for k in KEEPS[KEEPS >= 0.5]]
    best = min(sum(k * b for k, b in zip(ks, row_bytes, strict=True))
               for ks in product(grid, repeat=4) if _sq_error(curves, ks) <= budget)
    assert spent <= best + 0.05 * max(row_bytes)


def test_a_noisy_curve_is_read_as_monotone():
    noisy = _curve(1.0)
    noisy[3] = 0.0  # a dip at keep 0.45: keeping fewer rows is never taken as more accurate
    curves = GateCurves(KEEPS, np.stack([noisy, _curve(1.0)]))
    assert curves.uniform_error(0, 0.45) == pytest.approx(float(_curve(1.0)[4]))
    keeps = curves.layer_keeps(0.8, [100, 100])
    assert _sq_error(curves, keeps) <= _sq_error(curves, [0.8, 0.8]) * (1 + 1e-6)


def test_targets_off_the_grid_stay_uniform():
    curves = GateCurves(KEEPS, np.stack([_curve(0.2), _curve(3.0)]))
    assert curves.layer_keeps(0.2, [1, 1]) == (0.2, 0.2)
    with pytest.raises(ValueError, match="3 row sizes for 2 layers"):
        curves.layer_keeps(0.8, [1, 1, 1])


# ---- the converter's measurements -------------------------------------------------------

def test_error_curve_is_the_ffn_output_error_of_each_tokens_top_share():
    rng = np.random.default_rng(3)
    n_ff, n_embd = 48, 16
    gate, up = (rng.standard_normal((n_ff, n_embd)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((n_embd, n_ff)).astype(np.float32)
    x = rng.standard_normal((50, n_embd)).astype(np.float32)
    up_bias = rng.standard_normal(n_ff).astype(np.float32)
    keeps = (0.25, 0.5, 1.0)
    got = gate_error_curve("silu", gate, up, down, x, keeps, up_bias=up_bias)
    a = _silu(x @ gate.T)
    h = a * (x @ up.T + up_bias)
    y = h @ down.T
    for keep, err in zip(keeps, got, strict=True):
        k = kept_count(keep, n_ff)
        kept = np.zeros_like(h)
        for t in range(len(x)):
            top = np.argsort(-np.abs(a[t]))[:k]
            kept[t, top] = h[t, top]
        want = np.linalg.norm(y - kept @ down.T) / np.linalg.norm(y)
        assert err == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got[-1] == 0.0 and got[0] > got[1] > 0


@pytest.fixture(scope="module")
def calibrated_gate_file(tiny_models, tmp_path_factory) -> Path:
    from flashgguf.calibrate.collect import CalibrationOptions

    src = tiny_models(TinyModel(n_layer=4, ffn_type=GGMLQuantizationType.Q8_0))
    out = tmp_path_factory.mktemp("gate-keep") / "gate-cal.flash.gguf"
    calibration = CalibrationOptions(tokens=640, min_tokens=500, window_tokens=128, n_threads=1)
    convert_gguf(src, out, ConvertOptions(progress=False, gate_resident=True,
                                          calibration=calibration))
    return out


def test_calibrated_file_stores_curves_and_orders_rows_at_the_default_keep(calibrated_gate_file):
    ff = open_flash_file(calibrated_gate_file)
    curves = ff.gate_curves
    assert curves is not None and curves.error.shape == (ff.n_layer, len(KEEPS))
    np.testing.assert_allclose(curves.keep, KEEPS)
    assert (curves.error[:, -1] == 0).all() and (curves.error[:, 0] > curves.error[:, -2]).all()
    for layer in ff.layers:
        # the stored frequencies are the picks per token at the share a default run keeps
        assert layer.freq.sum() == pytest.approx(kept_count(DEFAULT_GATE_KEEP, ff.n_ff), rel=0.01)


def test_runtime_keeps_each_layers_share(calibrated_gate_file):
    ff = open_flash_file(calibrated_gate_file)
    x = np.random.default_rng(5).standard_normal((3, ff.n_embd)).astype(np.float32)
    assert gate_runtime(ff).gate_keeps == \
        (ff.gate_curves.layer_keeps(DEFAULT_GATE_KEEP, [la.layout.stride for la in ff.layers])
         if DEFAULT_GATE_PER_LAYER else (DEFAULT_GATE_KEEP,) * ff.n_layer)
    for per_layer in (True, False):
        rt = gate_runtime(ff, gate_keep=0.7, gate_per_layer=per_layer)
        want = ff.gate_curves.layer_keeps(0.7, [la.layout.stride for la in ff.layers]) \
            if per_layer else (0.7,) * ff.n_layer
        assert rt.gate_keeps == pytest.approx(want)
        for layer, keep in enumerate(rt.gate_keeps):
            chosen = rt.predict(layer, x).astype(bool)
            assert (chosen.sum(axis=1) == math.ceil(keep * ff.n_ff - 0.01)).all()
    assert len(set(ff.gate_curves.layer_keeps(0.7, [1] * ff.n_layer))) > 1  # not uniform here


def test_per_layer_keeps_without_curves_are_refused(tiny_models, tmp_path):
    src = tiny_models(TinyModel(n_layer=2, ffn_type=GGMLQuantizationType.Q8_0))
    out = tmp_path / "gate.flash.gguf"  # --gate-resident without --calibrate
    convert_gguf(src, out, ConvertOptions(progress=False, gate_resident=True, predictor=None))
    flash = open_flash_file(out)
    assert flash.gate_curves is None
    with pytest.raises(OptionError, match="stores no per-layer error curves"):
        gate_runtime(flash, gate_per_layer=True)
    assert gate_runtime(flash).gate_keeps == (DEFAULT_GATE_KEEP,) * flash.n_layer


# ---- the format ------------------------------------------------------------------------

def _patch_first_value(path: Path, key: str, value: float) -> None:
    n = len(KEEPS) if key == C.KEY_GATE_CURVE_KEEP else 4 * len(KEEPS)
    base = open_flash_file(path).payload.base
    patch_key(path, key, GGUFValueType.ARRAY,
              struct.pack("<IQf", GGUFValueType.FLOAT32, n, value), base)


@pytest.mark.parametrize("key, value, message", [
    (C.KEY_GATE_CURVE_KEEP, 0.9, "must be shares of rows kept in \\(0, 1\\], ascending"),
    (C.KEY_GATE_CURVE_KEEP, float("nan"), "ascending"),
    (C.KEY_GATE_CURVE_ERROR, -1.0, "errors must be >= 0"),
    (C.KEY_GATE_CURVE_ERROR, float("inf"), "non-finite"),
])
def test_bad_curves_are_refused(calibrated_gate_file, tmp_path, key, value, message):
    bad = copy_to(calibrated_gate_file, tmp_path)
    _patch_first_value(bad, key, value)
    with pytest.raises(FormatError, match=message):
        open_flash_file(bad)


def test_half_a_curve_is_refused(calibrated_gate_file, tmp_path):
    bad = copy_to(calibrated_gate_file, tmp_path)
    rename_in_payload(bad, C.KEY_GATE_CURVE_KEEP.encode(), b"flashgguf.gate.curve.kept")
    with pytest.raises(FormatError, match="without 'flashgguf.gate.curve.keep'"):
        open_flash_file(bad)

