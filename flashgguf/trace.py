"""Traces of the flash runtime: per streaming FFN call, the rows it needed, what was
pinned, cached and read, the reads themselves and the call's times. Recorded from a model
(`flashgguf-profile run --trace`), saved as one file, and replayed through the runtime's
cache and read engine without the model (`flashgguf-profile replay`), at other budgets,
windows, coalescing gaps and read engines, or against a payload of another model's shape.

The file is a numpy .npz (np.load reads it; no pickles) with these arrays:

    meta         0-d unicode: JSON with "format" (= FORMAT), "source" (the flash file),
                 "n_layer", "n_embd", "n_ff", "strides" (bundle bytes per row, per layer),
                 "options" (the runtime's FlashOptions), "capacity" and "pinned" (slots and
                 pinned rows per layer), "direct_io", "io_backend", "io_alignment"
    calls        [n_calls] records, one per call in order (TRACE_CALL_DTYPE): layer,
                 n_tokens (FFN input rows), needed, pinned, hits, misses (rows), reads,
                 bytes_read, first_read (index into read_offset/read_len), time_predict_s,
                 time_io_wait_s, time_ffn_s
    needed       uint8 [n_calls, ceil(n_ff / 8)]: bit i of byte i // 8 (least significant
                 first) set when the call computed row i (bundle row order)
    read_offset  uint64 [n_reads]; read_len uint64 [n_reads]: every read in issue order
    seen         int64 [2]: calls and reads seen while recording (more than recorded: cut)

A token is a run of calls from layer 0 to the last layer; a prompt batch is one such run
with n_tokens > 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .archs import get_arch
from .convert.bundle import make_layout
from .errors import FlashGGUFError
from .format import FlashFile, LayerInfo
from .format.constants import DEFAULT_BUNDLE_ALIGN
from .format.gguf_stream import TensorInfo
from .format.output import atomic_output
from .options import FlashOptions
from .runtime import TRACE_CALL_DTYPE, Runtime

FORMAT = "flashgguf-trace-1"
_ARRAYS = ("meta", "calls", "needed", "read_offset", "read_len", "seen")


class TraceError(FlashGGUFError, ValueError):
    """A trace file that cannot be read, or a trace that does not fit the payload given."""


@dataclass
class Trace:
    meta: dict[str, Any]
    calls: np.ndarray
    needed: np.ndarray
    read_offset: np.ndarray
    read_len: np.ndarray
    seen_calls: int
    seen_reads: int

    @property
    def n_ff(self) -> int:
        return int(self.meta["n_ff"])

    @property
    def n_layer(self) -> int:
        return int(self.meta["n_layer"])

    @property
    def truncated(self) -> bool:
        return self.seen_calls > len(self.calls) or self.seen_reads > len(self.read_len)

    def mask(self, call: int) -> np.ndarray:
        """Rows computed by one call, bool [n_ff]."""
        return np.unpackbits(self.needed[call], count=self.n_ff, bitorder="little").astype(bool)

    def token_of_call(self) -> np.ndarray:
        """Index of the token run each call belongs to (a new run starts at layer 0)."""
        return np.cumsum(self.calls["layer"] == 0) - 1

    def save(self, path: Path) -> None:
        """Write the .npz atomically: an error or interruption leaves no partial file."""
        path = Path(path)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, meta=np.array(json.dumps(self.meta)), calls=self.calls,
                                needed=self.needed, read_offset=self.read_offset,
                                read_len=self.read_len,
                                seen=np.array([self.seen_calls, self.seen_reads], np.int64))

    @classmethod
    def load(cls, path: Path) -> Trace:
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [name for name in _ARRAYS if name not in z.files]
                if missing:
                    raise TraceError(f"{path}: not a flashgguf trace (no {', '.join(missing)})")
                arrays = {name: z[name] for name in _ARRAYS}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            if isinstance(exc, TraceError):
                raise
            raise TraceError(f"{path}: cannot read a trace: {exc}") from exc
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: its meta is not JSON: {exc}") from exc
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != FORMAT:
            raise TraceError(f"{path}: format {found!r}, this flashgguf reads {FORMAT!r}")
        trace = cls(meta, arrays["calls"], arrays["needed"], arrays["read_offset"],
                    arrays["read_len"], int(arrays["seen"][0]), int(arrays["seen"][1]))
        _check(trace, path)
        return trace


def _check(trace: Trace, path: Path) -> None:
    """Shapes and ranges that replay relies on (a trace file is input like any other)."""
    calls, n_ff, n_layer = trace.calls, trace.meta.get("n_ff"), trace.meta.get("n_layer")
    if not isinstance(n_ff, int) or not isinstance(n_layer, int) or n_ff < 1 or n_layer < 1:
        raise TraceError(f"{path}: meta gives no valid n_ff and n_layer")
    if calls.dtype != TRACE_CALL_DTYPE:
        raise TraceError(f"{path}: calls have fields {calls.dtype}, expected {TRACE_CALL_DTYPE}")
    if trace.needed.dtype != np.uint8 or trace.needed.shape != (len(calls), (n_ff + 7) // 8):
        raise TraceError(f"{path}: needed is {trace.needed.dtype} {trace.needed.shape}, "
                         f"expected uint8 ({len(calls)}, {(n_ff + 7) // 8})")
    if trace.read_offset.shape != trace.read_len.shape:
        raise TraceError(f"{path}: read_offset and read_len differ in length")
    bad = (calls["layer"] < 0) | (calls["layer"] >= n_layer) | (calls["n_tokens"] < 1)
    if bad.any():
        raise TraceError(f"{path}: call {int(np.argmax(bad))} has a layer outside "
                         f"[0, {n_layer}) or no input rows")


def record(runtime: Runtime, source: str) -> Trace:
    """What runtime traced since Runtime.trace_start, with the meta replay needs."""
    calls, needed, offsets, lengths, seen_calls, seen_reads = runtime.trace_take()
    flash = runtime.flash
    plan = [runtime.capacity(i) for i in range(flash.n_layer)]
    meta = dict(format=FORMAT, source=source, n_layer=flash.n_layer, n_embd=flash.n_embd,
                n_ff=flash.n_ff, strides=[layer.layout.stride for layer in flash.layers],
                options=dataclasses.asdict(runtime.options),
                capacity=[c for c, _ in plan], pinned=[p for _, p in plan],
                direct_io=runtime.direct_io, io_backend=runtime.io_backend,
                io_alignment=runtime.io_alignment)
    return Trace(meta, calls, needed, offsets, lengths, seen_calls, seen_reads)


def replay(trace: Trace, flash: FlashFile, opts: FlashOptions,
           progress: Callable[[int], None] | None = None) -> Trace:
    """Feed the trace's needed rows, call by call, through a fresh runtime on flash with
    opts (its cache, reads and FFN arithmetic on zero inputs; no model, no predictor):
    the trace that replay records. With the recording's file and options, its hits, misses
    and reads are the recording's."""
    if (flash.n_layer, flash.n_ff) != (trace.n_layer, trace.n_ff):
        raise TraceError(f"the trace has {trace.n_layer} layers of {trace.n_ff} rows, "
                         f"{flash.path} {flash.n_layer} of {flash.n_ff}: scale it first "
                         "(flashgguf-profile replay --shape)")
    if opts.mode == "dense":
        raise TraceError("replay streams the payload: give a mode other than dense")
    n_tokens = int(trace.calls["n_tokens"].max(initial=1))
    opts = dataclasses.replace(opts, max_tokens=max(opts.max_tokens, n_tokens))
    spec = get_arch(flash.arch)
    # the masks decide; the file's predictors are set where it has them (their DRAM counts)
    runtime = Runtime(flash, spec, opts, masks_only=True)
    try:
        runtime.trace_start(len(trace.calls), max(int(trace.seen_reads), 1) * 4 + (1 << 16))
        zeros = np.zeros((n_tokens, flash.n_embd), dtype=np.float32)
        for i, call in enumerate(trace.calls):
            runtime.ffn(int(call["layer"]), zeros[: int(call["n_tokens"])], trace.mask(i))
            if progress is not None:
                progress(1)
        return record(runtime, str(flash.path))
    finally:
        runtime.close()


