"""The one door to the C core and to llama.cpp's eval callback: the FFN runtime and the
calibration capture own their fg_* handles here, every C error code becomes an exception
through one table, and llama.cpp contexts get the callback through one context swap.
Nothing else in flashgguf imports the compiled module."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ._native import ffi, lib
from .archs import ArchSpec
from .errors import (
    BudgetError,
    FlashGGUFError,
    MissingPredictorError,
    NativeError,
    OptionError,
    VersionMismatchError,
)
from .expert_cache import pinned_experts
from .format import FlashFile, LayerInfo, MoEFlashFile
from .format import constants as C
from .options import FlashOptions
from .predictor import PREDICTOR_BLOCK, LayerPredictor
from .quants import row_nbytes

# llama.cpp's eval-callback ABI and graph node names are those of this release
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# the format's activation names are the C core's FG_ACT_* constants in lower case
_ACTIVATIONS = {name: getattr(lib, f"FG_ACT_{name.upper()}") for name in C.ACTIVATIONS}
_PARTS = {C.PART_GATE: lib.FG_PART_GATE, C.PART_UP: lib.FG_PART_UP, C.PART_DOWN: lib.FG_PART_DOWN}
_MODES = {"dense": lib.FG_MODE_DENSE, "naive": lib.FG_MODE_NAIVE,
          "hybrid": lib.FG_MODE_HYBRID, "predicted": lib.FG_MODE_PREDICTED,
          "gate": lib.FG_MODE_GATE}
_IO = {"auto": lib.FG_IO_AUTO, "threads": lib.FG_IO_THREADS, "io_uring": lib.FG_IO_URING}
_IO_NAMES = {lib.FG_IO_THREADS: "threads", lib.FG_IO_URING: "io_uring", 0: "none"}
_STATS = ("tokens", "bytes_read", "reads", "bytes_needed", "cache_hits", "cache_misses",
          "neurons_computed", "down_computed", "pinned_neurons", "window_evictions",
          "time_predict_s", "time_io_wait_s", "time_ffn_s", "time_total_s")
# fg_trace_call, field by field (checked against C's struct size at import)
TRACE_CALL_DTYPE = np.dtype([
    ("layer", np.int32), ("n_tokens", np.int32), ("needed", np.int32), ("pinned", np.int32),
    ("hits", np.int32), ("misses", np.int32), ("reads", np.int32), ("reserved", np.int32),
    ("bytes_read", np.uint64), ("first_read", np.uint64), ("time_predict_s", np.float64),
    ("time_io_wait_s", np.float64), ("time_ffn_s", np.float64)])
assert TRACE_CALL_DTYPE.itemsize == ffi.sizeof("fg_trace_call")
# C error code -> exception; a code not listed is a NativeError
_ERRORS: dict[int, type[FlashGGUFError]] = {lib.FG_ERR_BUDGET: BudgetError}


def strerror(code: int) -> str:
    return ffi.string(lib.fg_strerror(code)).decode()


def check(code: int, what: str, detail: str = "") -> None:
    """Raise the exception for a C error code: "what: [detail ](code's message)"."""
    if code != lib.FG_OK:
        message = f"{detail} ({strerror(code)})" if detail else strerror(code)
        raise _ERRORS.get(code, NativeError)(f"{what}: {message}")


class DirectIOWarning(UserWarning):
    """The payload's filesystem refuses direct I/O; reads go through the page cache."""


def _config(flash: FlashFile, spec: ArchSpec, opts: FlashOptions):
    """The record as fg_config (checked when it was made; C checks again)."""
    cfg = ffi.new("fg_config *")
    cfg.n_layer = flash.n_layer
    cfg.n_embd = flash.n_embd
    cfg.n_ff = flash.n_ff
    cfg.gated = int(flash.gated)
    cfg.gate_resident = int(flash.gate_resident)
    cfg.split_rows = int(flash.split)
    cfg.down_keep = opts.down_keep
    cfg.gate_keep = opts.gate_keep
    cfg.gate_cache_bonus = opts.gate_cache_bonus
    cfg.activation = _ACTIVATIONS[flash.activation]
    cfg.activation_threshold = flash.activation_threshold
    # layer 0's layout is every layer's until Runtime gives each its own
    types, offsets = _layout_arrays(flash.layers[0])
    for p in range(3):
        cfg.part_type[p], cfg.part_offset[p] = types[p], offsets[p]
    cfg.bundle_stride = flash.layers[0].layout.stride
    cfg.max_tokens = opts.max_tokens
    cfg.n_threads = opts.n_threads
    cfg.n_threads_batch = opts.n_threads_batch
    cfg.use_direct_io = int(opts.direct_io)
    cfg.input_node = spec.ffn_input_node.encode()
    cfg.output_node = spec.ffn_output_node.encode()
    cfg.mode = _MODES[opts.mode]
    cfg.dram_budget = opts.dram_budget
    cfg.pinned_share = opts.pinned_share
    cfg.window_tokens = opts.window
    cfg.coalesce_gap = -1 if opts.coalesce_gap == "auto" else opts.coalesce_gap
    cfg.coalesce_bytes = opts.coalesce_bytes
    cfg.io_backend = _IO[opts.io]
    cfg.io_depth = opts.io_depth
    cfg.max_read_bytes = opts.max_read_bytes
    cfg.read_log_cap = opts.read_log
    return cfg


