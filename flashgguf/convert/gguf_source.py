"""Convert a GGUF model into a flash GGUF."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ..archs import ArchSpec, get_arch
from ..calibrate.collect import CalibrationOptions, FFNInputs, collect_ffn_inputs
from ..calibrate.text import read_calibration_text
from ..errors import BudgetError, ConvertError, FormatError, UnsupportedError
from ..format import (
    BundleLayout,
    CalibrationRecord,
    FlashWriter,
    GGUFStream,
    PayloadLayer,
    PayloadRecord,
    PredictorRecord,
    SourceKey,
    TensorInfo,
    TrunkRecord,
    TrunkTensor,
    atomic_output,
    open_flash_file,
    open_gguf,
    release_pages,
    tensor_array,
)
from ..format import constants as C
from ..gate_keep import GateCurves
from ..options import DEFAULT_GATE_KEEP, DEFAULT_PINNED_SHARE, FlashOptions
from ..quants import row_nbytes
from ..runtime import Runtime
from .blas import single_threaded_blas
from .bundle import (
    LayerBundle,
    SourceMatrix,
    build_layer_bundle,
    choose_down_type,
    choose_part_type,
    make_layout,
)
from .gate_order import CURVE_TOKENS, gate_error_curve, gate_frequency, order_by_frequency
from .moe_source import convert_moe, expert_count
from .predictor_fit import FittedLayer, PredictorOptions, fit_layer_predictor


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
    # Keep each layer's gate matrix apart from the bundles (format version 4): the runtime
    # holds it in DRAM and picks each token's rows from the exact gate (flash_mode "gate").
    # No low-rank predictor is fitted then (predictor is ignored); calibration orders each
    # layer's rows by how often the gate picks them.
    gate_resident: bool = False
    # With gate_resident: store each layer's up rows and down rows apart (format version 6),
    # so that flash_mode "gate" reads a down row only for the neurons whose exact up x
    # act(gate) passes a second cut (flash_down_keep).
    two_stage: bool = False
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
    gate_types: tuple[GGMLQuantizationType | None, ...] = ()  # per layer: a resident gate's

    @property
    def bundle_nbytes(self) -> int:
        """Bytes of bundle rows and resident gate rows: what the payload holds besides
        order, biases, predictors."""
        gates = sum(row_nbytes(t, self.n_embd) * self.n_ff for t in self.gate_types
                    if t is not None)
        return gates + sum(self.n_ff * layout.stride for layout in self.layouts)


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
                  opts: ConvertOptions) -> tuple[BundleLayout, GGMLQuantizationType | None]:
    """Layer bid's bundle layout: each part's type from its source tensor's (choose_part_type);
    K-quant mixes differ by layer (Q4_K_M keeps some layers' down tensors in Q6_K). With
    opts.gate_resident the gate is no bundle part: its type comes second (else None)."""
    types = {}
    for part, template in _part_sources(spec):
        requested = opts.down_type if part == C.PART_DOWN else opts.bundle_type
        t = tensors.get(template.format(bid=bid))
        if t is None:
            raise FormatError(f"source tensor {template.format(bid=bid)!r} is missing")
        choose = choose_down_type if part == C.PART_DOWN else choose_part_type
        types[part] = choose(t.ggml_type, n_embd, requested)
    if opts.gate_resident:
        gate_type = types.pop(C.PART_GATE)
        return make_layout(n_embd, False, types, opts.bundle_align, opts.two_stage), gate_type
    return make_layout(n_embd, spec.gated, types, opts.bundle_align), None


def _describe_layouts(tensors: dict[str, TensorInfo], spec: ArchSpec,
                      layouts: list[BundleLayout],
                      gate_types: list[GGMLQuantizationType | None]) -> str:
    """One line per distinct layout: its parts (and a resident gate), which source types
    they came from, whether gate/up rows are the source's bytes, its stride and the layers
    that use it."""
    groups: dict[tuple, list[int]] = {}
    for bid, (layout, gate_type) in enumerate(zip(layouts, gate_types, strict=True)):
        sources = {part: tensors[template.format(bid=bid)].ggml_type
                   for part, template in _part_sources(spec)}
        groups.setdefault((layout, gate_type, tuple(sources.items())), []).append(bid)
    lines = []
    for (layout, gate_type, sources), bids in groups.items():
        source_of = dict(sources)
        typed = list(zip(layout.parts, layout.types, strict=True))
        if gate_type is not None:
            typed.insert(0, (C.PART_GATE, gate_type))
        parts = []
        for part, t in typed:
            src_t = source_of[part]
            if part == C.PART_DOWN:
                how = "columns re-quantized" + ("" if t == src_t else f" from {src_t.name}")
            else:
                how = "rows copied" if t == src_t else f"rows re-quantized from {src_t.name}"
            where = ", resident" if part == C.PART_GATE and gate_type is not None else ""
            parts.append(f"{part} {t.name} ({how}{where})")
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
    if opts.two_stage and not opts.gate_resident:
        raise ConvertError("--two-stage needs --gate-resident (the exact gate picks the up rows "
                           "to read)")
    if opts.gate_resident:
        opts = dataclasses.replace(opts, predictor=None)  # the gate picks the rows
    if opts.predictor is not None:
        opts.predictor.check()
    calibration_text = None
    if opts.calibration is not None:
        opts.calibration.check()
        calibration_text = read_calibration_text(opts.calibration.text)
    t_start = time.perf_counter()

    source = _open_source(src)
    stream = source.stream
    arch_name = stream.get(C.KEY_ARCHITECTURE)
    if arch_name == C.TRUNK_ARCH:
        raise ConvertError(f"{src} is already a flash GGUF")
    spec = get_arch(str(arch_name))
    if expert_count(stream.fields, spec.name) > 0:
        return convert_moe(source, spec, src, out, opts, _sha256(src), t_start,
                           calibration_text)
    if opts.calibration is not None and opts.predictor is None and not opts.gate_resident:
        raise ConvertError("calibration fits the predictor: it cannot go with --no-predictor")
    if not spec.dense:
        raise FormatError(f"{src}: {spec.name} without experts ({spec.name}.expert_count)")
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
    ffn_names = {n for bid in range(n_layer) for n in spec.ffn_tensor_parts(bid)}
    if opts.gate_resident and not spec.gated:
        raise ConvertError(f"--gate-resident needs a gated FFN; {spec.name}'s is not")
    layouts, gate_types = map(list, zip(*(_layer_layout(tensors, spec, bid, n_embd, opts)
                                          for bid in range(n_layer)), strict=True))
    opts.log(f"flashgguf-convert: {opts.source_name or src.name}: {spec.name}, {n_layer} layers, "
             f"n_embd {n_embd}, n_ff {n_ff}; bundles:\n"
             + _describe_layouts(tensors, spec, layouts, gate_types))

    # the calibration's FFN inputs live in a scratch folder beside the output, only when asked
    calib_folder = contextlib.nullcontext(None) if opts.calibration is None else \
        tempfile.TemporaryDirectory(dir=out.parent, prefix=".flashgguf-calib-")
    with atomic_output(out) as final_tmp, calib_folder as calib_dir:
        inputs = None
        if opts.calibration is not None:
            t0 = time.perf_counter()
            inputs = collect_ffn_inputs(src, spec, n_layer, n_embd, calibration_text,
                                        Path(calib_dir), opts.calibration)
            opts.log(f"flashgguf-convert: calibration: FFN inputs of {inputs.n_tokens} tokens "
                     f"collected from llama.cpp in {time.perf_counter() - t0:.1f} s")
        # Without calibration neurons keep their original order and have no measured
        # frequency; with it, each layer's rows go hottest first (unless hot_first is off) and
        # store their measured frequencies (the fitted order and frequencies).
        order = np.arange(n_ff, dtype=np.int32)
        fitted = None
        if opts.predictor is not None:
            fitted = _fit_predictors(source, spec, n_layer, n_embd, n_ff,
                                     [n_ff * layout.stride for layout in layouts], order,
                                     opts.predictor, opts, inputs)
        orders, gate_curves = None, None
        if fitted is not None and inputs is not None:
            orders = [(f.order, f.freq) for f in fitted]
        elif opts.gate_resident and inputs is not None:
            orders, gate_curves = _gate_orders(source, spec, n_layer, n_embd, n_ff, layouts,
                                               inputs, opts)
        trunk = _trunk_record(stream, spec, n_layer)
        payload = _payload_record(source, spec, layouts, gate_types, n_embd, n_ff, opts, src,
                                  inputs, fitted, gate_curves)
        with FlashWriter(final_tmp, trunk, payload) as writer:
            _write_trunk(writer, source)
            down_err = _write_payload(writer, source, spec, layouts, gate_types, n_embd, n_ff,
                                      order, opts, orders)
            if fitted is not None:
                expected = _expected_read_bytes(final_tmp, spec, fitted)
                writer.set_expected_read(expected)
                _log_report(fitted, expected, inputs is not None, opts.log)
        trunk_nbytes, payload_nbytes = writer.trunk_nbytes, writer.payload_nbytes
    report = ConvertReport(out, spec.name, n_layer, n_embd, n_ff, tuple(layouts), trunk_nbytes,
                           payload_nbytes, down_err, fitted, source_ffn_nbytes=sum(
                               tensors[n].nbytes for n in ffn_names if n in tensors),
                           gate_types=tuple(gate_types))
    bundles = report.bundle_nbytes
    opts.log(f"flashgguf-convert: wrote {out} (trunk {trunk_nbytes / 2**20:.1f} MiB, payload "
             f"{payload_nbytes / 2**20:.1f} MiB: bundles {bundles / 2**20:.1f} MiB = "
             f"{bundles / max(report.source_ffn_nbytes, 1):.3f}x the source's FFN tensors); "
             f"down columns' max relative re-quantization error {down_err:.4f}")
    report = dataclasses.replace(report, seconds=time.perf_counter() - t_start)
    opts.log(f"flashgguf-convert: done in {report.seconds:.1f} s")
    return report


def _trunk_record(stream: GGUFStream, spec: ArchSpec, n_layer: int) -> TrunkRecord:
    """The source's keys and tensors as the trunk copies them; FFN tensors become dummies."""
    parts = {name: part for bid in range(n_layer)
             for name, part in spec.ffn_tensor_parts(bid).items()}
    keys = tuple(SourceKey(key, value, stream.value_types[key], stream.array_types.get(key))
                 for key, value in stream.fields.items())
    tensors = tuple(TrunkTensor(t.name, t.shape, t.ggml_type, parts.get(t.name))
                    for t in stream.tensors.values())
    alignment = stream.alignment if C.KEY_ALIGNMENT in stream.fields else None
    return TrunkRecord(spec.name, keys, tensors, alignment)


def _write_trunk(writer: FlashWriter, source: _Source) -> None:
    while (t := writer.next_trunk_tensor) is not None:
        info = source.stream.tensors[t.name]
        writer.write_trunk_tensor(source.data(info))
        source.release(info)


def _payload_record(source: _Source, spec: ArchSpec, layouts: list[BundleLayout],
                    gate_types: list[GGMLQuantizationType | None], n_embd: int,
                    n_ff: int, opts: ConvertOptions, src: Path, inputs: FFNInputs | None,
                    fitted: tuple[FittedLayer, ...] | None,
                    gate_curves: GateCurves | None = None) -> PayloadRecord:
    tensors = source.stream.tensors
    layers = []
    for bid, layout in enumerate(layouts):
        biases: dict[str, np.ndarray] = {}
        for name, template, n in (("up_bias", spec.ffn_up_bias, n_ff),
                                  ("gate_bias", spec.ffn_gate_bias, n_ff),
                                  ("down_bias", spec.ffn_down_bias, n_embd)):
            t = tensors.get(template.format(bid=bid))
            if t is None or (name == "gate_bias" and not spec.gated):
                continue
            data = np.asarray(source.data(t), dtype=np.float32).reshape(-1)
            if data.size != n:
                raise FormatError(f"bias {t.name!r} has {data.size} values, expected {n}")
            biases[name] = data
        f = None if fitted is None else fitted[bid]
        layers.append(PayloadLayer(layout, **biases, gate_type=gate_types[bid]) if f is None
                      else PayloadLayer(layout, **biases, gate_type=gate_types[bid],
                                        predictor=f.predictor, predictor_recall=f.recall,
                                        predictor_density=f.density,
                                        predictor_precision=f.precision, predictor_curve=f.curve))
    predictor = None
    if opts.predictor is not None:
        calibration = None
        if inputs is not None and opts.calibration is not None:
            calibration = CalibrationRecord(inputs.n_tokens, inputs.text_sha256)
        predictor = PredictorRecord(opts.predictor.keep, calibration)
    return PayloadRecord(spec.name, n_embd, n_ff, spec.activation, spec.gated, tuple(layers),
                         opts.source_name or src.name, _sha256(src),
                         activation_threshold=opts.activation_threshold, predictor=predictor,
                         gate_resident=opts.gate_resident, gate_curves=gate_curves,
                         split=opts.two_stage)


def _write_payload(writer: FlashWriter, source: _Source, spec: ArchSpec,
                   layouts: list[BundleLayout], gate_types: list[GGMLQuantizationType | None],
                   n_embd: int, n_ff: int, order: np.ndarray,
                   opts: ConvertOptions,
                   calibrated: list[tuple[np.ndarray, np.ndarray]] | None) -> float:
    """Each layer's bundle, built from the source's FFN rows, in `order` or (calibrated) the
    measured (order, frequencies) of each layer; returns the down columns' max relative
    re-quantization error."""
    freq = np.zeros(n_ff, dtype=np.float32)
    down_err = 0.0
    layers = range(len(layouts))
    if opts.progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="bundling FFN layers", unit="layer")
    for bid in layers:
        gate = _source_matrix(source, spec.ffn_gate.format(bid=bid), n_embd, n_ff, False) \
            if spec.gated else None
        up = _source_matrix(source, spec.ffn_up.format(bid=bid), n_embd, n_ff, False)
        down = _source_matrix(source, spec.ffn_down.format(bid=bid), n_embd, n_ff, True)
        layer_order, layer_freq = order, freq
        if calibrated is not None:
            layer_order, layer_freq = calibrated[bid]
        bundle: LayerBundle = build_layer_bundle(layouts[bid], gate, up, down, layer_order,
                                                 gate_types[bid])
        down_err = max(down_err, bundle.down_rel_error)
        writer.write_layer(bid, bundle.rows.view(np.int8), layer_order, layer_freq,
                           gate_rows=bundle.gate_rows,
                           down_norm=bundle.down_norm if opts.two_stage else None)
        del bundle  # not alive while the next layer's bundle is built
        _release_ffn(source, spec, bid)
    writer.finish(down_err)
    return down_err


