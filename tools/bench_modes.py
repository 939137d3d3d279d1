#!/usr/bin/env python3
"""Decode speed and reads of the streaming modes at one DRAM budget, side by side in one run:
flash all-resident, naive, hybrid, and predicted at several pinned shares.

    python tools/bench_modes.py [--budget 0.5] [--tokens 64] [--shares 0.25,0.5,0.75]

Predicted mode uses weight-only truncated-SVD predictors built here (tests/flash_helpers.py;
rank --rank, threshold keeping about --keep of the rows on random inputs), not the file's.
Quality (teacher-forced top-1 agreement and perplexity against all-resident flash) is
measured on the first --eval-tokens tokens of the Brown evaluation text, token by token
(n_batch=1): a batch computes the union of its tokens' predicted rows, so only one token at
a time measures what decode computes. This benchmark is for choosing runtime defaults
(pinned share); the full comparison with llama.cpp under a memory cap is tools/bench_flash.py.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_dense import decode_tokens_per_s  # noqa: E402
from flash_helpers import svd_predictor  # noqa: E402

from flashgguf import Llama  # noqa: E402
from flashgguf.convert import ConvertOptions, convert_gguf  # noqa: E402
from flashgguf.errors import BudgetError  # noqa: E402
from flashgguf.evaluate import (  # noqa: E402
    evaluation_tokens,
    perplexity,
    teacher_forced_logits,
    top1_agreement,
)
from flashgguf.format import map_file, open_flash_file, tensor_array  # noqa: E402
from flashgguf.models import smollm2_gguf  # noqa: E402

EVALUATION = ROOT.parent / "shared" / "data" / "brown" / "evaluation.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of the FFN payload")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--shares", default="0.25,0.5,0.75")
    ap.add_argument("--modes", default="naive,hybrid", help="baselines to run too")
    ap.add_argument("--gaps", default="32", help="coalescing gaps (rows) for predicted mode")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    kw = dict(n_ctx=512, n_batch=1, n_ubatch=1, n_threads=args.threads,
              n_threads_batch=args.threads, verbose=False, logits_all=True)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        path = Path(tmp) / "smollm2.flash.gguf"
        convert_gguf(smollm2_gguf(), path, ConvertOptions(progress=False, log=lambda _m: None))
        flash = open_flash_file(path)
        # the FFN input is RMS-normalized then scaled by ffn_norm: calibrate on that scale
        buf = memoryview(map_file(path))
        norms = [tensor_array(buf, flash.trunk.tensors[f"blk.{i}.ffn_norm.weight"])
                 for i in range(flash.n_layer)]
        preds = [svd_predictor(flash, i, args.rank, args.keep, input_scale=norms[i])
                 for i in range(flash.n_layer)]
        dense = Llama(str(path), flash_offload=True, flash_dram_budget=1.0, **kw)
        tokens = evaluation_tokens(dense, EVALUATION.read_text(), args.eval_tokens)
        want = teacher_forced_logits(dense, tokens)
        configs = [("resident", "predicted", 0.5, 1.0, 2)]
        configs += [(m, m, 0.0, args.budget, 2) for m in args.modes.split(",") if m]
        configs += [(f"predicted pin {s} gap {g}", "predicted", float(s), args.budget, int(g))
                    for s in args.shares.split(",") for g in args.gaps.split(",")]
        print(f"{path.name}: budget {args.budget} of {flash.payload_nbytes / 2**20:.1f} MiB "
              f"FFN payload, {args.tokens} decode tokens, {args.threads} thread(s), SVD "
              f"rank {args.rank} keep {args.keep}")
        print(f"{'mode':>26} {'tok/s':>7} {'KiB/tok':>8} {'reads/tok':>9} {'hit%':>5} "
              f"{'rows%':>6} {'io ms':>6} {'ffn ms':>6} {'pred ms':>7} {'top1':>5} {'ppl':>7}")
        for name, mode, share, budget, gap in configs:
            try:
                llm = dense if name == "resident" else Llama(
                    str(path), flash_offload=True, flash_dram_budget=budget, flash_mode=mode,
                    flash_pinned_share=share, flash_coalesce_gap=gap, flash_predictors=preds,
                    **kw)
            except BudgetError as exc:
                print(f"{name:>26} does not fit: {exc}")
                continue
            got = teacher_forced_logits(llm, tokens)
            tps = decode_tokens_per_s(llm, args.tokens,
                                      functools.partial(llm.flash_stats, reset=True))
            s = llm.flash_stats()
            n = max(s["tokens"], 1)
            looked = s["cache_hits"] + s["cache_misses"]
            print(f"{name:>26} {tps:7.1f} {s['bytes_read'] / n / 1024:8.0f} "
                  f"{s['reads'] / n:9.1f} {100 * s['cache_hits'] / max(looked, 1):5.1f} "
                  f"{100 * s['neurons_computed'] / n / flash.n_ff / flash.n_layer:6.1f} "
                  f"{1e3 * s['time_io_wait_s'] / n:6.2f} {1e3 * s['time_ffn_s'] / n:6.2f} "
                  f"{1e3 * s['time_predict_s'] / n:7.2f} {top1_agreement(got, want):5.3f} "
                  f"{perplexity(got, tokens):7.2f}")
            if llm is not dense:
                llm.close()
        print(f"resident perplexity {perplexity(want, tokens):.2f} on {len(tokens)} tokens")
        dense.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
