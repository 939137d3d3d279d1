"""Calibration: FFN inputs captured from llama.cpp, activity targets, predictor training."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import TinyModel

from flashgguf.archs import get_arch
from flashgguf.calibrate.collect import collect_ffn_inputs
from flashgguf.calibrate.targets import LayerWeights, Target, layer_targets, relative_error
from flashgguf.calibrate.text import read_calibration_text
from flashgguf.calibrate.train import TrainOptions, train_predictor
from flashgguf.errors import CalibrationError, NativeError
from flashgguf.gguf_stream import open_gguf, tensor_array

# ---- text ---------------------------------------------------------------------------------------


def test_shipped_calibration_text_is_read():
    text = read_calibration_text()
    assert len(text) > 300_000


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"  \n\t\n", "empty"),
    (b"caf\xe9 au lait " * 50, "not UTF-8"),
])
def test_bad_calibration_text_is_refused(tmp_path, content, needle):
    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=needle):
        read_calibration_text(path)


def test_missing_calibration_text_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read"):
        read_calibration_text(tmp_path / "nope.txt")


# ---- collection from llama.cpp ------------------------------------------------------------------


@pytest.mark.native
def test_capture_records_each_layers_ffn_input(tiny_models, tmp_path):
    spec = TinyModel(n_layer=2)
    src = tiny_models(spec)
    inputs = collect_ffn_inputs(src, get_arch("llama"), spec.n_layer, spec.n_embd,
                                read_calibration_text(), tmp_path / "cap", max_tokens=300,
                                window_tokens=128, min_tokens=100, n_threads=1)
    assert inputs.n_tokens == 300
    stream, buf = open_gguf(src)
    for layer in range(spec.n_layer):
        x = inputs.layer(layer)
        assert x.shape == (300, spec.n_embd) and np.isfinite(x).all()
        # the FFN input is RMSNorm(h) * ffn_norm.weight: dividing by the weight gives rows of
        # unit RMS, which no other node of the layer has
        norm_w = tensor_array(buf, stream.tensors[f"blk.{layer}.ffn_norm.weight"])
        rms = np.sqrt(np.mean((x / norm_w) ** 2, axis=1))
        np.testing.assert_allclose(rms, 1.0, rtol=2e-3)
    # different layers see different inputs
    assert not np.allclose(inputs.layer(0), inputs.layer(1))


@pytest.mark.native
def test_too_short_calibration_text_is_refused(tiny_models, tmp_path):
    spec = TinyModel(n_layer=2)
    with pytest.raises(CalibrationError, match="tokens; at least 1000"):
        collect_ffn_inputs(tiny_models(spec), get_arch("llama"), spec.n_layer, spec.n_embd,
                           "Only a few words here.", tmp_path / "cap", max_tokens=1000,
                           window_tokens=128, min_tokens=1000, n_threads=1)


@pytest.mark.native
def test_capture_shape_mismatch_is_an_error(tiny_models, tmp_path):
    spec = TinyModel(n_layer=2)
    with pytest.raises(NativeError, match="expected contiguous F32"):
        # n_embd given wrong on purpose: the capture refuses the node instead of misreading it
        collect_ffn_inputs(tiny_models(spec), get_arch("llama"), spec.n_layer, spec.n_embd * 2,
                           read_calibration_text(), tmp_path / "cap", max_tokens=200,
                           window_tokens=128, min_tokens=100, n_threads=1)


# ---- targets ------------------------------------------------------------------------------------


def _layer(rng: np.random.Generator, n_embd: int = 64, n_ff: int = 192) -> LayerWeights:
    return LayerWeights(
        gate=rng.standard_normal((n_ff, n_embd)).astype(np.float32) / 8,
        up=rng.standard_normal((n_ff, n_embd)).astype(np.float32) / 8,
        down=rng.standard_normal((n_embd, n_ff)).astype(np.float32) / 14,
    )


def test_keep_target_keeps_that_share():
    rng = np.random.default_rng(0)
    w, x = _layer(rng), rng.standard_normal((600, 64)).astype(np.float32)
    t = layer_targets(x, w, "silu", Target(keep=0.4))
    assert abs(t.labels.mean() - 0.4) < 0.01
    # the kept neurons are the largest contributions
    h = w.hidden(x, "silu")
    contrib = np.abs(h) * np.linalg.norm(w.down, axis=0)
    assert contrib[t.labels].min() >= contrib[~t.labels].max()


def test_error_target_meets_the_bound_tightly():
    rng = np.random.default_rng(1)
    w, x = _layer(rng), rng.standard_normal((400, 64)).astype(np.float32)
    t = layer_targets(x, w, "gelu", Target(max_error=0.1))
    err = relative_error(w.hidden(x, "gelu"), w.down, t.labels)
    assert 0.08 < err <= 0.1 + 1e-3
    assert 0.0 < t.labels.mean() < 1.0


def test_relu_targets_are_the_nonzero_activations():
    rng = np.random.default_rng(2)
    w, x = _layer(rng), rng.standard_normal((100, 64)).astype(np.float32)
    t = layer_targets(x, w, "relu", Target(keep=0.5))  # keep is ignored for ReLU
    np.testing.assert_array_equal(t.labels, w.hidden(x, "relu") != 0)
    assert t.error == 0.0


@pytest.mark.parametrize("target", [dict(), dict(keep=0.5, max_error=0.1), dict(keep=1.5),
                                    dict(max_error=-0.1)])
def test_bad_targets_are_refused(target):
    with pytest.raises(CalibrationError):
        Target(**target)


# ---- training -----------------------------------------------------------------------------------


def _planted(seed: int, tokens_seed: int = 0):
    """Labels from a rank-12 rule B* A* x + b* > 0; the decider is the rule plus noise."""
    rng = np.random.default_rng(seed)
    n, d, n_ff, r = 4000, 96, 192, 12
    a = rng.standard_normal((r, d)) / np.sqrt(d)
    b = rng.standard_normal((n_ff, r))
    b0 = rng.normal(-1.0, 0.5, n_ff)
    x = np.random.default_rng([seed, tokens_seed]).standard_normal((n, d)).astype(np.float32)
    labels = (x @ a.T) @ b.T + b0 > 0
    decider = (b @ a + 0.3 * rng.standard_normal((n_ff, d)) / np.sqrt(d)).astype(np.float32)
    return x, labels, decider


def test_training_recovers_a_planted_low_rank_rule():
    x, labels, decider = _planted(3)
    p = train_predictor(x, labels, decider, TrainOptions(rank=32, target_recall=0.99,
                                                         max_epochs=25))
    assert p.recall >= 0.99
    assert p.precision >= 0.9
    # and on fresh tokens of the same rule
    x2, labels2, _ = _planted(3, tokens_seed=1)
    pred = p.scores(x2) > p.threshold
    assert (pred & labels2).sum() / labels2.sum() >= 0.98


def test_training_is_deterministic_for_a_seed():
    x, labels, decider = _planted(4)
    opts = TrainOptions(rank=16, max_epochs=3, seed=7)
    p1 = train_predictor(x, labels, decider, opts)
    p2 = train_predictor(x, labels, decider, opts)
    np.testing.assert_array_equal(p1.a, p2.a)
    np.testing.assert_array_equal(p1.b, p2.b)
    assert p1.threshold == p2.threshold


def test_training_refuses_labels_with_nothing_to_learn():
    x, labels, decider = _planted(5)
    with pytest.raises(CalibrationError, match="every neuron"):
        train_predictor(x, np.zeros_like(labels), decider, TrainOptions(rank=8))
    with pytest.raises(CalibrationError, match="do not match"):
        train_predictor(x, labels[:, :10], decider, TrainOptions(rank=8))
