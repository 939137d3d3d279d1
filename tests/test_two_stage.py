"""Split rows (format version 6, flashgguf-convert --gate-resident --two-stage) and gate
mode's two stages on them: up rows for the rows the exact gate chose, then down rows only
for the rows whose exact |h| x ||down|| is in the token's top flash_down_keep share."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import bundle_rows, convert, part_weights, runtime
from gguf import GGMLQuantizationType
from gguf_patch import copy_to, rename_in_payload, set_flash_version
from model_factory import TinyModel
from test_flash_runtime import assert_same_sum
from test_gate_resident import KQUANT, _as_q8, _gate_act, _logits

from flashgguf import Llama
from flashgguf.errors import ConvertError, FlashGGUFError, FormatError, OptionError, VersionError
from flashgguf.format import constants as C
from flashgguf.format import open_flash_file, open_gguf, tensor_array
from flashgguf.quants import dequantize_rows

Q = GGMLQuantizationType


def _pair(tiny_models, tmp_path_factory, model: TinyModel, name: str) -> tuple[Path, Path]:
    """(split file, the same model gate-resident with whole rows)."""
    src = tiny_models(model)
    folder = tmp_path_factory.mktemp("split")
    whole = convert(src, folder / f"{name}.flash.gguf", gate_resident=True, predictor=None)
    split = convert(src, folder / f"{name}-split.flash.gguf", gate_resident=True,
                    two_stage=True, predictor=None)
    return split, whole


@pytest.fixture(scope="module")
def q41_pair(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    return _pair(tiny_models, tmp_path_factory, TinyModel(ffn_type=Q.Q4_1), "q41")


@pytest.fixture(scope="module")
def kquant_pair(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    return _pair(tiny_models, tmp_path_factory, KQUANT, "kquant")


# ---- format ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["q4_1", "kquant"])
def test_split_file_holds_the_same_parts_up_rows_first(which, q41_pair, kquant_pair,
                                                       tiny_models):
    split_path, whole_path = q41_pair if which == "q4_1" else kquant_pair
    split, whole = open_flash_file(split_path), open_flash_file(whole_path)
    assert split.split and not whole.split
    assert split.trunk.fields[C.KEY_VERSION] == C.SPLIT_VERSION == 6
    assert whole.trunk.fields[C.KEY_VERSION] == C.FORMAT_VERSION == 4
    src, buf = open_gguf(tiny_models(TinyModel(ffn_type=Q.Q4_1) if which == "q4_1" else KQUANT))
    for a, b in zip(split.layers, whole.layers, strict=True):
        np.testing.assert_array_equal(a.order, b.order)
        up_stride = a.layout.part("down")[1]
        assert a.layout.part("up")[1] == 0 and up_stride % C.DEFAULT_BUNDLE_ALIGN == 0
        assert a.layout.stride % C.DEFAULT_BUNDLE_ALIGN == 0
        for part in ("up", "down"):  # the same bytes as the whole rows hold
            np.testing.assert_array_equal(part_weights(split, a.index, part),
                                          part_weights(whole, b.index, part))
        # the runs: row 5's up row at 5 x up stride, its down row after all up rows
        raw = np.fromfile(split.path, dtype=np.uint8)
        rows = bundle_rows(whole, b.index)
        width = a.layout.stride - up_stride
        off = a.part_offset("down", 5, split.n_ff)
        assert off == a.bundle.offset + split.n_ff * up_stride + 5 * width
        down_bytes = rows[5, b.layout.part("down")[1]:][:width]
        np.testing.assert_array_equal(raw[off:off + len(down_bytes)], down_bytes)
        # the norms are the source's down columns', in row order
        t = src.tensors[f"blk.{a.index}.ffn_down.weight"]
        down = dequantize_rows(tensor_array(buf, t).reshape(split.n_embd, -1), t.ggml_type,
                               split.n_ff)
        want = np.linalg.norm(down.astype(np.float64), axis=0)[a.order]
        np.testing.assert_allclose(a.down_norm, want, rtol=1e-5)
    assert split.payload_nbytes >= whole.payload_nbytes


def test_older_readers_refuse_version_6(q41_pair, monkeypatch):
    monkeypatch.setattr(C, "READABLE_VERSIONS", (1, 2, 3, 4, 5))
    with pytest.raises(VersionError,
                       match="version 6, this flashgguf reads versions 1, 2, 3, 4, 5"):
        open_flash_file(q41_pair[0])


def test_split_rows_in_an_older_version_are_refused(q41_pair, tmp_path):
    bad = copy_to(q41_pair[0], tmp_path)
    set_flash_version(bad, 4)
    with pytest.raises(FormatError, match="split rows in a version 4 file"):
        open_flash_file(bad)


def test_missing_down_norms_are_refused(q41_pair, tmp_path):
    bad = copy_to(q41_pair[0], tmp_path)
    rename_in_payload(bad, b"blk.1.ffn_down_norm", b"blk.1.ffn_down_nerm")
    with pytest.raises(FormatError, match="'blk.1.ffn_down_norm' is missing"):
        open_flash_file(bad)


def test_negative_down_norms_are_refused(q41_pair, tmp_path):
    bad = copy_to(q41_pair[0], tmp_path)
    t = open_flash_file(bad).payload.tensors["blk.0.ffn_down_norm"]
    with open(bad, "r+b") as f:
        f.seek(t.offset + 4 * 3)
        f.write(struct.pack("<f", -1.0))
    with pytest.raises(FormatError, match="ffn_down_norm.*negative or non-finite"):
        open_flash_file(bad)


def test_two_stage_needs_a_resident_gate(tiny_models, tmp_path):
    src = tiny_models(TinyModel(ffn_type=Q.Q4_1))
    with pytest.raises(ConvertError, match="--two-stage needs --gate-resident"):
        convert(src, tmp_path / "x.flash.gguf", two_stage=True, predictor=None)
    assert list(tmp_path.iterdir()) == []


# ---- runtime -----------------------------------------------------------------------

def gate_runtime(flash, share=0.6, **kw):
    return runtime(flash, mode="gate", dram_budget=max(1, int(share * flash.payload_nbytes)),
                   **kw)


def _h(flash, layer: int, x: np.ndarray) -> np.ndarray:
    """h = act(gate) x up in float64, x quantized as the kernels see it (Q8_1 for Q4_1 up)."""
    up = part_weights(flash, layer, "up").astype(np.float64)
    return _gate_act(flash, layer, x) * (_as_q8(x) @ up.T)


@pytest.mark.parametrize("which", ["q4_1", "kquant"])
def test_dense_mode_on_split_rows_equals_whole_rows(which, q41_pair, kquant_pair):
    split_path, whole_path = q41_pair if which == "q4_1" else kquant_pair
    split, whole = open_flash_file(split_path), open_flash_file(whole_path)
    a, b = runtime(split, mode="dense"), runtime(whole, mode="dense")
    x = np.random.default_rng(1).standard_normal((3, split.n_embd)).astype(np.float32)
    for layer in range(split.n_layer):
        assert_same_sum(a.ffn(layer, x), b.ffn(layer, x))


@pytest.mark.parametrize("io", ["threads", "io_uring"])
@pytest.mark.parametrize("n_tokens", [1, 4])
def test_down_keep_at_gate_keep_is_gate_mode_on_whole_rows(q41_pair, io, n_tokens):
    """With down_keep >= gate_keep every chosen row's down row is read: the result is the
    dense FFN over the gate's rows (and the pinned ones), as gate mode on whole rows."""
    split = open_flash_file(q41_pair[0])
    dense = runtime(split, mode="dense")
    rt = gate_runtime(split, gate_keep=0.5, down_keep=0.5, io=io)
    rng = np.random.default_rng(3)
    for _ in range(4):
        x = rng.standard_normal((n_tokens, split.n_embd)).astype(np.float32)
        for layer in range(split.n_layer):
            mask = rt.predict(layer, x).any(axis=0)
            mask[:rt.capacity(layer)[1]] = True
            assert_same_sum(rt.ffn(layer, x), dense.ffn(layer, x, mask=mask.astype(np.uint8)))
    s = rt.stats()
    assert s["down_computed"] == s["neurons_computed"] > 0
    assert 0 < rt.capacity(0)[1] == rt.capacity(0)[0] < split.n_ff


