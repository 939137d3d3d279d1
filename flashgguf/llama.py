"""flashgguf.Llama: llama_cpp.Llama with the FFN computed by flashgguf's runtime.

The trunk of a flash GGUF is loaded by llama.cpp as it is (kv_overrides gives back the real
architecture name); a C eval callback on the llama.cpp context computes each layer's FFN
from the payload. Every high-level llama-cpp-python API works unchanged on top.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .archs import get_arch
from .errors import NotFlashGGUFError, OptionError
from .format import MoEFlashFile, is_flash_gguf, open_any_flash_file
from .options import (
    DEFAULT_COALESCE_GAP,
    DEFAULT_DOWN_KEEP,
    DEFAULT_EXPERT_PREFETCH,
    DEFAULT_GATE_CACHE_BONUS,
    DEFAULT_GATE_KEEP,
    DEFAULT_GATE_PER_LAYER,
    DEFAULT_IO,
    DEFAULT_MODE,
    DEFAULT_PINNED_SHARE,
    DEFAULT_WINDOW,
    FlashOptions,
    flash_options,
    predictors_at_recall,
)
from .policy import default_mode
from .predictor import LayerPredictor
from .runtime import MoERuntime, Runtime, installed_context_class, llama_cpp_module
from .usage import UseGuard

llama_cpp = llama_cpp_module()


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama that runs flash GGUFs (made by flashgguf-convert).

    flash_offload=True: the FFN payload is read with direct I/O by flashgguf's runtime and
    kept under flash_dram_budget: bytes, a "48MiB"/"1.5GiB" string, or a float fraction in
    (0, 1] of the FFN payload. Without a budget the whole payload stays resident when it fits
    in 80% (options.DEFAULT_RAM_SHARE) of the RAM available at load (cgroup limits included)
    after the trunk, else that share is the budget. A budget that holds the whole payload
    keeps every bundle resident in predicted mode (read once at load).
    flash_mode: "gate" (the default for files converted with --gate-resident: the gate
    matrix stays in DRAM and each token's exact gate picks the rows whose up and down are
    read: its top flash_gate_keep share by |act(gate)|; flash_gate_cache_bonus > 0 scores
    a row already in DRAM by (1 + bonus) |act|; flash_gate_per_layer=True spreads
    flash_gate_keep over the layers of a file that stores per-layer error curves, at the same
    summed error; off by default: it measured worse, BENCHMARKS.md; on a file converted with
    --two-stage, the down rows are read only for each token's top flash_down_keep share of
    rows by |h| x ||down||, once h = act(gate) x up is exact; default
    options.DEFAULT_DOWN_KEEP, refused on other files), "predicted" (predictor +
    window cache + pinned hot rows; the file must store a predictor), "naive" (each layer's
    whole FFN read every token) or "hybrid" (the rows the budget holds pinned, the rest read
    every token): the paper's baselines. Default for other files: of predicted and hybrid, the one
    expected to read fewer bytes per token at this budget (flashgguf/policy.py).
    flash_window: tokens a loaded row is kept without being used before it is the first to
    go. flash_pinned_share: share of each layer's slots pinned to its hottest rows (default
    0.25); for a mixture of experts, share of the expert cache pinned to the most used
    experts of the file's calibrated routing (default: the share the converter measured to
    pay on held-out text, 0 when it did not or without --calibrate).
    flash_expert_prefetch (mixtures of experts): each decode call guesses the next layer's
    experts from its own input and reads the guesses no slot holds while llama.cpp computes
    that layer's attention (stats prefetch_reads, prefetch_used; default off).
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
                 flash_dram_budget: int | float | str | None = None,
                 flash_window: int = DEFAULT_WINDOW, flash_mode: str | None = None,
                 flash_gate_keep: float = DEFAULT_GATE_KEEP,
                 flash_gate_cache_bonus: float = DEFAULT_GATE_CACHE_BONUS,
                 flash_gate_per_layer: bool = DEFAULT_GATE_PER_LAYER,
                 flash_down_keep: float | None = None,
                 flash_pinned_share: float | None = None,
                 flash_expert_prefetch: bool = DEFAULT_EXPERT_PREFETCH,
                 flash_coalesce_gap: int | str = DEFAULT_COALESCE_GAP, flash_io: str = DEFAULT_IO,
                 flash_predictor_recall: float | None = None,
                 flash_predictors: Sequence[LayerPredictor | None] | None = None,
                 **kwargs: Any) -> None:
        self._flash_runtime: Runtime | MoERuntime | None = None
        path = os.fspath(model_path)
        self._use = UseGuard(f"the model {path}")
        if not is_flash_gguf(path):
            if flash_offload:
                raise NotFlashGGUFError(
                    f"{path} is not a flash GGUF; convert it first: flashgguf-convert {path} "
                    f"-o {os.path.splitext(path)[0]}.flash.gguf"
                )
            super().__init__(path, *args, **kwargs)
            return

        flash = open_any_flash_file(path)
        spec = get_arch(flash.arch)
        overrides = dict(kwargs.pop("kv_overrides", None) or {})
        overrides["general.architecture"] = flash.arch
        n_batch = int(kwargs.get("n_batch", 512))
        n_ubatch = int(kwargs.get("n_ubatch", 512))
        n_threads = kwargs.get("n_threads") or max(multiprocessing.cpu_count() // 2, 1)
        n_threads_batch = kwargs.get("n_threads_batch") or multiprocessing.cpu_count()

        if flash_pinned_share is None:  # a MoE file's measured default, else the dense one
            flash_pinned_share = flash.pinned_share if isinstance(flash, MoEFlashFile) \
                else DEFAULT_PINNED_SHARE

        def options_for(mode: str) -> FlashOptions:
            return flash_options(
                flash.payload_nbytes, flash_dram_budget, mode, flash_window, flash_pinned_share,
                flash_coalesce_gap, flash_io, trunk_nbytes=flash.file_size - flash.payload_nbytes,
                offload=flash_offload, max_tokens=max(1, min(n_batch, n_ubatch)),
                n_threads=n_threads, n_threads_batch=n_threads_batch, gate_keep=flash_gate_keep,
                gate_cache_bonus=flash_gate_cache_bonus, gate_per_layer=flash_gate_per_layer,
                down_keep=DEFAULT_DOWN_KEEP if flash_down_keep is None else flash_down_keep,
                expert_prefetch=flash_expert_prefetch)

        if flash_down_keep is not None and (isinstance(flash, MoEFlashFile) or not flash.split):
            raise OptionError(f"{path}: flash_down_keep is for files whose up and down rows are "
                              "stored apart: convert the model with flashgguf-convert "
                              "--gate-resident --two-stage")

        if isinstance(flash, MoEFlashFile):
            if flash_mode is not None or flash_predictors is not None or \
                    flash_predictor_recall is not None:
                raise OptionError(f"{path} is a mixture of experts: its router picks the "
                                  "experts, so flash_mode and the predictor options do not "
                                  "apply")
            # "predicted" only for the rule's outcome: resident when the budget holds every
            # expert, else streamed through expert slots
            self._flash_runtime = MoERuntime(flash, spec, options_for("predicted"))
            self._init_llama(path, args, overrides, kwargs)
            return
        if flash_expert_prefetch:
            raise OptionError(f"{path} has no experts: flash_expert_prefetch is for mixtures "
                              "of experts")

        layer_weights = None
        if flash_predictor_recall is not None:
            if flash_predictors is not None:
                raise OptionError("give flash_predictor_recall or flash_predictors, not both")
            flash_predictors, layer_weights = predictors_at_recall(flash, flash_predictor_recall)
        if flash_mode is None:  # predictors or a recall given: the caller means predicted
            flash_mode = DEFAULT_MODE if flash_predictors is not None else \
                default_mode(flash, spec, options_for)
        opts = options_for(flash_mode)
        self._flash_runtime = Runtime(flash, spec, opts, predictors=flash_predictors,
                                      layer_weights=layer_weights)
        self._init_llama(path, args, overrides, kwargs)

    def _init_llama(self, path: str, args: Any, overrides: dict[str, Any],
                    kwargs: dict[str, Any]) -> None:
        """llama_cpp.Llama's own __init__ with the runtime's callback on its context."""
        runtime = self._flash_runtime
        assert runtime is not None
        try:
            with installed_context_class(runtime.context_class()):
                super().__init__(path, *args, kv_overrides=overrides, **kwargs)
        except BaseException:
            runtime.close()
            self._flash_runtime = None
            raise

    @property
    def flash_runtime(self) -> Runtime | MoERuntime | None:
        return self._flash_runtime

    def flash_stats(self, reset: bool = False) -> dict[str, float]:
        """Cumulative counters of the flash runtime (empty for a plain GGUF)."""
        return {} if self._flash_runtime is None else self._flash_runtime.stats(reset=reset)

    # One thread at a time (flashgguf/usage.py): the calls that decode, sample or change
    # the context's state. tokenize/detokenize only read the vocabulary.
    def eval(self, tokens: Sequence[int]) -> None:
        with self._use.use("eval"):
            super().eval(tokens)

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[int]:
        return self._use.generation("generate", super().generate(*args, **kwargs))

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded_call("create_completion", super().create_completion, args, kwargs)

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded_call("create_chat_completion", super().create_chat_completion,
                                  args, kwargs)

    def _guarded_call(self, what: str, call: Any, args: Any, kwargs: Any) -> Any:
        # the whole call is one use; a stream is one step per chunk, so that close() from
        # another thread never frees the model under the detokenizing between tokens
        with self._use.use(what):
            result = call(*args, **kwargs)
        return self._use.generation(what, result) if isinstance(result, Iterator) else result

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        with self._use.use("embed"):
            return super().embed(*args, **kwargs)

    def reset(self) -> None:
        with self._use.use("reset"):
            super().reset()

    def save_state(self) -> Any:
        with self._use.use("save_state"):
            return super().save_state()

    def load_state(self, state: Any) -> None:
        with self._use.use("load_state"):
            super().load_state(state)

    def close(self) -> None:
        """Free the model; from another thread while it generates, once that generation
        ends (its next step raises ModelClosedError). Calling it again does nothing."""
        guard = getattr(self, "_use", None)
        if guard is None:  # __init__ failed before the guard existed
            self._free()
        else:
            guard.close(self._free)

    def _free(self) -> None:
        # The context (which calls into the runtime) goes first, then the runtime.
        if hasattr(self, "_stack"):  # absent when __init__ failed before llama.cpp was called
            super().close()
        runtime, self._flash_runtime = getattr(self, "_flash_runtime", None), None
        if runtime is not None:
            runtime.close()