def scaled(trace: Trace, n_layer: int, n_ff: int) -> Trace:
    """The trace's needed rows stretched to another shape: layer l takes the source layer
    l * L / n_layer, row j the source row j * F / n_ff (rows keep their hot-first order, so
    density, reuse between tokens and the place of hot rows carry over). Only the needed
    rows mean anything in the result: its hits, reads and times are zero."""
    src_layer = (np.arange(n_layer) * trace.n_layer) // n_layer
    src_row = (np.arange(n_ff) * trace.n_ff) // n_ff
    tokens = trace.token_of_call()
    first = np.searchsorted(tokens, np.arange(tokens[-1] + 1 if len(tokens) else 0))
    calls, rows = [], []
    for t, start in enumerate(first):
        end = first[t + 1] if t + 1 < len(first) else len(trace.calls)
        by_layer = {int(trace.calls["layer"][i]): i for i in range(start, end)}
        if len(by_layer) != trace.n_layer:
            continue  # a token cut by the trace's limit
        for layer in range(n_layer):
            i = by_layer[int(src_layer[layer])]
            rec = np.zeros(1, dtype=TRACE_CALL_DTYPE)
            rec["layer"], rec["n_tokens"] = layer, trace.calls["n_tokens"][i]
            mask = trace.mask(i)[src_row]
            rec["needed"] = int(mask.sum())
            calls.append(rec)
            rows.append(np.packbits(mask, bitorder="little"))
    meta = dict(trace.meta, n_layer=n_layer, n_ff=n_ff, scaled_from=trace.meta.get("source"))
    return Trace(meta, np.concatenate(calls) if calls else np.zeros(0, TRACE_CALL_DTYPE),
                 np.array(rows, dtype=np.uint8).reshape(len(rows), (n_ff + 7) // 8),
                 np.zeros(0, np.uint64), np.zeros(0, np.uint64), len(calls), 0)


def write_noise(f: BinaryIO, nbytes: int, progress: Callable[[int], None] | None = None) -> None:
    """nbytes of bytes that are not zeros (a sparse or compressible file would not be read
    from the device) into f, then flushed to the device; progress gets each chunk's size."""
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    left = nbytes
    while left > 0:
        n = min(left, len(block))
        f.write(block[:n])
        left -= n
        if progress is not None:
            progress(n)
    f.flush()
    os.fsync(f.fileno())


def shaped_payload(flash: FlashFile, n_layer: int, n_embd: int, n_ff: int, path: Path,
                   progress: Callable[[int], None] | None = None) -> FlashFile:
    """A payload file of another model's shape with flash's bundle types (its layer 0's
    part types for every layer, rows laid out as the converter lays them), filled with
    bytes that are not zeros (a sparse or compressible file would not be read from the
    device), and the FlashFile that describes it to the runtime. For replays only: its
    weights are noise. path is written atomically."""
    source = flash.layers[0].layout
    layout = make_layout(n_embd, flash.gated, dict(zip(source.parts, source.types, strict=True)),
                         DEFAULT_BUNDLE_ALIGN)
    layer_bytes = n_ff * layout.stride
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        write_noise(f, n_layer * layer_bytes, progress)
    layers = tuple(LayerInfo(
        index=i, layout=layout,
        bundle=TensorInfo(f"flash.{i}.bundle", (layout.stride, n_ff), flash.layers[0].bundle
                          .ggml_type, i * layer_bytes, layer_bytes),
        order=np.arange(n_ff, dtype=np.int32), freq=np.zeros(n_ff, np.float32),
        up_bias=None, gate_bias=None, down_bias=None) for i in range(n_layer))
    return dataclasses.replace(flash, path=Path(path), file_size=n_layer * layer_bytes,
                               n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, layers=layers,
                               gate_resident=False, predictor_kind=None, gate_curves=None)