@pytest.mark.parametrize("io", ["threads", "io_uring"])
def test_second_stage_reads_down_rows_only_for_each_tokens_top_h(q41_pair, io):
    """down_keep < gate_keep: the result is the dense FFN over the rows whose exact
    |h| x ||down|| is in the token's top down_keep x n_ff among the gate's rows (pinned rows
    always), and only those rows' down rows are read beyond the pinned ones."""
    split = open_flash_file(q41_pair[0])
    gate_keep, down_keep = 0.6, 0.3
    dense = runtime(split, mode="dense")
    rt = gate_runtime(split, share=0.5, gate_keep=gate_keep, down_keep=down_keep, io=io)
    k2 = math.ceil(down_keep * split.n_ff)
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(6):
        x = rng.standard_normal((1, split.n_embd)).astype(np.float32)
        for layer in range(split.n_layer):
            pinned = rt.capacity(layer)[1]
            first = rt.predict(layer, x)[0].astype(bool)
            first[:pinned] = True
            score = np.where(first, np.abs(_h(split, layer, x)[0]) * split.layers[layer].down_norm,
                             -1.0)
            ranked = np.sort(score[first])[::-1]
            cut = ranked[k2 - 1]
            # skip a draw whose cut the kernels' rounding could move (ties within 1e-3)
            near = np.abs(ranked - cut) <= 1e-3 * cut
            got = rt.ffn(layer, x)
            if near.sum() > 1:
                continue
            second = first & (score >= cut)
            second[:pinned] = True
            assert_same_sum(got, dense.ffn(layer, x, mask=second.astype(np.uint8)))
            checked += 1
    assert checked >= 6
    s = rt.stats()
    assert 0 < s["down_computed"] < s["neurons_computed"]


