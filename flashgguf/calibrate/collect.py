"""Collect each layer's FFN input (or, for a mixture of experts, its routing) from stock
llama.cpp running the source GGUF.

The C capture callback (native/capture.c) records the rows of the architecture's FFN input
node while llama.cpp evaluates windows of the calibration text; after each window the rows
are appended to one float16 file per layer on disk. Memory stays bounded by the capture
buffer (n_layer x window x n_embd floats) whatever the number of tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..archs import ArchSpec, MoESpec
from ..errors import CalibrationError, NativeError
from ..runtime import Capture, installed_context_class, llama_cpp_module, no_weight_repacking


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


@contextlib.contextmanager
def _source_model(source_gguf: str | os.PathLike[str], capture: Capture,
                  opts: CalibrationOptions, repack: bool = True) -> Iterator[Any]:
    """Stock llama.cpp on the source GGUF with capture's callback in its graph; repack=False
    keeps the weights mapped (a model larger than RAM then streams instead of filling it)."""
    llama_cpp = llama_cpp_module()
    threads = opts.n_threads or max(os.cpu_count() or 1, 1)
    with installed_context_class(capture.context_class()), \
            contextlib.nullcontext() if repack else no_weight_repacking():
        llm = llama_cpp.Llama(os.fspath(source_gguf), n_ctx=opts.window_tokens,
                              n_batch=opts.window_tokens, n_ubatch=opts.window_tokens,
                              n_threads=threads, n_threads_batch=threads, verbose=False,
                              # every position's logits, so that the last layer keeps every
                              # row (llama.cpp drops rows without an output before its FFN)
                              logits_all=True)
    try:
        yield llm
    finally:
        llm.close()
        capture.close()


def _windows(llm: Any, text: str, opts: CalibrationOptions) -> Iterator[tuple[int, int]]:
    """Evaluate text in windows of opts.window_tokens, each from an empty context (so that
    every position is seen), until opts.tokens are done: yields each window's token count
    and how many of them to keep."""
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if len(tokens) < opts.min_tokens:
        raise CalibrationError(f"the calibration text has {len(tokens)} tokens; at least "
                               f"{opts.min_tokens} are needed")
    bos = llm.token_bos()
    step = opts.window_tokens - 1 if bos >= 0 else opts.window_tokens
    n_done = 0
    for start in range(0, len(tokens), step):
        if n_done >= opts.tokens:
            break
        window = tokens[start:start + step]
        if bos >= 0:
            window = [bos, *window]
        llm.reset()
        llm.eval(window)
        keep = min(len(window), opts.tokens - n_done)
        yield len(window), keep
        n_done += keep


def _take(capture: Capture, layer: int, n_window: int, what: str) -> np.ndarray:
    rows = capture.take(layer)
    if rows.shape[0] != n_window:
        raise NativeError(f"layer {layer}: captured {rows.shape[0]} {what} for a window of "
                          f"{n_window} tokens")
    return rows


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def collect_ffn_inputs(source_gguf: str | os.PathLike[str], spec: ArchSpec, n_layer: int,
                       n_embd: int, text: str, folder: Path,
                       opts: CalibrationOptions) -> FFNInputs:
    """Run the source model on text in windows of opts.window_tokens and store up to
    opts.tokens FFN inputs per layer."""
    capture = Capture(n_layer, n_embd, spec.ffn_input_node, opts.window_tokens)
    n_done = 0
    with _source_model(source_gguf, capture, opts) as llm:
        folder.mkdir(parents=True, exist_ok=True)
        files = [open(folder / f"ffn_input.{layer}.f16", "wb") for layer in range(n_layer)]
        try:
            for n_window, keep in _windows(llm, text, opts):
                for layer, f in enumerate(files):
                    rows = _take(capture, layer, n_window, "FFN inputs")
                    if not np.all(np.abs(rows[:keep]) < 65000.0):
                        raise CalibrationError(f"layer {layer}: FFN inputs beyond float16 range "
                                               "(or not finite) cannot be stored")
                    rows[:keep].astype(np.float16).tofile(f)
                n_done += keep
        finally:
            for f in files:
                f.close()
    return FFNInputs(folder, n_layer, n_embd, n_done, _text_sha256(text))


@dataclass(frozen=True)
class ExpertChoices:
    """The experts the router chose for each of n_tokens calibration tokens."""

    chosen: np.ndarray  # int16 [n_tokens, n_layer, n_used], in text order
    n_expert: int
    text_sha256: str

    @property
    def n_tokens(self) -> int:
        return self.chosen.shape[0]

    @staticmethod
    def frequency_of(chosen: np.ndarray, n_expert: int) -> np.ndarray:
        """float32 [n_layer, n_expert]: the share of the tokens (rows of chosen) that used
        each expert (a layer's row sums to the experts used per token)."""
        n_tokens, n_layer, _ = chosen.shape
        keys = chosen.astype(np.int64) + np.arange(n_layer)[None, :, None] * n_expert
        counts = np.bincount(keys.ravel(), minlength=n_layer * n_expert)
        return (counts.reshape(n_layer, n_expert) / max(n_tokens, 1)).astype(np.float32)

    @property
    def frequency(self) -> np.ndarray:
        return self.frequency_of(self.chosen, self.n_expert)


def count_expert_choices(source_gguf: str | os.PathLike[str], moe: MoESpec, n_layer: int,
                         n_expert: int, n_used: int, text: str,
                         opts: CalibrationOptions) -> ExpertChoices:
    """Run the source model on text (windows as collect_ffn_inputs, weights mapped, not
    repacked: a mixture of experts is usually larger than RAM) and record each token's
    routing. The router's logits (node moe.logits_node) are captured; the experts chosen
    are their top n_used, which is llama.cpp's choice for every supported architecture
    (softmax gating without an expert bias: the softmax keeps the logits' order)."""
    capture = Capture(n_layer, n_expert, moe.logits_node, opts.window_tokens)
    chosen: list[np.ndarray] = []
    with _source_model(source_gguf, capture, opts, repack=False) as llm:
        for n_window, keep in _windows(llm, text, opts):
            window = np.empty((keep, n_layer, n_used), np.int16)
            for layer in range(n_layer):
                logits = _take(capture, layer, n_window, "router outputs")[:keep]
                if not np.all(np.isfinite(logits)):
                    raise CalibrationError(f"layer {layer}: the router's outputs are not "
                                           "finite")
                window[:, layer] = np.argpartition(-logits, n_used - 1, axis=1)[:, :n_used]
            chosen.append(window)
    return ExpertChoices(np.concatenate(chosen), n_expert, _text_sha256(text))
