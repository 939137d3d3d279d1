"""Collect each layer's FFN input from stock llama.cpp running the source GGUF.

The C capture callback (native/capture.c) records the rows of the architecture's FFN input
node while llama.cpp evaluates windows of the calibration text; after each window the rows
are appended to one float16 file per layer on disk. Memory stays bounded by the capture
buffer (n_layer x window x n_embd floats) whatever the number of tokens.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..archs import ArchSpec
from ..errors import CalibrationError, NativeError
from ..runtime import Capture, installed_context_class, llama_cpp_module


@dataclass(frozen=True)
class CalibrationOptions:
    text: Path | None = None  # None: the calibration text shipped with flashgguf
    tokens: int = 8192  # FFN inputs collected per layer (the most tokens used)
    min_tokens: int = 2048  # fewer in the text is an error: too little to fit on
    window_tokens: int = 512  # context of each window of text
    held_out: float = 0.25  # share of the tokens kept to set thresholds and measure
    # order each layer's neurons hottest first (pinning takes a prefix, co-active neurons
    # sit closer); False keeps the source order, to measure what the ordering buys
    hot_first: bool = True
    n_threads: int | None = None

    def check(self) -> None:
        if self.tokens < self.min_tokens:
            raise CalibrationError(f"--calibration-tokens {self.tokens} is below the minimum "
                                   f"{self.min_tokens}")
        if self.window_tokens < 16:
            raise CalibrationError(f"calibration window of {self.window_tokens} tokens < 16")
        if not 0.05 <= self.held_out <= 0.5:
            raise CalibrationError(f"held-out share {self.held_out} is not in [0.05, 0.5]")


@dataclass(frozen=True)
class FFNInputs:
    """FFN inputs of n_tokens calibration tokens: one [n_tokens, n_embd] float16 file per layer."""

    folder: Path
    n_layer: int
    n_embd: int
    n_tokens: int
    text_sha256: str = ""

    def path(self, layer: int) -> Path:
        return self.folder / f"ffn_input.{layer}.f16"

    def layer(self, layer: int) -> np.ndarray:
        """Layer's inputs as float32 [n_tokens, n_embd] (one layer in memory at a time)."""
        data = np.fromfile(self.path(layer), dtype=np.float16)
        return data.reshape(self.n_tokens, self.n_embd).astype(np.float32)

    def split(self, layer: int, held_out: float) -> tuple[np.ndarray, np.ndarray]:
        """(fit, held out) rows of a layer: the held-out ones are the last windows of text,
        so that neighbouring tokens do not sit on both sides."""
        x = self.layer(layer)
        n_held = max(1, int(round(self.n_tokens * held_out)))
        return x[:-n_held], x[-n_held:]


def collect_ffn_inputs(source_gguf: str | os.PathLike[str], spec: ArchSpec, n_layer: int,
                       n_embd: int, text: str, folder: Path,
                       opts: CalibrationOptions) -> FFNInputs:
    """Run the source model on text in windows of opts.window_tokens (each from an empty
    context, so every position is seen) and store up to opts.tokens FFN inputs per layer."""
    max_tokens, window_tokens = opts.tokens, opts.window_tokens
    min_tokens, n_threads = opts.min_tokens, opts.n_threads
    llama_cpp = llama_cpp_module()
    capture = Capture(n_layer, n_embd, spec.ffn_input_node, window_tokens)
    threads = n_threads or max(os.cpu_count() or 1, 1)
    with installed_context_class(capture.context_class()):
        llm = llama_cpp.Llama(os.fspath(source_gguf), n_ctx=window_tokens, n_batch=window_tokens,
                              n_ubatch=window_tokens, n_threads=threads,
                              n_threads_batch=threads, verbose=False,
                              # every position's logits, so that the last layer keeps every
                              # row (llama.cpp drops rows without an output before its FFN)
                              logits_all=True)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(tokens) < min_tokens:
            raise CalibrationError(f"the calibration text has {len(tokens)} tokens; at least "
                                   f"{min_tokens} are needed")
        bos = llm.token_bos()
        step = window_tokens - 1 if bos >= 0 else window_tokens
        folder.mkdir(parents=True, exist_ok=True)
        files = [open(folder / f"ffn_input.{layer}.f16", "wb") for layer in range(n_layer)]
        n_done = 0
        try:
            for start in range(0, len(tokens), step):
                if n_done >= max_tokens:
                    break
                window = tokens[start:start + step]
                if bos >= 0:
                    window = [bos, *window]
                llm.reset()
                llm.eval(window)
                keep = min(len(window), max_tokens - n_done)
                for layer, f in enumerate(files):
                    rows = capture.take(layer)
                    if rows.shape[0] != len(window):
                        raise NativeError(f"layer {layer}: captured {rows.shape[0]} FFN inputs "
                                          f"for a window of {len(window)} tokens")
                    if not np.all(np.abs(rows[:keep]) < 65000.0):
                        raise CalibrationError(f"layer {layer}: FFN inputs beyond float16 range "
                                               "(or not finite) cannot be stored")
                    rows[:keep].astype(np.float16).tofile(f)
                n_done += keep
        finally:
            for f in files:
                f.close()
    finally:
        llm.close()
        capture.close()
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return FFNInputs(folder, n_layer, n_embd, n_done, text_sha256)
