"""Flash GGUF v1: round trip through the converter, and every validation failure."""

from __future__ import annotations

import dataclasses
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flash_helpers import convert
from gguf import GGMLQuantizationType, GGUFValueType
from gguf import quants as gq
from gguf_patch import copy_to, patch_key, patch_u64_key, rename_in_payload, set_flash_version
from model_factory import TinyModel

from flashgguf.archs import get_arch
from flashgguf.convert import ConvertOptions, convert_gguf
from flashgguf.errors import (
    ConvertError,
    FlashGGUFError,
    FormatError,
    NotFlashGGUFError,
    UnsupportedError,
    VersionError,
)
from flashgguf.format import constants as C
from flashgguf.format import is_flash_gguf, open_flash_file, open_gguf, tensor_array

Q = GGMLQuantizationType
QUIET = ConvertOptions(progress=False, log=lambda _m: None)


@pytest.fixture(scope="module")
def tiny_flash(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    src = tiny_models(TinyModel(ffn_type=Q.Q4_1))
    out = tmp_path_factory.mktemp("flash") / "tiny.flash.gguf"
    return src, convert(src, out)


# One model of each architecture for the round trip (the validation tests use tiny_flash).
ARCH_SPECS = [TinyModel(ffn_type=Q.Q4_1),
              TinyModel(arch="gemma3", ffn_type=Q.Q4_1, head_dim=32)]
ARCH_IDS = ["llama", "gemma3"]


@pytest.fixture(scope="module", params=ARCH_SPECS, ids=ARCH_IDS)
def arch_flash(request, tiny_models, tmp_path_factory) -> tuple[TinyModel, Path, Path]:
    spec = request.param
    src = tiny_models(spec)
    return spec, src, convert(src, tmp_path_factory.mktemp("flash") / "arch.flash.gguf")


def test_round_trip_bundles_match_source(arch_flash):
    spec, src, out = arch_flash
    ff = open_flash_file(out)
    assert (ff.arch, ff.n_layer, ff.n_embd, ff.n_ff) == (spec.arch, 2, spec.n_embd, spec.n_ff)
    assert ff.activation == get_arch(spec.arch).activation and ff.gated
    assert ff.layout.parts == ("gate", "up", "down")
    assert ff.layout.types == (Q.Q4_1, Q.Q4_1, Q.Q8_0)
    assert ff.layout.stride % C.DEFAULT_BUNDLE_ALIGN == 0
    assert ff.payload.base % C.PAYLOAD_ALIGNMENT == 0
    stream, buf = open_gguf(src)
    tensors = {name: tensor_array(buf, t) for name, t in stream.tensors.items()}
    raw = np.fromfile(out, dtype=np.uint8)
    for layer in ff.layers:
        bid = layer.index
        assert layer.bundle.offset % C.PAYLOAD_ALIGNMENT == 0
        rows = raw[layer.bundle.offset:layer.bundle.offset + layer.bundle.nbytes]
        rows = rows.reshape(ff.n_ff, ff.layout.stride)
        for part in ("gate", "up"):
            ptype, off = ff.layout.part(part)
            src_rows = tensors[f"blk.{bid}.ffn_{part}.weight"]
            width = src_rows.shape[1]
            # copied byte for byte, in the stored neuron order
            np.testing.assert_array_equal(rows[:, off:off + width], src_rows[layer.order])
        dtype, off = ff.layout.part("down")
        down = gq.dequantize(tensors[f"blk.{bid}.ffn_down.weight"], Q.Q4_1)
        cols = gq.dequantize(np.ascontiguousarray(rows[:, off:off + 34 * ff.n_embd // 32]), dtype)
        err = np.linalg.norm(cols - down.T[layer.order]) / np.linalg.norm(down)
        assert err < 0.01
    # the trunk keeps every non-FFN tensor byte for byte, and a dummy zero FFN
    trunk = open_flash_file(out).trunk
    for name, data in tensors.items():
        t = trunk.tensors[name]
        if ".ffn_gate." in name or ".ffn_up." in name or ".ffn_down." in name:
            assert t.ggml_type == Q.F32
            assert C.DUMMY_FFN_WIDTH in t.shape
            assert not np.any(tensor_array(memoryview(raw), t))
        else:
            assert t.ggml_type == stream.tensors[name].ggml_type
            np.testing.assert_array_equal(tensor_array(memoryview(raw), t), data)


def test_trunk_keeps_keys_and_renames_architecture(arch_flash):
    spec, src, out = arch_flash
    a = spec.arch
    s = open_gguf(src)[0].fields
    t = open_flash_file(out).trunk.fields
    assert t["general.architecture"] == C.TRUNK_ARCH
    assert t[C.KEY_ARCH] == a
    assert t[C.KEY_VERSION] == C.FORMAT_VERSION
    assert t[f"{a}.feed_forward_length"] == C.DUMMY_FFN_WIDTH
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.token_type", f"{a}.embedding_length",
                f"{a}.attention.head_count_kv"):
        if isinstance(s[key], np.ndarray):
            assert np.array_equal(t[key], s[key])
        else:
            assert t[key] == s[key]
    assert set(s) <= set(t)


def test_is_flash_gguf(tiny_flash):
    src, out = tiny_flash
    assert is_flash_gguf(out)
    assert not is_flash_gguf(src)
    with pytest.raises(NotFlashGGUFError, match="flashgguf-convert"):
        open_flash_file(src)


@pytest.mark.parametrize("bundle_type", ["f16", "q8_0", "q4_0", "q4_1"])
def test_bundle_types(tiny_models, tmp_path, bundle_type):
    src = tiny_models(TinyModel(ffn_type=Q.Q8_0))
    ff = open_flash_file(convert(src, tmp_path / "x.flash.gguf", bundle_type=bundle_type,
                                 down_type=bundle_type))
    assert ff.layout.types == (C.BUNDLE_TYPES[bundle_type],) * 3


# ---- validation failures: each names the problem ------------------------------------

def test_truncated_file(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size - 5000)
    with pytest.raises(FormatError, match="past the end"):
        open_flash_file(bad)


def test_truncated_in_trunk_header(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    with open(bad, "r+b") as f:
        f.truncate(3000)
    with pytest.raises(FormatError, match="ends at byte 3000"):
        open_flash_file(bad)


def test_payload_offset_past_end(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    patch_u64_key(bad, C.KEY_PAYLOAD_OFFSET, 1 << 40)
    with pytest.raises(FormatError, match="payload .* runs past the end"):
        open_flash_file(bad)


def test_payload_offset_unaligned(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    ff = open_flash_file(bad)
    patch_u64_key(bad, C.KEY_PAYLOAD_OFFSET, ff.payload.base + 8)
    with pytest.raises(FormatError, match="not 4096-aligned"):
        open_flash_file(bad)


def test_wrong_version(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    patch_key(bad, C.KEY_VERSION, GGUFValueType.UINT32, struct.pack("<I", 7))
    with pytest.raises(VersionError, match="version 7.*reads versions 1, 2, 3, 4, 5, 6"):
        open_flash_file(bad)


def test_missing_bundle_tensor(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    rename_in_payload(bad, b"blk.1.ffn_bundle", b"blk.1.ffn_bundlX")
    with pytest.raises(FormatError, match="'blk.1.ffn_bundle' is missing"):
        open_flash_file(bad)


def test_shape_mismatch(tiny_flash, tmp_path):
    bad = copy_to(tiny_flash[1], tmp_path)
    base = open_flash_file(bad).payload.base
    data = bytearray(bad.read_bytes())
    key = C.KEY_FEED_FORWARD_LENGTH.encode()
    pos = data.find(key, base) + len(key) + 4
    data[pos:pos + 4] = struct.pack("<I", TinyModel().n_ff + 32)
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="'blk.0.ffn_bundle' is I8 .* expected I8"):
        open_flash_file(bad)


def test_unknown_array_item_type(pred_flash, tmp_path):
    """Fuzzing regression (tests/fuzz_flash.py, seed 2, case 30): an array key whose item
    type is no GGUF type was a raw ValueError, read before the value was checked."""
    bad = copy_to(pred_flash[0], tmp_path)
    base = open_flash_file(bad).payload.base
    patch_key(bad, C.KEY_PREDICTOR_RECALL, GGUFValueType.ARRAY, struct.pack("<I", 518),
              offset=base)
    with pytest.raises(FormatError, match="unknown value type 518"):
        open_flash_file(bad)


def test_token_text_llama_cpp_would_read_twice(tiny_flash, tmp_path):
    """Fuzzing regression (tests/fuzz_flash.py, seed 20261201, cases 966, 3493, 8034, 9862):
    a token whose text continues after a NUL is, for llama.cpp, the text before it; when
    that is another token's text, llama.cpp's GGML_ASSERT aborted the process."""
    bad = copy_to(tiny_flash[1], tmp_path)
    tokens = open_flash_file(bad).trunk.get("tokenizer.ggml.tokens")
    index = {t: i for i, t in enumerate(tokens)}
    i, token = next((i, t) for i, t in enumerate(tokens) if len(t) >= 2 and t[0] in index)
    raw = token.encode()
    data = bytearray(bad.read_bytes())
    at = data.find(struct.pack("<Q", len(raw)) + raw) + 8
    first = len(token[0].encode())
    data[at + first:at + len(raw)] = bytes(len(raw) - first)
    bad.write_bytes(bytes(data))
    low, high = sorted((index[token[0]], i))
    with pytest.raises(FormatError, match=f"twice \\(ids {low} and {high}"):
        open_flash_file(bad)


def test_bad_magic(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(FormatError, match="bad magic"):
        open_flash_file(bad)


def test_errors_are_flashgguf_errors():
    for cls in (FormatError, VersionError, NotFlashGGUFError, ConvertError, UnsupportedError):
        assert issubclass(cls, FlashGGUFError)


# ---- converter errors leave no output behind ----------------------------------------

def _no_leftovers(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_convert_refuses_non_gguf(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ConvertError, match="not a GGUF"):
        convert(src, tmp_path / "out.flash.gguf")
    assert not (tmp_path / "out.flash.gguf").exists()
    _no_leftovers(tmp_path)


def test_convert_refuses_existing_output(tiny_flash, tmp_path):
    out = tmp_path / "exists.flash.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="--force"):
        convert(tiny_flash[0], out)
    assert out.read_bytes() == b"keep me"
    convert(tiny_flash[0], out, force=True)
    assert is_flash_gguf(out)
    _no_leftovers(tmp_path)


def test_convert_refuses_unsupported_arch(tiny_models, tmp_path):
    src = tiny_models(TinyModel())
    bad = tmp_path / "other.gguf"
    data = bytearray(src.read_bytes())
    pos = data.find(b"llama")  # general.architecture's value is the first "llama"
    data[pos:pos + 5] = b"llamX"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match="'llamX' is not supported .*llama"):
        convert(bad, tmp_path / "out.flash.gguf")
    assert not (tmp_path / "out.flash.gguf").exists()
    _no_leftovers(tmp_path)


def test_convert_failure_midway_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from flashgguf.convert import gguf_source

    def boom(*_a, **_k):
        raise ConvertError("simulated failure while bundling")

    monkeypatch.setattr(gguf_source, "build_layer_bundle", boom)
    with pytest.raises(ConvertError, match="simulated"):
        convert(tiny_models(TinyModel()), tmp_path / "out.flash.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_errors(tmp_path, capsys):
    from flashgguf.convert.cli import main

    assert main([str(tmp_path / "missing.gguf"), "-q"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_sigterm_midway_leaves_nothing(tiny_models, tmp_path):
    """SIGTERM (a service manager, `kill`, a container stopping) while the converter has its
    partial output and its calibration scratch files open: exit 143, nothing left behind."""
    out = tmp_path / "out"
    out.mkdir()
    code = "\n".join([
        "import sys, time",
        "from flashgguf.convert import gguf_source",
        "from flashgguf.convert.cli import main",
        "real = gguf_source.build_layer_bundle",
        "def slow(*a, **k):",
        "    print('bundling', flush=True)",
        "    time.sleep(120)",
        "    return real(*a, **k)",
        "gguf_source.build_layer_bundle = slow",
        f"sys.exit(main([{str(tiny_models(TinyModel()))!r}, '-o', "
        f"{str(out / 'm.flash.gguf')!r}, '--calibrate', '-q']))",
    ])
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "bundling", process.stderr.read()
        assert any(out.iterdir())  # the partial output exists while it converts
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM and "interrupted" in err
    assert list(out.iterdir()) == []


def test_cli_full_disk_is_a_clear_error_and_leaves_nothing(tiny_models, tmp_path):
    """A disk that fills mid-conversion (here a file-size limit, EFBIG: no root needed)."""
    out = tmp_path / "out"
    out.mkdir()
    code = "\n".join([
        "import resource, signal, sys",
        "from flashgguf.convert.cli import main",
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))",
        f"sys.exit(main([{str(tiny_models(TinyModel()))!r}, '-o', "
        f"{str(out / 'm.flash.gguf')!r}, '-q']))",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"error: writing {out / 'm.flash.gguf'}" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(out.iterdir()) == []


# ---- the activity predictor ----------------------------------------------------------

@pytest.fixture(scope="module")
def pred_flash(tiny_models, tmp_path_factory):
    src = tiny_models(TinyModel(ffn_type=Q.Q4_1))
    out = tmp_path_factory.mktemp("pred") / "tiny.flash.gguf"
    report = convert_gguf(src, out, QUIET)
    return out, report


def test_predictor_round_trip(pred_flash):
    out, report = pred_flash
    ff = open_flash_file(out)
    assert ff.predictor_kind == C.PREDICTOR_WEIGHT_SVD
    assert ff.predictor_keep == pytest.approx(C.DEFAULT_PREDICTOR_KEEP)
    spec = TinyModel()
    for layer, fitted in zip(ff.layers, report.predictor, strict=True):
        got, want = layer.predictor, fitted.predictor
        assert got is not None and got.rank == want.rank and got.rank % 32 == 0
        assert got.a.shape == (got.rank, spec.n_embd // 32 * 34)
        assert got.b.shape == got.b_up.shape == (spec.n_ff, got.rank // 32 * 34)
        for name in ("a", "b", "b_up", "scale"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        # weight-only: no residuals (random inputs say nothing of real ones): the plain score
        assert got.sigma_g is None and got.sigma_u is None
        assert got.threshold == np.float32(want.threshold)
        assert layer.predictor_recall == pytest.approx(fitted.recall, abs=1e-6)
        assert layer.predictor_density == pytest.approx(fitted.density, abs=1e-6)


def test_no_predictor(tiny_models, tmp_path):
    ff = open_flash_file(convert(tiny_models(TinyModel()), tmp_path / "x.flash.gguf",
                                 predictor=None))
    assert ff.predictor_kind is None
    assert all(layer.predictor is None for layer in ff.layers)


def _value_offset(path: Path, key: str, item_type: GGUFValueType | None = None) -> int:
    """Offset of a payload key's value (of an array's first item when item_type is given)."""
    data = path.read_bytes()
    vtype = GGUFValueType.ARRAY if item_type is not None else GGUFValueType.FLOAT32
    pattern = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype)
    if item_type is not None:
        pattern += struct.pack("<I", item_type)
    pos = data.find(pattern)
    assert pos > 0 and data.find(pattern, pos + 1) < 0
    return pos + len(pattern) + (8 if item_type is not None else 0)  # skip an array's count


def _poke(path: Path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def _tensor_offset(path: Path, name: str) -> int:
    return open_flash_file(path).payload.tensors[name].offset


@pytest.fixture(scope="module")
def cal_flash(tiny_models, tmp_path_factory):
    from flashgguf.calibrate.collect import CalibrationOptions

    out = tmp_path_factory.mktemp("cal") / "tiny.flash.gguf"
    calibration = CalibrationOptions(tokens=640, min_tokens=500, window_tokens=128, n_threads=1)
    report = convert_gguf(tiny_models(TinyModel(ffn_type=Q.Q4_1)), out,
                          dataclasses.replace(QUIET, calibration=calibration))
    return out, report


@pytest.mark.native
def test_calibrated_predictor_stores_its_residuals(cal_flash):
    out, report = cal_flash
    for layer, fitted in zip(open_flash_file(out).layers, report.predictor, strict=True):
        got, want = layer.predictor, fitted.predictor
        # SiLU, real inputs: the fit's residual RMS per neuron, so the score is the expected one
        assert got.sigma_g is not None and np.all(got.sigma_g > 0)
        assert got.sigma_u is not None and np.all(got.sigma_u > 0)
        np.testing.assert_array_equal(got.sigma_g, want.sigma_g)
        np.testing.assert_array_equal(got.sigma_u, want.sigma_u)


@pytest.mark.native
@pytest.mark.parametrize("case, match", [
    ("sigma_negative", "'blk.1.pred_sigma_g' has a negative or non-finite value"),
    ("sigma_u_alone", "'blk.0.pred_sigma_u' without 'blk.0.pred_sigma_g'"),
    ("sigma_in_v1", "tensor 'blk.0.pred_sigma_g' in a version 1 file"),
])
def test_malformed_residuals(cal_flash, tmp_path, case, match):
    bad = copy_to(cal_flash[0], tmp_path)
    if case == "sigma_negative":
        _poke(bad, _tensor_offset(bad, "blk.1.pred_sigma_g") + 4, struct.pack("<f", -1.0))
    elif case == "sigma_u_alone":
        n = struct.pack("<Q", len("blk.0.pred_sigma_g"))
        rename_in_payload(bad, n + b"blk.0.pred_sigma_g", n + b"blk.0.pred_sigma_X")
    elif case == "sigma_in_v1":
        set_flash_version(bad, 1)
    with pytest.raises(FormatError, match=match):
        open_flash_file(bad)


@pytest.mark.parametrize("case, match", [
    ("kind", "unknown predictor kind 'weight-xyz'"),
    ("keep", "'flashgguf.predictor.keep' is 1.5, not in"),
    ("rank_odd", "predictor rank 48 of layer 0 is not a positive multiple of 32"),
    ("rank_shape", r"'blk.0.pred_a' is Q8_0 \[64, 32\], expected Q8_0 \[64, 64\]"),
    ("threshold_nan", "'flashgguf.predictor.threshold' has a non-finite value at layer 1"),
    ("recall_range", "'flashgguf.predictor.recall' has a value outside"),
    ("missing_b", "'blk.1.pred_b' is missing"),
    ("stray", "tensor 'blk.0.pred_a' but no key 'flashgguf.predictor.kind'"),
    ("scale_nan", "'blk.1.pred_scale' has a negative or non-finite value"),
    ("q8_scale_inf", "'blk.0.pred_a' has a non-finite Q8_0 block scale"),
])
def test_malformed_predictor(pred_flash, tmp_path, case, match):
    bad = copy_to(pred_flash[0], tmp_path)
    if case == "kind":
        rename_in_payload(bad, b"weight-svd", b"weight-xyz")
    elif case == "keep":
        _poke(bad, _value_offset(bad, C.KEY_PREDICTOR_KEEP), struct.pack("<f", 1.5))
    elif case in ("rank_odd", "rank_shape"):
        _poke(bad, _value_offset(bad, C.KEY_PREDICTOR_RANK, GGUFValueType.UINT32),
              struct.pack("<I", 48 if case == "rank_odd" else 64))
    elif case == "threshold_nan":
        off = _value_offset(bad, C.KEY_PREDICTOR_THRESHOLD, GGUFValueType.FLOAT32)
        _poke(bad, off + 4, struct.pack("<f", float("nan")))
    elif case == "recall_range":
        off = _value_offset(bad, C.KEY_PREDICTOR_RECALL, GGUFValueType.FLOAT32)
        _poke(bad, off, struct.pack("<f", 1.25))
    elif case == "missing_b":
        n = struct.pack("<Q", 12)  # the name's length prefix tells pred_b from pred_b_up
        rename_in_payload(bad, n + b"blk.1.pred_b", n + b"blk.1.pred_X")
    elif case == "stray":
        rename_in_payload(bad, C.KEY_PREDICTOR_KIND.encode(), b"flashgguf.predictor.kinX")
    elif case == "scale_nan":
        _poke(bad, _tensor_offset(bad, "blk.1.pred_scale") + 8, struct.pack("<f", float("nan")))
    elif case == "q8_scale_inf":
        _poke(bad, _tensor_offset(bad, "blk.0.pred_a") + 34, np.float16(np.inf).tobytes())
    with pytest.raises(FormatError, match=match):
        open_flash_file(bad)


def test_threshold_curves_round_trip(pred_flash):
    out, report = pred_flash
    for layer, fitted in zip(open_flash_file(out).layers, report.predictor, strict=True):
        got, want = layer.predictor_curve, fitted.curve
        assert got is not None and want is not None
        np.testing.assert_array_equal(got.recall_targets,
                                      np.asarray(C.PREDICTOR_CURVE_RECALLS, np.float32))
        for name in ("threshold", "density", "error"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("case, match", [
    ("targets_order", "must be recall targets in \\(0, 1\\], ascending"),
    ("threshold_rises", "thresholds must be >= 0 and not rise"),
    ("density_range", "densities must be in \\[0, 1\\]"),
    ("missing_key", "'flashgguf.predictor.curve.recall' without "
                    "'flashgguf.predictor.curve.error'"),
])
def test_malformed_threshold_curves(pred_flash, tmp_path, case, match):
    bad = copy_to(pred_flash[0], tmp_path)
    f32 = GGUFValueType.FLOAT32
    if case == "targets_order":
        _poke(bad, _value_offset(bad, C.KEY_PREDICTOR_CURVE_RECALL, f32) + 4,
              struct.pack("<f", 0.1))
    elif case == "threshold_rises":
        _poke(bad, _value_offset(bad, C.KEY_PREDICTOR_CURVE_THRESHOLD, f32) + 8,
              struct.pack("<f", 1e30))
    elif case == "density_range":
        _poke(bad, _value_offset(bad, C.KEY_PREDICTOR_CURVE_DENSITY, f32), struct.pack("<f", 2.0))
    elif case == "missing_key":
        rename_in_payload(bad, C.KEY_PREDICTOR_CURVE_ERROR.encode(),
                           b"flashgguf.predictor.curve.errox")
    with pytest.raises(FormatError, match=match):
        open_flash_file(bad)


@pytest.mark.native
def test_report_stores_expected_bytes_read_per_token(tiny_models, tmp_path):
    from flashgguf.options import FlashOptions
    from flashgguf.runtime import Runtime

    logs: list[str] = []
    out = tmp_path / "wide.flash.gguf"
    report = convert_gguf(tiny_models(TinyModel(n_ff=1024)), out,
                          dataclasses.replace(QUIET, log=logs.append))
    ff = open_flash_file(out)
    assert ff.payload.get(C.KEY_PREDICTOR_EXPECTED_BUDGET) == pytest.approx(C.REPORT_BUDGET_SHARE)
    stored = ff.payload.get(C.KEY_PREDICTOR_EXPECTED_READ)
    assert stored.shape == (ff.n_layer,)
    runtime = Runtime(ff, get_arch(ff.arch), FlashOptions(
        mode="predicted", dram_budget=int(C.REPORT_BUDGET_SHARE * ff.payload_nbytes)),
        load=False)
    plan = runtime.plan()
    runtime.close()
    for (capacity, pinned), fitted, got in zip(plan, report.predictor, stored, strict=True):
        assert 0 < pinned < capacity < ff.n_ff
        # the unpinned rows' predicted-active shares, times the bytes of a row
        want = float(fitted.active_freq[pinned:].sum()) * ff.layout.stride
        assert 0 < got < (ff.n_ff - pinned) * ff.layout.stride
        assert got == pytest.approx(want, rel=1e-6)
    assert any(f"{stored.sum() / 2**20:.2f} MiB before window-cache hits" in line
               for line in logs)


def test_report_counts_every_predicted_row_when_the_budget_holds_only_predictors(pred_flash):
    # the narrow test model's predictors take most of half its payload: few or no slots,
    # so nearly every predicted row is read (the runtime computes misses without slots)
    flash = open_flash_file(pred_flash[0])
    stored = flash.payload.get(C.KEY_PREDICTOR_EXPECTED_READ)
    assert np.all(np.isfinite(stored)) and np.all(stored > 0)
    for got, layer in zip(stored, flash.layers, strict=True):
        assert got <= flash.n_ff * layer.layout.stride
