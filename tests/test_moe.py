"""Mixtures of experts from flash (format version 5): generated tiny MoE models of each
supported layout (qwen3moe, qwen2moe with its shared expert, olmoe, Mixtral as llama),
converted and run against stock llama.cpp on the source GGUF."""

from __future__ import annotations

import dataclasses
import errno
import struct
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType
from gguf_patch import copy_to, patch_key, rename_in_payload, set_flash_version
from model_factory import TinyModel
from test_hook import graph_node_names

from flashgguf import Llama
from flashgguf.archs import ARCHS, get_arch
from flashgguf.calibrate.collect import CalibrationOptions, ExpertChoices
from flashgguf.calibrate.text import read_calibration_text
from flashgguf.convert.gguf_source import ConvertOptions, convert_gguf
from flashgguf.errors import (
    FlashGGUFError,
    FormatError,
    OptionError,
    UnsupportedError,
)
from flashgguf.expert_cache import pinned_experts, recommend_pinned_share
from flashgguf.format import MoEFlashFile, open_any_flash_file, open_flash_file, open_gguf
from flashgguf.format import constants as C
from flashgguf.options import flash_options
from flashgguf.runtime import MoERuntime

MOE_ARCHS = sorted(a for a, spec in ARCHS.items() if spec.moe is not None)
KQ = (Q.Q4_K, Q.Q4_K, Q.Q6_K)  # Q4_K_M's expert types
TOKENS = list(range(100, 132))


def moe_spec(arch: str, n_layer: int = 2, expert_types=KQ, n_embd: int = 256) -> TinyModel:
    return TinyModel(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=4,
                     n_head_kv=4 if arch == "olmoe" else 2, n_expert=8, n_expert_used=2,
                     n_ff_exp=n_embd, n_ff_shexp=n_embd if arch == "qwen2moe" else 0,
                     expert_types=expert_types, seed=len(arch))


def convert(src: Path, folder: Path) -> Path:
    out = folder / (src.name.removesuffix(".gguf") + ".flash.gguf")
    if not out.exists():
        convert_gguf(src, out, ConvertOptions(progress=False, log=lambda _m: None))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


def logits(model: llama_cpp.Llama, tokens: list[int], one_by_one: bool = False) -> np.ndarray:
    model.reset()
    if one_by_one:
        for t in tokens:
            model.eval([t])
    else:
        model.eval(tokens)
    return np.array(model.scores[:len(tokens)])


def stock_logits(src: Path, one_by_one: bool = False) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(src), logits_all=True, n_ctx=128, n_threads=1,
                            verbose=False)
    try:
        return logits(model, TOKENS, one_by_one)
    finally:
        model.close()


def flash_logits(path: Path, one_by_one: bool = False, **flash: object) -> tuple[np.ndarray, dict]:
    model = Llama(model_path=str(path), flash_offload=True, logits_all=True, n_ctx=128,
                  n_threads=1, verbose=False, **flash)
    try:
        out = logits(model, TOKENS, one_by_one)
        runtime = model.flash_runtime
        assert isinstance(runtime, MoERuntime)
        stats = runtime.stats()
        stats["slots"] = runtime.slots
        stats["mode"] = runtime.mode
        return out, stats
    finally:
        model.close()


