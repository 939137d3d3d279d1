"""K-quant and Q5 bundles: which type each part gets, gate/up rows copied byte for byte from
K-quant mixes, per-layer layouts in the file and in the runtime (format version 3)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import bundle_rows, convert_open, runtime
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf_patch import patch_key, set_flash_version
from model_factory import TinyModel

from flashgguf.archs import get_arch
from flashgguf.convert.bundle import choose_down_type, choose_part_type
from flashgguf.errors import FormatError, UnsupportedError
from flashgguf.format import constants as C
from flashgguf.format import open_flash_file, open_gguf, tensor_array
from flashgguf.options import FlashOptions
from flashgguf.quants import dequantize_rows, row_nbytes
from flashgguf.runtime import Runtime

Q = GGMLQuantizationType

# Q4_K_M as llama.cpp writes it: gate/up Q4_K, down Q6_K in some layers and Q4_K in others
Q4_K_M = TinyModel(arch="qwen2", n_layer=3, n_embd=256, n_ff=512, ffn_type=Q.Q4_K,
                   down_types=(Q.Q6_K, Q.Q4_K, Q.Q6_K))
# Gemma 3's Q4_K_M: n_embd is not a multiple of 256, so gate/up fall back to Q5_0
GEMMA_Q5_0 = TinyModel(arch="gemma3", n_layer=2, n_embd=64, n_ff=512, head_dim=32,
                       ffn_type=Q.Q5_0, down_types=(Q.Q6_K, Q.Q6_K))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kquant")


# ---- the type of each part ---------------------------------------------------------

@pytest.mark.parametrize("source, n_embd, want", [
    (Q.Q4_K, 1536, Q.Q4_K),  # supported and fits: the source's own bytes
    (Q.Q6_K, 1536, Q.Q6_K),
    (Q.Q5_0, 640, Q.Q5_0),
    (Q.Q4_1, 576, Q.Q4_1),
    (Q.Q4_K, 640, Q.Q4_0),  # 640 is not whole 256-blocks: the 4.5-bit 32-block type
    (Q.Q5_K, 576, Q.Q5_0),  # 5.5 bits
    (Q.Q6_K, 640, Q.Q5_1),  # 6.5625 bits: the most below is Q5_1's 6
    (Q.Q3_K, 1536, Q.Q4_K),  # nothing at or below 3.44 bits: the fewest, a K-quant
    (Q.Q3_K, 640, Q.Q4_0),
    (Q.IQ4_XS, 4096, Q.Q4_K),
    (Q.Q8_0, 640, Q.Q8_0),
    (Q.BF16, 640, Q.Q8_0),  # floats other than F16 go to Q8_0
    (Q.F32, 640, Q.Q8_0),
    (Q.F16, 640, Q.F16),
])
def test_auto_keeps_the_source_type_or_the_closest_below(source, n_embd, want):
    assert choose_part_type(source, n_embd, C.AUTO_TYPE) == want


@pytest.mark.parametrize("source, n_embd, want", [
    (Q.Q6_K, 1536, Q.Q6_K),  # K-quant columns of the source's bits (Qwen's Q4_K_M)
    (Q.Q4_K, 1536, Q.Q4_K),
    (Q.Q3_K, 1536, Q.Q4_K),
    (Q.Q6_K, 640, Q.Q8_0),  # 32-block columns of the same bits cost too much (Gemma 3)
    (Q.Q4_K, 640, Q.Q8_0),
    (Q.Q4_1, 576, Q.Q8_0),  # SmolLM2
    (Q.Q8_0, 576, Q.Q8_0),
    (Q.F16, 576, Q.Q8_0),
])
def test_auto_down_type(source, n_embd, want):
    assert choose_down_type(source, n_embd, C.AUTO_TYPE) == want


def test_requested_down_type_is_taken():
    assert choose_down_type(Q.Q4_1, 576, "q4_1") == Q.Q4_1
    assert choose_down_type(Q.Q6_K, 1536, "f16") == Q.F16


def test_requested_type_must_fit_the_row():
    assert choose_part_type(Q.Q4_K, 640, "q8_0") == Q.Q8_0
    assert choose_part_type(Q.Q4_K, 1536, "Q5_K") == Q.Q5_K
    with pytest.raises(UnsupportedError, match="q6_k needs rows of whole 256-value blocks; "
                       "n_embd 640"):
        choose_part_type(Q.Q4_K, 640, "q6_k")
    with pytest.raises(UnsupportedError, match="'q3_k' is not supported"):
        choose_part_type(Q.Q4_K, 1536, "q3_k")


# ---- conversion ----------------------------------------------------------------------

def _source_tensors(src: Path) -> dict:
    stream, buf = open_gguf(src)
    return {name: (t.ggml_type, tensor_array(buf, t)) for name, t in stream.tensors.items()}


@pytest.mark.parametrize("spec", [Q4_K_M, GEMMA_Q5_0], ids=["q4_k_m", "gemma-q5_0"])
def test_gate_up_rows_are_the_sources_bytes(tiny_models, folder, spec):
    src = tiny_models(spec)
    flash = convert_open(src, folder, predictor=None)
    tensors = _source_tensors(src)
    for layer in flash.layers:
        rows = bundle_rows(flash, layer.index)
        for part in ("gate", "up"):
            ptype, off = layer.layout.part(part)
            src_type, src_rows = tensors[f"blk.{layer.index}.ffn_{part}.weight"]
            assert ptype == src_type
            width = row_nbytes(ptype, flash.n_embd)
            np.testing.assert_array_equal(rows[:, off:off + width],
                                          src_rows.reshape(flash.n_ff, -1)[layer.order])
        # down: columns of the source, re-quantized per layer to the type auto picks
        dtype, off = layer.layout.part("down")
        src_type, src_down = tensors[f"blk.{layer.index}.ffn_down.weight"]
        assert dtype == choose_down_type(src_type, flash.n_embd, C.AUTO_TYPE)
        down = dequantize_rows(src_down, src_type, flash.n_ff)  # [n_embd, n_ff]
        cols = dequantize_rows(np.ascontiguousarray(
            rows[:, off:off + row_nbytes(dtype, flash.n_embd)]), dtype, flash.n_embd)
        err = np.linalg.norm(cols - down.T[layer.order]) / np.linalg.norm(down)
        assert err < {Q.Q6_K: 0.03, Q.Q4_K: 0.1, Q.Q8_0: 0.01}[dtype]
        # the stride is the parts' bytes padded to the alignment, nothing more
        used = sum(row_nbytes(t, flash.n_embd) for t in layer.layout.types)
        assert layer.layout.stride == -(-used // C.DEFAULT_BUNDLE_ALIGN) * C.DEFAULT_BUNDLE_ALIGN


def test_k_quant_mix_stores_per_layer_layouts(tiny_models, folder):
    flash = convert_open(tiny_models(Q4_K_M), folder, predictor=None)
    downs = [layer.layout.part("down")[0] for layer in flash.layers]
    assert downs == [Q.Q6_K, Q.Q4_K, Q.Q6_K]
    strides = [layer.layout.stride for layer in flash.layers]
    assert strides[0] == strides[2] != strides[1]
    assert flash.payload_nbytes == sum(flash.n_ff * s for s in strides)
    with pytest.raises(FormatError, match="different bundle layouts"):
        _ = flash.layout
    fields = flash.payload.fields
    assert len(fields[C.KEY_BUNDLE_TYPES]) == 3 * flash.n_layer
    assert list(fields[C.KEY_BUNDLE_STRIDE]) == strides


def test_uniform_layout_is_stored_once(tiny_models, folder):
    flash = convert_open(tiny_models(TinyModel(ffn_type=Q.Q4_K, n_embd=256, n_ff=256)), folder,
                    predictor=None)
    assert isinstance(flash.payload.fields[C.KEY_BUNDLE_STRIDE], int)
    assert flash.layout == flash.layers[1].layout


def test_per_layer_layouts_in_an_older_version_are_refused(tiny_models, folder, tmp_path):
    flash = convert_open(tiny_models(Q4_K_M), folder, predictor=None)
    bad = tmp_path / "v2.flash.gguf"
    bad.write_bytes(flash.path.read_bytes())
    set_flash_version(bad, 2)
    with pytest.raises(FormatError, match="per-layer bundle layouts in a version 2 file"):
        open_flash_file(bad)


def test_per_layer_layout_of_a_block_type_that_does_not_fit_is_refused(tiny_models, folder,
                                                                        tmp_path):
    flash = convert_open(tiny_models(GEMMA_Q5_0), folder, predictor=None)
    bad = tmp_path / "bad.flash.gguf"
    bad.write_bytes(flash.path.read_bytes())
    # a Q4_K gate where n_embd (64) is not a whole 256-value block
    types = [int(t) for t in flash.layout.types]
    types[0] = int(Q.Q4_K)
    raw = struct.pack("<IQ", GGUFValueType.UINT32, len(types)) + struct.pack(f"<{len(types)}I",
                                                                             *types)
    patch_key(bad, C.KEY_BUNDLE_TYPES, GGUFValueType.ARRAY, raw, flash.payload.base)
    with pytest.raises(FormatError, match="Q4_K, whose 256-value blocks do not divide n_embd 64"):
        open_flash_file(bad)


def test_payload_of_a_k_quant_mix_is_the_sources_ffn_plus_padding(tiny_models, folder):
    """The bundles hold the source's gate/up bytes and K-quant down columns of the same bits:
    the payload is the source's FFN bytes plus the row padding."""
    src = tiny_models(Q4_K_M)
    flash = convert_open(src, folder, predictor=None)
    stream, _ = open_gguf(src)
    ffn = sum(t.nbytes for name, t in stream.tensors.items() if ".ffn_" in name and
              name.endswith(".weight") and "norm" not in name)
    padding = sum(flash.n_ff * (layer.layout.stride - sum(
        row_nbytes(t, flash.n_embd) for t in layer.layout.types)) for layer in flash.layers)
    assert flash.payload_nbytes - padding == ffn


