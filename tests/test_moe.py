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
from gguf_patch import copy_to, patch_key, set_flash_version
from model_factory import TinyModel
from test_hook import graph_node_names

from flashgguf import Llama
from flashgguf.archs import ARCHS, get_arch
from flashgguf.convert.gguf_source import ConvertOptions, convert_gguf
from flashgguf.errors import (
    FlashGGUFError,
    FormatError,
    OptionError,
    UnsupportedError,
)
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


def test_clock_simulation_matches_the_burst_example():
    from flashgguf.profile.experts import clock_hits, lru_hits, opt_hits

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
