"""The native FFN runtime against a numpy forward pass of the same weights."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import convert, convert_open, rel_err, runtime
from gguf import GGMLQuantizationType
from gguf import quants as gq
from model_factory import TinyModel

from flashgguf.archs import get_arch
from flashgguf.format import open_flash_file
from flashgguf.gguf_stream import open_gguf, tensor_array
from flashgguf.runtime import DirectIOWarning, Runtime, RuntimeOptions

Q = GGMLQuantizationType
pytestmark = pytest.mark.native

ACTS = {
    "silu": lambda v: v / (1.0 + np.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1 + np.tanh(0.7978845608028654 * (v + 0.044715 * v**3))),
    "relu": lambda v: np.maximum(v, 0.0),
    "relu2": lambda v: np.maximum(v, 0.0) ** 2,
}


def dense_weights(src: Path, bid: int) -> dict[str, np.ndarray]:
    stream, buf = open_gguf(src)
    out = {}
    for part in ("gate", "up", "down"):
        t = stream.tensors[f"blk.{bid}.ffn_{part}.weight"]
        raw = tensor_array(buf, t)
        out[part] = (raw.astype(np.float32) if t.ggml_type in (Q.F32, Q.F16)
                     else gq.dequantize(raw, t.ggml_type)).reshape(t.shape[1], t.shape[0])
    for part in ("gate", "up", "down"):
        t = stream.tensors.get(f"blk.{bid}.ffn_{part}.bias")
        out[f"{part}_b"] = None if t is None else tensor_array(buf, t).astype(np.float64)
    return out


def numpy_ffn(w: dict[str, np.ndarray], x: np.ndarray, act: str) -> np.ndarray:
    x = x.astype(np.float64)
    g = x @ w["gate"].T.astype(np.float64)
    u = x @ w["up"].T.astype(np.float64)
    if w["gate_b"] is not None:
        g += w["gate_b"]
    if w["up_b"] is not None:
        u += w["up_b"]
    y = (ACTS[act](g) * u) @ w["down"].T.astype(np.float64)
    if w["down_b"] is not None:
        y += w["down_b"]
    return y


def make_runtime(src: Path, folder: Path, threads: int = 2, direct_io: bool = False,
                 max_tokens: int = 64, **convert_kw) -> Runtime:
    """Convert src into folder and open a runtime on it (buffered reads unless asked)."""
    return runtime(convert_open(src, folder, **convert_kw), n_threads=threads,
                   n_threads_batch=threads, direct_io=direct_io, max_tokens=max_tokens)


@pytest.mark.parametrize("ffn_type", [Q.Q4_1, Q.Q4_0, Q.Q8_0, Q.F16])
@pytest.mark.parametrize("n_tokens", [1, 7])
def test_ffn_matches_numpy(tiny_models, tmp_path, ffn_type, n_tokens):
    src = tiny_models(TinyModel(ffn_type=ffn_type))
    rt = make_runtime(src, tmp_path)
    rng = np.random.default_rng(1)
    for bid in range(2):
        x = rng.standard_normal((n_tokens, 64)).astype(np.float32)
        got = rt.ffn(bid, x)
        want = numpy_ffn(dense_weights(src, bid), x, "silu")
        # activations are quantized to 8 bits (as llama.cpp does) and down to Q8_0
        assert rel_err(got, want) < 0.02, (ffn_type, bid)


@pytest.mark.parametrize("act", ["gelu", "relu", "relu2"])
def test_activation_override(tiny_models, tmp_path, act):
    src = tiny_models(TinyModel(ffn_type=Q.Q8_0))
    rt = make_runtime(src, tmp_path, activation=act)
    assert rt.flash.activation == act
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    assert rel_err(rt.ffn(1, x), numpy_ffn(dense_weights(src, 1), x, act)) < 0.03


def test_ffn_biases(tiny_models, tmp_path):
    src = tiny_models(TinyModel(ffn_type=Q.Q8_0, ffn_biases=True))
    rt = make_runtime(src, tmp_path)
    assert rt.flash.layers[0].up_bias is not None
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    assert rel_err(rt.ffn(0, x), numpy_ffn(dense_weights(src, 0), x, "silu")) < 0.02


def test_thread_counts_agree(tiny_models, tmp_path):
    src = tiny_models(TinyModel(ffn_type=Q.Q4_1))
    x = np.random.default_rng(4).standard_normal((9, 64)).astype(np.float32)
    one = make_runtime(src, tmp_path, threads=1).ffn(0, x)
    two = make_runtime(src, tmp_path, threads=2).ffn(0, x)
    # only the order of the final float sums differs
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-5)


def test_rows_beyond_capacity_are_refused(tiny_models, tmp_path):
    rt = make_runtime(tiny_models(TinyModel()), tmp_path, max_tokens=4)
    with pytest.raises(ValueError, match="1..4"):
        rt.ffn(0, np.zeros((5, 64), dtype=np.float32))


def test_direct_io_and_buffered_load_the_same_bytes(tiny_models, tmp_path):
    src = tiny_models(TinyModel(ffn_type=Q.Q4_1))
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    direct = make_runtime(src, tmp_path, direct_io=True)
    assert direct.direct_io  # tmp_path is on a disk filesystem here (ext4)
    buffered = make_runtime(src, tmp_path, direct_io=False)
    assert not buffered.direct_io
    np.testing.assert_array_equal(direct.ffn(1, x), buffered.ffn(1, x))
    payload = direct.flash.payload_nbytes
    s = direct.stats()
    assert payload <= s["bytes_read"] < payload + 2 * 4096 * direct.flash.n_layer
    assert buffered.stats()["bytes_read"] == payload


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_direct_io_falls_back_on_tmpfs(tiny_models, tmp_path):
    src = tiny_models(TinyModel())
    # a fresh name: tmp_path's name repeats across pytest runs sharing this machine
    folder = Path(tempfile.mkdtemp(prefix="flashgguf-test-", dir="/dev/shm"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rt = make_runtime(src, folder, direct_io=True)
        warned = any(issubclass(w.category, DirectIOWarning) for w in caught)
        # Linux >= 6.6 accepts O_DIRECT on tmpfs; older kernels refuse it (then: warn, buffered)
        assert warned == (not rt.direct_io)
        x = np.ones((1, 64), dtype=np.float32)
        np.testing.assert_array_equal(rt.ffn(0, x), make_runtime(src, tmp_path).ffn(0, x))
        rt.close()
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_truncated_payload_is_an_error_not_a_crash(tiny_models, tmp_path):
    src = tiny_models(TinyModel())
    out = convert(src, tmp_path / "t.flash.gguf")
    ff = open_flash_file(out)
    # validated at open, then cut under the runtime's feet: the C reader must report it
    with open(out, "r+b") as f:
        f.truncate(ff.layers[-1].bundle.offset + 100)
    from flashgguf.errors import NativeError

    with pytest.raises(NativeError, match="ended before"):
        Runtime(ff, get_arch(ff.arch), RuntimeOptions(direct_io=True))


def test_closed_runtime_raises(tiny_models, tmp_path):
    from flashgguf.errors import FlashGGUFError

    rt = make_runtime(tiny_models(TinyModel()), tmp_path)
    rt.close()
    rt.close()  # twice is fine
    with pytest.raises(FlashGGUFError, match="closed"):
        rt.ffn(0, np.zeros((1, 64), dtype=np.float32))
