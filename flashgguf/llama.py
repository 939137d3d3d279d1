"""flashgguf.Llama: llama_cpp.Llama with the FFN computed by flashgguf's runtime.

The trunk of a flash GGUF is loaded by llama.cpp as it is (kv_overrides gives back the real
architecture name); a C eval callback on the llama.cpp context computes each layer's FFN
from the payload. Every high-level llama-cpp-python API works unchanged on top.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import llama_cpp
from llama_cpp import _internals

from .archs import get_arch
from .errors import NotFlashGGUFError, OptionError, VersionMismatchError
from .format import is_flash_gguf, open_flash_file
from .options import (
    DEFAULT_COALESCE_GAP,
    DEFAULT_PINNED_SHARE,
    flash_options,
    predictors_at_recall,
)
from .predictor import LayerPredictor
from .runtime import Runtime, RuntimeOptions

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
    raise VersionMismatchError(
        f"flashgguf needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (its eval-callback ABI and "
        f"graph node names are pinned), but {llama_cpp.__version__} is installed: "
        f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    )

# llama_cpp.Llama creates its context inside __init__ with no way to pass cb_eval, so the
# context class is swapped for the duration of that call; the lock keeps two threads that
# load models at once from seeing each other's swap.
_context_swap_lock = threading.Lock()


def callback_context_class(callback_address: int, user_data_address: int,
                           after_decode: Callable[[], None]) -> type[_internals.LlamaContext]:
    """A LlamaContext whose graph runs the C eval callback at callback_address with
    user_data_address; after_decode runs after each decode (to raise the callback's errors)."""
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


def _flash_context_class(runtime: Runtime) -> type[_internals.LlamaContext]:
    return callback_context_class(runtime.callback_address, runtime.handle_address,
                                  runtime.raise_pending_error)


@contextlib.contextmanager
def installed_context_class(cls: type[_internals.LlamaContext]) -> Iterator[None]:
    with _context_swap_lock:
        original = _internals.LlamaContext
        _internals.LlamaContext = cls
        try:
            yield
        finally:
            _internals.LlamaContext = original


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama that runs flash GGUFs (made by flashgguf-convert).

    flash_offload=True: the FFN payload is read with direct I/O by flashgguf's runtime and
    kept under flash_dram_budget: bytes, a "48MiB"/"1.5GiB" string, or a float fraction in
    (0, 1] of the FFN payload. Without a budget the whole payload stays resident when it fits
    in half the RAM available at load, else half that RAM is the budget. A budget that
    holds the whole payload keeps every bundle resident (read once at load).
    flash_mode: "predicted" (default: predictor + window cache + pinned hot rows; the file
    must store a predictor), "naive" (each layer's whole FFN read every token) or "hybrid"
    (the rows the budget holds pinned, the rest read every token): the paper's baselines.
    flash_window: tokens a loaded row is kept without being used before it is the first to
    go. flash_pinned_share: share of each layer's slots pinned to its hottest rows.
    flash_coalesce_gap: misses at most this many rows apart are read in one read; "auto"
    (default): when the bytes between them cost less than a read's fixed cost.
    flash_io: "auto", "threads" (pread workers) or "io_uring".
    flash_predictor_recall: trade quality for I/O at run time: each layer's predictor
    threshold for this recall of the needed neurons, from the curves the converter measured
    and stored (SiLU/GELU predictors); default: the threshold chosen at conversion.
    flash_predictors: one LayerPredictor (or None) per layer instead of the file's own
    (experiments, benchmarks, tests).

    flash_offload=False on a flash GGUF: the same engine, every bundle resident, read
    through the page cache. A plain GGUF with flash_offload=False is run by llama.cpp.
    """

    def __init__(self, model_path: str, *args: Any, flash_offload: bool = False,
                 flash_dram_budget: int | float | str | None = None, flash_window: int = 4,
                 flash_mode: str = "predicted", flash_pinned_share: float = DEFAULT_PINNED_SHARE,
                 flash_coalesce_gap: int | str = DEFAULT_COALESCE_GAP, flash_io: str = "auto",
                 flash_predictor_recall: float | None = None,
                 flash_predictors: Sequence[LayerPredictor | None] | None = None,
                 **kwargs: Any) -> None:
        self._flash_runtime: Runtime | None = None
        path = os.fspath(model_path)
        if not is_flash_gguf(path):
            if flash_offload:
                raise NotFlashGGUFError(
                    f"{path} is not a flash GGUF; convert it first: flashgguf-convert {path} "
                    f"-o {os.path.splitext(path)[0]}.flash.gguf"
                )
            super().__init__(path, *args, **kwargs)
            return

        flash = open_flash_file(path)
        spec = get_arch(flash.arch)
        overrides = dict(kwargs.pop("kv_overrides", None) or {})
        overrides["general.architecture"] = flash.arch
        n_batch = int(kwargs.get("n_batch", 512))
        n_ubatch = int(kwargs.get("n_ubatch", 512))
        n_threads = kwargs.get("n_threads") or max(multiprocessing.cpu_count() // 2, 1)
        n_threads_batch = kwargs.get("n_threads_batch") or multiprocessing.cpu_count()
        opts = flash_options(flash.payload_nbytes, flash_dram_budget, flash_mode, flash_window,
                             flash_pinned_share, flash_coalesce_gap, flash_io,
                             trunk_nbytes=flash.file_size - flash.payload_nbytes)
        streaming = flash_offload and opts.budget is not None
        layer_weights = None
        if flash_predictor_recall is not None:
            if flash_predictors is not None:
                raise OptionError("give flash_predictor_recall or flash_predictors, not both")
            flash_predictors, layer_weights = predictors_at_recall(flash, flash_predictor_recall)
        runtime = Runtime(flash, spec, RuntimeOptions(
            max_tokens=max(1, min(n_batch, n_ubatch)),
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            direct_io=flash_offload,
            mode=opts.mode if streaming else "dense",
            dram_budget=opts.budget if streaming else 0,
            pinned_share=opts.pinned_share,
            window=opts.window,
            coalesce_gap=opts.coalesce_gap,
            io=opts.io,
        ), predictors=flash_predictors, layer_weights=layer_weights)
        self._flash_runtime = runtime
        try:
            with installed_context_class(_flash_context_class(runtime)):
                super().__init__(path, *args, kv_overrides=overrides, **kwargs)
        except BaseException:
            runtime.close()
            self._flash_runtime = None
            raise

    @property
    def flash_runtime(self) -> Runtime | None:
        return self._flash_runtime

    def flash_stats(self, reset: bool = False) -> dict[str, float]:
        """Cumulative counters of the flash runtime (empty for a plain GGUF)."""
        return {} if self._flash_runtime is None else self._flash_runtime.stats(reset=reset)

    def close(self) -> None:
        # The context (which calls into the runtime) goes first, then the runtime.
        if hasattr(self, "_stack"):  # absent when __init__ failed before llama.cpp was called
            super().close()
        runtime, self._flash_runtime = getattr(self, "_flash_runtime", None), None
        if runtime is not None:
            runtime.close()