# ---- the runtime on layers of different layouts ------------------------------------

@pytest.mark.native
def test_budget_split_counts_each_layers_stride(tiny_models, folder):
    flash = convert_open(tiny_models(Q4_K_M), folder, predictor=None)
    budget = int(0.5 * flash.payload_nbytes)
    rt = runtime(flash, [None] * flash.n_layer, mode="hybrid", dram_budget=budget)
    caps = [rt.capacity(i)[0] for i in range(flash.n_layer)]
    slot_bytes = sum(c * layer.layout.stride for c, layer in zip(caps, flash.layers, strict=True))
    assert slot_bytes <= budget
    # the bytes go evenly: layers of smaller rows get more rows
    assert caps[1] > caps[0] == caps[2]
    assert budget - slot_bytes < max(layer.layout.stride for layer in flash.layers) * 3


@pytest.mark.native
def test_dense_runtime_computes_each_layer_with_its_own_types(tiny_models, folder):
    flash = convert_open(tiny_models(Q4_K_M), folder, predictor=None)
    rt = runtime(flash)
    x = np.random.default_rng(3).standard_normal((2, flash.n_embd)).astype(np.float32)
    for layer in flash.layers:
        rows = bundle_rows(flash, layer.index)
        w = {}
        for part in layer.layout.parts:
            t, off = layer.layout.part(part)
            w[part] = dequantize_rows(np.ascontiguousarray(
                rows[:, off:off + row_nbytes(t, flash.n_embd)]), t, flash.n_embd)
        g, u = x @ w["gate"].T, x @ w["up"].T
        want = (g / (1 + np.exp(-g)) * u) @ w["down"]
        got = rt.ffn(layer.index, x)
        # the activations are quantized to Q8_K for the K-quant dot products, as in ggml
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    assert GGML_QUANT_SIZES[Q.Q8_K][0] == 256