def test_every_moe_arch_is_in_the_registry():
    assert MOE_ARCHS == ["llama", "olmoe", "qwen2moe", "qwen3moe"]
    assert [a for a in MOE_ARCHS if not ARCHS[a].dense] == ["olmoe", "qwen2moe", "qwen3moe"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_nodes_around_the_experts(tiny_models, arch):
    """The callback's facts about llama.cpp's graph: per layer the MoE input, then the
    chosen experts, then their weights, then the routed sum, in this order."""
    spec = ARCHS[arch].moe
    names = graph_node_names(tiny_models(moe_spec(arch)), n_tokens=5)
    for layer in range(2):
        seq = [f"{spec.input_node}-{layer}", f"ffn_moe_topk-{layer}",
               f"ffn_moe_weights-{layer}", f"{spec.output_node}-{layer}"]
        at = [names.index(n) for n in seq]
        assert at == sorted(at) and all(names.count(n) == 1 for n in seq[:3]), (seq, at)
        # Mixtral and qwen3moe renormalize the chosen weights; qwen2moe and olmoe do not
        assert (f"ffn_moe_weights_norm-{layer}" in names) == (arch in ("llama", "qwen3moe"))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_one_layer_equals_llama_cpp(tiny_models, folder, arch):
    """With one layer llama.cpp and flashgguf see the same input and routing, so the
    logits differ only by float rounding: most tokens agree to the last bits; on a few an
    h value lands on the other side of a Q8_K rounding step (ggml's SIMD silu and libm's
    expf differ in the last ulp), one quantization step of one activation."""
    src = tiny_models(moe_spec(arch, n_layer=1))
    ref = stock_logits(src)
    got, stats = flash_logits(convert(src, folder))
    scale = np.abs(ref).max()
    diff = np.abs(got - ref).max(axis=1)
    assert (diff <= 1e-6 * scale).mean() >= 0.75, diff / scale
    assert diff.max() <= 1e-3 * scale, diff / scale
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert stats["mode"] == "dense" and stats["expert_misses"] == 0
    assert stats["tokens"] == len(TOKENS) and stats["calls"] == 1 and stats["expert_hits"] > 0


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_prompt_and_decode_match_llama_cpp_resident_and_streamed(tiny_models, folder, arch):
    """Two layers: the first layer's rounding reaches the second's quantized activations
    (and can flip a near-tie of its router), so the bound is looser than one layer's; the
    streamed runs at a budget of three experts (evictions on every call) compute exactly
    what the resident run computes, with either read engine."""
    src = tiny_models(moe_spec(arch))
    flash = convert(src, folder)
    expert = open_any_flash_file(flash).expert_nbytes
    for one_by_one in (False, True):
        ref = stock_logits(src, one_by_one)
        resident, rstats = flash_logits(flash, one_by_one)
        scale = np.abs(ref).max()
        assert np.abs(resident - ref).max() <= 1e-2 * scale
        assert (resident.argmax(1) == ref.argmax(1)).mean() >= 0.95
        assert rstats["mode"] == "dense" and rstats["slots"] == 16
        for io in ("threads", "io_uring"):
            streamed, stats = flash_logits(flash, one_by_one, flash_dram_budget=3 * expert,
                                           flash_io=io)
            np.testing.assert_array_equal(streamed, resident)
            assert stats["mode"] == "streaming" and stats["slots"] == 3
            # one call per layer for the prompt: its one-offs evict nothing (take_slot)
            assert stats["expert_misses"] > 0 and (stats["evictions"] > 0) == one_by_one
            # whole experts, one aligned read each: nothing read beyond the missed experts
            assert stats["bytes_read"] == stats["bytes_needed"] == \
                stats["expert_misses"] * expert
            assert stats["reads"] == stats["expert_misses"]


def test_expert_bundles_are_the_sources_bytes(tiny_models, folder):
    src = tiny_models(moe_spec("qwen3moe"))
    flash = open_any_flash_file(convert(src, folder))
    assert isinstance(flash, MoEFlashFile)
    stream, buf = open_gguf(src)
    raw = np.frombuffer(Path(flash.path).read_bytes(), np.uint8)
    for layer in flash.layers:
        la = layer.layout
        assert la.types == KQ and la.stride % C.PAYLOAD_ALIGNMENT == 0
        bundles = raw[layer.experts.offset:layer.experts.offset + layer.experts.nbytes]
        bundles = bundles.reshape(flash.n_expert, la.stride)
        for part, offset, nbytes in zip(("gate", "up", "down"), la.offsets,
                                        la.part_nbytes(flash.n_embd, flash.n_ff_exp),
                                        strict=True):
            t = stream.tensors[f"blk.{layer.index}.ffn_{part}_exps.weight"]
            source = np.frombuffer(buf[t.offset:t.offset + t.nbytes], np.uint8)
            np.testing.assert_array_equal(bundles[:, offset:offset + nbytes],
                                          source.reshape(flash.n_expert, nbytes))
    # the trunk keeps the router at its shape and llama.cpp's keys, the experts at width 1
    trunk = flash.trunk
    assert trunk.tensors["blk.0.ffn_gate_inp.weight"].shape == (flash.n_embd, flash.n_expert)
    assert trunk.tensors["blk.0.ffn_gate_exps.weight"].shape == (flash.n_embd, 1, 8)
    assert trunk.tensors["blk.0.ffn_down_exps.weight"].shape == (1, flash.n_embd, 8)
    assert trunk.get("qwen3moe.expert_feed_forward_length") == C.DUMMY_EXPERT_WIDTH
    assert trunk.get(C.KEY_VERSION) == C.MOE_VERSION


def test_cache_keeps_hot_experts_through_a_burst_of_one_offs(tiny_models, folder):
    """CLOCK with use counts: experts used on every call survive a run of experts used
    once (a prompt's tail), where LRU would have let the one-offs flush them."""
    flash = open_any_flash_file(convert(tiny_models(moe_spec("qwen3moe")), folder))
    opts = flash_options(flash.payload_nbytes, 4 * flash.expert_nbytes, "predicted")
    runtime = MoERuntime(flash, get_arch("qwen3moe"), opts)
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, flash.n_embd)).astype(np.float32)
        w = np.array([[0.6, 0.4]], np.float32)

        def use(a: int, b: int) -> np.ndarray:
            return runtime.forward(0, x, np.array([[a, b]], np.int32), w)

        first = use(0, 1)
        for _ in range(4):
            np.testing.assert_array_equal(use(0, 1), first)  # hits compute the same
        for pair in ((2, 3), (4, 5), (6, 7)):
            use(*pair)
        resident = runtime.resident()[0]
        assert resident[0] and resident[1], resident
        assert resident.sum() == 4
        with pytest.raises(FlashGGUFError, match="argument"):  # one token, one expert twice
            use(3, 3)
        with pytest.raises(FlashGGUFError, match="argument"):
            use(0, 8)
        before = runtime.stats()["expert_misses"]
        use(0, 1)
        assert runtime.stats()["expert_misses"] == before
        hits, misses = runtime.layer_stats()
        assert int(misses[0]) == 8 and int(hits[0]) == 5 * 2 and int(misses[1]) == 0
    finally:
        runtime.close()