def test_bytes_needed_are_the_up_rows_and_the_down_rows_read(kquant_pair):
    split = open_flash_file(kquant_pair[0])
    rt = gate_runtime(split, share=0.5, gate_keep=0.7, down_keep=0.4)
    x = np.random.default_rng(6).standard_normal((1, split.n_embd)).astype(np.float32)
    want = 0
    for layer in range(split.n_layer):
        before = rt.stats()
        rt.ffn(layer, x)
        after = rt.stats()
        layout = split.layers[layer].layout
        up_stride = layout.part("down")[1]
        pinned = rt.capacity(layer)[1]
        ups = after["neurons_computed"] - before["neurons_computed"] - pinned
        downs = after["down_computed"] - before["down_computed"] - pinned
        assert after["cache_misses"] - before["cache_misses"] == ups + downs
        assert 0 < downs < ups
        want += ups * up_stride + downs * (layout.stride - up_stride)
    s = rt.stats()
    assert s["bytes_needed"] == want and s["bytes_read"] >= want


def test_split_files_refuse_the_modes_that_read_whole_rows(q41_pair):
    split = open_flash_file(q41_pair[0])
    for mode in ("hybrid", "naive"):
        with pytest.raises(OptionError, match="--two-stage.*flash_mode='gate'"):
            runtime(split, mode=mode, dram_budget=split.payload_nbytes // 2)
    rt = gate_runtime(split)
    with pytest.raises(FlashGGUFError, match="starting a trace"):
        rt.trace_start(8, 8)


@pytest.mark.parametrize("value", [0.0, 1.5, True])
def test_bad_down_keep_is_refused(q41_pair, value):
    with pytest.raises(OptionError, match="flash_down_keep"):
        gate_runtime(open_flash_file(q41_pair[0]), down_keep=value)


def test_llama_runs_two_stages_and_matches_the_page_cache_engine(q41_pair):
    path, prompt = str(q41_pair[0]), "a b c d e f"
    want, _ = _logits(path, prompt, flash_offload=False)
    got, stats = _logits(path, prompt, flash_offload=True, flash_dram_budget=0.5,
                         flash_gate_keep=1.0, flash_down_keep=1.0)
    assert stats["mode"] == "gate"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    _, stats = _logits(path, prompt, flash_offload=True, flash_dram_budget=0.5,
                       flash_gate_keep=0.8, flash_down_keep=0.4)
    assert 0 < stats["down_computed"] < stats["neurons_computed"]


def test_down_keep_on_a_file_without_split_rows_is_refused(q41_pair):
    with pytest.raises(OptionError, match="flash_down_keep.*--two-stage"):
        Llama(model_path=str(q41_pair[1]), flash_offload=True, flash_dram_budget=0.5,
              flash_down_keep=0.5, verbose=False)


@pytest.mark.parametrize("mode", ["dense", "gate"])
def test_a_resident_row_reads_back_as_the_files_row(q41_pair, mode):
    """debug_row on split rows: the up row and the down row side by side, as bundle_rows
    gives them (dense: every row; gate: the pinned ones)."""
    split = open_flash_file(q41_pair[0])
    rt = runtime(split, mode="dense") if mode == "dense" else gate_runtime(split)
    for layer in range(split.n_layer):
        rows = bundle_rows(split, layer)
        pinned = rt.capacity(layer)[1]
        for i in (0, pinned - 1, split.n_ff - 1 if mode == "dense" else pinned // 2):
            got = rt.resident_row(layer, i)
            assert got is not None
            np.testing.assert_array_equal(np.frombuffer(got, np.uint8), rows[i])
        if mode == "gate":
            assert rt.resident_row(layer, pinned) is None
