#!/usr/bin/env python3
"""Read-engine benchmark: pthread pool vs io_uring, and the coalescing gap, in one run.

    python tools/bench_io.py [--model m.flash.gguf] [--tokens 24] [--density 0.25]
                             [--gaps 0,1,2,4,8] [--depths 8,16,32]

Every layer of every token reads a fresh random set of rows (each row with probability
--density: what a predictor's misses look like) with direct I/O, through the runtime's
naive mode with an oracle mask, so that nothing is cached between tokens and every row is a
read. Configurations alternate within each repetition so that drift of a shared machine
hits all of them. Printed per configuration: I/O wait per token, reads and mean read size,
bytes per token, and achieved throughput (bytes read / time waiting for reads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashgguf.archs import get_arch  # noqa: E402
from flashgguf.convert import ConvertOptions, convert_gguf  # noqa: E402
from flashgguf.format import open_flash_file  # noqa: E402
from flashgguf.models import smollm2_gguf  # noqa: E402
from flashgguf.options import FlashOptions  # noqa: E402
from flashgguf.runtime import Runtime  # noqa: E402


def run(flash, io: str, gap: int, depth: int, masks: np.ndarray, x: np.ndarray) -> dict:
    rt = Runtime(flash, get_arch(flash.arch), FlashOptions(
        max_tokens=1, mode="naive", dram_budget=flash.payload_nbytes // 2, coalesce_gap=gap,
        io=io, io_depth=depth))
    if not rt.direct_io:
        print("warning: no direct I/O here: figures include the page cache", file=sys.stderr)
    rt.stats(reset=True)
    for t in range(masks.shape[0]):
        for layer in range(flash.n_layer):
            rt.ffn(layer, x[t:t + 1], masks[t, layer])
    s = rt.stats()
    s["backend"] = rt.io_backend
    rt.close()
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a flash GGUF (default: SmolLM2, converted)")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--gaps", default="0,1,2,4,8")
    ap.add_argument("--depths", default="16")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        path = args.model
        if path is None:
            path = Path(tmp) / "smollm2.flash.gguf"
            convert_gguf(smollm2_gguf(), path, ConvertOptions(progress=False, log=lambda _m: None))
        flash = open_flash_file(path)
        rng = np.random.default_rng(0)
        masks = rng.random((args.tokens, flash.n_layer, flash.n_ff)) < args.density
        x = rng.standard_normal((args.tokens, flash.n_embd)).astype(np.float32)
        configs = [(io, gap, depth) for depth in map(int, args.depths.split(","))
                   for gap in map(int, args.gaps.split(",")) for io in ("threads", "io_uring")]
        results: dict[tuple, list[dict]] = {c: [] for c in configs}
        for _ in range(args.reps):
            for c in configs:
                results[c].append(run(flash, *c, masks, x))
        strides = sorted({layer.layout.stride for layer in flash.layers})
        print(f"{path.name}: {flash.n_layer} layers x {flash.n_ff} rows of "
              f"{'/'.join(map(str, strides))} B, density {args.density}, {args.tokens} tokens, "
              f"median of {args.reps}")
        print(f"{'engine':>9} {'gap':>3} {'depth':>5} {'io ms/tok':>9} {'reads/tok':>9} "
              f"{'KiB/read':>8} {'MiB/tok':>7} {'MB/s':>7}")
        for (_io, gap, depth), runs in results.items():
            wait = statistics.median(r["time_io_wait_s"] for r in runs)
            r = runs[0]
            tok = args.tokens
            print(f"{runs[0]['backend']:>9} {gap:>3} {depth:>5} {1e3 * wait / tok:9.2f} "
                  f"{r['reads'] / tok:9.1f} {r['bytes_read'] / max(r['reads'], 1) / 1024:8.1f} "
                  f"{r['bytes_read'] / tok / 2**20:7.2f} {r['bytes_read'] / wait / 1e6:7.0f}")


if __name__ == "__main__":
    main()