def q8_k(v: np.ndarray) -> np.ndarray:
    """v as ggml's quantize_row_q8_K_ref rounds it (the activations of K-quant dot products):
    per 256 values, the signed value of largest magnitude maps to -127."""
    blocks = v.astype(np.float32).reshape(-1, 256)
    peak = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)][:, None]
    iscale = np.float32(-127.0) / peak
    q = np.minimum(np.rint((iscale * blocks).astype(np.float32)), 127)
    return (q * (np.float32(1.0) / iscale)).reshape(v.shape)


def test_forward_matches_a_numpy_reference_of_the_experts(tiny_models, folder):
    """The routed sum from the stored bytes equals sum_k w_k down(silu(gate x) * up x) in
    float64 numpy over the dequantized experts, with x and h rounded to Q8_K as ggml's
    mul_mat_id rounds them: what is left is float summation order."""
    from flashgguf.quants import dequantize_rows

    flash = open_any_flash_file(convert(tiny_models(moe_spec("olmoe")), folder))
    runtime = MoERuntime(flash, get_arch("olmoe"), flash_options(flash.payload_nbytes, None,
                                                                 "predicted", offload=False))
    try:
        rng = np.random.default_rng(1)
        x = rng.standard_normal((3, flash.n_embd)).astype(np.float32)
        ids = np.array([[5, 2], [2, 7], [0, 5]], np.int32)
        w = rng.uniform(0.1, 1.0, ids.shape).astype(np.float32)
        y = runtime.forward(1, x, ids, w)
        layer = flash.layers[1]
        raw = np.frombuffer(Path(flash.path).read_bytes(), np.uint8)
        bundles = raw[layer.experts.offset:layer.experts.offset + layer.experts.nbytes]
        bundles = bundles.reshape(flash.n_expert, -1)
        n, f = flash.n_embd, flash.n_ff_exp

        def matrix(e: int, part: int, rows: int, cols: int) -> np.ndarray:
            t, off = layer.layout.types[part], layer.layout.offsets[part]
            nbytes = layer.layout.part_nbytes(n, f)[part]
            raw_rows = bundles[e, off:off + nbytes].reshape(rows, -1)
            return dequantize_rows(raw_rows, t, cols).astype(np.float64)

        want = np.zeros_like(y, dtype=np.float64)
        for t in range(3):
            xq = q8_k(x[t]).astype(np.float64)
            for k in range(2):
                e = ids[t, k]
                g = (matrix(e, 0, f, n) @ xq).astype(np.float32)
                u = (matrix(e, 1, f, n) @ xq).astype(np.float32)
                h = q8_k(g / (1 + np.exp(-g)) * u).astype(np.float64)
                want[t] += w[t, k] * (matrix(e, 2, n, f) @ h)
        assert np.abs(y - want).max() <= 1e-4 * np.abs(want).max()
    finally:
        runtime.close()


