"""flash_mode's default for a file at a budget: of predicted and hybrid, the mode expected to
read fewer FFN bytes per token, from the plan the budget gives each and the share of rows
the converter measured the file's predictor to mark active.

Predicted mode pays when a token needs few rows (ReLU-family models: exact zeros). On a
dense SiLU/GELU FFN its predictor marks 80-99% of the rows and takes DRAM that hybrid gives
to rows: SmolLM2 at a 50% budget read 46.8 MiB per token in predicted mode (calibrated
predictor, 1.026x stock perplexity) against 29.6 MiB in hybrid (0.996x), BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .archs import ArchSpec
from .errors import BudgetError
from .format import FlashFile
from .options import DEFAULT_GATE_MODE, DEFAULT_MODE, FlashOptions
from .runtime import Runtime

CHOSEN_MODES = ("predicted", "hybrid")


def expected_read_bytes(flash: FlashFile, spec: ArchSpec, opts: FlashOptions,
                        densities: Sequence[float | None] | None = None) -> float | None:
    """FFN bytes read per token by a streaming predicted or hybrid run, before cache hits
    and coalescing: hybrid reads every row its slots do not hold; predicted reads the rows
    its predictor marks active (each layer's density, uniform over the rows) beyond the
    pinned ones. None where the budget cannot hold the mode or a density is unknown."""
    if opts.mode not in CHOSEN_MODES:
        raise ValueError(f"no read estimate for mode {opts.mode!r}")
    if densities is None:
        densities = [layer.predictor_density for layer in flash.layers]
    runtime = Runtime(flash, spec, opts, load=False)
    try:
        plan = runtime.plan()
    except BudgetError:
        return None
    finally:
        runtime.close()
    total = 0.0
    for layer, density, (slots, pinned) in zip(flash.layers, densities, plan, strict=True):
        if opts.mode == "hybrid":
            rows = flash.n_ff - slots
        elif density is None:
            return None
        else:
            rows = density * (flash.n_ff - pinned)
        total += rows * layer.layout.stride
    return total


def default_mode(flash: FlashFile, spec: ArchSpec, options_for: Callable[[str], FlashOptions],
                 densities: Sequence[float | None] | None = None) -> str:
    """The flash_mode a file runs in when none is given. options_for(mode) is the options
    record the run would have in that mode (budget, threads, ...); densities: each layer's
    share of rows predicted active (default: the file's, measured by the converter)."""
    if flash.gate_resident:
        return DEFAULT_GATE_MODE
    predicted = options_for(DEFAULT_MODE)
    if predicted.mode not in CHOSEN_MODES:  # dense: nothing streams, the mode is moot
        return DEFAULT_MODE
    if any(layer.predictor is None for layer in flash.layers):
        return "hybrid"
    hybrid_bytes = expected_read_bytes(flash, spec, options_for("hybrid"))
    predicted_bytes = expected_read_bytes(flash, spec, predicted, densities)
    if predicted_bytes is None:  # unknown densities, or predictors the budget cannot hold
        return "hybrid" if hybrid_bytes is not None else DEFAULT_MODE
    if hybrid_bytes is None or predicted_bytes < hybrid_bytes:
        return DEFAULT_MODE
    return "hybrid"
