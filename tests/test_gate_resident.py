"""Gate-resident files (format version 4) and flash_mode="gate": the layout round trip, its
refusals, and the runtime choosing each token's rows from the exact gate."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import convert, rel_err, runtime
from gguf import GGMLQuantizationType
from gguf_patch import copy_to, rename_in_payload, set_flash_version
from hf_factory import TinyHF, write_tiny_checkpoint
from model_factory import TinyModel
from test_flash_runtime import assert_same_sum

from flashgguf import Llama
from flashgguf.convert import ConvertOptions, convert_gguf
from flashgguf.convert.gate_order import gate_frequency
from flashgguf.convert.hf_source import convert_hf
from flashgguf.errors import BudgetError, ConvertError, FormatError, OptionError, VersionError
from flashgguf.format import constants as C
from flashgguf.format import open_flash_file, open_gguf, tensor_array
from flashgguf.quants import dequantize_rows

Q = GGMLQuantizationType
# Q4_K_M-like: K-quant rows, down in Q6_K in one layer and Q4_K in the other (n_embd 256:
# K-quant blocks)
KQUANT = TinyModel(n_embd=256, n_ff=512, ffn_type=Q.Q4_K, down_types=(Q.Q6_K, Q.Q4_K))


@pytest.fixture(scope="module")
def gate_file(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    src = tiny_models(TinyModel(ffn_type=Q.Q4_1))
    out = tmp_path_factory.mktemp("gate") / "tiny.flash.gguf"
    return src, convert(src, out, gate_resident=True, predictor=None)


@pytest.fixture(scope="module")
def kquant_gate_file(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    src = tiny_models(KQUANT)
    out = tmp_path_factory.mktemp("gate") / "kquant.flash.gguf"
    return src, convert(src, out, gate_resident=True, predictor=None)


@pytest.fixture(scope="module")
def relu_gate_file(tiny_models, tmp_path_factory) -> Path:
    src = tiny_models(TinyModel(ffn_type=Q.Q8_0, seed=3))
    out = tmp_path_factory.mktemp("gate") / "relu.flash.gguf"
    return convert(src, out, gate_resident=True, predictor=None, activation="relu")


# ---- format ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q4_1", "kquant"])
def test_round_trip_gate_rows_are_the_source_rows(which, gate_file, kquant_gate_file):
    src, out = gate_file if which == "q4_1" else kquant_gate_file
    ff = open_flash_file(out)
    assert ff.gate_resident and ff.gated
    assert ff.trunk.fields[C.KEY_VERSION] == C.FORMAT_VERSION == 4
    stream, buf = open_gguf(src)
    raw = np.fromfile(out, dtype=np.uint8)
    total = 0
    for layer in ff.layers:
        assert layer.layout.parts == ("up", "down")
        gate = stream.tensors[f"blk.{layer.index}.ffn_gate.weight"]
        t = layer.gate_rows
        assert t is not None and t.ggml_type == gate.ggml_type  # copied, not re-quantized
        assert t.shape == (ff.n_embd, ff.n_ff) and t.offset % C.PAYLOAD_ALIGNMENT == 0
        rows = raw[t.offset:t.offset + t.nbytes].reshape(ff.n_ff, -1)
        np.testing.assert_array_equal(rows, tensor_array(buf, gate)[layer.order])
        total += layer.bundle.nbytes + t.nbytes
    assert ff.payload_nbytes == total


def test_gate_resident_layout_drops_the_gate_from_the_bundle(tiny_models, gate_file, tmp_path):
    src, out = gate_file
    plain = open_flash_file(convert(src, tmp_path / "plain.flash.gguf", predictor=None))
    gate = open_flash_file(out)
    assert not plain.gate_resident and plain.layers[0].gate_rows is None
    assert plain.layout.parts == ("gate", "up", "down")
    # the same up and down bytes, the gate's moved out of the rows
    assert gate.layout.types == plain.layout.types[1:]
    assert gate.layout.stride < plain.layout.stride


def test_older_readers_refuse_version_4(gate_file, tmp_path, monkeypatch):
    # what a version-3 flashgguf does with this file
    monkeypatch.setattr(C, "READABLE_VERSIONS", (1, 2, 3))
    with pytest.raises(VersionError, match="version 4, this flashgguf reads versions 1, 2, 3"):
        open_flash_file(gate_file[1])


def test_resident_gate_in_an_older_version_is_refused(gate_file, tmp_path):
    bad = copy_to(gate_file[1], tmp_path)
    set_flash_version(bad, 3)
    with pytest.raises(FormatError, match="resident gate in a version 3 file"):
        open_flash_file(bad)


def test_missing_gate_rows_are_refused(gate_file, tmp_path):
    bad = copy_to(gate_file[1], tmp_path)
    rename_in_payload(bad, b"blk.1.ffn_gate_rows", b"blk.1.ffn_gate_rowX")
    with pytest.raises(FormatError, match="'blk.1.ffn_gate_rows' is missing"):
        open_flash_file(bad)


def test_gate_rows_in_a_file_whose_gate_is_not_resident_are_refused(gate_file, tmp_path):
    bad = copy_to(gate_file[1], tmp_path)
    rename_in_payload(bad, C.KEY_GATE_RESIDENT.encode(), b"flashgguf.gate.residenX")
    with pytest.raises(FormatError, match="bundle parts .* gate resident=False"):
        open_flash_file(bad)


def test_gate_rows_of_an_unsupported_type_are_refused(gate_file, tmp_path):
    bad = copy_to(gate_file[1], tmp_path)
    ff = open_flash_file(bad)
    # the tensor info's type field follows its name, its dimension count and dimensions
    name = b"blk.0.ffn_gate_rows"
    data = bytearray(bad.read_bytes())
    pos = data.find(name, ff.payload.base) + len(name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    type_pos = pos + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_pos)[0] == Q.Q4_1
    struct.pack_into("<I", data, type_pos, Q.IQ4_NL)  # 32-value blocks, no kernel
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="ffn_gate_rows.*unsupported type"):
        open_flash_file(bad)


def test_converter_refuses_an_ungated_ffn(tiny_tokenizer_gguf, tmp_path):
    folder = tmp_path / "opt"
    write_tiny_checkpoint(folder, TinyHF(kind="opt"), tiny_tokenizer_gguf)
    opts = ConvertOptions(progress=False, log=lambda _m: None, gate_resident=True,
                          predictor=None)
    with pytest.raises(ConvertError, match="--gate-resident needs a gated FFN"):
        convert_hf(folder, tmp_path / "opt.flash.gguf", opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


# ---- runtime -----------------------------------------------------------------------

def gate_runtime(flash, share=0.5, **kw):
    """Gate mode with `share` of the payload as budget (the gates come out of it)."""
    return runtime(flash, mode="gate", dram_budget=max(1, int(share * flash.payload_nbytes)),
                   **kw)


def _as_q8(x: np.ndarray) -> np.ndarray:
    """x as the gate's dot products see it: 32-value blocks of int8 with a float16 scale
    (Q8_0 / Q8_1, ggml's reference rounding)."""
    blocks = x.astype(np.float32).reshape(len(x), -1, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / 127.0
    q = np.round(blocks / np.where(d > 0, d, 1.0))
    return (q * d.astype(np.float16).astype(np.float64)).reshape(x.shape)


def _gate_act(flash, layer: int, x: np.ndarray) -> np.ndarray:
    """act(gate) in float64 from the dequantized resident rows (row order) and x as the
    kernels see it (quantized to the gate's activation type)."""
    t = flash.layers[layer].gate_rows
    raw = np.fromfile(flash.path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
    w = dequantize_rows(raw.reshape(flash.n_ff, -1), t.ggml_type, flash.n_embd)
    g = _as_q8(x) @ w.T.astype(np.float64)
    if flash.activation == "relu":
        return np.maximum(g, 0.0)
    return g / (1.0 + np.exp(-g))


@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_gate_choice_is_each_tokens_top_share_by_act(gate_file, keep):
    flash = open_flash_file(gate_file[1])
    rt = gate_runtime(flash, gate_keep=keep)
    x = np.random.default_rng(1).standard_normal((6, flash.n_embd)).astype(np.float32)
    k = math.ceil(keep * flash.n_ff)
    for layer in range(flash.n_layer):
        chosen = rt.predict(layer, x).astype(bool)
        a = np.abs(_gate_act(flash, layer, x))
        for t in range(len(x)):
            assert chosen[t].sum() == k
            # every chosen row scores at least every other, up to the kernels' rounding
            scale = a[t].max()
            assert a[t][chosen[t]].min() >= a[t][~chosen[t]].max() - 1e-4 * scale


@pytest.mark.parametrize("bonus", [0.1, 0.5])
def test_cache_aware_choice_never_drops_a_row_above_its_margin(gate_file, bonus):
    """With a bonus, rows in DRAM score (1 + bonus) |act|: a row to read is still chosen
    whenever |act| >= (1 + bonus) x the plain cut, and the choice keeps its size."""
    flash = open_flash_file(gate_file[1])
    keep = 0.5
    rt = gate_runtime(flash, share=0.6, gate_keep=keep, gate_cache_bonus=bonus)
    plain = gate_runtime(flash, share=0.6, gate_keep=keep)
    rng = np.random.default_rng(9)
    k = math.ceil(keep * flash.n_ff)
    preferred = 0
    x = rng.standard_normal((4, flash.n_embd)).astype(np.float32)
    for layer in range(flash.n_layer):
        resident = np.zeros(flash.n_ff, dtype=bool)
        rows, _, _ = rt.slots(layer)
        resident[rows[rows >= 0]] = True
        assert 0 < resident.sum() < flash.n_ff
        chosen = rt.predict(layer, x).astype(bool)
        a = np.abs(_gate_act(flash, layer, x))
        for t in range(len(x)):
            assert abs(int(chosen[t].sum()) - k) <= 1  # ties of boosted scores aside
            cut = np.sort(a[t])[::-1][k - 1]  # the plain choice's k-th largest |act|
            must = ~resident & (a[t] >= (1 + bonus) * cut * (1 + 1e-3))
            assert chosen[t][must].all()
        plain_chosen = plain.predict(layer, x).astype(bool)
        preferred += int((chosen & resident).sum() - (plain_chosen & resident).sum())
    assert preferred > 0  # the bonus does move the choice towards rows in DRAM


def test_relu_gate_never_chooses_an_inactive_row(relu_gate_file):
    flash = open_flash_file(relu_gate_file)
    rt = gate_runtime(flash, gate_keep=1.0)
    x = np.random.default_rng(2).standard_normal((5, flash.n_embd)).astype(np.float32)
    for layer in range(flash.n_layer):
        chosen = rt.predict(layer, x).astype(bool)
        a = _gate_act(flash, layer, x)
        scale = np.abs(a).max()
        clear = np.abs(a) > 1e-4 * scale  # rows whose sign the rounding cannot flip
        assert not np.any(chosen & (a <= 0) & clear)
        assert np.all(chosen[(a > 0) & clear])


@pytest.mark.parametrize("io", ["threads", "io_uring"])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_gate_mode_equals_dense_over_the_chosen_rows(gate_file, io, n_tokens):
    """Gate mode computes exactly the dense FFN restricted to the rows it chose (union over
    the call's tokens) and the pinned rows, through reads."""
    flash = open_flash_file(gate_file[1])
    dense = runtime(flash, mode="dense")
    rt = gate_runtime(flash, share=0.6, gate_keep=0.5, io=io)
    rng = np.random.default_rng(3)
    for _ in range(6):
        x = rng.standard_normal((n_tokens, flash.n_embd)).astype(np.float32)
        for layer in range(flash.n_layer):
            mask = rt.predict(layer, x).any(axis=0)
            mask[:rt.capacity(layer)[1]] = True  # pinned rows are always computed
            want = dense.ffn(layer, x, mask=mask.astype(np.uint8))
            got = rt.ffn(layer, x)
            assert_same_sum(got, want)
            assert rel_err(got, dense.ffn(layer, x)) > 0 or mask.all()
    stats = rt.stats()  # every slot pinned: no cache, chosen rows beyond them are read
    assert stats["cache_hits"] == 0 and stats["cache_misses"] > 0 and stats["bytes_read"] > 0
    assert 0 < rt.capacity(0)[1] == rt.capacity(0)[0] < flash.n_ff


def test_gate_mode_at_keep_1_is_the_dense_ffn(kquant_gate_file):
    flash = open_flash_file(kquant_gate_file[1])
    dense = runtime(flash, mode="dense")
    rt = gate_runtime(flash, share=0.5, gate_keep=1.0)
    x = np.random.default_rng(4).standard_normal((3, flash.n_embd)).astype(np.float32)
    for layer in range(flash.n_layer):
        assert_same_sum(rt.ffn(layer, x), dense.ffn(layer, x))
        assert_same_sum(rt.ffn(layer, x[:1]), dense.ffn(layer, x[:1]))


def test_other_modes_take_the_gate_from_the_resident_matrix(gate_file, tmp_path):
    """dense, naive and hybrid on a gate-resident file equal dense on the plain file."""
    src, out = gate_file
    plain = runtime(open_flash_file(convert(src, tmp_path / "p.flash.gguf", predictor=None)),
                    mode="dense")
    flash = open_flash_file(out)
    x = np.random.default_rng(5).standard_normal((4, flash.n_embd)).astype(np.float32)
    for mode, extra in (("dense", {}), ("naive", {"dram_budget": flash.payload_nbytes // 2}),
                        ("hybrid", {"dram_budget": flash.payload_nbytes // 2})):
        rt = runtime(flash, mode=mode, **extra)
        for layer in range(flash.n_layer):
            assert_same_sum(rt.ffn(layer, x), plain.ffn(layer, x))


def test_gate_matrices_are_the_budgets_minimum(gate_file):
    flash = open_flash_file(gate_file[1])
    gates = sum(layer.gate_rows.nbytes for layer in flash.layers)
    with pytest.raises(BudgetError, match=f"minimum is {gates:,} bytes"):
        runtime(flash, mode="gate", dram_budget=gates - 1)
    rt = runtime(flash, mode="gate", dram_budget=gates)  # no slots: every row read
    x = np.random.default_rng(6).standard_normal((2, flash.n_embd)).astype(np.float32)
    dense = runtime(flash, mode="dense")
    for layer in range(flash.n_layer):
        assert rt.capacity(layer) == (0, 0)
        mask = rt.predict(layer, x).any(axis=0).astype(np.uint8)
        assert_same_sum(rt.ffn(layer, x), dense.ffn(layer, x, mask=mask))


def test_gate_mode_needs_a_resident_gate(gate_file, tmp_path):
    plain = open_flash_file(convert(gate_file[0], tmp_path / "p.flash.gguf", predictor=None))
    with pytest.raises(OptionError, match="--gate-resident"):
        gate_runtime(plain)


@pytest.mark.parametrize("option, value", [("gate_keep", 0.0), ("gate_keep", 1.5),
                                           ("gate_keep", True), ("gate_cache_bonus", -0.1),
                                           ("gate_cache_bonus", float("nan"))])
def test_bad_gate_options_are_refused(gate_file, option, value):
    with pytest.raises(OptionError, match=f"flash_{option}"):
        gate_runtime(open_flash_file(gate_file[1]), **{option: value})


# ---- end to end ----------------------------------------------------------------------

def _logits(path: str, prompt: str, **kw) -> tuple[np.ndarray, dict]:
    llm = Llama(model_path=path, n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False,
                logits_all=True, **kw)
    try:
        llm.eval(llm.tokenize(prompt.encode()))
        return np.array(llm.scores[:llm.n_tokens]), llm.flash_stats() | {
            "mode": llm.flash_runtime.mode}
    finally:
        llm.close()


def test_llama_defaults_to_gate_mode_and_matches_the_page_cache_engine(gate_file):
    path, prompt = str(gate_file[1]), "a b c d e f"
    want, _ = _logits(path, prompt, flash_offload=False)
    got, stats = _logits(path, prompt, flash_offload=True, flash_dram_budget=0.5,
                         flash_gate_keep=1.0)
    assert stats["mode"] == "gate"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert stats["bytes_read"] > 0 and stats["neurons_computed"] > 0


# ---- calibration: rows hottest first by the gate's picks -----------------------------

def test_gate_frequency_counts_each_tokens_top_share():
    rng = np.random.default_rng(8)
    gate = rng.standard_normal((40, 16)).astype(np.float32)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    freq = gate_frequency("silu", gate, x, 0.25)
    g = x @ gate.T
    a = np.abs(g / (1 + np.exp(-g)))
    want = np.zeros(40)
    for row in a:
        want[np.argsort(-row)[:10]] += 1
    np.testing.assert_allclose(freq, want / len(x), atol=1e-6)
    assert freq.sum() == pytest.approx(10.0)
    # an exact 0 is never picked (relu): rows never positive have frequency 0
    gate[:5] = -np.abs(gate[:5])
    relu = gate_frequency("relu", gate, np.abs(x), 1.0)
    np.testing.assert_allclose(relu, ((np.abs(x) @ gate.T) > 0).mean(axis=0), atol=1e-6)
    assert (relu[:5] == 0).all()


def test_calibrated_gate_resident_file_is_hottest_first_without_a_predictor(tiny_models,
                                                                            tmp_path):
    from flashgguf.calibrate.collect import CalibrationOptions

    src = tiny_models(TinyModel(n_layer=2, ffn_type=Q.Q8_0))
    calibration = CalibrationOptions(tokens=640, min_tokens=500, window_tokens=128, n_threads=1)
    logs: list[str] = []
    out = tmp_path / "gate-cal.flash.gguf"
    convert_gguf(src, out, ConvertOptions(progress=False, log=logs.append, gate_resident=True,
                                          calibration=calibration))
    ff = open_flash_file(out)
    assert ff.gate_resident and ff.predictor_kind is None  # no low-rank predictor is fitted
    assert any("ordered by the gate's picks on 640" in line for line in logs)
    stream, buf = open_gguf(src)
    for layer in ff.layers:
        assert (layer.order != np.arange(ff.n_ff)).any()
        assert (np.diff(layer.freq) <= 0).all() and layer.freq[0] > 0
        # the default keep's picks per token, summed over rows (ties aside)
        assert layer.freq.sum() == pytest.approx(math.ceil(0.8 * ff.n_ff), rel=0.01)
        t = layer.gate_rows
        rows = np.fromfile(out, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        gate = tensor_array(buf, stream.tensors[f"blk.{layer.index}.ffn_gate.weight"])
        np.testing.assert_array_equal(rows.reshape(ff.n_ff, -1), gate[layer.order])
