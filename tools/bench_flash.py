#!/usr/bin/env python3
"""Flash runtime benchmark (issue 3, part 7), one run, side by side:

    python tools/bench_flash.py [--budgets 0.25,0.5,0.75] [--modes naive,hybrid,predicted]
                                [--tokens 128] [--ppl-tokens 1000] [--threads 2]
                                [--workdir DIR] [--keep-files]
                                [--calibrate TOKENS [--source-order]]

1. Converts SmolLM2 (with the weight-only predictor, or with --calibrate the calibrated one,
   neurons hottest first) into a scratch folder; with --source-order also a second file with
   the same calibrated predictor but the neurons in the source order (hot_first=False).
2. Stock llama.cpp on the source GGUF, no cap: decode tokens/s and perplexity (the
   reference), and its anonymous memory (KV cache, buffers, interpreter: what any run needs
   besides the model's bytes; measured without logits_all, as the speed runs go).
3. Per budget (a share of the FFN payload) and mode: flashgguf.Llama(flash_offload=True,
   flash_dram_budget=share, flash_mode=mode): decode tokens/s over `--tokens` greedy tokens,
   bytes read per token, mean read size, read throughput (flash_stats()), perplexity on
   the first `--ppl-tokens` tokens of ../shared/data/brown/evaluation.txt. The flash
   perplexity is evaluated token by token (n_batch = n_ubatch = 1), as decode computes:
   in predicted mode a batch computes the union of its tokens' predicted neurons, so a
   512-token batch would measure nearly dense quality. The neurons computed per token in
   that run are reported too ("ppl computed"). Stock llama.cpp's reference perplexity is
   evaluated token by token too: its single-token and batched kernels differ by about 1% in
   perplexity on SmolLM2 (200 tokens: 35.78 at n_batch 1, 35.44 at 64 or 512), which would
   otherwise sit in every ratio.
   With --source-order, the source-order file runs in predicted mode at each budget too,
   and a second table compares the two files' reads (per token: MiB, mean read size, reads,
   cache hits), tokens/s and perplexity: what hot-first ordering buys.
4. Per budget: stock llama.cpp with mmap in a memory cgroup (v2 memory.max or v1
   memory.limit_in_bytes; the cap covers the page cache) of the flash runs' DRAM: trunk +
   the largest anonymous memory of the flash runs at that budget; with --stock-cap weights
   (or where no flash run ran) trunk + budget + the anonymous memory measured in 2, i.e.
   the same bytes for weights. Its reads come from /proc/self/io.

Every measurement runs in its own child process (fresh page cache accounting, one model
per process). Prints a table, then the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_dense import decode_tokens_per_s  # noqa: E402

EVALUATION = REPO.parent / "shared" / "data" / "brown" / "evaluation.txt"
EVALUATION_HEAD = REPO / "flashgguf" / "data" / "evaluation_head.txt"  # its first 24 KB
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20
SOURCE_ORDER = "source order"  # row-name suffix of the --source-order file's runs


# ---- memory cap ------------------------------------------------------------------------

class CgroupError(RuntimeError):
    pass


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh memory cgroup capped at `limit` bytes (page cache included); yields the
    cgroup.procs file a child writes its pid into. v2 where the memory controller is
    enabled, else v1."""
    name = f"flashgguf-bench-{os.getpid()}-{time.monotonic_ns()}"
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        folder, limit_file = CGROUP_V2 / name, "memory.max"
    elif (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
        folder, limit_file = CGROUP_V1_MEMORY / name, "memory.limit_in_bytes"
    else:
        raise CgroupError("no cgroup v2 memory controller at /sys/fs/cgroup and no v1 memory "
                          "hierarchy at /sys/fs/cgroup/memory")
    try:
        folder.mkdir()
    except OSError as exc:
        raise CgroupError(f"cannot create {folder}: {exc.strerror} (needs root or a "
                          "delegated cgroup)") from exc
    try:
        (folder / limit_file).write_text(str(limit))
        yield folder / "cgroup.procs"
    except OSError as exc:
        raise CgroupError(f"cannot set {folder / limit_file}: {exc.strerror}") from exc
    finally:
        for _ in range(50):  # the child may take a moment to be reaped
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def drop_file_cache(path: Path) -> None:
    """Evict a file's clean pages so that the next reader pays for (and is charged) them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---- child: one measurement --------------------------------------------------------------

def _proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, value = line.split(":")
            out[key] = int(value)
    return out


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _open(spec: dict, logits_all: bool, n_batch: int = 512):
    import inspect

    import llama_cpp

    from flashgguf import Llama

    kw = dict(n_ctx=1024, n_batch=n_batch, n_ubatch=n_batch, n_threads=spec["threads"],
              n_threads_batch=spec["threads"], logits_all=logits_all, verbose=False)
    if spec["kind"] == "stock":
        return llama_cpp.Llama(spec["path"], use_mmap=True, **kw)
    # llama_cpp.Llama swallows unknown keywords: check that this flashgguf has the runtime
    params = inspect.signature(Llama.__init__).parameters
    if "flash_dram_budget" not in params or "flash_mode" not in params:
        raise SystemExit("flashgguf.Llama has no flash_dram_budget/flash_mode: this checkout "
                         "lacks the flash runtime (issue 3)")
    return Llama(spec["path"], flash_offload=True, flash_dram_budget=spec["budget"],
                 flash_mode=spec["mode"], **kw)


def run_child(spec: dict) -> dict:
    from flashgguf.evaluate import perplexity, teacher_forced_logits

    out: dict = {}
    llm = _open(spec, logits_all=False)
    flash = spec["kind"] == "flash"
    if flash:
        llm.flash_stats(reset=True)
    io0, flt0 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    out["tok_s"] = decode_tokens_per_s(llm, spec["tokens"])
    io1, flt1 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    out["rss_anon"] = _rss_anon()  # before a logits_all context's big score buffer
    if flash:
        stats = llm.flash_stats(reset=True)
        out["stats"] = stats
        out["bytes_per_token"] = stats["bytes_read"] / max(int(stats["tokens"]), 1)
        out["mean_read"] = stats["bytes_read"] / max(int(stats["reads"]), 1)
        io_s = float(stats["time_io_wait_s"])
        out["read_mb_s"] = stats["bytes_read"] / io_s / 1e6 if io_s > 0 else float("nan")
    else:
        read = io1["read_bytes"] - io0["read_bytes"]
        out["bytes_per_token"] = read / spec["tokens"]
        out["mean_read"] = read / max(flt1 - flt0, 1)  # a major fault reads (with readahead)
        out["read_mb_s"] = float("nan")
    llm.close()
    if spec["ppl"]:
        # token by token, as decode computes (a flash batch computes the union of its
        # tokens' predicted neurons; stock's batched kernels round differently)
        llm = _open(spec, logits_all=True, n_batch=1)
        tokens = json.loads(Path(spec["eval_tokens"]).read_text())
        if flash:
            llm.flash_stats(reset=True)
        out["ppl"] = perplexity(teacher_forced_logits(llm, tokens), tokens)
        if flash:
            out["ppl_stats"] = llm.flash_stats(reset=True)
        llm.close()
    return out


def measure(spec: dict, cgroup_procs: Path | None = None) -> dict:
    """Run one measurement in a child process (inside the cgroup when given)."""
    def enter_cgroup() -> None:
        if cgroup_procs is not None:
            cgroup_procs.write_text(str(os.getpid()))

    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          preexec_fn=enter_cgroup, capture_output=True, text=True,
                          cwd=str(REPO), check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode < 0 or proc.returncode == 137:
            tail = f"killed by signal {-proc.returncode or 9} (out of memory under the cap?)"
        return {"error": tail}
    return json.loads(lines[-1])


# ---- parent ------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--budgets", default="0.25,0.5,0.75",
                   help="DRAM budgets as shares of the FFN payload")
    p.add_argument("--modes", default="naive,hybrid,predicted")
    p.add_argument("--tokens", type=int, default=128, help="greedy decode tokens timed")
    p.add_argument("--ppl-tokens", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stock-cap", choices=["total", "weights"], default="total",
                   help="capped stock's DRAM: the flash runs' measured total (trunk + their "
                   "anonymous memory), or trunk + budget + stock's own anonymous memory")
    p.add_argument("--evaluation", type=Path,
                   default=EVALUATION if EVALUATION.exists() else EVALUATION_HEAD,
                   help="perplexity text (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the converted model goes (default: the temp folder)")
    p.add_argument("--keep-files", action="store_true", help="keep the scratch folder")
    p.add_argument("--calibrate", type=int, default=0, metavar="TOKENS",
                   help="convert with the predictor calibrated on this many tokens of the "
                   "shipped calibration text (flashgguf-convert --calibrate), not weight-only")
    p.add_argument("--source-order", action="store_true",
                   help="with --calibrate: also convert keeping the source neuron order "
                   "(--no-hot-first) and compare both files in predicted mode")
    args = p.parse_args()
    if args.source_order and not args.calibrate:
        p.error("--source-order compares orders of a calibrated conversion: give --calibrate")
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    import llama_cpp

    from flashgguf.calibrate.collect import CalibrationOptions
    from flashgguf.convert import ConvertOptions, convert_gguf
    from flashgguf.evaluate import evaluation_tokens
    from flashgguf.format import open_flash_file
    from flashgguf.models import smollm2_gguf

    budgets = [float(b) for b in args.budgets.split(",")]
    modes = args.modes.split(",")
    # the scratch folder must be on a real disk: direct I/O and the page cache are measured
    work = Path(tempfile.mkdtemp(prefix="bench_flash-", dir=args.workdir))
    try:
        # a private copy of the source: its page cache is ours to drop before capped runs
        src = work / "source.gguf"
        shutil.copyfile(smollm2_gguf(), src)
        flash_path = work / "smollm2.flash.gguf"
        t0 = time.perf_counter()
        calibration = CalibrationOptions(tokens=args.calibrate) if args.calibrate else None
        report = convert_gguf(src, flash_path, ConvertOptions(
            progress=False, log=lambda _m: None, calibration=calibration))
        convert_s = time.perf_counter() - t0
        flash = open_flash_file(flash_path)
        args.n_neurons = flash.n_layer * flash.n_ff
        payload = flash.payload_nbytes
        ranks = [layer.predictor.rank for layer in flash.layers if layer.predictor]
        print(f"converted {smollm2_gguf().name} in {convert_s:.1f} s: trunk "
              f"{report.trunk_nbytes / MiB:.1f} MiB, FFN payload {payload / MiB:.1f} MiB, "
              f"predictor ranks {min(ranks)}-{max(ranks)} ({flash.predictor_kind})", flush=True)
        source_order_path = None
        if args.source_order:
            assert calibration is not None
            source_order_path = work / "smollm2.source-order.flash.gguf"
            t0 = time.perf_counter()
            convert_gguf(src, source_order_path, ConvertOptions(
                progress=False, log=lambda _m: None,
                calibration=dataclasses.replace(calibration, hot_first=False)))
            print(f"converted again keeping the source neuron order in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)

        vocab = llama_cpp.Llama(str(src), vocab_only=True, verbose=False)
        tokens = evaluation_tokens(vocab, args.evaluation.read_text(encoding="utf-8"),
                                   args.ppl_tokens)
        eval_file = work / "eval_tokens.json"
        eval_file.write_text(json.dumps(tokens))
        common = dict(tokens=args.tokens, threads=args.threads, eval_tokens=str(eval_file))

        rows: list[tuple[str, float | None, dict]] = []
        stock = measure({**common, "kind": "stock", "path": str(src), "ppl": True})
        overhead = int(stock.get("rss_anon", 0))
        rows.append(("stock llama.cpp (no cap)", src.stat().st_size + overhead, stock))
        print(f"stock: {stock}", flush=True)
        for share in budgets:
            budget = int(share * payload)
            flash_anon = []
            for mode in modes:
                r = measure({**common, "kind": "flash", "path": str(flash_path),
                             "budget": share, "mode": mode, "ppl": True})
                if "rss_anon" in r:
                    flash_anon.append(int(r["rss_anon"]))
                # a flash run's DRAM: the trunk (mapped by llama.cpp) + its anonymous memory
                # (FFN slots within the budget, predictor, KV cache, buffers, interpreter)
                rows.append((f"flash {mode} @{share:.0%}",
                             report.trunk_nbytes + r.get("rss_anon", budget + overhead), r))
                print(f"flash {mode} @{share:.0%}: {r}", flush=True)
            if source_order_path is not None:
                r = measure({**common, "kind": "flash", "path": str(source_order_path),
                             "budget": share, "mode": "predicted", "ppl": True})
                rows.append((f"flash predicted @{share:.0%} {SOURCE_ORDER}",
                             report.trunk_nbytes + r.get("rss_anon", budget + overhead), r))
                print(f"flash predicted @{share:.0%} {SOURCE_ORDER}: {r}", flush=True)
            # --stock-cap total: what the flash runs used at this budget (where they ran);
            # weights (or no flash run): the same bytes for weights, trunk + budget, plus
            # stock's own anonymous memory
            if args.stock_cap == "total" and flash_anon:
                cap = report.trunk_nbytes + max(flash_anon)
            else:
                cap = report.trunk_nbytes + budget + overhead
            drop_file_cache(src)
            try:
                with memory_cgroup(cap) as procs:
                    r = measure({**common, "kind": "stock", "path": str(src), "ppl": False},
                                procs)
            except CgroupError as exc:
                print(f"stock llama.cpp under a {cap / MiB:.0f} MiB cap: skipped: {exc}")
                r = {"error": f"no memory cap: {exc}"}
            rows.append((f"stock mmap, cap {cap / MiB:.0f} MiB @{share:.0%}", cap, r))
            print(f"stock capped @{share:.0%}: {r}", flush=True)
        _print_table(rows, stock, overhead, args)
        _print_ratios(rows, stock, budgets)
        if source_order_path is not None:
            _print_orders(rows, budgets, args)
    finally:
        if args.keep_files:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print_table(rows: list[tuple[str, float | None, dict]], stock: dict, overhead: int,
                 args: argparse.Namespace) -> None:
    print(f"\nSmolLM2-135M Q4_1, {args.tokens} greedy tokens, {args.threads} threads; "
          f"perplexity on the first {args.ppl_tokens} tokens of {args.evaluation.name}. "
          f"DRAM: flash = trunk + measured anonymous memory; capped stock = its cgroup cap "
          f"(stock's own anonymous memory: {overhead / MiB:.0f} MiB). Flash per token: "
          f"share of neurons computed (decode, and in the token-by-token perplexity run), ms "
          f"predicting / waiting for I/O / in the FFN")
    head = (f"{'run':34s} {'DRAM MiB':>8s} {'tok/s':>7s} {'KiB read/tok':>12s} "
            f"{'mean read KiB':>13s} {'read MB/s':>9s} {'ppl':>7s} {'ppl/stock':>9s} "
            f"{'computed':>8s} {'ppl comp':>8s} {'pred/io/ffn ms':>16s}")
    print(head)
    print("-" * len(head))
    ref = stock.get("ppl")
    for name, dram, r in rows:
        if "error" in r:
            print(f"{name:34s} {_fmt(dram and dram / MiB, '8.0f')}  {r['error']}")
            continue
        ppl = r.get("ppl")
        print(f"{name:34s} {_fmt(dram and dram / MiB, '8.0f')} {_fmt(r['tok_s'], '7.1f')} "
              f"{_fmt(r['bytes_per_token'] / 1024, '12.1f')} "
              f"{_fmt(r['mean_read'] / 1024, '13.1f')} "
              f"{_fmt(r['read_mb_s'], '9.0f')} {_fmt(ppl, '7.3f')} "
              f"{_fmt(ppl / ref if ppl and ref else None, '9.4f')} {_per_token(r, args)}")


def _computed(stats: dict | None, args: argparse.Namespace) -> float | None:
    """Share of the FFN neurons computed per token."""
    if not stats or not stats.get("tokens"):
        return None
    return stats["neurons_computed"] / stats["tokens"] / args.n_neurons


def _per_token(r: dict, args: argparse.Namespace) -> str:
    stats = r.get("stats")
    computed = _computed(stats, args)
    if stats is None or computed is None:
        return ""
    n = stats["tokens"]
    ppl_computed = _computed(r.get("ppl_stats"), args)
    ms = [1e3 * stats[k] / n for k in ("time_predict_s", "time_io_wait_s", "time_ffn_s")]
    return (f"{computed:8.1%} {'-' if ppl_computed is None else f'{ppl_computed:.1%}':>8s} "
            f"{'/'.join(f'{v:.1f}' for v in ms):>16s}")


def _print_ratios(rows: list[tuple[str, float | None, dict]], stock: dict,
                  budgets: list[float]) -> None:
    by_name = {name: r for name, _, r in rows}
    print("\nratios (targets at 50%: predicted >= 3x naive, >= 5x capped stock tok/s; "
          "ppl <= 1.05x stock)")
    for share in budgets:
        pred = by_name.get(f"flash predicted @{share:.0%}", {})
        naive = by_name.get(f"flash naive @{share:.0%}", {})
        capped = next((r for name, r in by_name.items()
                       if name.startswith("stock mmap") and name.endswith(f"@{share:.0%}")), {})

        def ratio(a: dict, b: dict, key: str) -> str:
            if key in a and key in b and b[key]:
                return f"{a[key] / b[key]:.2f}x"
            return "n/a"

        print(f"  @{share:.0%}: predicted/naive tok/s {ratio(pred, naive, 'tok_s')}, "
              f"predicted/capped-stock tok/s {ratio(pred, capped, 'tok_s')}, "
              f"predicted/stock ppl {ratio(pred, stock, 'ppl')}")



def _print_orders(rows: list[tuple[str, float | None, dict]], budgets: list[float],
                  args: argparse.Namespace) -> None:
    """Hot-first vs source order: the same calibrated predictor, in predicted mode."""
    by_name = {name: r for name, _, r in rows}
    print("\nhot-first vs source neuron order (predicted mode, the same calibrated predictor); "
          "per decoded token")
    head = (f"{'budget':>6s} {'order':12s} {'MiB read':>8s} {'mean read KiB':>13s} "
            f"{'reads':>7s} {'cache hits':>10s} {'tok/s':>7s} {'ppl':>7s} {'ppl comp':>8s}")
    print(head)
    print("-" * len(head))
    for share in budgets:
        for order, name in (("hot-first", f"flash predicted @{share:.0%}"),
                            (SOURCE_ORDER, f"flash predicted @{share:.0%} {SOURCE_ORDER}")):
            r = by_name.get(name)
            if r is None or "error" in r:
                print(f"{share:>6.0%} {order:12s} {(r or {}).get('error', 'not run')}")
                continue
            stats = r["stats"]
            n = max(int(stats["tokens"]), 1)
            ppl_computed = _computed(r.get("ppl_stats"), args)
            print(f"{share:>6.0%} {order:12s} {r['bytes_per_token'] / MiB:>8.3f} "
                  f"{r['mean_read'] / 1024:>13.1f} {stats['reads'] / n:>7.1f} "
                  f"{stats['cache_hits'] / n:>10.1f} {_fmt(r['tok_s'], '7.1f')} "
                  f"{_fmt(r.get('ppl'), '7.3f')} "
                  f"{'-' if ppl_computed is None else f'{ppl_computed:.1%}':>8s}")


if __name__ == "__main__":
    sys.exit(main())