def _layout_arrays(layer: LayerInfo) -> tuple[list[int], list[int]]:
    """A layer's part types and offsets indexed by FG_PART_* (an absent gate: F32 at 0; a
    resident gate: its matrix's type at 0)."""
    layout = layer.layout
    types, offsets = [int(GGMLQuantizationType.F32)] * 3, [0] * 3
    for part, ggml_type, offset in zip(layout.parts, layout.types, layout.offsets, strict=True):
        types[_PARTS[part]], offsets[_PARTS[part]] = int(ggml_type), offset
    if layer.gate_rows is not None:
        types[_PARTS[C.PART_GATE]] = int(layer.gate_rows.ggml_type)
    return types, offsets


def _expected_active(flash: FlashFile) -> list[float] | None:
    """Per-layer budget weights: the share of rows the file's predictor expects active
    (predictor_density), when every layer has one; None (an even split) otherwise."""
    dens = [getattr(layer, "predictor_density", None) for layer in flash.layers]
    if any(d is None or not d > 0 for d in dens):
        return None
    return [float(d) for d in dens]


def _gate_keeps(flash: FlashFile, opts: FlashOptions) -> tuple[float, ...]:
    """Each layer's share of rows kept in gate mode: opts.gate_keep spread by the file's
    error curves (flashgguf/gate_keep.py) when it stores them and gate_per_layer, else
    opts.gate_keep everywhere."""
    curves = flash.gate_curves
    if curves is None and opts.gate_per_layer and opts.mode == "gate":
        raise OptionError(f"flash_gate_per_layer=True: {flash.path} stores no per-layer error "
                          "curves (convert the model with --gate-resident --calibrate)")
    if curves is None or not opts.gate_per_layer:
        return (float(opts.gate_keep),) * flash.n_layer
    return curves.layer_keeps(opts.gate_keep, [layer.layout.stride for layer in flash.layers])


class _NativeHandle:
    """A C handle (self._rt, freed by its destroy function through ffi.gc) shared by the
    runtimes: closing, dropping it in a forked child, and its counters as a dict."""

    _rt: Any = None
    _what = "the flash runtime"
    # the C eval callback, and the function that hands out the first error raised in it
    _callback = "fg_eval_callback"
    _take_error = "fg_runtime_take_error"
    _failed = "flash FFN failed during llama_decode"

    @property
    def handle(self):
        if self._rt is None:
            raise FlashGGUFError(f"{self._what} is closed")
        return self._rt

    def close(self) -> None:
        if self._rt is not None:
            ffi.release(self._rt)
            self._rt = None

    def _abandon(self) -> None:
        """Drop the handle without destroying it (see _abandon_in_child)."""
        if self._rt is not None:
            ffi.gc(self._rt, None)  # detaches the destroy function from the handle
            self._rt = None

    def raise_pending_error(self) -> None:
        """Raise what went wrong inside the eval callback during the last decode, if anything."""
        msg = ffi.new("char[256]")
        code = getattr(lib, self._take_error)(self.handle, msg, 256)
        check(code, self._failed, ffi.string(msg).decode(errors="replace"))

    def context_class(self) -> type:
        """A llama.cpp context class whose graph runs this runtime's callback and raises
        what went wrong in it after each decode (install it with installed_context_class)."""
        return _callback_context_class(_address(ffi.addressof(lib, self._callback)),
                                      _address(self.handle), self.raise_pending_error)

    def _stats(self, struct: str, names: tuple[str, ...], get: Any, reset: Any,
               do_reset: bool) -> dict[str, float]:
        s = ffi.new(f"{struct} *")
        get(self.handle, s)
        out: dict[str, float] = {}
        for name in names:
            value = getattr(s, name)
            out[name] = float(value) if name.startswith("time_") else int(value)
        if do_reset:
            reset(self.handle)
        return out