# ---- refusals ---------------------------------------------------------------------------

def test_dense_tools_refuse_a_moe_file(tiny_models, folder):
    path = convert(tiny_models(moe_spec("qwen3moe")), folder)
    with pytest.raises(UnsupportedError, match="mixture-of-experts"):
        open_flash_file(path)


def test_flash_mode_is_refused_on_a_moe_file(tiny_models, folder):
    path = convert(tiny_models(moe_spec("qwen3moe")), folder)
    with pytest.raises(OptionError, match="router picks the experts"):
        Llama(model_path=str(path), flash_offload=True, flash_mode="hybrid", verbose=False)


def test_trunk_whose_expert_count_disagrees_is_refused(tiny_models, folder, tmp_path):
    bad = copy_to(convert(tiny_models(moe_spec("qwen2moe")), folder), tmp_path)
    patch_key(bad, "qwen2moe.expert_count", GGUFValueType.UINT32, struct.pack("<I", 4))
    with pytest.raises(FormatError, match=r"qwen2moe.expert_count is 4, the payload's experts "
                                          r"need 8"):
        open_any_flash_file(bad)


def test_payload_of_an_older_version_is_refused(tiny_models, folder, tmp_path):
    bad = copy_to(convert(tiny_models(moe_spec("olmoe")), folder), tmp_path)
    set_flash_version(bad, 4)
    with pytest.raises(FormatError, match="need version 5"):
        open_any_flash_file(bad)


def test_dense_file_claiming_the_moe_version_is_refused(tiny_models, tmp_path):
    dense = tmp_path / "dense.flash.gguf"
    convert_gguf(tiny_models(TinyModel()), dense,
                 ConvertOptions(progress=False, predictor=None, log=lambda _m: None))
    set_flash_version(dense, 5)
    with pytest.raises(FormatError, match="a version 5 file without its experts"):
        open_any_flash_file(dense)


def test_source_whose_router_disagrees_with_its_keys_is_refused(tiny_models, tmp_path):
    src = copy_to(tiny_models(moe_spec("llama")), tmp_path)
    patch_key(src, "llama.expert_count", GGUFValueType.UINT32, struct.pack("<I", 4))
    out = tmp_path / "out.flash.gguf"
    with pytest.raises(FormatError, match=r"ffn_gate_exps.weight' has shape \[256, 256, 8\], "
                                          r"expected \[256, 256, 4\]"):
        convert_gguf(src, out, ConvertOptions(progress=False, log=lambda _m: None))
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_experts_in_an_architecture_without_a_moe_block_are_refused(tiny_models, tmp_path,
                                                                   monkeypatch):
    src = tiny_models(moe_spec("llama"))
    monkeypatch.setitem(ARCHS, "llama", dataclasses.replace(ARCHS["llama"], moe=None))
    out = tmp_path / "out.flash.gguf"
    with pytest.raises(UnsupportedError, match=r"llama with experts is not supported \(MoE "
                                               r"architectures: olmoe, qwen2moe, qwen3moe\)"):
        convert_gguf(src, out, ConvertOptions(progress=False, log=lambda _m: None))
    assert not out.exists()