def layer_ffn_weights(source: _Source, spec: ArchSpec, bid: int, n_embd: int, n_ff: int,
                      norm: bool = True
                      ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]:
    """A layer's FFN as the predictor fit takes it: dense gate (None ungated) and up
    [n_ff, n_embd], down [n_embd, n_ff], and the FFN norm weight [n_embd] (None unless
    norm)."""
    gate = _source_matrix(source, spec.ffn_gate.format(bid=bid), n_embd, n_ff, False) \
        .dense() if spec.gated else None
    up = _source_matrix(source, spec.ffn_up.format(bid=bid), n_embd, n_ff, False).dense()
    down = _source_matrix(source, spec.ffn_down.format(bid=bid), n_embd, n_ff, True).dense()
    if not norm:
        return gate, up, down, None
    name = spec.ffn_norm.format(bid=bid)
    t = source.stream.tensors.get(name)
    if t is None:
        raise FormatError(f"source tensor {name!r} is missing: the weight-only predictor "
                          "needs the FFN norm weight (or convert with --no-predictor)")
    return gate, up, down, np.asarray(source.data(t), dtype=np.float32).reshape(-1)


def _release_ffn(source: _Source, spec: ArchSpec, bid: int) -> None:
    """Drop layer bid's FFN matrices from the source's cache (one layer in memory at a time)."""
    tensors = source.stream.tensors
    source.release(*(tensors.get(template.format(bid=bid))
                     for template in (spec.ffn_gate, spec.ffn_up, spec.ffn_down)))