class Runtime(_NativeHandle):
    """The native FFN engine for one flash GGUF: all bundles in DRAM (mode "dense"), or
    streamed from the payload under a DRAM budget ("naive", "hybrid", "predicted").

    predictors: one LayerPredictor (or None) per layer; default: what the file stores
    (LayerInfo.predictor). Mode "predicted" needs one for every layer.
    layer_weights: how the budget beyond every layer's minimum is shared; default: the
    predictor's expected active share per layer when the file stores it (predicted mode),
    else an even split. load=False: configured but nothing allocated or read (plan()).
    masks_only: every call will give its rows (ffn's mask: trace replay), so predicted mode
    runs without predictors (the file's are still set when it has them: their DRAM counts)."""

    def __init__(self, flash: FlashFile, spec: ArchSpec, opts: FlashOptions,
                 predictors: Sequence[LayerPredictor | None] | None = None,
                 layer_weights: Sequence[float] | None = None, load: bool = True,
                 masks_only: bool = False) -> None:
        self.flash = flash
        self._opts = opts
        self.spec = spec
        self.mode = opts.mode
        if predictors is None:
            predictors = [getattr(layer, "predictor", None) for layer in flash.layers]
        if len(predictors) != flash.n_layer:
            raise OptionError(f"{len(predictors)} predictors for {flash.n_layer} layers")
        missing = [i for i, p in enumerate(predictors) if p is None]
        if opts.mode == "predicted" and missing and not masks_only:
            raise MissingPredictorError(
                f"{flash.path}: flash_mode='predicted' needs a predictor per layer, and layer "
                f"{missing[0]} has none: convert the model again with this flashgguf, or use "
                "flash_mode='naive' or 'hybrid', or a budget that holds the whole FFN payload")
        if opts.mode == "gate" and not flash.gate_resident:
            raise OptionError(f"{flash.path}: flash_mode='gate' needs a file whose gate is "
                              "resident: convert the model with flashgguf-convert "
                              "--gate-resident")
        if flash.split and opts.mode not in ("gate", "dense"):
            raise OptionError(f"{flash.path}: its up and down rows are stored apart "
                              "(--two-stage), which only flash_mode='gate' reads; got "
                              f"flash_mode={opts.mode!r}")
        cfg = _config(flash, spec, opts)
        self.max_tokens = cfg.max_tokens
        self._rt = None
        out = ffi.new("fg_runtime **")
        check(lib.fg_runtime_create(cfg, str(flash.path).encode(), out),
              f"opening {flash.path} for the flash runtime")
        self._rt = ffi.gc(out[0], lib.fg_runtime_destroy)
        _live_runtimes.add(self)
        self._keep: list[np.ndarray] = []  # buffers stay alive until C has copied them
        for layer in flash.layers:
            types, offsets = _layout_arrays(layer)
            check(lib.fg_runtime_set_layer_layout(self._rt, layer.index, types, offsets,
                                                  layer.layout.stride),
                  f"bundle layout of layer {layer.index}")
            biases = [self._floats(b) for b in (layer.up_bias, layer.gate_bias, layer.down_bias)]
            check(lib.fg_runtime_set_layer(self._rt, layer.index, layer.bundle.offset, *biases),
                  f"layer {layer.index}")
            if layer.gate_rows is not None:
                check(lib.fg_runtime_set_gate_rows(self._rt, layer.index, layer.gate_rows.offset),
                      f"gate matrix of layer {layer.index}")
            if layer.down_norm is not None:
                check(lib.fg_runtime_set_down_norm(self._rt, layer.index,
                                                   self._floats(layer.down_norm)),
                      f"down norms of layer {layer.index}")
        self.gate_keeps = _gate_keeps(flash, opts)
        for i, keep in enumerate(self.gate_keeps):
            check(lib.fg_runtime_set_gate_keep(self._rt, i, keep), f"gate keep of layer {i}")
        if opts.mode == "predicted":  # the baselines use none: their DRAM stays with the cache
            for i, pred in enumerate(predictors):
                if pred is not None:
                    self._set_predictor(i, pred)
            if layer_weights is None and not missing:
                layer_weights = _expected_active(flash)
        if layer_weights is not None and opts.mode != "dense":
            if len(layer_weights) != flash.n_layer:
                raise OptionError(f"{len(layer_weights)} layer weights for {flash.n_layer} layers")
            for i, w in enumerate(layer_weights):
                if not (w > 0 and np.isfinite(w)):
                    raise OptionError(f"layer {i}: weight {w!r} is not a positive number")
                check(lib.fg_runtime_set_layer_weight(self._rt, i, float(w)), f"layer {i}")
        self._keep.clear()
        self.direct_io = opts.direct_io
        if load:
            self._check_budget(lib.fg_runtime_load(self._rt),
                               f"reading the FFN bundles of {flash.path}")
            self.direct_io = bool(lib.fg_runtime_direct_io(self._rt))
            if opts.direct_io and not self.direct_io:
                warnings.warn(f"{flash.path}: the filesystem refuses direct I/O (tmpfs?); the "
                              "payload is read through the page cache, so I/O figures include "
                              "cached reads", DirectIOWarning, stacklevel=3)

    def _check_budget(self, code: int, what: str) -> None:
        """check(), naming the budget and its minimum when the budget is what failed."""
        detail = ""
        if code == lib.FG_ERR_BUDGET:
            opts, need = self._opts, int(lib.fg_runtime_min_budget(self._rt))
            what = (f"flash_dram_budget of {opts.dram_budget:,} bytes is too small for "
                    f"flash_mode={opts.mode!r}")
            detail = f"the minimum is {need:,} bytes (the predictors and resident gates)"
        check(code, what, detail)

    @property
    def options(self) -> FlashOptions:
        """The options record this runtime was made with (budget, mode, threads, ...)."""
        return self._opts

    def plan(self) -> list[tuple[int, int]]:
        """(slots, pinned rows) per layer that loading would give (streaming modes): for a
        runtime made with load=False, which allocates and reads nothing."""
        n = self.flash.n_layer
        cap, pinned = ffi.new("int32_t[]", n), ffi.new("int32_t[]", n)
        self._check_budget(lib.fg_runtime_plan(self.handle, cap, pinned),
                           "planning the budget split")
        return [(int(cap[i]), int(pinned[i])) for i in range(n)]

    def _floats(self, arr: np.ndarray | None):
        if arr is None:
            return ffi.NULL
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self._keep.append(arr)
        return ffi.cast("float *", ffi.from_buffer(arr))

    def _bytes(self, arr: np.ndarray | None, rows: int, row_bytes: int, what: str):
        if arr is None:
            return ffi.NULL
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        if arr.shape != (rows, row_bytes):
            raise OptionError(f"{what} must be uint8 [{rows}, {row_bytes}], got {arr.shape}")
        self._keep.append(arr)
        return ffi.from_buffer(arr)

    def _set_predictor(self, layer: int, pred: LayerPredictor) -> None:
        q8 = GGMLQuantizationType.Q8_0
        n_ff, n_embd = self.flash.n_ff, self.flash.n_embd
        if pred.rank <= 0 or pred.rank % PREDICTOR_BLOCK:
            raise OptionError(f"layer {layer}: predictor rank {pred.rank} is not a positive "
                              f"multiple of {PREDICTOR_BLOCK}")
        a = self._bytes(pred.a, pred.rank, row_nbytes(q8, n_embd), f"layer {layer} pred_a")
        b = self._bytes(pred.b, n_ff, row_nbytes(q8, pred.rank), f"layer {layer} pred_b")
        b_up = self._bytes(pred.b_up, n_ff, row_nbytes(q8, pred.rank), f"layer {layer} pred_b_up")
        scale = np.ascontiguousarray(pred.scale, dtype=np.float32)
        if scale.shape != (n_ff,):
            raise OptionError(f"layer {layer}: pred_scale must be [{n_ff}], got {scale.shape}")
        check(lib.fg_runtime_set_predictor(self._rt, layer, pred.rank, a, b, b_up,
                                           self._floats(scale), float(pred.threshold)),
              f"layer {layer}: setting the predictor")
        if pred.sigma_g is not None:
            if (pred.sigma_u is None) != (pred.b_up is None):
                raise OptionError(f"layer {layer}: the predictor needs sigma_u exactly when it "
                                  "has b_up")
            sigmas = []
            for name in ("sigma_g", "sigma_u"):
                arr = getattr(pred, name)
                if arr is not None and np.asarray(arr).shape != (n_ff,):
                    raise OptionError(f"layer {layer}: predictor {name} must be [{n_ff}] floats")
                sigmas.append(self._floats(arr))
            check(lib.fg_runtime_set_predictor_sigma(self._rt, layer, *sigmas),
                  f"layer {layer}: setting the predictor's residuals (finite, >= 0)")

    @property
    def io_backend(self) -> str:
        """The read engine in use: "threads", "io_uring", or "none" (dense mode)."""
        return _IO_NAMES[int(lib.fg_runtime_io_backend(self.handle))]

    @property
    def io_alignment(self) -> int:
        """Alignment of streaming reads: the file's direct-I/O alignment, 1 if buffered."""
        return int(lib.fg_runtime_io_alignment(self.handle))

    def capacity(self, layer: int) -> tuple[int, int]:
        """(slots, pinned rows) of a layer; (n_ff, n_ff) in dense mode."""
        cap, pinned = ffi.new("int32_t *"), ffi.new("int32_t *")
        check(lib.fg_runtime_layer_capacity(self.handle, layer, cap, pinned), f"layer {layer}")
        return int(cap[0]), int(pinned[0])

    def _rows(self, x: np.ndarray, max_rows: int | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.flash.n_embd:
            raise ValueError(f"x must be [n_tokens, {self.flash.n_embd}], got {x.shape}")
        if not 1 <= x.shape[0] <= (max_rows or self.max_tokens):
            raise ValueError(f"x has {x.shape[0]} rows; the runtime takes 1..{self.max_tokens}")
        return x

    def ffn(self, layer: int, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The FFN of one layer on rows of x ([n_tokens, n_embd] float32); with mask (bool
        [n_ff], row order), over exactly those rows instead of the mode's choice."""
        x = self._rows(x)
        y = np.empty_like(x)
        m = ffi.NULL
        if mask is not None:
            mask = np.ascontiguousarray(mask, dtype=np.uint8)
            if mask.shape != (self.flash.n_ff,):
                raise ValueError(f"mask must be [{self.flash.n_ff}], got {mask.shape}")
            m = ffi.from_buffer(mask)
        check(lib.fg_runtime_ffn_masked(
            self.handle, layer, ffi.cast("float *", ffi.from_buffer(x)),
            ffi.cast("float *", ffi.from_buffer(y, require_writable=True)), x.shape[0], m),
            f"FFN of layer {layer}")
        return y

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The C predictor's decisions, bool [n_tokens, n_ff] (streaming modes with one)."""
        x = self._rows(x, max_rows=1 << 30)  # no per-token scratch: any number of rows
        out = np.zeros((x.shape[0], self.flash.n_ff), dtype=np.uint8)
        check(lib.fg_runtime_predict(self.handle, layer, ffi.cast("float *", ffi.from_buffer(x)),
                                     x.shape[0], ffi.from_buffer(out, require_writable=True)),
              f"predictor of layer {layer}")
        return out.astype(bool)

    # ---- trace (flashgguf-profile) -------------------------------------------------

    def trace_start(self, max_calls: int, max_reads: int) -> None:
        """Record the next max_calls streaming FFN calls and their first max_reads reads
        (flashgguf.trace); clears an earlier trace. Streaming modes only."""
        check(lib.fg_runtime_trace_start(self.handle, max_calls, max_reads),
              f"starting a trace of {max_calls} calls and {max_reads} reads")

    def trace_take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
        """(calls, needed bitsets, read offsets, read lengths, calls seen, reads seen) of the
        trace so far; calls is a structured array with fg_trace_call's fields."""
        counts = ffi.new("int64_t[4]")
        lib.fg_runtime_trace_counts(self.handle, counts)
        n_calls, n_reads = int(counts[0]), int(counts[1])
        calls = np.zeros(n_calls, dtype=TRACE_CALL_DTYPE)
        needed = np.zeros((n_calls, (self.flash.n_ff + 7) // 8), dtype=np.uint8)
        offsets = np.zeros(n_reads, dtype=np.uint64)
        lengths = np.zeros(n_reads, dtype=np.uint64)
        if n_calls or n_reads:
            lib.fg_runtime_trace_copy(
                self.handle, ffi.cast("fg_trace_call *", ffi.from_buffer(calls)),
                ffi.from_buffer(needed), ffi.cast("uint64_t *", ffi.from_buffer(offsets)),
                ffi.cast("uint64_t *", ffi.from_buffer(lengths)))
        return calls, needed, offsets, lengths, int(counts[2]), int(counts[3])

    def trace_stop(self) -> None:
        lib.fg_runtime_trace_stop(self.handle)

    # ---- inspection (tests) --------------------------------------------------------

    def slots(self, layer: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(row held by each slot or -1, last-use token stamp of each slot, layer clock)."""
        cap, _ = self.capacity(layer)
        rows = np.empty(cap, dtype=np.int32)
        used = np.empty(cap, dtype=np.uint64)
        clock = ffi.new("uint64_t *")
        check(lib.fg_runtime_debug_slots(self.handle, layer,
                                         ffi.cast("int32_t *", ffi.from_buffer(rows)),
                                         ffi.cast("uint64_t *", ffi.from_buffer(used)), clock),
              f"slots of layer {layer}")
        return rows, used, int(clock[0])

    def resident_row(self, layer: int, row: int) -> bytes | None:
        """The bytes the runtime holds for a row, None when it is not resident."""
        out = ffi.new("uint8_t[]", self.flash.layers[layer].layout.stride)
        code = lib.fg_runtime_debug_row(self.handle, layer, row, out)
        if code == lib.FG_ERR_ARG:
            return None
        check(code, f"row {row} of layer {layer}")
        return bytes(ffi.buffer(out))

    def read_log(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(offsets, lengths) of the logged reads and how many reads were issued."""
        cap = 1 << 20
        off = np.empty(cap, dtype=np.uint64)
        ln = np.empty(cap, dtype=np.uint64)
        n = int(lib.fg_runtime_debug_reads(self.handle,
                                           ffi.cast("uint64_t *", ffi.from_buffer(off)),
                                           ffi.cast("uint64_t *", ffi.from_buffer(ln)), cap))
        kept = min(n, cap)
        return off[:kept].copy(), ln[:kept].copy(), n

    def fail_reads(self, errno_value: int, after: int = 0) -> None:
        """Every read fails with errno_value once `after` more reads went through (0: off)."""
        lib.fg_runtime_debug_fail_reads(self.handle, errno_value, after)

    def transient_reads(self, kind: str, every: int) -> None:
        """Tests: every every-th read first comes back short, or fails once with EINTR or
        EAGAIN (kind "short", "eintr", "eagain"); the engines must absorb it. every 0: off."""
        kinds = {"short": lib.FG_FAULT_SHORT, "eintr": lib.FG_FAULT_EINTR,
                 "eagain": lib.FG_FAULT_EAGAIN}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {', '.join(kinds)}, got {kind!r}")
        lib.fg_runtime_debug_transient_reads(self.handle, kinds[kind], every)

    def delay_reads(self, delay_us: int, every: int) -> None:
        """Tests: every every-th read of a call lands delay_us late (reorders completions)."""
        lib.fg_runtime_debug_delay_reads(self.handle, delay_us, every)

    # ---- errors and stats ----------------------------------------------------------

    def stats(self, reset: bool = False) -> dict[str, float]:
        return self._stats("fg_stats", _STATS, lib.fg_runtime_get_stats,
                           lib.fg_runtime_reset_stats, reset)


_MOE_STATS = ("tokens", "calls", "expert_hits", "expert_misses", "bytes_read", "reads",
              "bytes_needed", "evictions", "pinned", "pinned_hits", "next_predicted",
              "next_right", "next_missed_predicted", "next_right_missed", "prefetch_reads",
              "prefetch_used", "time_io_wait_s", "time_ffn_s", "time_total_s")


class MoERuntime(_NativeHandle):
    """The native expert engine for one mixture-of-experts flash GGUF: every expert resident
    (opts.mode "dense"), or read whole when routed to, into a cache of expert slots that
    holds opts.dram_budget bytes. llama.cpp's graph computes the routing; the callback takes
    its chosen experts and weights and replaces the routed experts' sum."""

    _what = "the expert runtime"
    _callback = "fg_moe_eval_callback"
    _take_error = "fg_moe_take_error"
    _failed = "flash experts failed during llama_decode"

    def __init__(self, flash: MoEFlashFile, spec: ArchSpec, opts: FlashOptions) -> None:
        if spec.moe is None:
            raise OptionError(f"{flash.path}: {spec.name} has no mixture-of-experts block")
        self.flash = flash
        self.spec = spec
        self._opts = opts
        self.mode = "dense" if opts.mode == "dense" else "streaming"
        cfg = ffi.new("fg_moe_config *")
        cfg.n_layer, cfg.n_embd, cfg.n_ff_exp = flash.n_layer, flash.n_embd, flash.n_ff_exp
        cfg.n_expert, cfg.n_expert_used = flash.n_expert, flash.n_expert_used
        cfg.activation = _ACTIVATIONS[flash.activation]
        cfg.max_tokens = opts.max_tokens
        cfg.n_threads, cfg.n_threads_batch = opts.n_threads, opts.n_threads_batch
        cfg.use_direct_io = int(opts.direct_io)
        cfg.io_backend, cfg.io_depth = _IO[opts.io], opts.io_depth
        cfg.resident = int(self.mode == "dense")
        cfg.dram_budget = opts.dram_budget
        cfg.input_node = spec.moe.input_node.encode()
        cfg.output_node = spec.moe.output_node.encode()
        self.max_tokens = opts.max_tokens
        self._rt = None
        out = ffi.new("fg_moe **")
        check(lib.fg_moe_create(cfg, str(flash.path).encode(), out),
              f"opening {flash.path} for the expert runtime")
        self._rt = ffi.gc(out[0], lib.fg_moe_destroy)
        _live_runtimes.add(self)
        for layer in flash.layers:
            la = layer.layout
            check(lib.fg_moe_set_layer(self._rt, layer.index, layer.experts.offset, la.stride,
                                       [int(t) for t in la.types], list(la.offsets)),
                  f"experts of layer {layer.index}")
        # the experts pinned at load (keys layer * n_expert + expert)
        self.pinned = np.zeros(0, np.int32)
        if self.mode == "streaming":
            self.pinned = pinned_experts(flash.frequency,
                                         opts.dram_budget // flash.expert_nbytes,
                                         opts.pinned_share)
            check(lib.fg_moe_pin(self._rt, ffi.cast("int32_t *", ffi.from_buffer(self.pinned)),
                                 self.pinned.size), "pinning experts")
        check(lib.fg_moe_load(self._rt), f"reading the experts of {flash.path}")
        self.direct_io = bool(lib.fg_moe_direct_io(self._rt))
        if opts.direct_io and not self.direct_io:
            warnings.warn(f"{flash.path}: the filesystem refuses direct I/O (tmpfs?); the "
                          "experts are read through the page cache, so I/O figures include "
                          "cached reads", DirectIOWarning, stacklevel=3)
        if opts.expert_prefetch and self.mode == "streaming":
            self.predict_next_layer()
            check(lib.fg_moe_set_prefetch(self.handle, 1), "starting the expert prefetch")

    @property
    def options(self) -> FlashOptions:
        return self._opts

    @property
    def slots(self) -> int:
        """Expert slots of the cache (every expert when resident)."""
        return int(lib.fg_moe_slots(self.handle))

    def predict_next_layer(self) -> None:
        """From now on each decode token's experts are guessed one layer ahead (layer L's
        MoE input through layer L + 1's router) and the guesses scored when L + 1 routes:
        stats next_predicted, next_right (routed to), next_missed_predicted (not resident:
        what a prefetch would have read) and next_right_missed (of those, routed to)."""
        import gguf

        from .format.gguf_stream import map_file, tensor_array

        f = self.flash
        buf = memoryview(map_file(f.path))
        for layer in range(f.n_layer):
            t = f.trunk.tensors[self.spec.moe.router.format(bid=layer)]
            w = gguf.dequantize(tensor_array(buf, t), t.ggml_type)
            w = np.ascontiguousarray(w, dtype=np.float32).reshape(f.n_expert, f.n_embd)
            check(lib.fg_moe_set_router(self.handle, layer,
                                        ffi.cast("float *", ffi.from_buffer(w))),
                  f"router of layer {layer}")

    def forward(self, layer: int, x: np.ndarray, ids: np.ndarray,
                weights: np.ndarray) -> np.ndarray:
        """The routed experts' weighted sum for rows of x (float32 [n, n_embd]) routed to
        ids (int32 [n, n_expert_used]) with weights (float32, the same shape), through the
        cache and reads as a decode does."""
        f = self.flash
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        n = x.shape[0] if x.ndim == 2 else 0
        if x.shape != (n, f.n_embd) or ids.shape != (n, f.n_expert_used) or \
                weights.shape != ids.shape or not 0 < n <= self.max_tokens:
            raise OptionError(f"forward: x {x.shape}, ids {ids.shape}, weights "
                              f"{weights.shape} for n_embd {f.n_embd}, {f.n_expert_used} "
                              f"experts per token, at most {self.max_tokens} rows")
        y = np.empty_like(x)
        check(lib.fg_moe_forward(self.handle, layer, ffi.cast("float *", ffi.from_buffer(x)),
                                 ffi.cast("int32_t *", ffi.from_buffer(ids)),
                                 ffi.cast("float *", ffi.from_buffer(weights)),
                                 ffi.cast("float *", ffi.from_buffer(y)), n),
              f"experts of layer {layer}")
        return y

    def layer_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Expert hits and misses per layer (uint64 [n_layer] each)."""
        hits = np.zeros(self.flash.n_layer, np.uint64)
        misses = np.zeros(self.flash.n_layer, np.uint64)
        lib.fg_moe_layer_stats(self.handle, ffi.cast("uint64_t *", ffi.from_buffer(hits)),
                               ffi.cast("uint64_t *", ffi.from_buffer(misses)))
        return hits, misses

    def resident(self) -> np.ndarray:
        """bool [n_layer, n_expert]: experts held in a slot now."""
        out = np.zeros((self.flash.n_layer, self.flash.n_expert), np.uint8)
        lib.fg_moe_resident(self.handle, ffi.cast("uint8_t *", ffi.from_buffer(out)))
        return out.astype(bool)

    def fail_reads(self, errno_value: int, after: int = 0) -> None:
        """Tests: every read fails with errno_value once `after` more have succeeded."""
        lib.fg_moe_debug_fail_reads(self.handle, errno_value, after)

    def trace_start(self, max_calls: int) -> None:
        """Record the routing of the next max_calls MoE layer calls."""
        check(lib.fg_moe_trace_start(self.handle, max_calls), "starting the routing record")

    def trace_take(self) -> tuple[np.ndarray, np.ndarray]:
        """The recorded calls: layer (int32 [n]) and experts used (bool [n, n_expert]);
        recording stops."""
        cap = int(lib.fg_moe_trace_count(self.handle))
        layer = np.zeros(cap, np.int32)
        used = np.zeros((cap, self.flash.n_expert), np.uint8)
        n = lib.fg_moe_trace_copy(self.handle, ffi.cast("int32_t *", ffi.from_buffer(layer)),
                                  ffi.cast("uint8_t *", ffi.from_buffer(used)))
        lib.fg_moe_trace_stop(self.handle)
        return layer[:n], used[:n].astype(bool)

    def stats(self, reset: bool = False) -> dict[str, float]:
        return self._stats("fg_moe_stats", _MOE_STATS, lib.fg_moe_get_stats,
                           lib.fg_moe_reset_stats, reset)


_live_runtimes: weakref.WeakSet[Runtime | MoERuntime] = weakref.WeakSet()


def _abandon_in_child() -> None:
    # fork() copies only the calling thread: a runtime's read workers stay in the parent,
    # and destroying the runtime here (at the child's exit, say) would wait for them
    # forever. The child leaves it allocated instead; its models refuse to run there.
    for runtime in list(_live_runtimes):
        runtime._abandon()


os.register_at_fork(after_in_child=_abandon_in_child)


class Capture:
    """Records each layer's FFN input rows (the node named node) while llama.cpp evaluates
    a batch of at most max_rows tokens: the calibration's view of the source model."""

    def __init__(self, n_layer: int, n_embd: int, node: str, max_rows: int) -> None:
        out = ffi.new("fg_capture **")
        check(lib.fg_capture_create(n_layer, n_embd, node.encode(), max_rows, out),
              "creating the calibration capture")
        self.handle = ffi.gc(out[0], lib.fg_capture_destroy)
        self.n_embd = n_embd
        self.max_rows = max_rows

    def context_class(self) -> type:
        return _callback_context_class(_address(ffi.addressof(lib, "fg_capture_callback")),
                                      _address(self.handle), lambda: None)

    def take(self, layer: int) -> np.ndarray:
        """The rows captured for layer in the last batch, float32 [rows, n_embd]."""
        out = np.empty((self.max_rows, self.n_embd), dtype=np.float32)
        rows = lib.fg_capture_rows(self.handle, layer)
        code = lib.fg_capture_take(self.handle, layer,
                                   ffi.cast("float *", ffi.from_buffer(out)), self.max_rows)
        if code != lib.FG_OK:
            msg = ffi.new("char[200]")
            lib.fg_capture_take_error(self.handle, msg, 200)
            check(code, "calibration capture", ffi.string(msg).decode(errors="replace"))
        return out[:rows]

    def close(self) -> None:
        ffi.release(self.handle)


def _address(pointer: Any) -> int:
    return int(ffi.cast("uintptr_t", pointer))


# ---- llama.cpp's eval callback -------------------------------------------------------

def llama_cpp_module() -> Any:
    """llama_cpp, imported (it loads llama.cpp's libraries) and checked against the pinned
    release whose eval-callback ABI and graph node names the runtime relies on."""
    import llama_cpp

    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        raise VersionMismatchError(
            f"flashgguf needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (its eval-callback "
            f"ABI and graph node names are pinned), but {llama_cpp.__version__} is installed: "
            f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")
    return llama_cpp


def _callback_context_class(callback_address: int, user_data_address: int,
                           after_decode: Callable[[], None]) -> type:
    """A LlamaContext whose graph runs the C eval callback at callback_address with
    user_data_address; after_decode runs after each decode (to raise the callback's errors)."""
    llama_cpp = llama_cpp_module()
    from llama_cpp import _internals

    callback = llama_cpp.ggml_backend_sched_eval_callback(callback_address)

    class CallbackContext(_internals.LlamaContext):
        def __init__(self, *, model, params, verbose: bool = True) -> None:
            params.cb_eval = callback
            params.cb_eval_user_data = user_data_address
            self._eval_callback = callback  # the ctypes pointer lives as long as the context
            super().__init__(model=model, params=params, verbose=verbose)

        def decode(self, batch) -> None:
            super().decode(batch)
            after_decode()

    return CallbackContext


# llama-cpp-python offers no hook where flashgguf needs one (llama_cpp.Llama creates its
# context inside __init__ with no way to pass cb_eval; llama_cpp.server builds its models
# itself), so a module attribute is swapped for the duration of one call. The lock keeps
# two threads that load models at once from seeing each other's swap; it is reentrant
# because the server's swap wraps a Llama's own.
_swap_lock = threading.RLock()


@contextlib.contextmanager
def swapped_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """owner.name is value inside this block, and what it was again after it."""
    with _swap_lock:
        original = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, original)


def no_weight_repacking() -> contextlib.AbstractContextManager[None]:
    """llama_cpp.Llama made inside loads with use_extra_bufts=False: llama.cpp's CPU backend
    then keeps its weights as the file stores them (pure mmap: DESIGN.md section 5)."""
    llama_cpp = llama_cpp_module()
    original = llama_cpp.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    return swapped_attribute(llama_cpp.llama_cpp, "llama_model_default_params", params)


def installed_context_class(cls: type) -> contextlib.AbstractContextManager[None]:
    """llama_cpp.Llama objects made inside this block get contexts of class cls."""
    from llama_cpp import _internals

    return swapped_attribute(_internals, "LlamaContext", cls)
