"""flashgguf-profile io: how fast this storage is for flashgguf's reads.

1. The device curve: random reads of a scratch file (--path: a folder on the disk that will
   hold the model, or an existing file to read), read size x queue depth (reader threads),
   direct I/O and buffered (the file's pages dropped before each), in MB/s and microseconds
   per read; per depth, the fit t(size) = c + size / B of the direct reads: c x B is the
   break-even gap (flash_coalesce_gap auto reads through gaps smaller than it).
2. With --flash FILE: the runtime's own read engines (threads, io_uring) at each coalescing
   gap, on random row sets of --density per layer and token (naive mode: nothing cached,
   every needed row is a read), in I/O wait per token, reads, read size and MB/s."""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import (
    MB,
    MiB,
    ProfileError,
    drop_file_cache,
    emit,
    existing_file,
    int_list,
    load_average,
    print_table,
    progress_bar,
    size_list,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("io", help="the storage curve: read size x depth x engine",
                       description=__doc__)
    p.add_argument("--path", type=Path, default=Path("."),
                   help="a folder to put a scratch file in, or a file to read (default: .)")
    p.add_argument("--file-mb", type=int, default=256, help="scratch file size (MB)")
    p.add_argument("--sizes", type=size_list, default=size_list("4K,16K,64K,256K,1M"))
    p.add_argument("--depths", type=int_list, default=[1, 4, 16])
    p.add_argument("--mb", type=int, default=32, help="MB read per point")
    p.add_argument("--flash", type=existing_file, default=None,
                   help="also measure the runtime's read engines on this flash GGUF")
    p.add_argument("--engines", default="threads,io_uring")
    p.add_argument("--gaps", default="0,8,auto", help="coalescing gaps (rows or auto)")
    p.add_argument("--density", type=float, default=0.25, help="share of rows read per layer")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=1,
                   help="repeat the engine runs (alternating); I/O wait is their median")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if min(args.depths, default=0) < 1 or min(args.mb, args.file_mb, args.reps, args.tokens) < 1:
        raise ProfileError("--depths, --mb, --file-mb, --reps and --tokens must be positive")
    load_avg = load_average()
    result: dict[str, Any] = {"device": _device(args)}
    if args.flash is not None:
        result["engines"] = _engines(args)
    result["load_average"] = [load_avg, load_average()]
    return emit(result, args.json, _table)


def _device(args: argparse.Namespace) -> dict[str, Any]:
    if args.path.is_file():
        return _curve(args.path, args)
    if not args.path.is_dir():
        raise ProfileError(f"--path {args.path}: no such file or folder")
    from ..trace import write_noise

    with tempfile.NamedTemporaryFile(dir=args.path, prefix=".flashgguf-io-") as f:
        bar = progress_bar(args.file_mb * MB, "writing a scratch file", args.quiet, unit="B",
                           unit_scale=True)
        write_noise(f, args.file_mb * 1_000_000, bar.update)  # MB, as --mb
        bar.close()
        return _curve(Path(f.name), args)


