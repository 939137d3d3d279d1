"""flashgguf-profile run: one generation, token by token: where each token's time goes
(predict, I/O wait, FFN arithmetic, the rest of llama.cpp's graph), what it read, what the
cache held; --trace records every layer call for `replay`."""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from .harness import (
    PROMPT,
    MiB,
    ProfileError,
    add_flash_options,
    emit,
    existing_file,
    flash_kwargs,
    flash_model,
    fmt,
    greedy_next_token,
    load_average,
    note,
    print_table,
    progress_bar,
    rss_anon,
)
from .plots import timeline_plot, write_plot

_DELTAS = ("bytes_read", "reads", "bytes_needed", "cache_hits", "cache_misses",
           "neurons_computed", "time_predict_s", "time_io_wait_s", "time_ffn_s")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="one generation: a per-token timeline of time and reads",
                       description=__doc__)
    p.add_argument("model", type=existing_file, help="a flash GGUF (or a GGUF, converted)")
    add_flash_options(p)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens after the prompt")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp and FFN threads")
    p.add_argument("--trace", type=Path, default=None,
                   help="write every layer call (rows needed, hits, reads, times) here (.npz)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder for conversions")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG plot here (needs flashgguf[plot])")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise ProfileError(f"--tokens must be at least 1, got {args.tokens}")
    with flash_model(args.model, args.workdir, args.quiet) as path:
        result = profile_run(path, flash_kwargs(args), args.tokens, args.prompt, args.threads,
                             args.trace, args.quiet)
    result["plot"] = write_plot(args.plot, timeline_plot(result), args.quiet)
    return emit(result, args.json, _table)


def profile_run(path: Path, options: dict[str, Any], n_tokens: int, prompt: str,
                threads: int | None, trace_path: Path | None, quiet: bool) -> dict[str, Any]:
    from .. import Llama
    from ..trace import record

    kw: dict[str, Any] = dict(n_ctx=max(512, n_tokens + 256), verbose=False)
    if threads:
        kw.update(n_threads=threads, n_threads_batch=threads)
    load_avg = load_average()
    t0 = time.perf_counter()
    llm = Llama(str(path), flash_offload=True, **options, **kw)
    try:
        load_s = time.perf_counter() - t0
        runtime = llm.flash_runtime
        assert runtime is not None  # a flash GGUF with flash_offload=True
        prompt_tokens = llm.tokenize(prompt.encode())
        if trace_path is not None:
            if runtime.mode == "dense":
                raise ProfileError("nothing streams (every bundle fits the budget): give a "
                                   "smaller --budget to trace")
            n_layer = runtime.flash.n_layer
            calls = (n_tokens + 1 + len(prompt_tokens)) * n_layer
            runtime.trace_start(calls, calls * 256)
        llm.flash_stats(reset=True)
        t0 = time.perf_counter()
        llm.eval(prompt_tokens)
        prompt_s = time.perf_counter() - t0
        tok = greedy_next_token(llm)
        before = llm.flash_stats()
        rows, generated = [], []
        bar = progress_bar(n_tokens, "decode", quiet, unit="tok")
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok_next = greedy_next_token(llm)
            wall = time.perf_counter() - t0
            after = llm.flash_stats()
            d = {k: after[k] - before[k] for k in _DELTAS}
            before = after
            generated.append(tok)
            tok = tok_next
            ffn = d["time_predict_s"] + d["time_io_wait_s"] + d["time_ffn_s"]
            rows.append(dict(
                ms=1e3 * wall, predict_ms=1e3 * d["time_predict_s"],
                io_wait_ms=1e3 * d["time_io_wait_s"], ffn_ms=1e3 * d["time_ffn_s"],
                rest_ms=1e3 * max(wall - ffn, 0.0), read_mib=d["bytes_read"] / MiB,
                reads=int(d["reads"]), hits=int(d["cache_hits"]), misses=int(d["cache_misses"]),
                over_fetch=d["bytes_read"] / d["bytes_needed"] if d["bytes_needed"] else None,
                computed=d["neurons_computed"] / (runtime.flash.n_layer * runtime.flash.n_ff),
                rss_anon_mib=rss_anon() / MiB))
            bar.update(1)
        bar.close()
        total = llm.flash_stats()
        result: dict[str, Any] = dict(
            model=str(path), mode=runtime.mode, budget=runtime.options.dram_budget,
            payload=runtime.flash.payload_nbytes, io_backend=runtime.io_backend,
            direct_io=runtime.direct_io, load_s=load_s, prompt_tokens=len(prompt_tokens),
            prompt_s=prompt_s, tokens=n_tokens,
            text=llm.detokenize(generated).decode(errors="replace"),
            tok_s=n_tokens / (sum(r["ms"] for r in rows) / 1e3),
            median={k: statistics.median(r[k] for r in rows) for k in
                    ("ms", "predict_ms", "io_wait_ms", "ffn_ms", "rest_ms", "read_mib",
                     "reads", "computed")},
            bytes_read_total=int(total["bytes_read"]), reads_total=int(total["reads"]),
            # the process's own memory beyond the budget: interpreter, llama.cpp's KV cache
            # and compute buffers, the runtime's scratch and staging buffers
            rss_anon_max_mib=max(r["rss_anon_mib"] for r in rows),
            overhead_mib=max(r["rss_anon_mib"] for r in rows)
            - (runtime.flash.payload_nbytes if runtime.mode == "dense"
               else runtime.options.dram_budget) / MiB,
            threads=threading.active_count(), native_threads=len(os.listdir("/proc/self/task")),
            open_fds=len(os.listdir("/proc/self/fd")),
            load_average=[load_avg, load_average()], per_token=rows)
        if trace_path is not None:
            trace = record(runtime, str(path))
            trace.save(trace_path)
            result["trace"] = dict(path=str(trace_path), calls=len(trace.calls),
                                   reads=len(trace.read_len), cut=trace.truncated,
                                   bytes_read=int(trace.read_len.sum()))
            runtime.trace_stop()
            note(f"trace: {len(trace.calls)} calls, {len(trace.read_len)} reads -> "
                 f"{trace_path}", quiet)
        return result
    finally:
        llm.close()


