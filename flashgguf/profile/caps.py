"""flashgguf-profile bench: stock llama.cpp against flashgguf under the same memory cap.

1. The process overhead: stock llama.cpp with weight repacking off (pure mmap), no cap, its
   anonymous memory after a short decode (KV cache, compute buffers, interpreter); and
   flashgguf's own with no rows kept (its runtime scratch and staging buffers).
2. Per cap (the overhead + a share of the source GGUF's bytes; the cgroup charges the page
   cache) and thread count, each run in its own child process after both files are dropped
   from the page cache:
   - stock as shipped (CPU_REPACK copies in anonymous memory, which a cap cannot evict) and
     stock pure mmap (DESIGN.md section 5);
   - flashgguf per mode, its budget what the cap leaves after flashgguf's overhead and the
     flash file's trunk, less --slack (1% of the cap by default).
   Reported: decode tok/s over --tokens greedy tokens after a short prompt; MB read from the
   device per token (/proc/self/io); flash's own reads, over-fetch, I/O wait, FFN time, hits.
Where no memory cgroup can be made (not root, no delegated cgroup) the runs go uncapped, the
flash budget still what the cap would leave, and the table says so. --caps none runs without
a cap at --budget (a share of the payload, or bytes); a mode's own dram_budget option
(hybrid:dram_budget=1.0: everything resident) wins over both. --busy N adds runs with N
processes spinning on a core each (a shared machine's load)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from .harness import (
    MB,
    ProfileError,
    cgroup_available,
    drop_file_cache,
    emit,
    existing_file,
    flash_model,
    float_list,
    fmt,
    int_list,
    load_average,
    note,
    option_items,
    print_table,
    progress_bar,
    run_child,
)
from .plots import bench_plot, write_plot


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="stock llama.cpp's mmap vs flashgguf under memory caps",
                       description=__doc__)
    p.add_argument("source", type=existing_file, help="the GGUF stock llama.cpp runs")
    p.add_argument("--flash", type=existing_file, default=None,
                   help="its flash GGUF (default: converted into a scratch folder)")
    p.add_argument("--caps", type=_caps, default=[0.5, 0.65, 0.8],
                   help="caps: overhead + these shares of the source GGUF's bytes; 'none': "
                   "no cap (then give --budget)")
    p.add_argument("--budget", default=None,
                   help="with --caps none: the flash budget (a share of the payload, bytes or "
                   "a size)")
    p.add_argument("--slack", type=float, default=0.01,
                   help="share of each cap flashgguf's budget leaves unused: room for the "
                   "trunk's pages and llama.cpp's buffers (a MoE's 30B trunk needs ~0.08)")
    p.add_argument("--busy", type=int, default=0,
                   help="also run everything with this many busy-loop processes")
    p.add_argument("--modes", default="hybrid", help="flash modes, each optionally with "
                   "flash_* options after colons: hybrid,gate:pinned_share=1.0 ('' for none); "
                   "for a mixture of experts 'experts' with options, e.g. "
                   "experts,experts:expert_prefetch=true (other modes are ignored there)")
    p.add_argument("--stock", default="shipped,mmap", help="stock runs: shipped, mmap")
    p.add_argument("--threads", type=int_list, default=[2])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=1, help="repeat every run (alternating)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder for conversions")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG plot here (needs flashgguf[plot])")
    p.set_defaults(func=main)


def _caps(text: str) -> list[float | None]:
    return [None] if text.strip() == "none" else list(float_list(text))


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that spin on a core each."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _modes(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in filter(None, text.split(",")):
        mode, _, extra = item.partition(":")
        out.append((item, dict(option_items(extra.replace(":", ",")), flash_mode=mode)))
    return out


def main(args: argparse.Namespace) -> int:
    from ..format import MoEFlashFile, open_any_flash_file
    from ..options import budget_argument, parse_budget

    if args.tokens < 1 or args.reps < 1 or args.busy < 0 or not 0 <= args.slack < 1:
        raise ProfileError("--tokens and --reps must be at least 1, --busy at least 0, "
                           "--slack in [0, 1)")
    if args.caps == [None] and args.budget is None:
        raise ProfileError("--caps none needs --budget")
    modes = _modes(args.modes)
    stocks = [s for s in args.stock.split(",") if s]
    bad = [s for s in stocks if s not in ("shipped", "mmap")]
    if bad:
        raise ProfileError(f"--stock: {bad[0]!r} is not shipped or mmap")
    with flash_model(args.flash or args.source, args.workdir, args.quiet) as flash_path:
        flash = open_any_flash_file(flash_path)
        moe = isinstance(flash, MoEFlashFile)
        if moe:  # the router picks the experts: no modes, but a run per option set given
            # as "experts:KEY=VALUE" (or one run with the defaults)
            modes = [(name, {k: v for k, v in opts.items() if k != "flash_mode"})
                     for name, opts in modes if opts["flash_mode"] == "experts"] \
                or [("experts", {})]
        no_cap = None if args.caps == [None] else cgroup_available()
        if no_cap:
            note(f"no memory cap can be set here ({no_cap}): every run goes uncapped", args.quiet)
        model_bytes = args.source.stat().st_size
        trunk = flash.file_size - flash.payload_nbytes
        base = dict(model=str(args.source), flash=str(flash_path), tokens=args.tokens)
        _drop(args.source, flash_path)
        over = run_child(dict(base, kind="stock mmap", threads=args.threads[0]), None,
                         args.timeout)
        if "error" in over:
            raise ProfileError(f"the overhead run failed: {over['error']}")
        overhead = int(over["rss_anon_mb"] * MB)
        gates = 0 if moe else \
            sum(la.gate_rows.nbytes for la in flash.layers if la.gate_rows is not None)
        # flashgguf's own memory with nothing kept: no rows (naive mode; gate mode, the only
        # one, for split rows), or no expert slots
        bare = dict(flash_dram_budget=1) if moe else \
            dict(flash_mode="gate" if flash.split else "naive", flash_dram_budget=max(gates, 1))
        fover = run_child(dict(base, kind="flash", threads=args.threads[0], no_repack=True,
                               options=bare), None, args.timeout)
        if "error" in fover:
            raise ProfileError(f"the flash overhead run failed: {fover['error']}")
        flash_overhead = int(fover["rss_anon_mb"] * MB) - gates
        configs = []
        for share in args.caps:
            if share is None:
                cap = None
                budget = parse_budget(budget_argument(args.budget), flash.payload_nbytes)
            else:
                cap = overhead + int(share * model_bytes)
                budget = max(cap - flash_overhead - trunk - int(args.slack * cap), 1)
            for busy in sorted({0, args.busy}):
                for threads in args.threads:
                    for s in stocks:
                        configs.append((share, cap, busy, f"stock {s}", dict(
                            base, kind=f"stock {s}", threads=threads)))
                    for name, options in modes:
                        configs.append((share, cap, busy, f"flash {name}", dict(
                            base, kind="flash", threads=threads,
                            options={"flash_dram_budget": budget, **options})))
        load_avg = load_average()
        results = []
        bar = progress_bar(len(configs) * args.reps, "runs", args.quiet, unit="run")
        for rep in range(args.reps):
            for share, cap, busy, name, spec in configs:
                _drop(args.source, flash_path)
                loops = busy_loops(busy)
                try:
                    r = run_child(spec, None if no_cap else cap, args.timeout)
                finally:
                    for proc in loops:
                        proc.kill()
                        proc.wait()
                budget = spec.get("options", {}).get("flash_dram_budget")
                r.update(name=name, share=share, cap_mb=None if cap is None else cap / MB,
                         busy=busy, threads=spec["threads"], rep=rep,
                         capped=cap is not None and not no_cap,
                         budget_mb=budget / MB if isinstance(budget, int) else budget)
                results.append(r)
                bar.update(1)
        bar.close()
    result = dict(source=str(args.source), flash=str(args.flash or "(converted)"),
                  source_mb=model_bytes / MB, trunk_mb=trunk / MB,
                  payload_mb=flash.payload_nbytes / MB, overhead_mb=overhead / MB,
                  flash_overhead_mb=flash_overhead / MB,
                  capped=args.caps != [None] and not no_cap,
                  uncapped_why="--caps none" if args.caps == [None] else no_cap,
                  load_average=[load_avg, load_average()], runs=results,
                  medians=_medians(results))
    result["plot"] = write_plot(args.plot, bench_plot(result), args.quiet)
    return emit(result, args.json, _table)


def _drop(*paths: Path) -> None:
    for path in paths:
        drop_file_cache(path)


def _medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (cap, threads, run): median tok/s over reps; flash against the better stock."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["share"], r["busy"], r["threads"], r["name"]), []).append(r)
    out = []
    for (share, busy, threads, name), rows in groups.items():
        ok = [r for r in rows if "tok_s" in r]
        row: dict[str, Any] = dict(share=share, busy=busy, threads=threads, name=name,
                                   cap_mb=rows[0]["cap_mb"], budget_mb=rows[0]["budget_mb"],
                                   ok=len(ok), runs=len(rows),
                                   error=None if ok else rows[0].get("error"))
        if ok:
            row.update(tok_s=statistics.median(r["tok_s"] for r in ok),
                       tok_s_range=[min(r["tok_s"] for r in ok), max(r["tok_s"] for r in ok)],
                       device_mb_per_token=statistics.median(
                           r["device_mb_per_token"] for r in ok))
            if name.startswith("flash"):
                row["read_mib_per_token"] = statistics.median(
                    r["read_mib_per_token"] for r in ok)
        out.append(row)
    for row in out:
        if row["name"].startswith("flash") and "tok_s" in row:
            stock = [o["tok_s"] for o in out if o["name"].startswith("stock") and "tok_s" in o
                     and (o["share"], o["busy"], o["threads"])
                     == (row["share"], row["busy"], row["threads"])]
            if stock:
                row["vs_better_stock"] = row["tok_s"] / max(stock)
    return out


def _table(r: dict[str, Any]) -> None:
    print(f"{r['source']}: {r['source_mb']:.1f} MB; flash trunk {r['trunk_mb']:.1f} MB, payload "
          f"{r['payload_mb']:.1f} MB; overhead (RssAnon) stock mmap {r['overhead_mb']:.1f} MB, "
          f"flashgguf {r['flash_overhead_mb']:.1f} MB"
          + ("" if r["capped"] else f"; no memory cap: {r['uncapped_why']}"))
    rows = []
    for m in r["medians"]:
        where = [fmt(m["share"], ".2f"), fmt(m["cap_mb"], ".0f"), str(m["busy"]),
                 str(m["threads"]), m["name"],
                 fmt(m["budget_mb"], ".1f") if m["name"].startswith("flash") else ""]
        if "tok_s" not in m:
            rows.append([*where, "failed", "", "", "", ""])
            continue
        lo, hi = m["tok_s_range"]
        rows.append([*where, f"{m['tok_s']:.3f}", f"{lo:.3f}-{hi:.3f}",
                     f"{m['device_mb_per_token']:.1f}", fmt(m.get("read_mib_per_token"), ".2f"),
                     fmt(m.get("vs_better_stock"), ".2f")])
    print_table(["cap share", "cap MB", "busy", "threads", "run", "budget MB", "tok/s",
                 "range", "device MB/tok", "flash MiB/tok", "x better stock"], rows)
    for m in r["medians"]:
        if "tok_s" not in m:
            print(f"failed: {m['name']} at cap share {fmt(m['share'], '.2f')}: {m['error']}")
    print(f"medians of {max(m['runs'] for m in r['medians'])} rep(s); load average "
          f"{r['load_average'][0]:.2f} -> {r['load_average'][1]:.2f}")
    if r["plot"]:
        print(f"plot: {r['plot']}")