def _gate_orders(source: _Source, spec: ArchSpec, n_layer: int, n_embd: int, n_ff: int,
                 layouts: list[BundleLayout], inputs: FFNInputs, opts: ConvertOptions
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray]], GateCurves]:
    """Gate-resident files, one pass over the layers: each layer's error curve over
    C.GATE_CURVE_KEEPS (held-out calibration inputs), and its rows hottest first by how
    often the gate's top share at flash_gate_keep's default picks them (a default run keeps
    one share: flash_gate_per_layer is off)."""
    t0 = time.perf_counter()
    tensors = source.stream.tensors

    def vector(template: str, bid: int) -> np.ndarray | None:
        t = tensors.get(template.format(bid=bid))
        return None if t is None else np.asarray(source.data(t), np.float32).reshape(-1)

    assert opts.calibration is not None
    errors, out = [], []
    for bid in range(n_layer):
        gate, up, down, _ = layer_ffn_weights(source, spec, bid, n_embd, n_ff, norm=False)
        assert gate is not None  # gate_resident needs a gated FFN
        x = inputs.layer(bid)
        gate_bias = vector(spec.ffn_gate_bias, bid)
        errors.append(gate_error_curve(spec.activation, gate, up, down, x[-CURVE_TOKENS:],
                                       C.GATE_CURVE_KEEPS, gate_bias,
                                       vector(spec.ffn_up_bias, bid), opts.activation_threshold))
        freq = gate_frequency(spec.activation, gate, x, DEFAULT_GATE_KEEP, gate_bias,
                              opts.activation_threshold)
        del gate, up, down, x
        _release_ffn(source, spec, bid)
        order = order_by_frequency(freq) if opts.calibration.hot_first \
            else np.arange(n_ff, dtype=np.int32)
        out.append((order, freq[order]))
    curves = GateCurves(np.asarray(C.GATE_CURVE_KEEPS, np.float32), np.stack(errors))
    spread = curves.layer_keeps(DEFAULT_GATE_KEEP, [la.stride for la in layouts])
    opts.log(f"flashgguf-convert: gate error curves and rows ordered by the gate's picks on "
             f"{inputs.n_tokens} calibration tokens in {time.perf_counter() - t0:.1f} s; "
             f"flash_gate_per_layer would keep {min(spread):g}-{max(spread):g} of a layer's "
             f"rows at {DEFAULT_GATE_KEEP:g} (mean {float(np.mean(spread)):.3f})")
    return out, curves


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
        _release_ffn(source, spec, bid)
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
    runtime = Runtime(flash, spec, FlashOptions(
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
