"""flashgguf-profile replay: a recorded trace fed through the runtime's cache and read
engine without the model, at other settings (budget, window, coalescing, read engine) or
against a payload of another model's shape (--shape: 7b, 13b or LAYERS,EMBD,FF), so that
what flashgguf would read and wait for on models this machine cannot hold is measured, not
guessed. With the recording's file and options the replay gives its hits and bytes."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from .harness import (
    MiB,
    ProfileError,
    drop_file_cache,
    emit,
    existing_file,
    fmt,
    load_average,
    note,
    print_table,
    progress_bar,
)
from .storage import random_read_mb_s

# Llama 2 7B / 13B: layers, n_embd, FFN width
SHAPES = {"7b": (32, 4096, 11008), "13b": (40, 5120, 13824)}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="replay a trace through the cache and read engine only",
                       description=__doc__)
    p.add_argument("trace", type=existing_file, help="a trace from `run --trace`")
    p.add_argument("--flash", type=existing_file, default=None,
                   help="the flash GGUF to read (default: the trace's own)")
    p.add_argument("--budget", default=None,
                   help="DRAM budget: bytes, a size (512MiB) or a share of the payload "
                   "(default: the recording's bytes, or its share with --shape)")
    p.add_argument("--mode", default=None, help="naive, hybrid, predicted, gate (default: the "
                   "recording's)")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--gap", default=None, help="coalescing gap: rows or 'auto'")
    p.add_argument("--io", default=None, help="auto, threads, io_uring")
    p.add_argument("--depth", type=int, default=None, help="reads in flight")
    p.add_argument("--shape", default=None,
                   help="replay on a generated payload of this shape: 7b, 13b or L,EMBD,FF")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where a --shape payload is written (default: the system's temp)")
    p.add_argument("--disk-mb-s", type=float, default=None,
                   help="the disk's read bandwidth for the implied tokens/s (default: the "
                   "replay's own bytes / I/O wait)")
    p.set_defaults(func=main)


def _shape(text: str) -> tuple[int, int, int]:
    if text.lower() in SHAPES:
        return SHAPES[text.lower()]
    try:
        n_layer, n_embd, n_ff = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise ProfileError(f"--shape {text!r}: give 7b, 13b or LAYERS,EMBD,FF") from exc
    if min(n_layer, n_embd, n_ff) < 1:
        raise ProfileError(f"--shape {text!r}: every dimension must be positive")
    return n_layer, n_embd, n_ff


def main(args: argparse.Namespace) -> int:
    from ..format import open_flash_file
    from ..options import FlashOptions, budget_argument, parse_budget
    from ..trace import Trace, replay, scaled, shaped_payload

    trace = Trace.load(args.trace)
    if len(trace.calls) == 0:
        raise ProfileError(f"{args.trace}: the trace holds no calls")
    source = args.flash or Path(trace.meta["source"])
    if not source.is_file():
        raise ProfileError(f"{source}: the trace's flash GGUF is not there; give --flash")
    flash = open_flash_file(source)
    recorded = FlashOptions(**{k: v for k, v in trace.meta["options"].items()
                               if k in {f.name for f in dataclasses.fields(FlashOptions)}})
    changes: dict[str, Any] = {}
    for name, value in (("mode", args.mode), ("window", args.window), ("io", args.io),
                        ("io_depth", args.depth)):
        if value is not None:
            changes[name] = value
    if args.gap is not None:
        changes["coalesce_gap"] = args.gap if args.gap == "auto" else int(args.gap)
    result: dict[str, Any] = dict(trace=str(args.trace), recorded=_summary(trace))
    with tempfile.TemporaryDirectory(prefix="flashgguf-replay-", dir=args.workdir) as tmp:
        budget_share = recorded.dram_budget / flash.payload_nbytes
        if args.shape:
            n_layer, n_embd, n_ff = _shape(args.shape)
            if flash.gate_resident:
                raise ProfileError("--shape needs a trace of a file whose gate is in its "
                                   "bundles (not --gate-resident)")
            bar = progress_bar(n_layer * n_ff * flash.layers[0].layout.stride,
                               "writing the payload", args.quiet, unit="B", unit_scale=True)
            flash = shaped_payload(flash, n_layer, n_embd, n_ff, Path(tmp) / "shaped.payload",
                                   bar.update)
            bar.close()
            trace = scaled(trace, n_layer, n_ff)
            if changes.get("mode", recorded.mode) == "gate":
                changes["mode"] = "hybrid"  # the same pinning; a shaped payload has no gate
                note("mode gate replays as hybrid on a shaped payload (every slot pinned, as "
                     "gate mode; no resident gate matrix)", args.quiet)
            result["shape"] = dict(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff,
                                   payload=flash.payload_nbytes)
        if args.budget is not None:
            changes["dram_budget"] = parse_budget(budget_argument(args.budget),
                                                  flash.payload_nbytes)
        elif args.shape:
            changes["dram_budget"] = max(int(budget_share * flash.payload_nbytes), 1)
        opts = dataclasses.replace(recorded, **changes)
        drop_file_cache(flash.path)
        load_avg = load_average()
        bar = progress_bar(len(trace.calls), "replay", args.quiet, unit="call")
        got = replay(trace, flash, opts, bar.update)
        bar.close()
        result.update(options=dataclasses.asdict(opts), replayed=_summary(got),
                      load_average=[load_avg, load_average()],
                      same_plan=got.meta["capacity"] == trace.meta.get("capacity"))
        rep = result["replayed"]
        if args.disk_mb_s:
            bandwidth, measured = args.disk_mb_s * 1e6, False
        else:  # the payload's own file, at the runtime's read size and depth
            bandwidth = random_read_mb_s(flash.path, opts.max_read_bytes, opts.io_depth,
                                         min(256 << 20, flash.file_size), True) * 1e6
            measured = True
    # two bounds on a decode token, attention and the rest of the graph not counted: the
    # replay's own FFN calls (reads overlapped with the arithmetic, this machine's engine),
    # and the reads alone at the disk's bandwidth
    io_s = rep["bytes_per_token"] / bandwidth
    ffn_call_s = (rep["io_wait_ms_per_token"] + rep["ffn_ms_per_token"]
                  + rep["predict_ms_per_token"]) / 1e3
    result["implied"] = dict(bandwidth_mb_s=bandwidth / 1e6, measured=measured,
                             io_s_per_token=io_s, tok_s_io_bound=1 / io_s if io_s > 0 else None,
                             ffn_call_s_per_token=ffn_call_s,
                             tok_s_ffn_bound=1 / ffn_call_s if ffn_call_s > 0 else None,
                             engine_mb_s=rep["bytes_per_token"] / ffn_call_s / 1e6
                             if ffn_call_s > 0 else None)
    return emit(result, args.json, _table)


def _summary(trace: Any) -> dict[str, Any]:
    calls = trace.calls
    tokens = int(calls["n_tokens"][calls["layer"] == 0].sum()) or 1
    decode = calls["n_tokens"] == 1
    n_decode = max(int((decode & (calls["layer"] == 0)).sum()), 1)
    io_wait = float(calls["time_io_wait_s"].sum())
    nbytes = int(calls["bytes_read"].sum())
    return dict(
        calls=len(calls), tokens=tokens, needed_per_token=float(calls["needed"].sum()) / tokens,
        hits=int(calls["hits"].sum()), misses=int(calls["misses"].sum()),
        pinned=int(calls["pinned"].sum()), reads=int(calls["reads"].sum()), bytes_read=nbytes,
        bytes_per_token=float(calls["bytes_read"][decode].sum()) / n_decode,
        reads_per_token=float(calls["reads"][decode].sum()) / n_decode,
        mean_read_kib=nbytes / max(int(calls["reads"].sum()), 1) / 1024,
        io_wait_ms_per_token=1e3 * float(calls["time_io_wait_s"][decode].sum()) / n_decode,
        predict_ms_per_token=1e3 * float(calls["time_predict_s"][decode].sum()) / n_decode,
        ffn_ms_per_token=1e3 * float(calls["time_ffn_s"][decode].sum()) / n_decode,
        # bytes over the time blocked on them: reads overlap the FFN's arithmetic, so this
        # is more than the disk gives when the arithmetic hides much of the reading
        mb_s_per_wait=nbytes / io_wait / 1e6 if io_wait > 0 else 0.0)


def _table(r: dict[str, Any]) -> None:
    if "shape" in r:
        s = r["shape"]
        print(f"shaped payload: {s['n_layer']} layers x {s['n_ff']} rows, n_embd "
              f"{s['n_embd']}: {s['payload'] / MiB:.0f} MiB")
    o = r["options"]
    print(f"replayed at: mode {o['mode']}, budget {o['dram_budget'] / MiB:.1f} MiB, window "
          f"{o['window']}, gap {o['coalesce_gap']}, io {o['io']} depth {o['io_depth']}"
          + ("" if "shape" in r else f"; same plan as recorded: {r['same_plan']}"))
    rows = []
    for name in ("recorded", "replayed"):
        x = r[name]
        rows.append([name, str(x["calls"]), str(x["tokens"]), f"{x['needed_per_token']:.0f}",
                     str(x["hits"]), str(x["misses"]), str(x["reads"]),
                     f"{x['bytes_per_token'] / MiB:.2f}", f"{x['reads_per_token']:.1f}",
                     f"{x['mean_read_kib']:.1f}", f"{x['io_wait_ms_per_token']:.2f}",
                     f"{x['ffn_ms_per_token']:.2f}", f"{x['mb_s_per_wait']:.0f}"])
    print_table(["", "calls", "tokens", "rows/tok", "hits", "misses", "reads", "MiB/tok",
                 "reads/tok", "KiB/read", "io ms/tok", "ffn ms/tok", "MB/wait s"], rows)
    if "implied" in r:
        i = r["implied"]
        where = ("measured: direct reads of the payload file by Python threads at the "
                 "runtime's read size and depth" if i["measured"] else "given")
        print(f"implied, per decode token: the replayed FFN calls took "
              f"{i['ffn_call_s_per_token'] * 1e3:.1f} ms (reads overlapped with the "
              f"arithmetic, {fmt(i['engine_mb_s'], '.0f')} MB/s through the engine): at most "
              f"{fmt(i['tok_s_ffn_bound'], '.2f')} tok/s; the reads alone take "
              f"{i['io_s_per_token'] * 1e3:.1f} ms at {i['bandwidth_mb_s']:.0f} MB/s ({where}):"
              f" at most {fmt(i['tok_s_io_bound'], '.2f')} tok/s (attention and the rest of "
              "the graph not counted)")
    print(f"load average {r['load_average'][0]:.2f} -> {r['load_average'][1]:.2f}")