def _table(r: dict[str, Any]) -> None:
    print(f"{r['model']}: mode {r['mode']}, budget {r['budget'] / MiB:.1f} of "
          f"{r['payload'] / MiB:.1f} MiB, reads {r['io_backend']} "
          f"({'direct' if r['direct_io'] else 'buffered'}); load {r['load_s']:.2f} s, prompt "
          f"{r['prompt_tokens']} tokens in {r['prompt_s']:.2f} s")
    rows = [[str(i), fmt(t["ms"], ".1f"), fmt(t["predict_ms"], ".2f"), fmt(t["io_wait_ms"], ".2f"),
             fmt(t["ffn_ms"], ".2f"), fmt(t["rest_ms"], ".2f"), fmt(t["read_mib"], ".2f"),
             str(t["reads"]), str(t["hits"]), str(t["misses"]), fmt(t["over_fetch"], ".3f"),
             fmt(t["computed"], ".3f")] for i, t in enumerate(r["per_token"])]
    m = r["median"]
    rows.append(["median", fmt(m["ms"], ".1f"), fmt(m["predict_ms"], ".2f"),
                 fmt(m["io_wait_ms"], ".2f"), fmt(m["ffn_ms"], ".2f"), fmt(m["rest_ms"], ".2f"),
                 fmt(m["read_mib"], ".2f"), fmt(m["reads"], ".0f"), "", "", "",
                 fmt(m["computed"], ".3f")])
    print_table(["token", "ms", "predict", "io wait", "ffn", "rest", "MiB read", "reads", "hits",
                 "misses", "over-fetch", "computed"], rows)
    print(f"memory: RssAnon up to {r['rss_anon_max_mib']:.1f} MiB, "
          f"{r['overhead_mib']:.1f} MiB over the budget (dense: over the payload); "
          f"{r['native_threads']} threads, {r['open_fds']} open descriptors")
    print(f"{r['tok_s']:.2f} tok/s over {r['tokens']} tokens; load average "
          f"{r['load_average'][0]:.2f} -> {r['load_average'][1]:.2f}")
    if "trace" in r:
        t = r["trace"]
        print(f"trace {t['path']}: {t['calls']} calls, {t['reads']} reads, "
              f"{t['bytes_read'] / MiB:.1f} MiB" + (" (cut: raise the limits)" if t["cut"] else ""))
    print(f"text: {r['text']!r}")
    if r["plot"]:
        print(f"plot: {r['plot']}")
