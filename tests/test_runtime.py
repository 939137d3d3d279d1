"""The native FFN runtime against a numpy forward pass of the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import convert, convert_open, rel_err, runtime
from gguf import GGMLQuantizationType
from gguf import quants as gq
from model_factory import TinyModel

from flashgguf.archs import get_arch
from flashgguf.format import open_flash_file, open_gguf, tensor_array
from flashgguf.options import FlashOptions
from flashgguf.runtime import Runtime

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


@pytest.mark.parametrize("spec", [
    TinyModel(arch="gemma3", ffn_type=Q.Q4_0),
    TinyModel(ffn_type=Q.Q4_K, n_embd=256, n_ff=512, down_types=(Q.Q6_K, Q.Q4_K)),
], ids=["q4_0-gelu", "q4_k"])
def test_row_alone_equals_row_in_batch(tiny_models, tmp_path, spec):
    # The decode path (one row) and a batch give a row the same bits: each row's input is
    # quantized on its own and its sums run in the same order. (With the same thread count
    # for both, and enough rows that both take the parallel split: n_ff >= 128 here; below
    # that one row runs on one thread and differs from the batch in the last bit.)
    rt = make_runtime(tiny_models(spec), tmp_path)
    x = np.random.default_rng(5).standard_normal((12, spec.n_embd)).astype(np.float32)
    for bid in range(2):
        batch = rt.ffn(bid, x)
        for i in range(len(x)):
            np.testing.assert_array_equal(rt.ffn(bid, x[i:i + 1])[0], batch[i])


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


# Run in a child process in a private mount namespace (unshare -m), over a ramfs mounted on
# argv[2]: ramfs refuses open(O_DIRECT) with EINVAL (tmpfs accepts it since Linux 6.6). Prints
# JSON for the parent to check.
RAMFS_CHILD = r"""
import errno, json, os, shutil, sys, warnings
from pathlib import Path

import numpy as np
from flash_helpers import runtime

from flashgguf.format import open_flash_file
from flashgguf.runtime import DirectIOWarning

flash, mount = Path(sys.argv[1]), Path(sys.argv[2])
copy = Path(shutil.copyfile(flash, mount / flash.name))
try:
    os.close(os.open(copy, os.O_RDONLY | os.O_DIRECT))
    refused = None
except OSError as exc:
    refused = errno.errorcode[exc.errno]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rt = runtime(open_flash_file(copy), direct_io=True)
ref = runtime(open_flash_file(flash), direct_io=False)
x = np.random.default_rng(6).standard_normal((3, rt.flash.n_embd)).astype(np.float32)
same = all(np.array_equal(rt.ffn(b, x), ref.ffn(b, x)) for b in range(rt.flash.n_layer))
print(json.dumps(dict(
    refused=refused, direct_io=rt.direct_io, same=same,
    warnings=[str(w.message) for w in caught if issubclass(w.category, DirectIOWarning)],
    other_warnings=[str(w.message) for w in caught
                    if not issubclass(w.category, DirectIOWarning)],
    bytes_read=rt.stats()["bytes_read"], payload=rt.flash.payload_nbytes)))
rt.close()
ref.close()
"""
NO_MOUNT = 77  # the child shell's exit status when mount is refused


def run_on_ramfs(flash: Path, folder: Path) -> dict:
    """RAMFS_CHILD on flash under `unshare -m` with a ramfs on folder; skips (with the reason)
    where this process may not make a mount namespace or mount a ramfs."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare(1) and mount(8) (util-linux) to mount a ramfs")
    why = ("mounting a ramfs in a private mount namespace (unshare -m; mount -t ramfs) needs "
           "root or CAP_SYS_ADMIN, which this process lacks")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{why}: {probe.stderr.strip()}")
    import flashgguf

    path = [str(Path(flashgguf.__file__).resolve().parent.parent), str(Path(__file__).parent),
            os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    script = f'mount -t ramfs none "$1" || exit {NO_MOUNT}; exec "$2" -c "$3" "$4" "$1"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(folder),
                           sys.executable, RAMFS_CHILD, str(flash)],
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode == NO_MOUNT:
        pytest.skip(f"{why}: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_direct_io_falls_back_where_the_filesystem_refuses_it(tiny_models, tmp_path):
    flash = convert(tiny_models(TinyModel(ffn_type=Q.Q4_1)), tmp_path / "m.flash.gguf")
    mount = tmp_path / "ramfs"
    mount.mkdir()
    got = run_on_ramfs(flash, mount)
    assert got["refused"] == "EINVAL"  # the filesystem really refuses O_DIRECT
    assert got["direct_io"] is False
    assert len(got["warnings"]) == 1 and "refuses direct I/O" in got["warnings"][0]
    assert got["other_warnings"] == []
    assert got["same"]  # every layer's FFN as from a buffered runtime on the disk copy
    assert got["bytes_read"] == got["payload"]  # page-cache reads: no alignment padding
    assert list(mount.iterdir()) == []  # the ramfs went with the namespace


def test_truncated_payload_is_an_error_not_a_crash(tiny_models, tmp_path):
    src = tiny_models(TinyModel())
    out = convert(src, tmp_path / "t.flash.gguf")
    ff = open_flash_file(out)
    # validated at open, then cut under the runtime's feet: the C reader must report it
    with open(out, "r+b") as f:
        f.truncate(ff.layers[-1].bundle.offset + 100)
    from flashgguf.errors import NativeError

    with pytest.raises(NativeError, match="ended before"):
        Runtime(ff, get_arch(ff.arch), FlashOptions(direct_io=True))


def test_closed_runtime_raises(tiny_models, tmp_path):
    from flashgguf.errors import FlashGGUFError

    rt = make_runtime(tiny_models(TinyModel()), tmp_path)
    rt.close()
    rt.close()  # twice is fine
    with pytest.raises(FlashGGUFError, match="closed"):
        rt.ffn(0, np.zeros((1, 64), dtype=np.float32))
