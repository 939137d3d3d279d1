#!/usr/bin/env python3
"""Time the converter's weight-only predictor fit on one synthetic layer:

    python tools/bench_predictor_fit.py [--n-embd 1536] [--n-ff 8960] [--reps 3] [--profile]

The default shape is Qwen2.5-Coder-1.5B's (28 layers, SwiGLU): random gate/up/down
(N(0, 0.02), plus a rank-64 part in the gate so the rank rule has something to find), a
positive norm weight around 1, a bundle of 3000 bytes per neuron, default PredictorOptions,
on one OpenBLAS thread as the converter fits. Prints wall and CPU seconds per fit, the load
average (the machine may be shared: CPU time is the steadier number), the median, and the
fit's rank, threshold, recall and density; --profile prints a cProfile of one fit instead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashgguf.convert.blas import single_threaded_blas  # noqa: E402
from flashgguf.convert.predictor_fit import PredictorOptions, fit_layer_predictor  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=1536)
    p.add_argument("--n-ff", type=int, default=8960)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(1)
    n_ff, n_embd = args.n_ff, args.n_embd
    gate = (rng.standard_normal((n_ff, n_embd)) * 0.02).astype(np.float32)
    up = (rng.standard_normal((n_ff, n_embd)) * 0.02).astype(np.float32)
    down = (rng.standard_normal((n_embd, n_ff)) * 0.02).astype(np.float32)
    gate += (rng.standard_normal((n_ff, 64)) @ rng.standard_normal((64, n_embd)) * 0.01
             ).astype(np.float32)
    norm = np.abs(1.0 + 0.3 * rng.standard_normal(n_embd)).astype(np.float32)

    def fit():
        with single_threaded_blas():
            return fit_layer_predictor("silu", gate, up, down, norm, None, 3000 * n_ff,
                                       PredictorOptions(), 7)

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        fit()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return 0
    walls, cpus = [], []
    for _ in range(args.reps):
        w, c = time.perf_counter(), time.process_time()
        fitted = fit()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        print(f"wall {walls[-1]:.2f} s  cpu {cpus[-1]:.2f} s  load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
    print(f"median: wall {np.median(walls):.2f} s, cpu {np.median(cpus):.2f} s")
    print(f"rank {fitted.predictor.rank}, threshold {fitted.predictor.threshold:.6g}, "
          f"recall {fitted.recall:.4f}, precision {fitted.precision:.4f}, "
          f"density {fitted.density:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