@pytest.mark.native
def test_c_refuses_bad_layer_layouts(tiny_models, folder):
    from flashgguf._native import lib

    flash = convert_open(tiny_models(Q4_K_M), folder, predictor=None)
    rt = runtime(flash, [None] * flash.n_layer, mode="naive",
                 dram_budget=flash.payload_nbytes // 2)
    q4k = int(Q.Q4_K)
    row = row_nbytes(Q.Q4_K, flash.n_embd)
    good = ([q4k, q4k, q4k], [0, row, 2 * row], 3 * row)

    def set_layout(types, offsets, stride, layer=1):
        return lib.fg_runtime_set_layer_layout(rt.handle, layer, types, offsets, stride)

    assert set_layout(*good) == lib.FG_ERR_STATE  # after load: the slots are allocated
    rt = Runtime(flash, get_arch(flash.arch), FlashOptions(
        mode="naive", dram_budget=flash.payload_nbytes // 2), load=False)
    assert set_layout(*good) == lib.FG_OK
    assert set_layout([q4k, q4k, int(Q.Q3_K)], good[1], good[2]) == lib.FG_ERR_TYPE
    assert set_layout(good[0], [0, row - 1, 2 * row], good[2]) == lib.FG_ERR_ARG  # overlap
    assert set_layout(good[0], [0, row, 2 * row + 1], good[2]) == lib.FG_ERR_ARG  # past stride
    assert set_layout(good[0], [0, row, (1 << 62)], good[2]) == lib.FG_ERR_ARG  # no overflow
    assert set_layout(good[0], [-1, row, 2 * row], good[2]) == lib.FG_ERR_ARG
    assert set_layout(good[0], good[1], 1 << 30) == lib.FG_ERR_ARG  # a row must fit a read
    assert set_layout(*good, layer=flash.n_layer) == lib.FG_ERR_ARG