def test_read_error_during_decode_is_raised_and_the_model_survives(tiny_models, folder):
    path = convert(tiny_models(moe_spec("qwen3moe")), folder)
    expert = open_any_flash_file(path).expert_nbytes
    model = Llama(model_path=str(path), flash_offload=True, flash_dram_budget=2 * expert,
                  logits_all=True, n_ctx=128, n_threads=1, verbose=False)
    try:
        runtime = model.flash_runtime
        assert isinstance(runtime, MoERuntime)
        runtime.fail_reads(errno.EIO)
        with pytest.raises(FlashGGUFError, match="experts of layer"):
            model.eval(TOKENS[:4])
        runtime.fail_reads(0)
        model.reset()
        model.eval(TOKENS[:4])  # the cache dropped what never arrived: right again
        assert np.isfinite(np.array(model.scores[:4])).all()
    finally:
        model.close()


def test_profile_experts_simulates_the_runtimes_cache(tiny_models, folder, capsys):
    """flashgguf-profile experts: its CLOCK simulation reproduces the hits the runtime
    counted (it refuses to print otherwise), and no policy beats Belady's optimum."""
    import json

    from flashgguf.profile import main as profile_main

    path = convert(tiny_models(moe_spec("qwen2moe")), folder)
    code = profile_main(["experts", str(path), "--tokens", "6", "--budget", "0.3", "--json",
                         "-q", "--threads", "1", "--shares", "0.1,0.3,0.6,1.0"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["run_slots"] == 4 and r["experts_per_token"] == 2 * 2
    curve = r["curve"]
    assert [row["slots"] for row in curve] == [2, 5, 10, 16]
    for row in curve:
        assert 0 <= row["clock"] <= row["opt"] + 1e-12 and row["lru"] <= row["opt"] + 1e-12
    assert curve[-1]["clock"] == curve[-1]["lru"] == curve[-1]["opt"]  # everything fits
    assert not r["calibrated"] and r["run_pinned"] == 0 and curve[0]["clock_pinned"] is None

    # a calibrated file: the run pins experts, and the simulation with them still
    # reproduces its hits
    path = convert_calibrated(tiny_models(moe_spec("qwen3moe")),
                              folder / "two.calibrated.flash.gguf")
    code = profile_main(["experts", str(path), "--tokens", "6", "--budget", "0.4", "--json",
                         "-q", "--threads", "1", "--shares", "0.3,1.0", "--pinned-share",
                         "0.5"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["calibrated"] and r["run_slots"] == 6 and r["run_pinned"] == 3
    # (the optimum starts from an empty cache; pinned experts are read at load)
    assert all(0 <= row["clock_pinned"] <= 1 for row in r["curve"])
    assert r["curve"][-1]["clock_pinned"] >= r["curve"][-1]["clock"]


def test_clock_simulation_matches_the_burst_example():
    from flashgguf.expert_cache import clock_hits
    from flashgguf.profile.experts import lru_hits, opt_hits

    calls = [(0, np.array([0, 1]))] * 5 + [(0, np.array(p)) for p in ((2, 3), (4, 5), (6, 7))]
    calls += [(0, np.array([0, 1]))]
    # CLOCK keeps the hot pair through the one-offs (8 + 2 hits), LRU loses it (8 hits)
    assert clock_hits(calls, 8, 4, n_layer=2) == 10
    assert lru_hits(calls, 8, 4) == 8
    assert opt_hits(calls, 8, 4) == 10
    # a cache smaller than a token's experts (three layers of two): LRU cycles (no hits),
    # CLOCK keeps a set of four and hits it
    cycle = [(layer, np.array([0, 1])) for _ in range(20) for layer in range(3)]
    assert lru_hits(cycle, 8, 4) == 0
    assert clock_hits(cycle, 8, 4, n_layer=3) == 2 * 2 * 19


# ---- calibrated routing and pinned experts ---------------------------------------------

CALIBRATION = CalibrationOptions(tokens=64, min_tokens=64, window_tokens=32, n_threads=1)


def convert_calibrated(src: Path, out: Path) -> Path:
    if not out.exists():
        convert_gguf(src, out, ConvertOptions(progress=False, log=lambda _m: None,
                                              calibration=CALIBRATION))
    return out


def test_calibrated_frequencies_are_llama_cpps_routing(tiny_models, folder):
    """--calibrate counts the router's top-k on the calibration windows. With one layer
    the flash run routes from exactly llama.cpp's input, so its routing record, token by
    token over the same windows, gives the same counts."""
    src = tiny_models(moe_spec("qwen3moe", n_layer=1))
    flash = open_any_flash_file(convert_calibrated(src, folder / "one.calibrated.flash.gguf"))
    assert isinstance(flash, MoEFlashFile) and flash.frequency is not None
    assert flash.frequency.shape == (1, 8)
    np.testing.assert_allclose(flash.frequency.sum(axis=1), 2.0, rtol=1e-6)
    assert flash.payload.get(C.KEY_CALIBRATION_TOKENS) == CALIBRATION.tokens

    model = Llama(model_path=str(flash.path), flash_offload=True, n_ctx=64, n_threads=1,
                  verbose=False)
    try:
        runtime = model.flash_runtime
        assert isinstance(runtime, MoERuntime)
        tokens = model.tokenize(read_calibration_text().encode(), add_bos=False, special=False)
        step = CALIBRATION.window_tokens - 1  # and the BOS
        runtime.trace_start(CALIBRATION.tokens)
        for start in range(0, CALIBRATION.tokens, CALIBRATION.window_tokens):
            model.reset()
            for t in [model.token_bos(), *tokens[start // CALIBRATION.window_tokens * step:]
                      [:step]]:
                model.eval([t])
        layer, used = runtime.trace_take()
    finally:
        model.close()
    assert len(layer) == CALIBRATION.tokens and (layer == 0).all()
    assert (used.sum(axis=1) == 2).all()
    np.testing.assert_array_equal(np.rint(flash.frequency[0] * CALIBRATION.tokens),
                                  used.sum(axis=0))


def test_pinned_experts_are_the_most_used_and_never_evicted(tiny_models, folder):
    """flash_pinned_share of the slots go to the experts the calibration saw most (over
    all layers), read at load; decode under evictions computes what the resident run
    computes, and the pinned experts are still there at the end."""
    src = tiny_models(moe_spec("qwen3moe"))
    path = convert_calibrated(src, folder / "two.calibrated.flash.gguf")
    flash = open_any_flash_file(path)
    assert isinstance(flash, MoEFlashFile) and flash.frequency is not None
    resident, _ = flash_logits(path, True)
    model = Llama(model_path=str(path), flash_offload=True, logits_all=True, n_ctx=128,
                  n_threads=1, verbose=False, flash_dram_budget=6 * flash.expert_nbytes,
                  flash_pinned_share=0.5)
    try:
        runtime = model.flash_runtime
        assert isinstance(runtime, MoERuntime)
        keys = runtime.pinned
        top = np.argsort(-flash.frequency.reshape(-1), kind="stable")[:3]
        np.testing.assert_array_equal(keys, np.sort(top))
        stats = runtime.stats()
        assert stats["pinned"] == 3 and stats["bytes_read"] == 3 * flash.expert_nbytes
        streamed = logits(model, TOKENS, one_by_one=True)
        stats = runtime.stats()
        assert stats["evictions"] > 0 and stats["pinned_hits"] > 0
        assert runtime.resident().reshape(-1)[keys].all()
    finally:
        model.close()
    np.testing.assert_array_equal(streamed, resident)
    # without flash_pinned_share the file's measured default applies
    model = Llama(model_path=str(path), flash_offload=True, n_ctx=64, verbose=False,
                  flash_dram_budget=6 * flash.expert_nbytes)
    try:
        runtime = model.flash_runtime
        assert isinstance(runtime, MoERuntime)
        assert runtime.options.pinned_share == flash.pinned_share
        assert runtime.pinned.size == pinned_experts(flash.frequency, 6,
                                                     flash.pinned_share).size
    finally:
        model.close()


def test_pinned_experts_choice():
    freq = np.array([[0.5, 0.0, 1.0, 0.5], [0.9, 0.1, 0.0, 1.0]], np.float32)
    # the most used over all layers, in file order; one slot always left to the rest
    np.testing.assert_array_equal(pinned_experts(freq, 4, 0.5), [2, 7])
    np.testing.assert_array_equal(pinned_experts(freq, 4, 1.0), [2, 4, 7])
    # never-chosen experts are not pinned; no frequencies or no share: nothing
    assert list(pinned_experts(freq, 100, 1.0)) == [0, 2, 3, 4, 5, 7]
    assert pinned_experts(None, 4, 0.5).size == 0 and pinned_experts(freq, 4, 0.0).size == 0
    assert pinned_experts(freq, 1, 1.0).size == 0


def test_pinning_is_recommended_only_where_frequencies_carry_over():
    """The converter's choice: pin when the fitted frequencies predict the held-out routing
    (here a stable hot set per layer, which the cold traffic churns out of a plain CLOCK
    cache), not when the held-out text uses other experts."""
    rng = np.random.default_rng(1)
    n_layer, n_expert, n_tokens = 4, 64, 400

    def routing(hot: np.ndarray) -> np.ndarray:
        # per token and layer: one of the layer's 16 hot experts, and one other
        out = np.empty((n_tokens, n_layer, 2), np.int16)
        for layer in range(n_layer):
            for t in range(n_tokens):
                a = rng.choice(hot[layer])
                out[t, layer] = a, rng.choice(np.setdiff1d(np.arange(n_expert), [a]))
        return out

    hot = np.stack([rng.choice(n_expert, 16, replace=False) for _ in range(n_layer)])
    fit = ExpertChoices.frequency_of(routing(hot), n_expert)
    share, table = recommend_pinned_share(fit, routing(hot), n_expert)
    assert share == 0.5 and all(row["pinned_0.5"] > row["clock"] for row in table)
    assert table[0]["pinned_0.5"] - table[0]["clock"] > 0.03
    share, table = recommend_pinned_share(fit, routing((hot + 32) % n_expert), n_expert)
    assert share == 0.0 and len(table) == 2


def test_bad_pin_lists_are_refused(tiny_models, folder, monkeypatch):
    import flashgguf.runtime as runtime_module

    path = convert_calibrated(tiny_models(moe_spec("qwen3moe")),
                              folder / "two.calibrated.flash.gguf")
    budget = 4 * open_any_flash_file(path).expert_nbytes
    for keys in ([3, 3], [16]):  # twice the same expert; past the last
        monkeypatch.setattr(runtime_module, "pinned_experts",
                            lambda *_a, k=keys: np.array(k, np.int32))
        with pytest.raises(FlashGGUFError, match="pinning experts"):
            Llama(model_path=str(path), flash_offload=True, flash_dram_budget=budget,
                  verbose=False)


def _patch_frequency(path: Path, values: np.ndarray) -> None:
    flash = open_any_flash_file(path)
    patch_key(path, C.KEY_MOE_FREQUENCY, GGUFValueType.ARRAY,
              struct.pack("<IQ", GGUFValueType.FLOAT32, values.size)
              + values.astype("<f4").tobytes(), offset=flash.payload.base)


@pytest.mark.parametrize("change, needle", [
    (lambda f: f * 1.5, "each layer's sum to the 2 experts used per token"),
    (lambda f: np.where(np.arange(f.size) == 3, np.nan, f), "non-finite value"),
    (lambda f: np.where(np.arange(f.size) == 0, -f[0], f), r"each value must be in \[0, 1\]"),
])
def test_bad_routing_frequencies_are_refused(tiny_models, folder, tmp_path, change, needle):
    good = convert_calibrated(tiny_models(moe_spec("qwen3moe")),
                              folder / "two.calibrated.flash.gguf")
    bad = copy_to(good, tmp_path)
    freq = open_any_flash_file(bad).frequency
    assert freq is not None
    _patch_frequency(bad, change(freq.reshape(-1)))
    with pytest.raises(FormatError, match=needle):
        open_any_flash_file(bad)


def test_bad_pinned_share_is_refused(tiny_models, folder, tmp_path):
    good = convert_calibrated(tiny_models(moe_spec("qwen3moe")),
                              folder / "two.calibrated.flash.gguf")
    bad = copy_to(good, tmp_path)
    patch_key(bad, C.KEY_MOE_PINNED_SHARE, GGUFValueType.FLOAT32, struct.pack("<f", 1.5),
              offset=open_any_flash_file(bad).payload.base)
    with pytest.raises(FormatError, match="must be a share in"):
        open_any_flash_file(bad)


def test_routing_frequencies_without_their_calibration_keys_are_refused(tiny_models, folder,
                                                                        tmp_path):
    good = convert_calibrated(tiny_models(moe_spec("qwen3moe")),
                              folder / "two.calibrated.flash.gguf")
    bad = copy_to(good, tmp_path)
    key = C.KEY_CALIBRATION_TOKENS.encode()
    rename_in_payload(bad, key, key.replace(b"tokens", b"tokenz"))  # no longer found
    with pytest.raises(FormatError, match=f"{C.KEY_MOE_FREQUENCY}' without"):
        open_any_flash_file(bad)


def test_next_layer_guess_and_prefetch_change_no_result(tiny_models, folder):
    """Prefetching the guessed next-layer experts (read between the calls, taken into slots
    when the layer routes to them) leaves every logit as the resident run's, with either
    read engine; what it read is accounted: the misses plus the guesses."""
    path = convert(tiny_models(moe_spec("qwen3moe", n_layer=3)), folder)
    expert = open_any_flash_file(path).expert_nbytes
    resident, _ = flash_logits(path, True)
    for io in ("threads", "io_uring"):
        streamed, stats = flash_logits(path, True, flash_dram_budget=5 * expert, flash_io=io,
                                       flash_expert_prefetch=True)
        np.testing.assert_array_equal(streamed, resident)
        decode_guesses = (3 - 1) * 2 * (len(TOKENS))  # every token is a decode call here
        assert stats["next_predicted"] == decode_guesses
        assert 0 < stats["next_right"] <= decode_guesses
        assert 0 < stats["prefetch_used"] <= stats["prefetch_reads"] \
            == stats["next_missed_predicted"]
        assert stats["bytes_read"] == (stats["expert_misses"] + stats["prefetch_reads"]) * expert


def test_prefetch_is_refused_where_it_cannot_apply(tiny_models, folder):
    dense = folder / "dense.flash.gguf"
    if not dense.exists():
        convert_gguf(tiny_models(TinyModel()), dense,
                     ConvertOptions(progress=False, predictor=None, log=lambda _m: None))
    with pytest.raises(OptionError, match="flash_expert_prefetch is for mixtures of experts"):
        Llama(model_path=str(dense), flash_offload=True, flash_expert_prefetch=True,
              verbose=False)
    # all experts resident: nothing to prefetch, the option is a no-op
    path = convert(tiny_models(moe_spec("qwen3moe")), folder)
    _, stats = flash_logits(path, True, flash_expert_prefetch=True)
    assert stats["mode"] == "dense" and stats["prefetch_reads"] == 0
