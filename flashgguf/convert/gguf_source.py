"""Convert a GGUF model into a flash GGUF."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..archs import ArchSpec, get_arch
from ..calibrate.collect import CalibrationOptions, FFNInputs, collect_ffn_inputs
from ..calibrate.text import read_calibration_text
from ..errors import BudgetError, ConvertError, FormatError, UnsupportedError
from ..format import (
    BundleLayout,
    GGUFStream,
    TensorInfo,
    atomic_output,
    open_flash_file,
    open_gguf,
    release_pages,
    scratch_file,
    tensor_array,
)
from ..format import constants as C
from ..format.output import GGUFFileWriter, patch_key, patch_u64_key
from ..options import DEFAULT_PINNED_SHARE
from ..runtime import Runtime, RuntimeOptions
from .blas import single_threaded_blas
from .bundle import (
    LayerBundle,
    SourceMatrix,
    build_layer_bundle,
    choose_down_type,
    choose_part_type,
    make_layout,
)
from .predictor_fit import FittedLayer, PredictorOptions, fit_layer_predictor

Q8_0 = GGMLQuantizationType.Q8_0

# Keys the trunk does not copy from the source: the writer adds its own.
_SKIPPED_KEYS = ("GGUF.", C.KEY_ARCHITECTURE, C.KEY_ALIGNMENT)


@dataclass
class ConvertOptions:
    # gate/up parts: "auto" keeps the source's rows where their type is supported
    bundle_type: str = C.AUTO_TYPE
    # down columns (always re-quantized): "auto" matches the source's bits per weight
    down_type: str = C.DEFAULT_DOWN_TYPE
    bundle_align: int = C.DEFAULT_BUNDLE_ALIGN
    # The FFN activation to store instead of the architecture's (a checkpoint fine-tuned with
    # ReLU in a SiLU architecture: llama.cpp's graph would apply SiLU, flashgguf applies this).
    activation: str | None = None
    activation_threshold: float = 0.0  # fatrelu's threshold
    source_name: str | None = None  # recorded as the payload's source (default: the file name)
    # The weight-only activity predictor (predictor_fit.py); None stores no predictor.
    predictor: PredictorOptions | None = field(default_factory=PredictorOptions)
    # Calibrate the predictor on real FFN inputs collected by running the source model in
    # llama.cpp (and order neurons hot-first unless calibration.hot_first is off); None:
    # weight-only.
    calibration: CalibrationOptions | None = None
    force: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=print)


@dataclass(frozen=True)
class ConvertReport:
    output: Path
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    layouts: tuple[BundleLayout, ...]  # per layer
    trunk_nbytes: int
    payload_nbytes: int
    down_rel_error_max: float
    predictor: tuple[FittedLayer, ...] | None = None
    seconds: float = 0.0
    source_ffn_nbytes: int = 0  # the source's FFN tensors (weights and biases)

    @property
    def bundle_nbytes(self) -> int:
        """Bytes of bundle rows: what the payload holds besides order, biases, predictors."""
        return sum(self.n_ff * layout.stride for layout in self.layouts)


@dataclass(frozen=True)
class _Source:
    stream: GGUFStream
    buf: memoryview

    def data(self, t: TensorInfo) -> np.ndarray:
        return tensor_array(self.buf, t)

    def release(self, *tensors: TensorInfo | None) -> None:
        """Done with these tensors: drop their mapped pages from resident memory, so that a
        conversion's footprint follows the layer it works on, not the file it has read."""
        for t in tensors:
            if t is not None:
                release_pages(self.buf.obj, t.offset, t.nbytes)


