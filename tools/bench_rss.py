#!/usr/bin/env python3
"""Memory of a flash-offloaded model over a long generation: does it stay within its
flash_dram_budget plus a fixed overhead?

    python tools/bench_rss.py MODEL.flash.gguf [--budget 0.5] [--tokens 1000] [--mode M]

Loads the model with flash offload at the budget, then generates --tokens tokens greedily
(end-of-text suppressed, so the run has its full length) and samples /proc/self/status
every 100 tokens: RssAnon (the process's own memory: interpreter, llama.cpp's KV cache and
compute buffers, the runtime's slots and buffers) and RssFile (mapped file pages: the trunk,
which the page cache can drop). Prints each sample, the budget in bytes, and the overhead
max(RssAnon) - budget, with the threads and open descriptors of the process.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from flashgguf import Llama
from flashgguf.options import budget_argument


def status() -> dict[str, int]:
    """RssAnon / RssFile / VmHWM from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budget", default="0.5")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--mode", default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    mib = 2**20
    before = status()
    llm = Llama(args.model, flash_offload=True, flash_dram_budget=budget_argument(args.budget),
                flash_mode=args.mode, n_ctx=args.tokens + 64, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    runtime = llm.flash_runtime
    dense = runtime.mode == "dense"  # all resident: the payload is what is kept
    budget = runtime.flash.payload_nbytes if dense else runtime.options.dram_budget
    eos = llm.token_eos()

    def no_end(_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        logits[eos] = -np.inf
        return logits

    samples = [("loaded", 0, status())]
    n = 0
    for _ in llm("The history of the city begins", max_tokens=args.tokens, temperature=0.0,
                 stream=True, logits_processor=[no_end]):
        n += 1
        if n % 100 == 0:
            samples.append(("decode", n, status()))
    print(f"{args.model}: mode {runtime.mode}, budget {budget / mib:.1f} MiB, {n} tokens; "
          f"before loading: RssAnon {before['RssAnon'] / mib:.1f} MiB")
    for what, tokens, s in samples:
        print(f"  {what:<7} {tokens:>5} tokens  RssAnon {s['RssAnon'] / mib:8.1f} MiB  "
              f"RssFile {s['RssFile'] / mib:8.1f} MiB")
    peak = max(s["RssAnon"] for _, _, s in samples)
    growth = samples[-1][2]["RssAnon"] - samples[0][2]["RssAnon"]
    print(f"max RssAnon {peak / mib:.1f} MiB = budget + {(peak - budget) / mib:.1f} MiB; "
          f"growth from load to the end {growth / mib:+.1f} MiB; "
          f"threads {len(os.listdir('/proc/self/task'))}, open descriptors "
          f"{len(os.listdir('/proc/self/fd'))}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