def _curve(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = path.stat().st_size
    points = []
    configs = [(kind, depth, rs) for kind in ("direct", "buffered") for depth in args.depths
               for rs in args.sizes if rs <= size]
    bar = progress_bar(len(configs), "device curve", args.quiet, unit="point")
    for kind, depth, read_size in configs:
        try:
            mb_s = random_read_mb_s(path, read_size, depth, int(min(args.mb * MB, size)),
                                 kind == "direct")
        except OSError as exc:  # a filesystem that refuses O_DIRECT (tmpfs)
            points.append(dict(kind=kind, depth=depth, read_bytes=read_size,
                               error=exc.strerror))
        else:
            points.append(dict(kind=kind, depth=depth, read_bytes=read_size, mb_s=mb_s,
                               us_per_read=read_size / (mb_s * MB) * 1e6))
        bar.update(1)
    bar.close()
    fits = []
    for depth in args.depths:
        got = sorted((p["read_bytes"], p["us_per_read"] * 1e-6) for p in points
                     if p["kind"] == "direct" and p["depth"] == depth and "mb_s" in p)
        if len(got) >= 2 and got[-1][1] > got[0][1]:
            (s0, t0), (s1, t1) = got[0], got[-1]
            bandwidth = (s1 - s0) / (t1 - t0)
            fixed = max(t0 - s0 / bandwidth, 0.0)
            fits.append(dict(depth=depth, fixed_us=fixed * 1e6, bandwidth_mb_s=bandwidth / MB,
                             break_even_kib=fixed * bandwidth / 1024))
    return dict(path=str(path), file_bytes=size, points=points, fits=fits)


def random_read_mb_s(path: Path, read_size: int, depth: int, nbytes: int, direct: bool) -> float:
    """MB/s of nbytes read in read_size pieces at random aligned offsets, depth threads
    (each preadv releases the GIL: depth reads are in flight)."""
    drop_file_cache(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    fd = os.open(path, flags)
    try:
        span = os.fstat(fd).st_size // read_size
        rng = np.random.default_rng(read_size * 31 + depth)
        offsets = list(rng.integers(0, span, max(nbytes // read_size, depth)) * read_size)
        lock = threading.Lock()
        errors: list[OSError] = []

        def worker() -> None:
            buf = mmap.mmap(-1, read_size)  # page-aligned, as direct I/O needs
            while True:
                with lock:
                    if not offsets or errors:
                        return
                    at = int(offsets.pop())
                try:
                    os.preadv(fd, [buf], at)
                except OSError as exc:
                    errors.append(exc)
                    return

        n = len(offsets)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(depth)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return n * read_size / dt / MB


def _engines(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..archs import get_arch
    from ..format import open_flash_file
    from ..options import FlashOptions
    from ..runtime import Runtime

    flash = open_flash_file(args.flash)
    rng = np.random.default_rng(0)
    masks = rng.random((args.tokens, flash.n_layer, flash.n_ff)) < args.density
    x = np.zeros((1, flash.n_embd), dtype=np.float32)
    gaps = [g if g == "auto" else int(g) for g in args.gaps.split(",") if g]
    configs = [(e, g, d) for d in args.depths for g in gaps for e in args.engines.split(",") if e]
    waits: dict[tuple, list[float]] = {c: [] for c in configs}
    last: dict[tuple, tuple[dict[str, float], str, bool]] = {}
    bar = progress_bar(len(configs) * args.reps, "read engines", args.quiet, unit="run")
    for _ in range(args.reps):
        for engine, gap, depth in configs:
            rt = Runtime(flash, get_arch(flash.arch), FlashOptions(
                max_tokens=1, mode="naive", dram_budget=max(flash.payload_nbytes // 2, 1),
                coalesce_gap=gap, io=engine, io_depth=depth))
            try:
                drop_file_cache(flash.path)
                rt.stats(reset=True)
                for t in range(args.tokens):
                    for layer in range(flash.n_layer):
                        rt.ffn(layer, x, masks[t, layer])
                last[engine, gap, depth] = rt.stats(), rt.io_backend, rt.direct_io
            finally:
                rt.close()
            waits[engine, gap, depth].append(last[engine, gap, depth][0]["time_io_wait_s"])
            bar.update(1)
    bar.close()
    out = []
    for (engine, gap, depth), (s, backend, direct) in last.items():
        wait = statistics.median(waits[engine, gap, depth])
        out.append(dict(engine=engine, backend=backend, direct=direct, gap=gap, depth=depth,
                        io_ms_per_token=1e3 * wait / args.tokens,
                        io_ms_range=[1e3 * min(waits[engine, gap, depth]) / args.tokens,
                                     1e3 * max(waits[engine, gap, depth]) / args.tokens],
                        reads_per_token=s["reads"] / args.tokens,
                        kib_per_read=s["bytes_read"] / max(s["reads"], 1) / 1024,
                        mib_per_token=s["bytes_read"] / args.tokens / MiB,
                        mb_s=s["bytes_read"] / wait / MB if wait > 0 else None))
    return out


def _table(r: dict[str, Any]) -> None:
    d = r["device"]
    print(f"device: random reads of {d['path']} ({d['file_bytes'] / MB:.0f} MB)")
    rows = [[p["kind"], str(p["depth"]), f"{p['read_bytes'] >> 10}",
             f"{p['mb_s']:.0f}" if "mb_s" in p else "refused: " + p["error"],
             f"{p['us_per_read']:.1f}" if "mb_s" in p else ""] for p in d["points"]]
    print_table(["reads", "depth", "KiB", "MB/s", "us/read"], rows)
    for f in d["fits"]:
        print(f"depth {f['depth']}: fixed cost {f['fixed_us']:.1f} us per read, "
              f"{f['bandwidth_mb_s']:.0f} MB/s: break-even gap {f['break_even_kib']:.1f} KiB")
    if "engines" in r:
        print("runtime read engines (naive mode, random rows):")
        rows = [[e["backend"], str(e["gap"]), str(e["depth"]), f"{e['io_ms_per_token']:.2f} "
                 f"({e['io_ms_range'][0]:.1f}-{e['io_ms_range'][1]:.1f})",
                 f"{e['reads_per_token']:.1f}", f"{e['kib_per_read']:.1f}",
                 f"{e['mib_per_token']:.2f}", f"{e['mb_s']:.0f}" if e["mb_s"] else "-"]
                for e in r["engines"]]
        print_table(["engine", "gap", "depth", "io ms/tok (range)", "reads/tok", "KiB/read",
                     "MiB/tok", "MB/s"], rows)
    print(f"load average {r['load_average'][0]:.2f} -> {r['load_average'][1]:.2f}")
