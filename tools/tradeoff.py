#!/usr/bin/env python3
"""Sparsity/perplexity trade-off of the activity predictors (issue 4, part 7), one run:

    python tools/tradeoff.py [--calibrated FILE] [--calibrate-tokens 8192] [--tokens 500]
                             [--recalls 0.5,0.7,...] [--errors 0.1,0.2,...]
                             [--svg tradeoff.svg] [--csv tradeoff.csv]
                             [--from-csv earlier.csv ...] [--plot-only]

1. Stock llama.cpp on the source GGUF (SmolLM2, or --model): perplexity on the first
   `--tokens` tokens of ../shared/data/brown/evaluation.txt (never calibrated on).
2. Flash GGUFs: the weight-only predictor (converted here) and the calibrated one
   (--calibrated FILE, or converted here with --calibrate on the shipped text).
3. Per file and point: flashgguf.Llama(flash_offload=True, flash_pinned_share=0) with the
   predictor's thresholds set
     - "recall r": flash_predictor_recall=r (every layer at the same recall target), or
     - "error e" (calibrated file): each layer's threshold for a relative FFN output error
       of at most e on the held-out calibration tokens (its stored curve),
   evaluated token by token (n_batch=1: a batch computes the union of its tokens' rows, so
   only single-token evaluation measures what decode computes). Prints perplexity / stock
   and the share of FFN neurons computed per token (flash_stats), writes a CSV and an SVG
   plot (x: neurons computed, y: perplexity ratio).

Pinned rows are always computed; pinning is off here so that the curve is the predictor's.
The budget is the payload less one byte: predicted mode streams, but I/O only changes speed,
which this tool does not measure (tools/bench_flash.py does).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import llama_cpp  # noqa: E402
from svg_plot import write_svg  # noqa: E402

from flashgguf import Llama  # noqa: E402
from flashgguf.calibrate.collect import CalibrationOptions  # noqa: E402
from flashgguf.convert import ConvertOptions, convert_gguf  # noqa: E402
from flashgguf.evaluate import evaluation_tokens, perplexity, teacher_forced_logits  # noqa: E402
from flashgguf.format import FlashFile, open_flash_file  # noqa: E402
from flashgguf.models import smollm2_gguf  # noqa: E402

EVALUATION = REPO.parent / "shared" / "data" / "brown" / "evaluation.txt"
EVALUATION_HEAD = REPO / "flashgguf" / "data" / "evaluation_head.txt"


@dataclasses.dataclass
class Point:
    series: str
    setting: str
    computed: float  # share of FFN neurons computed per token
    ppl_ratio: float
    seconds: float


def _kw(threads: int, n_ctx: int) -> dict:
    return dict(n_ctx=n_ctx, n_batch=1, n_ubatch=1, logits_all=True, verbose=False,
                n_threads=threads, n_threads_batch=threads)


def measure(flash: FlashFile, tokens: list[int], stock_ppl: float, series: str, setting: str,
            threads: int, **flash_kw) -> Point:
    t0 = time.perf_counter()
    llm = Llama(str(flash.path), flash_offload=True, flash_mode="predicted",
                flash_dram_budget=flash.payload_nbytes - 1, flash_pinned_share=0.0,
                **flash_kw, **_kw(threads, len(tokens) + 8))
    llm.flash_stats(reset=True)
    logits = teacher_forced_logits(llm, tokens)
    stats = llm.flash_stats()
    llm.close()
    computed = stats["neurons_computed"] / stats["tokens"] / (flash.n_layer * flash.n_ff)
    point = Point(series, setting, computed, perplexity(logits, tokens) / stock_ppl,
                  time.perf_counter() - t0)
    print(f"{series:<12} {setting:<12} neurons computed {point.computed:6.1%}  "
          f"perplexity/stock {point.ppl_ratio:7.4f}  ({point.seconds:.0f} s)", flush=True)
    return point


def error_predictors(flash: FlashFile, bound: float) -> list:
    return [dataclasses.replace(layer.predictor,
                                threshold=layer.predictor_curve.threshold_for_error(bound))
            for layer in flash.layers]


CSV_HEADER = ("series", "setting", "neurons_computed", "ppl_ratio")
TARGET = (65.0, 1.03)  # issue 4's: at most 65% of the neurons computed within 1.03x


def plot(path: Path, points: list[Point]) -> None:
    """A line per series: x neurons computed (%), y perplexity / stock; the target shaded."""
    series: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        series.setdefault(p.series, []).append((p.computed * 100, p.ppl_ratio))
    write_svg(path, series, "FFN neurons computed per token (%)", "perplexity / stock llama.cpp",
              (30.0, 100.0), TARGET, f"target: &lt;= {TARGET[0]:.0f}% computed, "
              f"&lt;= {TARGET[1]:.2f}x")


def read_csv(path: Path) -> list[Point]:
    """Points of an earlier run (--add-csv), to draw beside this run's."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != list(CSV_HEADER):
        raise SystemExit(f"{path}: not a tradeoff.py CSV (header {rows[:1]})")
    return [Point(series, setting, float(computed), float(ratio), 0.0)
            for series, setting, computed, ratio in rows[1:]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="source GGUF (default: SmolLM2)")
    p.add_argument("--calibrated", type=Path, default=None,
                   help="a flash GGUF converted with --calibrate (default: convert one here)")
    p.add_argument("--calibrate-tokens", type=int, default=CalibrationOptions.tokens)
    p.add_argument("--tokens", type=int, default=500, help="evaluation tokens")
    p.add_argument("--recalls", default="0.5,0.6,0.7,0.8,0.9,0.95,0.99")
    p.add_argument("--errors", default="0.1,0.15,0.2,0.3,0.4",
                   help="per-layer output error bounds for the calibrated file")
    p.add_argument("--no-weight-only", action="store_true",
                   help="measure the calibrated file only")
    p.add_argument("--label", default="calibrated", help="series name of the calibrated file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--evaluation", type=Path,
                   default=EVALUATION if EVALUATION.exists() else EVALUATION_HEAD)
    p.add_argument("--csv", type=Path, default=Path("tradeoff.csv"))
    p.add_argument("--svg", type=Path, default=Path("tradeoff.svg"))
    p.add_argument("--from-csv", type=Path, action="append", default=[],
                   help="also plot an earlier run's CSV (series names as they are)")
    p.add_argument("--plot-only", action="store_true",
                   help="measure nothing: plot the --from-csv files into --svg")
    args = p.parse_args()
    earlier = [q for path in args.from_csv for q in read_csv(path)]
    if args.plot_only:
        plot(args.svg, earlier)
        print(f"wrote {args.svg}")
        return 0
    src = Path(args.model or smollm2_gguf())
    text = args.evaluation.read_text(encoding="utf-8")

    # token by token like the flash runs: llama.cpp's batched kernels round differently
    # (about 1% in perplexity on SmolLM2), which would sit in every ratio
    stock = llama_cpp.Llama(str(src), **_kw(args.threads, args.tokens + 8))
    tokens = evaluation_tokens(stock, text, args.tokens)
    stock_ppl = perplexity(teacher_forced_logits(stock, tokens), tokens)
    stock.close()
    print(f"{src.name}: stock perplexity {stock_ppl:.3f} on the first {len(tokens)} tokens of "
          f"{args.evaluation.name}", flush=True)

    points: list[Point] = []
    with tempfile.TemporaryDirectory(dir=src.parent if args.model else None) as tmp:
        weight_only = Path(tmp) / "weight-only.flash.gguf"
        if not args.no_weight_only:
            convert_gguf(src, weight_only, ConvertOptions(progress=False, log=lambda _m: None))
        calibrated = args.calibrated
        if calibrated is None:
            calibrated = Path(tmp) / "calibrated.flash.gguf"
            t0 = time.perf_counter()
            convert_gguf(src, calibrated, ConvertOptions(
                progress=False, log=lambda _m: None,
                calibration=CalibrationOptions(tokens=args.calibrate_tokens)))
            print(f"calibrated conversion ({args.calibrate_tokens} tokens): "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        files = [] if args.no_weight_only else [("weight-only", open_flash_file(weight_only))]
        files.append((args.label, open_flash_file(calibrated)))
        for name, flash in files:
            for r in (float(v) for v in args.recalls.split(",") if v):
                points.append(measure(flash, tokens, stock_ppl, f"{name} recall", f"r={r:g}",
                                      args.threads, flash_predictor_recall=r))
        flash = files[-1][1]
        for e in (float(v) for v in args.errors.split(",") if v):
            points.append(measure(flash, tokens, stock_ppl, f"{args.label} error", f"e={e:g}",
                                  args.threads, flash_predictors=error_predictors(flash, e)))
    with open(args.csv, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(CSV_HEADER)
        out.writerows((q.series, q.setting, f"{q.computed:.4f}", f"{q.ppl_ratio:.4f}")
                      for q in points)
    plot(args.svg, earlier + points)
    print(f"wrote {args.csv} and {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
