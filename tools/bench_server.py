#!/usr/bin/env python3
"""Streamed chat latency: flashgguf-server (over HTTP, the openai client) against the same
model and settings in-process (flashgguf.Llama), one after the other on this machine.

    python tools/bench_server.py MODEL.flash.gguf [--budget 0.5] [--mode hybrid]
                                 [--max-tokens 64] [--reps 5] [--threads 2]

Per repetition: time to the first streamed token, and decode tokens/s after it (streamed
chunks with text, which is one per token unless a token ends inside a UTF-8 character).
The first repetition evaluates the prompt; later ones find it in llama-cpp-python's KV
cache, in-process and in the server alike. Prints the first repetition's first-token time,
the medians, every repetition and the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def timed(chunks: Iterable[str]) -> tuple[float, float, int]:
    """(seconds to the first text, decode tokens/s after it, chunks with text)."""
    start = time.perf_counter()
    times = [time.perf_counter() - start for text in chunks if text]
    if len(times) < 2:
        raise SystemExit("fewer than 2 tokens streamed: raise --max-tokens")
    return times[0], (len(times) - 1) / (times[-1] - times[0]), len(times)


def in_process(args: argparse.Namespace) -> list[tuple[float, float, int]]:
    from flashgguf import Llama

    llm = Llama(args.model, flash_offload=True, flash_dram_budget=args.budget,
                flash_mode=args.mode, n_ctx=1024, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    try:
        return [timed(c["choices"][0]["delta"].get("content", "") for c in
                      llm.create_chat_completion(MESSAGES, max_tokens=args.max_tokens,
                                                 temperature=0.0, stream=True))
                for _ in range(args.reps)]
    finally:
        llm.close()


def served(args: argparse.Namespace) -> list[tuple[float, float, int]]:
    import openai

    command = [sys.executable, "-m", "flashgguf.server", "--model", args.model,
               "--host", "127.0.0.1", "--port", "0", "--n_ctx", "1024",
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--flash_dram_budget", str(args.budget), "--verbose", "false"]
    if args.mode:
        command += ["--flash_mode", args.mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        match = re.search(r"serving on (http://\S+)", process.stdout.readline())
        if match is None:
            raise SystemExit("the server did not start")
        client = openai.OpenAI(base_url=match.group(1) + "/v1", api_key="none")
        out = []
        for _ in range(args.reps):
            stream = client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=args.max_tokens, temperature=0.0,
                stream=True, extra_body={"repeat_penalty": 1.0})
            out.append(timed(c.choices[0].delta.content or "" for c in stream if c.choices))
        return out
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the payload")
    parser.add_argument("--mode", default=None, help="flash_mode (default: the file's)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    for name, runs in (("in-process", in_process(args)), ("server", served(args))):
        cached = statistics.median(r[0] for r in runs[1:]) if len(runs) > 1 else float("nan")
        rate = statistics.median(r[1] for r in runs)
        reps = ", ".join(f"{r[0] * 1e3:.0f} ms / {r[1]:.1f} tok/s ({r[2]} tokens)" for r in runs)
        print(f"{name:>10}: first token {runs[0][0] * 1e3:.0f} ms (prompt evaluated), "
              f"{cached * 1e3:.0f} ms (prompt cached, median); decode {rate:.1f} tok/s "
              f"(median)  [{reps}]")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
