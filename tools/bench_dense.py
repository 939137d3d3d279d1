#!/usr/bin/env python3
"""Decode speed of flashgguf (flash_offload=True, every neuron resident) against stock
llama.cpp on the source GGUF, measured side by side in one run.

    python tools/bench_dense.py [--model model.gguf] [--flash model.flash.gguf]
                                [--tokens 128] [--reps 5] [--threads 2]

Without --flash the model is converted (no predictor: an all-resident run does not use one).

Runs alternate (stock, flash, stock, flash, ...) so that drift of a shared machine hits both.
The last line is the median ratio flash / stock of decode tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402

from flashgguf import Llama  # noqa: E402
from flashgguf.convert import ConvertOptions, convert_gguf  # noqa: E402
from flashgguf.models import smollm2_gguf  # noqa: E402

PROMPT = "The history of the city begins in the twelfth century, when"


def greedy_next_token(llm) -> int:
    """Greedy next token from the last evaluated position: llama_cpp.Llama.scores is only
    filled with logits_all=True (llama-cpp-python 0.3.36), so read llama.cpp's logits."""
    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def decode_tokens_per_s(llm, n_tokens: int, before_timing=None) -> float:
    """Greedy decode of n_tokens one at a time after the prompt; only decode is timed.
    before_timing: called between the prompt and the timed decode (e.g. to reset stats)."""
    llm.reset()
    prompt = llm.tokenize(PROMPT.encode())
    llm.eval(prompt)
    tok = greedy_next_token(llm)
    if before_timing is not None:
        before_timing()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([tok])
        tok = greedy_next_token(llm)
    return n_tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="source GGUF (default: SmolLM2)")
    p.add_argument("--flash", type=Path, default=None,
                   help="the model already converted (default: convert it into a scratch file)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    src = args.model or smollm2_gguf()
    kw = dict(n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    with tempfile.TemporaryDirectory(dir=Path(src).parent if args.model else None) as tmp:
        flash_path = args.flash or Path(tmp) / "bench.flash.gguf"
        if args.flash is None:
            convert_gguf(src, flash_path, ConvertOptions(predictor=None, progress=False,
                                                         log=lambda _m: None))
        stock = llama_cpp.Llama(str(src), **kw)
        flash = Llama(str(flash_path), flash_offload=True, **kw)
        decode_tokens_per_s(stock, 8)  # warm both up
        decode_tokens_per_s(flash, 8)
        print(f"model {Path(src).name}, {args.tokens} decode tokens, {args.threads} threads")
        print(f"{'rep':>3} {'stock tok/s':>12} {'flash tok/s':>12} {'ratio':>7}")
        ratios = []
        for rep in range(args.reps):
            s = decode_tokens_per_s(stock, args.tokens)
            f = decode_tokens_per_s(flash, args.tokens)
            ratios.append(f / s)
            print(f"{rep:>3} {s:>12.1f} {f:>12.1f} {f / s:>7.3f}")
        ffn = flash.flash_stats()
        print(f"flash FFN time {ffn['time_ffn_s']:.2f} s over {ffn['tokens']} tokens "
              f"({1e3 * ffn['time_ffn_s'] / max(ffn['tokens'], 1):.2f} ms/token)")
        flash.close()
        stock.close()
    print(f"median decode speed ratio flash/stock: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