def _open_source(src: Path) -> _Source:
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConvertError(f"cannot read {src}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ConvertError(f"{src} is not a GGUF file (magic {magic!r})")
    return _Source(*open_gguf(src))


def _scalar_int(stream: GGUFStream, key: str) -> int:
    value = stream.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnsupportedError(f"key {key!r} is {value!r}; a single integer is needed "
                               "(per-layer FFN widths are not supported)")
    return value


def _source_matrix(source: _Source, name: str, n_embd: int, n_ff: int,
                   down: bool) -> SourceMatrix:
    t = source.stream.tensors.get(name)
    if t is None:
        raise FormatError(f"source tensor {name!r} is missing")
    want = (n_ff, n_embd) if down else (n_embd, n_ff)  # ggml order
    if t.shape != want:
        raise FormatError(f"source tensor {name!r} has shape {list(t.shape)}, "
                          f"expected {list(want)}")
    return SourceMatrix(source.data(t), t.ggml_type, n_ff if down else n_embd)


def _part_sources(spec: ArchSpec) -> tuple[tuple[str, str], ...]:
    """(bundle part, source tensor name template) of each part the architecture's FFN has."""
    parts = ((C.PART_GATE, spec.ffn_gate), (C.PART_UP, spec.ffn_up), (C.PART_DOWN, spec.ffn_down))
    return parts if spec.gated else parts[1:]


def _layer_layout(tensors: dict[str, TensorInfo], spec: ArchSpec, bid: int, n_embd: int,
                  opts: ConvertOptions) -> BundleLayout:
    """Layer bid's bundle layout: each part's type from its source tensor's (choose_part_type);
    K-quant mixes differ by layer (Q4_K_M keeps some layers' down tensors in Q6_K)."""
    types = {}
    for part, template in _part_sources(spec):
        requested = opts.down_type if part == C.PART_DOWN else opts.bundle_type
        t = tensors.get(template.format(bid=bid))
        if t is None:
            raise FormatError(f"source tensor {template.format(bid=bid)!r} is missing")
        choose = choose_down_type if part == C.PART_DOWN else choose_part_type
        types[part] = choose(t.ggml_type, n_embd, requested)
    return make_layout(n_embd, spec.gated, types, opts.bundle_align)


def _describe_layouts(tensors: dict[str, TensorInfo], spec: ArchSpec,
                      layouts: list[BundleLayout]) -> str:
    """One line per distinct layout: its parts, which source types they came from, whether
    gate/up rows are the source's bytes, its stride and the layers that use it."""
    groups: dict[tuple, list[int]] = {}
    for bid, layout in enumerate(layouts):
        sources = tuple(tensors[template.format(bid=bid)].ggml_type
                        for _part, template in _part_sources(spec))
        groups.setdefault((layout, sources), []).append(bid)
    lines = []
    for (layout, sources), bids in groups.items():
        parts = []
        for part, t, src_t in zip(layout.parts, layout.types, sources, strict=True):
            if part == C.PART_DOWN:
                how = "columns re-quantized" + ("" if t == src_t else f" from {src_t.name}")
            else:
                how = "rows copied" if t == src_t else f"rows re-quantized from {src_t.name}"
            parts.append(f"{part} {t.name} ({how})")
        lines.append(f"  layers {_ranges(bids)}: {', '.join(parts)}; stride {layout.stride} B")
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    out, start = [], values[0]
    for prev, cur in zip(values, [*values[1:], None], strict=True):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                 opts: ConvertOptions | None = None) -> ConvertReport:
    opts = opts or ConvertOptions()
    src = Path(src)
    out = Path(out) if out is not None else src.with_name(src.name.removesuffix(".gguf")
                                                          + ".flash.gguf")
    if opts.bundle_align <= 0 or opts.bundle_align & (opts.bundle_align - 1):
        raise ConvertError(f"--bundle-align {opts.bundle_align} is not a power of two")
    if out.exists() and not opts.force:
        raise ConvertError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == src.resolve():
        raise ConvertError("the output would overwrite the input")
    if opts.predictor is not None:
        opts.predictor.check()
    if opts.calibration is not None:
        if opts.predictor is None:
            raise ConvertError("calibration fits the predictor: it cannot go with --no-predictor")
        opts.calibration.check()
        calibration_text = read_calibration_text(opts.calibration.text)
    t_start = time.perf_counter()

    source = _open_source(src)
    stream = source.stream
    arch_name = stream.get(C.KEY_ARCHITECTURE)
    if arch_name == C.TRUNK_ARCH:
        raise ConvertError(f"{src} is already a flash GGUF")
    spec = get_arch(str(arch_name))
    if opts.activation is not None:
        if opts.activation not in C.ACTIVATIONS:
            raise UnsupportedError(f"activation {opts.activation!r} is not one of {C.ACTIVATIONS}")
        if opts.activation == "drelu" and not spec.gated:
            raise UnsupportedError(f"activation drelu needs a gated FFN; {spec.name}'s is not")
        spec = dataclasses.replace(spec, activation=opts.activation)
    if not np.isfinite(opts.activation_threshold):
        raise ConvertError(f"activation threshold {opts.activation_threshold} is not finite")
    n_layer = _scalar_int(stream, f"{spec.name}.block_count")
    n_embd = _scalar_int(stream, f"{spec.name}.embedding_length")
    n_ff = _scalar_int(stream, f"{spec.name}.feed_forward_length")
    tensors = stream.tensors
    ffn_names = {n for bid in range(n_layer) for n in spec.ffn_tensor_names(bid)}
    layouts = [_layer_layout(tensors, spec, bid, n_embd, opts) for bid in range(n_layer)]
    opts.log(f"flashgguf-convert: {opts.source_name or src.name}: {spec.name}, {n_layer} layers, "
             f"n_embd {n_embd}, n_ff {n_ff}; bundles:\n"
             + _describe_layouts(tensors, spec, layouts))

    # the calibration's FFN inputs live in a scratch folder beside the output, only when asked
    calib_folder = contextlib.nullcontext(None) if opts.calibration is None else \
        tempfile.TemporaryDirectory(dir=out.parent, prefix=".flashgguf-calib-")
    with atomic_output(out) as final_tmp, scratch_file(out.parent, ".payload") as payload_tmp, \
            calib_folder as calib_dir:
        inputs = None
        if opts.calibration is not None:
            t0 = time.perf_counter()
            inputs = collect_ffn_inputs(src, spec, n_layer, n_embd, calibration_text,
                                        Path(calib_dir), opts.calibration)
            opts.log(f"flashgguf-convert: calibration: FFN inputs of {inputs.n_tokens} tokens "
                     f"collected from llama.cpp in {time.perf_counter() - t0:.1f} s")
        payload_nbytes, down_err, fitted = _write_payload(payload_tmp, source, spec, layouts,
                                                          n_layer, n_embd, n_ff, opts, src,
                                                          inputs)
        trunk_nbytes = _write_trunk(final_tmp, source, spec, ffn_names, n_embd)
        offset = -(-trunk_nbytes // C.PAYLOAD_ALIGNMENT) * C.PAYLOAD_ALIGNMENT
        with open(final_tmp, "r+b") as fout, open(payload_tmp, "rb") as fin:
            fout.seek(offset)
            shutil.copyfileobj(fin, fout, 1 << 24)
        patch_u64_key(final_tmp, C.KEY_PAYLOAD_OFFSET, offset)
        patch_u64_key(final_tmp, C.KEY_PAYLOAD_SIZE, payload_nbytes)
        if fitted is not None:
            expected = _expected_read_bytes(final_tmp, spec, fitted)
            patch_key(final_tmp, C.KEY_PREDICTOR_EXPECTED_READ, GGUFValueType.ARRAY,
                      struct.pack("<IQ", GGUFValueType.FLOAT32, len(expected))
                      + np.asarray(expected, np.float32).tobytes(), offset)
            _log_report(fitted, expected, inputs is not None, opts.log)
    report = ConvertReport(out, spec.name, n_layer, n_embd, n_ff, tuple(layouts), trunk_nbytes,
                           payload_nbytes, down_err, fitted, source_ffn_nbytes=sum(
                               tensors[n].nbytes for n in ffn_names if n in tensors))
    bundles = report.bundle_nbytes
    opts.log(f"flashgguf-convert: wrote {out} (trunk {trunk_nbytes / 2**20:.1f} MiB, payload "
             f"{payload_nbytes / 2**20:.1f} MiB: bundles {bundles / 2**20:.1f} MiB = "
             f"{bundles / max(report.source_ffn_nbytes, 1):.3f}x the source's FFN tensors); "
             f"down columns' max relative re-quantization error {down_err:.4f}")
    report = dataclasses.replace(report, seconds=time.perf_counter() - t_start)
    opts.log(f"flashgguf-convert: done in {report.seconds:.1f} s")
    return report


def _write_trunk(path: Path, source: _Source, spec: ArchSpec, ffn_names: set[str],
                 n_embd: int) -> int:
    stream = source.stream
    w = GGUFFileWriter(path, C.TRUNK_ARCH)
    # the payload location goes first, patched once the payload is written
    w.add_uint64(C.KEY_PAYLOAD_OFFSET, 0)
    w.add_uint64(C.KEY_PAYLOAD_SIZE, 0)
    w.add_uint32(C.KEY_VERSION, C.FORMAT_VERSION)
    w.add_string(C.KEY_ARCH, spec.name)
    if C.KEY_ALIGNMENT in stream.fields:
        w.add_custom_alignment(stream.alignment)
    for key, value in stream.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        if key == f"{spec.name}.feed_forward_length":
            value = C.DUMMY_FFN_WIDTH
        if isinstance(value, np.ndarray):
            value = value.tolist()
        w.add_key_value(key, value, stream.value_types[key], stream.array_types.get(key))

    dummy = C.DUMMY_FFN_WIDTH
    sources: list[tuple[TensorInfo | None, np.ndarray]] = []
    for t in stream.tensors.values():
        if t.name in ffn_names:
            # llama.cpp's own FFN: zero weights of the dummy width (computes nothing of value)
            shape = _dummy_shape(spec, t.name, n_embd, dummy)
            data = np.zeros(shape, dtype=np.float32)
            w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes)
        else:
            data = source.data(t)
            w.add_tensor_info(t.name, data.shape, data.dtype, t.nbytes, raw_dtype=t.ggml_type)
        sources.append((None if t.name in ffn_names else t, data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, data in sources:
        w.write_tensor_data(data)
        source.release(t)
    w.close()
    return path.stat().st_size


def _dummy_shape(spec: ArchSpec, name: str, n_embd: int, dummy: int) -> tuple[int, ...]:
    """numpy shape (reversed ggml order) of a dummy-width FFN tensor."""
    for template, shape in ((spec.ffn_gate, (dummy, n_embd)), (spec.ffn_up, (dummy, n_embd)),
                            (spec.ffn_down, (n_embd, dummy)), (spec.ffn_gate_bias, (dummy,)),
                            (spec.ffn_up_bias, (dummy,)), (spec.ffn_down_bias, (n_embd,))):
        if name.endswith(template.split("}", 1)[1]):
            return shape
    raise AssertionError(name)


def _write_payload(path: Path, source: _Source, spec: ArchSpec,
                   layouts: list[BundleLayout], n_layer: int, n_embd: int, n_ff: int,
                   opts: ConvertOptions, src: Path, inputs: FFNInputs | None
                   ) -> tuple[int, float, tuple[FittedLayer, ...] | None]:
    tensors = source.stream.tensors
    # Without calibration neurons keep their original order and have no measured frequency;
    # with it, each layer's rows go hottest first (unless hot_first is off) and store their
    # measured frequencies (the fitted order and frequencies).
    order = np.arange(n_ff, dtype=np.int32)
    freq = np.zeros(n_ff, dtype=np.float32)
    fitted = None
    if opts.predictor is not None:
        fitted = _fit_predictors(source, spec, n_layer, n_embd, n_ff,
                                 [n_ff * layout.stride for layout in layouts], order,
                                 opts.predictor, opts, inputs)
    w = GGUFFileWriter(path, C.PAYLOAD_ARCH)
    w.add_custom_alignment(C.PAYLOAD_ALIGNMENT)
    w.add_uint32(C.KEY_VERSION, C.FORMAT_VERSION)
    w.add_string(C.KEY_ARCH, spec.name)
    w.add_uint32(C.KEY_BLOCK_COUNT, n_layer)
    w.add_uint32(C.KEY_EMBEDDING_LENGTH, n_embd)
    w.add_uint32(C.KEY_FEED_FORWARD_LENGTH, n_ff)
    w.add_string(C.KEY_ACTIVATION, spec.activation)
    if spec.activation in C.THRESHOLD_ACTIVATIONS:
        w.add_float32(C.KEY_ACTIVATION_THRESHOLD, opts.activation_threshold)
    w.add_bool(C.KEY_GATED, spec.gated)
    # one layout for all layers as before version 3, else per layer (layer-major)
    uniform = all(la == layouts[0] for la in layouts)
    stored = layouts[:1] if uniform else layouts
    w.add_array(C.KEY_BUNDLE_PARTS, list(layouts[0].parts))
    w.add_key_value(C.KEY_BUNDLE_TYPES, [int(t) for la in stored for t in la.types],
                    GGUFValueType.ARRAY, GGUFValueType.UINT32)
    w.add_key_value(C.KEY_BUNDLE_OFFSETS, [o for la in stored for o in la.offsets],
                    GGUFValueType.ARRAY, GGUFValueType.UINT32)
    if uniform:
        w.add_uint32(C.KEY_BUNDLE_STRIDE, layouts[0].stride)
    else:
        w.add_key_value(C.KEY_BUNDLE_STRIDE, [la.stride for la in layouts],
                        GGUFValueType.ARRAY, GGUFValueType.UINT32)
    w.add_string(C.KEY_SOURCE_NAME, opts.source_name or src.name)
    w.add_string(C.KEY_SOURCE_SHA256, _sha256(src))
    # placeholder, patched below (a float32 needs no re-layout)
    w.add_float32(C.KEY_DOWN_REQUANT_ERROR, 0.0)
    if fitted is not None:
        assert opts.predictor is not None
        _add_predictor_keys(w, fitted, opts.predictor, inputs, opts.calibration)

    biases = {}
    for bid in range(n_layer):
        stride = layouts[bid].stride
        w.add_tensor_info(C.TENSOR_BUNDLE.format(bid=bid), (n_ff, stride), np.dtype(np.int8),
                          n_ff * stride)
        w.add_tensor_info(C.TENSOR_ORDER.format(bid=bid), (n_ff,), np.dtype(np.int32), n_ff * 4)
        w.add_tensor_info(C.TENSOR_FREQ.format(bid=bid), (n_ff,), np.dtype(np.float32), n_ff * 4)
        for src_t, dst_t, n in ((spec.ffn_up_bias, C.TENSOR_UP_BIAS, n_ff),
                                (spec.ffn_gate_bias, C.TENSOR_GATE_BIAS, n_ff),
                                (spec.ffn_down_bias, C.TENSOR_DOWN_BIAS, n_embd)):
            t = tensors.get(src_t.format(bid=bid))
            if t is None or (dst_t == C.TENSOR_GATE_BIAS and not spec.gated):
                continue
            data = np.asarray(source.data(t), dtype=np.float32).reshape(-1)
            if data.size != n:
                raise FormatError(f"bias {t.name!r} has {data.size} values, expected {n}")
            biases[(bid, dst_t)] = data
            w.add_tensor_info(dst_t.format(bid=bid), (n,), np.dtype(np.float32), n * 4)
        if fitted is not None:
            for name, data in _predictor_tensors(bid, fitted[bid]):
                w.add_tensor_info(name, data.shape, data.dtype, data.nbytes,
                                  raw_dtype=None if data.dtype == np.float32 else Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    down_err = 0.0
    layers = range(n_layer)
    if opts.progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="bundling FFN layers", unit="layer")
    for bid in layers:
        gate = _source_matrix(source, spec.ffn_gate.format(bid=bid), n_embd, n_ff, False) \
            if spec.gated else None
        up = _source_matrix(source, spec.ffn_up.format(bid=bid), n_embd, n_ff, False)
        down = _source_matrix(source, spec.ffn_down.format(bid=bid), n_embd, n_ff, True)
        if inputs is not None:
            assert fitted is not None
            order, freq = fitted[bid].order, fitted[bid].freq
        bundle: LayerBundle = build_layer_bundle(layouts[bid], gate, up, down, order)
        down_err = max(down_err, bundle.down_rel_error)
        w.write_tensor_data(bundle.rows.view(np.int8))
        del bundle  # not alive while the next layer's bundle is built
        w.write_tensor_data(order)
        w.write_tensor_data(freq)
        for dst_t in (C.TENSOR_UP_BIAS, C.TENSOR_GATE_BIAS, C.TENSOR_DOWN_BIAS):
            if (bid, dst_t) in biases:
                w.write_tensor_data(biases[(bid, dst_t)])
        source.release(*(tensors.get(template.format(bid=bid))
                         for template in (spec.ffn_gate, spec.ffn_up, spec.ffn_down)))
        if fitted is not None:
            for _name, data in _predictor_tensors(bid, fitted[bid]):
                w.write_tensor_data(data)
    w.close()
    patch_key(path, C.KEY_DOWN_REQUANT_ERROR, GGUFValueType.FLOAT32, np.float32(down_err).tobytes())
    return path.stat().st_size, down_err, fitted


def layer_ffn_weights(source: _Source, spec: ArchSpec, bid: int, n_embd: int, n_ff: int
                      ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """A layer's FFN as the predictor fit takes it: dense gate (None ungated) and up
    [n_ff, n_embd], down [n_embd, n_ff], and the FFN norm weight [n_embd]."""
    gate = _source_matrix(source, spec.ffn_gate.format(bid=bid), n_embd, n_ff, False) \
        .dense() if spec.gated else None
    up = _source_matrix(source, spec.ffn_up.format(bid=bid), n_embd, n_ff, False).dense()
    down = _source_matrix(source, spec.ffn_down.format(bid=bid), n_embd, n_ff, True).dense()
    name = spec.ffn_norm.format(bid=bid)
    t = source.stream.tensors.get(name)
    if t is None:
        raise FormatError(f"source tensor {name!r} is missing: the weight-only predictor "
                          "needs the FFN norm weight (or convert with --no-predictor)")
    return gate, up, down, np.asarray(source.data(t), dtype=np.float32).reshape(-1)


def _fit_workers() -> int:
    """Layers fitted at once: FLASHGGUF_FIT_WORKERS, else one per core up to 4 (each holds
    one layer's dense FFN and its temporaries: a few hundred MB at 1.5B, ~2 GB at 7B)."""
    value = os.environ.get("FLASHGGUF_FIT_WORKERS")
    if value is not None:
        try:
            return max(1, int(value))
        except ValueError:
            raise ConvertError(f"FLASHGGUF_FIT_WORKERS={value!r} is not an integer") from None
    return max(1, min(os.cpu_count() or 1, 4))


def _fit_predictors(source: _Source, spec: ArchSpec, n_layer: int, n_embd: int, n_ff: int,
                    bundle_nbytes: list[int], order: np.ndarray, popts: PredictorOptions,
                    opts: ConvertOptions, inputs: FFNInputs | None) -> tuple[FittedLayer, ...]:
    t0 = time.perf_counter()
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=n_layer, desc="fitting predictors", unit="layer")

    def fit(bid: int) -> tuple[FittedLayer, float]:
        t_layer = time.perf_counter()
        gate, up, down, norm = layer_ffn_weights(source, spec, bid, n_embd, n_ff)
        split = None
        hot_first = order
        if inputs is not None:
            assert opts.calibration is not None
            split = inputs.split(bid, opts.calibration.held_out)
            hot_first = None if opts.calibration.hot_first else order  # None: fit orders
        fitted = fit_layer_predictor(spec.activation, gate, up, down, norm, hot_first,
                                     bundle_nbytes[bid], popts, popts.seed + bid, split,
                                     act_threshold=opts.activation_threshold)
        # the fit pass reads every layer too: keep its footprint at the layers in flight
        source.release(*(source.stream.tensors.get(template.format(bid=bid))
                         for template in (spec.ffn_gate, spec.ffn_up, spec.ffn_down)))
        return fitted, time.perf_counter() - t_layer

    # Layers are independent: fit several at once, each on one BLAS thread (numpy releases
    # the GIL in its products, sorts and LAPACK calls); one threaded BLAS call at a time
    # stalls at every hand-off on a busy machine (blas.py).
    results: dict[int, FittedLayer] = {}
    with single_threaded_blas(), ThreadPoolExecutor(_fit_workers()) as pool:
        futures = {pool.submit(fit, bid): bid for bid in range(n_layer)}
        try:
            for future in as_completed(futures):
                bid = futures[future]
                results[bid], seconds = future.result()
                # progress per layer: on the bar in a terminal, else a log line
                done = f"rank {results[bid].predictor.rank}, {seconds:.1f} s"
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"layer {bid}: {done}")
                else:
                    opts.log(f"flashgguf-convert: predictor layer {bid} ({len(results)}/"
                             f"{n_layer} done): {done}")
        except BaseException:
            pool.shutdown(cancel_futures=True)  # an error or Ctrl-C: start no more layers
            raise
        finally:
            if bar is not None:
                bar.close()
    fitted = [results[bid] for bid in range(n_layer)]
    ranks = [f.predictor.rank for f in fitted]
    recalls = [f.recall for f in fitted]
    dens = [f.density for f in fitted]
    what = "random" if inputs is None else "calibration"
    opts.log(f"flashgguf-convert: {'weight-only' if inputs is None else 'calibrated'} predictor "
             f"in {time.perf_counter() - t0:.1f} s: rank {min(ranks)}-{max(ranks)}; on held-out "
             f"{what} inputs recall {min(recalls):.3f}-{max(recalls):.3f} of the top "
             f"{popts.keep:.0%} contributions, {min(dens):.1%}-{max(dens):.1%} of neurons "
             "predicted active")
    return tuple(fitted)


def _expected_read_bytes(path: Path, spec: ArchSpec,
                         fitted: tuple[FittedLayer, ...]) -> list[float]:
    """Per layer, FFN bytes read per token at C.REPORT_BUDGET_SHARE of the payload in
    predicted mode, before window-cache hits: the rows predicted active on the held-out
    inputs beyond the pinned prefix the runtime's budget split gives (NaN: too small a budget).
    """
    flash = open_flash_file(path)
    runtime = Runtime(flash, spec, RuntimeOptions(
        mode="predicted", direct_io=False,
        dram_budget=int(C.REPORT_BUDGET_SHARE * flash.payload_nbytes)), load=False)
    try:
        plan = runtime.plan()
    except BudgetError:
        return [float("nan")] * len(fitted)
    finally:
        runtime.close()
    return [float(f.active_freq[pinned:].sum()) * layer.layout.stride
            for f, layer, (_, pinned) in zip(fitted, flash.layers, plan, strict=True)]


def _log_report(fitted: tuple[FittedLayer, ...], expected: list[float], calibrated: bool,
                log: Callable[[str], None]) -> None:
    """The per-layer predictor report (also stored in the payload's keys)."""
    share = f"{C.REPORT_BUDGET_SHARE:g}"
    if calibrated:
        log(f"layer  rank  needed  predicted  recall  precision  predictor KiB  "
            f"read KiB/token @{share}")
        for bid, f in enumerate(fitted):
            p = f.predictor
            nbytes = p.a.nbytes + p.b.nbytes + (0 if p.b_up is None else p.b_up.nbytes) \
                + p.scale.nbytes
            log(f"{bid:>5}  {p.rank:>4}  {float(f.freq.mean()):>6.1%}  {f.density:>9.1%}  "
                f"{f.recall:>6.3f}  {f.precision:>9.3f}  {nbytes / 1024:>13.1f}  "
                f"{expected[bid] / 1024:>18.1f}")
    total = float(np.sum(expected))
    log(f"flashgguf-convert: expected FFN read per token at flash_dram_budget={share}: "
        + ("the budget is too small for the predictors" if not np.isfinite(total) else
           f"{total / 2**20:.2f} MiB before window-cache hits (pinned share "
           f"{DEFAULT_PINNED_SHARE:g})"))


def _add_predictor_keys(w: GGUFFileWriter, fitted: tuple[FittedLayer, ...],
                        popts: PredictorOptions, inputs: FFNInputs | None,
                        calibration: CalibrationOptions | None) -> None:
    if inputs is not None and calibration is not None:
        w.add_string(C.KEY_PREDICTOR_KIND, C.PREDICTOR_CALIBRATED_SVD)
        w.add_uint32(C.KEY_CALIBRATION_TOKENS, inputs.n_tokens)
        w.add_string(C.KEY_CALIBRATION_TEXT_SHA256, inputs.text_sha256)
        w.add_key_value(C.KEY_PREDICTOR_PRECISION, [float(f.precision) for f in fitted],
                        GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    else:
        w.add_string(C.KEY_PREDICTOR_KIND, C.PREDICTOR_WEIGHT_SVD)
    w.add_float32(C.KEY_PREDICTOR_KEEP, popts.keep)
    w.add_key_value(C.KEY_PREDICTOR_RANK, [f.predictor.rank for f in fitted],
                    GGUFValueType.ARRAY, GGUFValueType.UINT32)
    for key, values in ((C.KEY_PREDICTOR_THRESHOLD, [f.predictor.threshold for f in fitted]),
                        (C.KEY_PREDICTOR_RECALL, [f.recall for f in fitted]),
                        (C.KEY_PREDICTOR_DENSITY, [f.density for f in fitted])):
        w.add_key_value(key, [float(v) for v in values], GGUFValueType.ARRAY,
                        GGUFValueType.FLOAT32)
    w.add_float32(C.KEY_PREDICTOR_EXPECTED_BUDGET, C.REPORT_BUDGET_SHARE)
    # placeholder, patched once the file is whole (the budget split needs the written file)
    w.add_key_value(C.KEY_PREDICTOR_EXPECTED_READ, [0.0] * len(fitted), GGUFValueType.ARRAY,
                    GGUFValueType.FLOAT32)
    curves = [f.curve for f in fitted]
    if all(c is not None for c in curves):
        w.add_key_value(C.KEY_PREDICTOR_CURVE_RECALL, [float(r) for r in C.PREDICTOR_CURVE_RECALLS],
                        GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        for key, field_name in ((C.KEY_PREDICTOR_CURVE_THRESHOLD, "threshold"),
                                (C.KEY_PREDICTOR_CURVE_DENSITY, "density"),
                                (C.KEY_PREDICTOR_CURVE_ERROR, "error")):
            values = np.concatenate([getattr(c, field_name) for c in curves])
            w.add_key_value(key, [float(v) for v in values], GGUFValueType.ARRAY,
                            GGUFValueType.FLOAT32)


def _predictor_tensors(bid: int, fitted: FittedLayer) -> list[tuple[str, np.ndarray]]:
    """(name, data) of a layer's predictor tensors, in the order they are written."""
    p = fitted.predictor
    out = [(C.TENSOR_PRED_A.format(bid=bid), p.a), (C.TENSOR_PRED_B.format(bid=bid), p.b)]
    if p.b_up is not None:
        out.append((C.TENSOR_PRED_B_UP.format(bid=bid), p.b_up))
    out.append((C.TENSOR_PRED_SCALE.format(bid=bid), p.scale))
    for template, sigma in ((C.TENSOR_PRED_SIGMA_G, p.sigma_g), (C.TENSOR_PRED_SIGMA_U, p.sigma_u)):
        if sigma is not None:
            out.append((template.format(bid=bid), sigma))
    return out

