"""flashgguf-profile quality: what flashgguf's settings cost in quality, against stock
llama.cpp on the source GGUF: perplexity and teacher-forced top-1 agreement on the first
--tokens tokens of the evaluation text, and per token the FFN bytes read and the share of
neurons computed. One row per setting: --run KEY=VALUE,... (flash_* options), or a sweep
(--recall, --gate-keep) at --budget: the trade-off curve. Default: one run with
flashgguf.Llama's defaults and --budget.

--n-batch 1 (the default) evaluates token by token, both sides, as decode computes: a batch
computes the union of its tokens' chosen neurons, so a 512-token batch would measure nearly
dense quality."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..runtime import no_weight_repacking
from .harness import (
    MiB,
    ProfileError,
    emit,
    evaluation_text,
    existing_file,
    flash_model,
    float_list,
    load_average,
    option_items,
    print_table,
    progress_bar,
)
from .plots import quality_plot, write_plot


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quality", help="perplexity and top-1 agreement against stock llama.cpp",
                       description=__doc__)
    p.add_argument("source", type=existing_file, help="the GGUF stock llama.cpp runs")
    p.add_argument("flash", type=existing_file, nargs="?", default=None,
                   help="its flash GGUF (default: converted into a scratch folder)")
    p.add_argument("--text", type=Path, default=None,
                   help="text to score (default: the project's evaluation text, else the "
                   "packaged excerpt of it)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--budget", default="0.5", help="flash_dram_budget of the runs that give "
                   "none (bytes, a size or a share of the payload)")
    p.add_argument("--run", action="append", type=option_items, default=[],
                   metavar="KEY=VALUE,...", help="flash_* options of one run; repeatable")
    p.add_argument("--recall", type=float_list, default=[],
                   help="predicted-mode runs at these flash_predictor_recall values")
    p.add_argument("--gate-keep", type=float_list, default=[],
                   help="gate-mode runs at these flash_gate_keep values (gate-resident files)")
    p.add_argument("--n-batch", type=int, default=1, help="tokens per llama.cpp batch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stock-floor", action="store_true",
                   help="also score stock llama.cpp with its weight repacking off against stock "
                   "as shipped: the agreement kernel rounding alone leaves")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder for conversions")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG plot here (needs flashgguf[plot])")
    p.set_defaults(func=main)


def _settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..options import budget_argument

    budget = budget_argument(args.budget)
    runs = [dict(r) for r in args.run]
    runs += [dict(flash_mode="predicted", flash_predictor_recall=r) for r in args.recall]
    runs += [dict(flash_mode="gate", flash_gate_keep=k) for k in args.gate_keep]
    for r in runs or [{}]:
        r.setdefault("flash_dram_budget", budget)
    return runs or [dict(flash_dram_budget=budget)]


def main(args: argparse.Namespace) -> int:
    import llama_cpp

    from .. import Llama
    from ..evaluate import evaluation_tokens, perplexity, teacher_forced_logits, top1_agreement

    if args.tokens < 2:
        raise ProfileError(f"--tokens must be at least 2, got {args.tokens}")
    settings = _settings(args)
    text, text_from = evaluation_text(args.text)
    kw: dict[str, Any] = dict(n_ctx=args.tokens, n_batch=args.n_batch, n_ubatch=args.n_batch,
                              logits_all=True, verbose=False)
    if args.threads:
        kw.update(n_threads=args.threads, n_threads_batch=args.threads)
    load_avg = load_average()
    stock = llama_cpp.Llama(str(args.source), **kw)
    try:
        tokens = evaluation_tokens(stock, text, args.tokens)
        want = teacher_forced_logits(stock, tokens)
    finally:
        stock.close()
    stock_ppl = perplexity(want, tokens)
    floor = None
    if args.stock_floor:
        with no_weight_repacking():
            plain = llama_cpp.Llama(str(args.source), **kw)
        try:
            got = teacher_forced_logits(plain, tokens)
        finally:
            plain.close()
        floor = dict(perplexity=perplexity(got, tokens), top1=top1_agreement(got, want))
    rows = []
    with flash_model(args.flash or args.source, args.workdir, args.quiet) as flash_path:
        bar = progress_bar(len(settings), "runs", args.quiet, unit="run")
        for options in settings:
            llm = Llama(str(flash_path), flash_offload=True, **options, **kw)
            try:
                if evaluation_tokens(llm, text, len(tokens)) != tokens:
                    raise ProfileError(f"{flash_path} tokenizes the text differently from "
                                       f"{args.source}: not its flash GGUF?")
                llm.flash_stats(reset=True)
                got = teacher_forced_logits(llm, tokens)
                stats = llm.flash_stats()
                runtime = llm.flash_runtime
                assert runtime is not None
                neurons = runtime.flash.n_layer * runtime.flash.n_ff
                mode = runtime.mode
            finally:
                llm.close()
            n = max(int(stats["tokens"]), 1)
            ppl = perplexity(got, tokens)
            rows.append(dict(
                setting={k.removeprefix("flash_"): v for k, v in options.items()}, mode=mode,
                perplexity=ppl, ratio=ppl / stock_ppl, top1=top1_agreement(got, want),
                read_mib_per_token=stats["bytes_read"] / n / MiB,
                needed_mib_per_token=stats["bytes_needed"] / n / MiB,
                computed=stats["neurons_computed"] / n / neurons))
            bar.update(1)
        bar.close()
    result = dict(source=str(args.source), text=text_from, tokens=len(tokens),
                  n_batch=args.n_batch, stock_perplexity=stock_ppl, stock_floor=floor,
                  runs=rows, load_average=[load_avg, load_average()])
    result["plot"] = write_plot(args.plot, quality_plot(result), args.quiet)
    return emit(result, args.json, _table)


def _table(r: dict[str, Any]) -> None:
    print(f"{r['source']}: first {r['tokens']} tokens of {r['text']}, n_batch {r['n_batch']}; "
          f"stock perplexity {r['stock_perplexity']:.4f}")
    if r["stock_floor"]:
        f = r["stock_floor"]
        print(f"stock without weight repacking: perplexity {f['perplexity']:.4f} (x"
              f"{f['perplexity'] / r['stock_perplexity']:.4f}), top-1 {f['top1']:.4f}")
    rows = [[", ".join(f"{k}={v}" for k, v in x["setting"].items()), x["mode"],
             f"{x['perplexity']:.4f}", f"{x['ratio']:.4f}", f"{x['top1']:.4f}",
             f"{x['read_mib_per_token']:.3f}", f"{x['computed']:.3f}"] for x in r["runs"]]
    print_table(["setting", "mode", "perplexity", "x stock", "top-1", "MiB read/tok",
                 "computed"], rows)
    if r["plot"]:
        print(f"plot: {r['plot']}")
