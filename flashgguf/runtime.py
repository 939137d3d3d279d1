"""Thin layer over the C core: a Runtime owns one fg_runtime handle; error codes -> exceptions."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from . import constants as C
from ._native import ffi, lib
from .archs import ArchSpec
from .errors import FlashGGUFError, NativeError
from .format import FlashFile

_ACTIVATIONS = {
    "silu": lib.FG_ACT_SILU,
    "gelu": lib.FG_ACT_GELU,
    "relu": lib.FG_ACT_RELU,
    "relu2": lib.FG_ACT_RELU2,
    "fatrelu": lib.FG_ACT_FATRELU,
    "drelu": lib.FG_ACT_DRELU,
}
_PARTS = {C.PART_GATE: lib.FG_PART_GATE, C.PART_UP: lib.FG_PART_UP, C.PART_DOWN: lib.FG_PART_DOWN}


def strerror(code: int) -> str:
    return ffi.string(lib.fg_strerror(code)).decode()


def check(code: int, what: str) -> None:
    if code != lib.FG_OK:
        raise NativeError(f"{what}: {strerror(code)}")


class DirectIOWarning(UserWarning):
    """The payload's filesystem refuses direct I/O; reads go through the page cache."""


@dataclass(frozen=True)
class RuntimeOptions:
    max_tokens: int = 512  # most rows one FFN call may get (llama.cpp's n_ubatch)
    n_threads: int = 1
    n_threads_batch: int = 1
    direct_io: bool = True


class Runtime:
    """The native FFN engine for one flash GGUF, with every bundle loaded in DRAM."""

    def __init__(self, flash: FlashFile, spec: ArchSpec, opts: RuntimeOptions) -> None:
        self.flash = flash
        self.spec = spec
        cfg = ffi.new("fg_config *")
        cfg.n_layer = flash.n_layer
        cfg.n_embd = flash.n_embd
        cfg.n_ff = flash.n_ff
        cfg.gated = int(flash.gated)
        cfg.activation = _ACTIVATIONS[flash.activation]
        cfg.activation_threshold = flash.activation_threshold
        for part, ggml_type, offset in zip(flash.layout.parts, flash.layout.types,
                                           flash.layout.offsets, strict=True):
            cfg.part_type[_PARTS[part]] = int(ggml_type)
            cfg.part_offset[_PARTS[part]] = offset
        cfg.bundle_stride = flash.layout.stride
        cfg.max_tokens = max(1, opts.max_tokens)
        cfg.n_threads = max(1, opts.n_threads)
        cfg.n_threads_batch = max(1, opts.n_threads_batch)
        cfg.use_direct_io = int(opts.direct_io)
        cfg.input_node = spec.ffn_input_node.encode()
        cfg.output_node = spec.ffn_output_node.encode()
        self.max_tokens = cfg.max_tokens

        out = ffi.new("fg_runtime **")
        code = lib.fg_runtime_create(cfg, str(flash.path).encode(), out)
        if code == lib.FG_ERR_IO:
            raise NativeError(f"cannot open {flash.path} for reading: {strerror(code)}")
        check(code, "creating the flash runtime")
        self._rt = ffi.gc(out[0], lib.fg_runtime_destroy)
        self._keep = []  # bias buffers stay alive until C has copied them
        for layer in flash.layers:
            biases = [self._floats(b) for b in (layer.up_bias, layer.gate_bias, layer.down_bias)]
            check(lib.fg_runtime_set_layer(self._rt, layer.index, layer.bundle.offset, *biases),
                  f"layer {layer.index}")
        self._keep.clear()
        check(lib.fg_runtime_load_all(self._rt), f"reading the FFN bundles of {flash.path}")
        self.direct_io = bool(lib.fg_runtime_direct_io(self._rt))
        if opts.direct_io and not self.direct_io:
            warnings.warn(f"{flash.path}: the filesystem refuses direct I/O (tmpfs?); the payload "
                          "is read through the page cache, so I/O figures include cached reads",
                          DirectIOWarning, stacklevel=3)

    def _floats(self, arr: np.ndarray | None):
        if arr is None:
            return ffi.NULL
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self._keep.append(arr)
        return ffi.cast("float *", ffi.from_buffer(arr))

    @property
    def handle(self):
        if self._rt is None:
            raise FlashGGUFError("the flash runtime is closed")
        return self._rt

    @property
    def callback_address(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "fg_eval_callback")))

    @property
    def handle_address(self) -> int:
        return int(ffi.cast("uintptr_t", self.handle))

    def ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The FFN of one layer on rows of x ([n_tokens, n_embd] float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.flash.n_embd:
            raise ValueError(f"x must be [n_tokens, {self.flash.n_embd}], got {x.shape}")
        if not 1 <= x.shape[0] <= self.max_tokens:
            raise ValueError(f"x has {x.shape[0]} rows; the runtime takes 1..{self.max_tokens}")
        y = np.empty_like(x)
        check(lib.fg_runtime_ffn(self.handle, layer,
                                 ffi.cast("float *", ffi.from_buffer(x)),
                                 ffi.cast("float *", ffi.from_buffer(y, require_writable=True)),
                                 x.shape[0]), f"FFN of layer {layer}")
        return y

    def raise_pending_error(self) -> None:
        """Raise what went wrong inside the eval callback during the last decode, if anything."""
        msg = ffi.new("char[256]")
        code = lib.fg_runtime_take_error(self.handle, msg, 256)
        if code != lib.FG_OK:
            raise NativeError(f"flash FFN failed during llama_decode: "
                              f"{ffi.string(msg).decode(errors='replace')} ({strerror(code)})")

    def stats(self, reset: bool = False) -> dict[str, float]:
        s = ffi.new("fg_stats *")
        lib.fg_runtime_get_stats(self.handle, s)
        out = {
            "tokens": int(s.tokens),
            "bytes_read": int(s.bytes_read),
            "reads": int(s.reads),
            "neurons_computed": int(s.neurons_computed),
            "time_io_s": float(s.time_io_s),
            "time_ffn_s": float(s.time_ffn_s),
        }
        if reset:
            lib.fg_runtime_reset_stats(self.handle)
        return out

    def close(self) -> None:
        if self._rt is not None:
            ffi.release(self._rt)
            self._rt = None
