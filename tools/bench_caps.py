#!/usr/bin/env python3
"""Stock llama.cpp against flashgguf under the same memory cap, any model, one run:

    python tools/bench_caps.py --model SRC.gguf --flash SRC.flash.gguf
                               [--caps 0.5,0.65,0.8] [--threads 1,2] [--tokens 8]
                               [--modes hybrid,predicted,gate:pinned_share=1.0]
                           [--stock shipped,mmap]
                               [--timeout 300] [--json FILE] [--reps N] [--busy N]
                               [--caps none --budget FRACTION]
    python tools/bench_caps.py --model SRC.gguf --flash SRC.flash.gguf --read-cost

1. The true process overhead: stock llama.cpp with weight repacking off (pure mmap), no
   cap, its anonymous memory after a short decode (KV cache, compute buffers, interpreter).
2. The disk: direct reads of the flash payload at the runtime's read size and depth (MB/s).
3. Per cap (overhead + a fraction of the source GGUF's bytes; the cgroup charges the page
   cache) and thread count, each in its own child process after evicting both files from
   the page cache:
   - stock as shipped (CPU_REPACK copies in anonymous memory, which a cap cannot evict) and
     stock pure mmap (use_extra_bufts=False; DESIGN.md section 5);
   - flashgguf per mode, its budget what the cap leaves after flashgguf's own overhead
     (measured like stock's, with no rows kept: it includes the read engine's staging
     buffers) and the flash file's trunk (mmapped by llama.cpp, part of it repacked), less
     1% of slack.
   Reported: decode tok/s over --tokens greedy tokens after a short prompt; MB read from the
   device per token (stock: /proc/self/io; flash: the same, which holds the trunk's page
   faults and the direct reads); flash's own reads, the missed rows' bytes, over-fetch,
   I/O wait, FFN time and hit rate; and the bound max(FFN time, flash bytes / disk MB/s)
   against the measured time per token.
A run that does not finish within --timeout seconds is reported as such (stock as shipped
stalls when its repacked weights do not fit the cap).
Needs root (or a delegated cgroup) for the caps. Run it on a quiet machine: it prints the
load average at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_dense import greedy_next_token  # noqa: E402
from bench_flash import _proc_io, _rss_anon, drop_file_cache, memory_cgroup  # noqa: E402
from quality import no_weight_repacking  # noqa: E402

MB = 1e6
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def run_child(spec: dict) -> dict:
    kind = spec["kind"]
    kw = dict(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=spec["threads"],
              n_threads_batch=spec["threads"], verbose=False)
    t0 = time.perf_counter()
    if kind.startswith("stock"):
        import llama_cpp

        with no_weight_repacking() if kind == "stock mmap" else contextlib.nullcontext():
            llm = llama_cpp.Llama(spec["model"], use_mmap=True, **kw)
    else:
        from flashgguf import Llama

        with no_weight_repacking() if spec.get("no_repack") else contextlib.nullcontext():
            mode, _, extra = spec["mode"].partition(":")
            options = {f"flash_{k}": int(v) if v.isdigit() else float(v) for k, v in
                       (item.split("=", 1) for item in extra.split(":") if item)}
            llm = Llama(spec["flash"], flash_offload=True, flash_dram_budget=spec["budget"],
                        flash_mode=mode, **options, **kw)
    load_s = time.perf_counter() - t0
    prompt = llm.tokenize(PROMPT.encode())
    llm.eval(prompt)
    tok = greedy_next_token(llm)
    if kind == "flash":
        llm.flash_stats(reset=True)
    io0 = _proc_io()
    t0 = time.perf_counter()
    generated = []
    for _ in range(spec["tokens"]):
        llm.eval([tok])
        generated.append(tok)
        tok = greedy_next_token(llm)
    dt = time.perf_counter() - t0
    io1 = _proc_io()
    out = {"load_s": load_s, "text": llm.detokenize(generated).decode(errors="replace"),
           "tok_s": spec["tokens"] / dt, "s_per_token": dt / spec["tokens"],
           "device_mb_per_token": (io1["read_bytes"] - io0["read_bytes"]) / MB / spec["tokens"],
           "rss_anon_mb": _rss_anon() / MB}
    if kind == "flash":
        s = llm.flash_stats()
        n = max(int(s["tokens"]), 1)
        out.update(
            flash_mb_per_token=s["bytes_read"] / MB / n,
            needed_mb_per_token=s["bytes_needed"] / MB / n,
            over_fetch=s["bytes_read"] / s["bytes_needed"] if s["bytes_needed"] else float("nan"),
            io_wait_s=s["time_io_wait_s"] / n, ffn_s=s["time_ffn_s"] / n,
            hit_rate=s["cache_hits"] / max(s["cache_hits"] + s["cache_misses"], 1),
            reads_per_token=s["reads"] / n)
    llm.close()
    return out


def measure(spec: dict, cap: int | None, timeout: float) -> dict:
    for path in (spec.get("model"), spec.get("flash")):
        if path:
            drop_file_cache(Path(path))
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        if cap is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd=str(REPO), check=False)
        else:
            with memory_cgroup(cap) as procs:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      cwd=str(REPO), check=False,
                                      preexec_fn=lambda: procs.write_text(str(os.getpid())))
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode in (-9, 137):
            tail = "killed (out of memory under the cap)"
        return {"error": tail}
    return json.loads(lines[-1])


def disk_mb_s(path: Path, offset: int, nbytes: int, read_bytes: int, depth: int) -> float:
    """Direct reads of [offset, offset + nbytes) in read_bytes pieces, depth at once."""
    import mmap

    drop_file_cache(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    offset -= offset % 4096
    pieces = list(range(offset, offset + nbytes, read_bytes))
    lock = threading.Lock()

    def worker():
        buf = mmap.mmap(-1, read_bytes)  # page-aligned, as direct I/O needs
        while True:
            with lock:
                if not pieces:
                    return
                at = pieces.pop()
            os.preadv(fd, [buf], at)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    os.close(fd)
    return nbytes / dt / MB


def read_cost(path: Path, offset: int, depth: int, reps: int = 3) -> None:
    """Print the per-read time of direct reads of 4-256 KiB at depth, and the fit
    t(s) = c + s / B from the 4 KiB and 256 KiB medians: c * B is the break-even gap, the
    bytes worth reading through rather than issuing one more read (coalesce_bytes)."""
    sizes = (4 << 10, 16 << 10, 64 << 10, 256 << 10)
    per_read: dict[int, list[float]] = {size: [] for size in sizes}
    for rep in range(reps):
        for size in sizes:
            nbytes = min(64 << 20, size * 1024)
            mb_s = disk_mb_s(path, offset + rep * (128 << 20), nbytes, size, depth)
            per_read[size].append(size / (mb_s * MB))
            print(f"rep {rep} read {size >> 10:3d} KiB: {mb_s:6.0f} MB/s, "
                  f"{per_read[size][-1] * 1e6:6.1f} us per read", flush=True)
    t_small, t_big = (statistics.median(per_read[s]) for s in (sizes[0], sizes[-1]))
    bandwidth = (sizes[-1] - sizes[0]) / (t_big - t_small)
    fixed = t_small - sizes[0] / bandwidth
    print(f"fixed cost per read {fixed * 1e6:.1f} us, bandwidth {bandwidth / MB:.0f} MB/s: "
          f"break-even gap {fixed * bandwidth / 1024:.1f} KiB")


def _f(v, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that spin on a core each: the background load of part 3."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help="the source GGUF stock llama.cpp runs")
    p.add_argument("--flash", type=Path, help="its flash GGUF (flashgguf-convert)")
    p.add_argument("--caps", default="0.5,0.65,0.8",
                   help="caps: overhead + these fractions of the source GGUF's bytes; 'none': "
                        "no cap (then give --budget)")
    p.add_argument("--budget", type=float, default=None,
                   help="flash budget as a fraction of the payload instead of what the cap leaves")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=1,
                   help="repeat every configuration (alternating); tables give medians")
    p.add_argument("--busy", type=int, default=0,
                   help="also measure with this many busy-loop processes running")
    p.add_argument("--modes", default="hybrid,predicted",
                   help="flash modes, each optionally with flash_* options: gate:pinned_share=1.0")
    p.add_argument("--stock", default="shipped,mmap")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    p.add_argument("--read-cost", action="store_true",
                   help="only measure the device's per-read cost and break-even gap")
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.model is None or args.flash is None:
        p.error("--model and --flash are required")
    if args.caps == "none" and args.budget is None:
        p.error("--caps none needs --budget")

    from flashgguf.format import open_flash_file
    from flashgguf.options import DEFAULT_IO_DEPTH, DEFAULT_MAX_READ_BYTES

    flash = open_flash_file(args.flash)
    model_bytes = args.model.stat().st_size
    trunk = flash.file_size - flash.payload_nbytes
    if args.read_cost:
        read_cost(args.flash, trunk, DEFAULT_IO_DEPTH)
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    print(f"load average at start: {os.getloadavg()}")
    print(f"model {args.model.name}: {model_bytes / MB:.1f} MB; flash file trunk "
          f"{trunk / MB:.1f} MB, payload {flash.payload_nbytes / MB:.1f} MB")

    base = dict(model=str(args.model), flash=str(args.flash), tokens=args.tokens)
    over = measure(dict(base, kind="stock mmap", threads=threads[0]), None, args.timeout)
    if "error" in over:
        print(f"overhead run failed: {over['error']}")
        return 1
    overhead = int(over["rss_anon_mb"] * MB)
    # flash's own: the same with every row streamed (naive keeps none) and repacking off:
    # its runtime scratch, staging buffers and the flashgguf imports. (With repacking on,
    # llama.cpp's copies of the trunk's Q4_K weights are anonymous memory that stands in for
    # their mmapped pages: the same bytes, so the trunk's size below covers them.)
    # (a gate-resident file keeps its gate matrices whatever the budget: they are the budget's
    # minimum, counted in it, not overhead)
    gates = sum(layer.gate_rows.nbytes for layer in flash.layers if layer.gate_rows is not None)
    fover = measure(dict(base, kind="flash", mode="naive", budget=max(gates, 1),
                         threads=threads[0], no_repack=True), None, args.timeout)
    if "error" in fover:
        print(f"flash overhead run failed: {fover['error']}")
        return 1
    flash_overhead = int(fover["rss_anon_mb"] * MB) - gates
    print(f"process overhead (RssAnon, no cap): stock pure mmap {overhead / MB:.1f} MB, "
          f"flashgguf with no rows kept (repacking off) {flash_overhead / MB:.1f} MB")
    configs = []
    for cap_arg in args.caps.split(","):
        frac = None if cap_arg == "none" else float(cap_arg)
        cap = None if frac is None else overhead + int(frac * model_bytes)
        if args.budget is not None:
            budget = int(args.budget * flash.payload_nbytes)
        else:  # what the cap leaves after flash's own overhead and its trunk, less 1%
            budget = cap - flash_overhead - trunk - int(0.01 * cap)
        for load in ([0, args.busy] if args.busy else [0]):
            for n_threads in threads:
                for s in [s for s in args.stock.split(",") if s]:
                    configs.append((cap, frac, load, dict(
                        base, kind=f"stock {'shipped' if s == 'shipped' else 'mmap'}",
                        threads=n_threads)))
                for m in [m for m in args.modes.split(",") if m]:
                    configs.append((cap, frac, load, dict(
                        base, kind="flash", mode=m, budget=max(budget, 1), threads=n_threads)))
    results = []
    for rep in range(args.reps):
        disk = disk_mb_s(args.flash, trunk, min(flash.payload_nbytes, 256 << 20),
                         DEFAULT_MAX_READ_BYTES, DEFAULT_IO_DEPTH)
        print(f"rep {rep}: disk {disk:.0f} MB/s (direct, {DEFAULT_MAX_READ_BYTES >> 10} KiB "
              f"reads, depth {DEFAULT_IO_DEPTH}); load average {os.getloadavg()[0]:.2f}")
        for cap, frac, load, spec in configs:
            loops = busy_loops(load)
            try:
                r = measure(spec, cap, args.timeout)
            finally:
                for proc in loops:
                    proc.kill()
                    proc.wait()
            r.update(cap_mb=(cap or 0) / MB, frac=frac, threads=spec["threads"], busy=load,
                     rep=rep, disk_mb_s=disk, budget_mb=spec.get("budget", 0) / MB,
                     name=spec["kind"] if spec["kind"] != "flash" else f"flash {spec['mode']}")
            results.append(r)
            _print_row(r)
    print(f"load average at end: {os.getloadavg()}")
    _print_medians(results)
    if args.json:
        args.json.write_text(json.dumps(dict(overhead=overhead, flash_overhead=flash_overhead,
                                             results=results), indent=1))
    return 0


def _where(r: dict) -> str:
    cap = "no cap" if r["frac"] is None else f"cap {r['cap_mb']:6.1f} MB ({r['frac']:.2f})"
    return f"{cap} t{r['threads']}" + (f" busy{r['busy']}" if r["busy"] else "")


def _print_row(r: dict) -> None:
    head = f"{_where(r)} {r['name']:<16}"
    if "error" in r:
        print(f"{head} {r['error']}", flush=True)
        return
    line = (f"{head} {r['tok_s']:6.3f} tok/s  device {r['device_mb_per_token']:7.1f} MB/tok  "
            f"anon {r['rss_anon_mb']:6.1f} MB")
    if "flash_mb_per_token" in r:
        bound = max(r["ffn_s"], r["flash_mb_per_token"] / r["disk_mb_s"])
        line += (f"  budget {r['budget_mb']:.0f} MB  flash read {r['flash_mb_per_token']:.1f} "
                 f"needed {r['needed_mb_per_token']:.1f} MB/tok (x{_f(r['over_fetch'], '.3f')})"
                 f"  io wait {1e3 * r['io_wait_s']:.0f} ms  ffn {1e3 * r['ffn_s']:.0f} ms"
                 f"  hits {100 * r['hit_rate']:.1f}%  time/bound {r['s_per_token'] / bound:.2f}")
    print(line, flush=True)


def _print_medians(results: list[dict]) -> None:
    """Per configuration: median tok/s (min-max over reps); flash against the better stock."""
    print("\nmedians over reps (tok/s, min-max); flash / better stock of the same cap, "
          "threads and load:")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["frac"] if r["frac"] is not None else -1.0, r["threads"],
                           r["busy"], r["name"]), []).append(r)

    def median_tok_s(rows: list[dict]) -> float | None:
        got = sorted(r["tok_s"] for r in rows if "tok_s" in r)
        return statistics.median(got) if got else None

    for (frac, n_threads, busy, name), rows in sorted(groups.items()):
        med = median_tok_s(rows)
        got = [r["tok_s"] for r in rows if "tok_s" in r]
        text = "failed: " + rows[0]["error"] if med is None else (
            f"{med:6.3f} ({min(got):.3f}-{max(got):.3f})")
        if name.startswith("flash") and med is not None:
            stock = [median_tok_s(v) for (f2, t2, b2, n2), v in groups.items()
                     if (f2, t2, b2) == (frac, n_threads, busy) and n2.startswith("stock")]
            best = max([s for s in stock if s is not None], default=None)
            mb = statistics.median(r["flash_mb_per_token"] for r in rows if "tok_s" in r)
            text += f"  read {mb:.1f} MB/tok"
            if best:
                text += f"  {med / best:.2f}x the better stock ({best:.3f})"
        print(f"  {_where(rows[0])} {name:<16} {text}")


if __name__ == "__main__":
    sys.exit(main())
