"""Fuzzing what flashgguf reads from users (issue 14, part 1): mutated copies of real flash
GGUF files made from generated models, and of a generated Hugging Face checkpoint
(safetensors header, config.json) for the converter. Each case must either work (the flash
file loads and generates a token; the checkpoint converts) or raise a FlashGGUFError, within
a time limit, without its peak memory growing by more than the input justifies, and a
refused conversion leaves no output; it runs in a worker process, so that a crash or a hang
is counted, not fatal.

    python tests/fuzz_flash.py --cases 10000 --seed 1 [--workers 2] [--json out.json]

Cases are numbered; case k of seed s is the same mutation on every run (numpy's generator
seeded with (s, k)), so a finding is reproduced with --only k. Mutations (chosen per case):
  header-bytes    1-8 random bytes of a GGUF header (either one: key-values, tensor infos)
  header-ints     an 8-byte-aligned spot of a header set to an edge value (0, 1, -1, 2^31,
                  2^32, 2^63 - 1, ...)
  floats          one value of a small float32 tensor of the payload (thresholds, curves,
                  biases, frequencies, residuals) set to NaN, +-inf, -1 or 1e30
  ints            one value of an int32 tensor (neuron orders) set to a duplicate, -1, n_ff
                  or 2^31 - 1
  truncate        the file cut at a random length
  bytes           1-64 random bytes anywhere (mostly bundle data: must still run)
Every third case is a checkpoint instead:
  st-header       1-8 random bytes of model.safetensors' JSON header (or its length)
  st-entry        one tensor entry's dtype, shape or data_offsets set to an edge value
  config          one config.json value set to an edge value (0, -1, 2^31, a string,
                  null, a list) or the key removed
  tokenizer       the same in tokenizer.json (top level, or its model: vocab, merges, ...)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MUTATIONS = ("header-bytes", "header-ints", "floats", "ints", "truncate", "bytes")
EDGE_INTS = (0, 1, 2, 255, 256, 4096, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
             (1 << 63) - 1, (1 << 64) - 1)
EDGE_FLOATS = (float("nan"), float("inf"), float("-inf"), -1.0, 1e30, 0.0)
# peak memory a case may add over the worker's baseline: a constant for llama.cpp's context
# (KV cache, compute buffers) and the runtime's scratch, plus a multiple of the file's size
MEMORY_FIXED = 256 << 20
MEMORY_PER_FILE_BYTE = 8
CASE_SECONDS = 30.0


@dataclass(frozen=True)
class Region:
    """Byte ranges of a seed file worth mutating."""

    headers: list[tuple[int, int]]
    floats: list[tuple[int, int]]  # (offset, count) of float32 tensors
    ints: list[tuple[int, int, int]]  # (offset, count, n_ff) of int32 tensors


def regions(path: Path) -> Region:
    from flashgguf.format import open_any_flash_file

    flash = open_any_flash_file(path)
    tensors = list(flash.payload.tensors.values())
    floats = [(t.offset, t.nbytes // 4) for t in tensors
              if t.ggml_type.name == "F32" and t.nbytes <= 1 << 20]
    # (MoE payloads hold none of either: their mutations fall to the headers and bytes)
    ints = [(t.offset, t.nbytes // 4, getattr(flash, "n_ff", 0)) for t in tensors
            if t.ggml_type.name == "I32"]
    return Region([(flash.trunk.base, flash.trunk.data_offset),
                   (flash.payload.base, flash.payload.data_offset)], floats, ints)


def mutate(seed_bytes: bytes, region: Region, seed: int, case: int) -> tuple[bytes, str]:
    rng = np.random.default_rng([seed, case])
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    data = bytearray(seed_bytes)
    if kind == "header-bytes":
        lo, hi = region.headers[int(rng.integers(len(region.headers)))]
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(lo, hi))] = int(rng.integers(256))
    elif kind == "header-ints":
        lo, hi = region.headers[int(rng.integers(len(region.headers)))]
        at = int(rng.integers(lo, hi - 8))
        value = EDGE_INTS[int(rng.integers(len(EDGE_INTS)))]
        width = 8 if rng.random() < 0.5 else 4
        data[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    elif kind == "floats" and region.floats:
        offset, count = region.floats[int(rng.integers(len(region.floats)))]
        at = offset + 4 * int(rng.integers(count))
        data[at:at + 4] = np.float32(EDGE_FLOATS[int(rng.integers(len(EDGE_FLOATS)))]).tobytes()
    elif kind == "ints" and region.ints:
        offset, count, n_ff = region.ints[int(rng.integers(len(region.ints)))]
        at = offset + 4 * int(rng.integers(count))
        other = offset + 4 * int(rng.integers(count))
        value = [int.from_bytes(data[other:other + 4], "little", signed=True), -1, n_ff,
                 (1 << 31) - 1][int(rng.integers(4))]
        data[at:at + 4] = int(value).to_bytes(4, "little", signed=True)
    elif kind == "truncate":
        del data[int(rng.integers(len(data))):]
    else:
        kind = "bytes"
        for _ in range(int(rng.integers(1, 65))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    return bytes(data), kind


CONFIG_EDGES = (0, -1, 1, 1 << 31, 1 << 62, 1e300, "x", None, [], {}, True)
ST_EDGES = (0, -1, 1, 1 << 31, 1 << 62, "F64", "I8", "BOOL", "Q4", [], [0], [1 << 40, 2])


def mutate_checkpoint(folder: Path, seed: int, case: int) -> str:
    """Mutate the checkpoint in folder in place; returns the mutation's name."""
    rng = np.random.default_rng([seed, case, 1])
    kind = ("st-header", "st-entry", "config", "tokenizer")[int(rng.integers(4))]
    st = folder / "model.safetensors"
    if kind in ("config", "tokenizer"):
        path = folder / ("config.json" if kind == "config" else "tokenizer.json")
        doc = json.loads(path.read_text())
        # the tokenizer's interesting keys are also one level down (model.vocab, .merges)
        node = doc["model"] if kind == "tokenizer" and rng.random() < 0.5 else doc
        key = sorted(node)[int(rng.integers(len(node)))]
        edge = CONFIG_EDGES[int(rng.integers(len(CONFIG_EDGES)))]
        if rng.random() < 0.2:
            del node[key]
        elif isinstance(node[key], list) and node[key] and rng.random() < 0.5:
            node[key][int(rng.integers(len(node[key])))] = edge
        else:
            node[key] = edge
        path.write_text(json.dumps(doc))
        return kind
    data = bytearray(st.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if kind == "st-header":
        for _ in range(int(rng.integers(1, 9))):
            data[int(rng.integers(0, 8 + n))] = int(rng.integers(256))
    else:
        header = json.loads(bytes(data[8:8 + n]))
        name = sorted(k for k in header if k != "__metadata__")[int(rng.integers(len(header) - 1))]
        field = ("dtype", "shape", "data_offsets")[int(rng.integers(3))]
        value = ST_EDGES[int(rng.integers(len(ST_EDGES)))]
        if field != "dtype" and isinstance(header[name][field], list) and rng.random() < 0.6:
            items = list(header[name][field])
            if items:
                items[int(rng.integers(len(items)))] = value
            value = items
        header[name][field] = value
        raw = json.dumps(header).encode()
        data[:8 + n] = len(raw).to_bytes(8, "little") + raw
    st.write_bytes(bytes(data))
    return kind


def run_conversion(folder: Path, out: Path) -> tuple[str, str]:
    """("ran" | "refused" | "bug", detail) for one mutated checkpoint; a refusal must leave
    no output."""
    from flashgguf.convert import ConvertOptions
    from flashgguf.convert.hf_source import convert_hf
    from flashgguf.errors import FlashGGUFError

    try:
        convert_hf(folder, out, ConvertOptions(progress=False, log=lambda _m: None,
                                               predictor=None))
        return "ran", ""
    except FlashGGUFError as exc:
        if out.exists() or list(out.parent.glob(f".{out.name}.*")):
            return "bug", f"refused but left output behind: {exc}"[:300]
        return "refused", f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # anything else is a finding
        return "bug", f"{type(exc).__name__}: {exc}"[:300]


# ---- worker: runs cases, one JSON line each -------------------------------------------------

def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def run_case(path: Path, tokens: list[int], mode: str) -> tuple[str, str]:
    """("ran" | "refused" | "bug", detail) for one mutated file."""
    from flashgguf import Llama
    from flashgguf.errors import FlashGGUFError

    try:
        modes = {} if mode == "experts" else dict(flash_mode=mode)
        llm = Llama(str(path), flash_offload=True, flash_dram_budget=0.5, n_ctx=32,
                    n_threads=1, n_threads_batch=1, verbose=False, **modes)
        try:
            llm.eval(tokens)
            llm.eval([tokens[-1]])
        finally:
            llm.close()
        return "ran", ""
    except FlashGGUFError as exc:
        return "refused", f"{type(exc).__name__}: {exc}"[:300]
    except Exception as exc:  # anything else is a finding
        return "bug", f"{type(exc).__name__}: {exc}"[:300]


def worker(seed_files: list[Path], seed: int) -> None:
    import resource
    import shutil

    from flashgguf.profile.harness import status_bytes

    # a runaway allocation fails here instead of swapping the machine (llama.cpp's and
    # OpenMP's thread stacks and arenas take some GB of address space already); not under
    # AddressSanitizer, whose shadow memory reserves terabytes of address space up front (the
    # peak-RSS bound below still applies)
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        resource.setrlimit(resource.RLIMIT_AS, (32 << 30, 32 << 30))
    checkpoints = [p for p in seed_files if p.is_dir()]
    # a mixture of experts has no modes (its router picks what is read); split rows run in
    # gate mode only
    flash_seeds = [(p.read_bytes(), regions(p),
                    "experts" if p.name.startswith("moe") else
                    "gate" if p.name.startswith("q4k-split") else None)
                   for p in seed_files if p.is_file()]
    tokens = [1, 40, 41, 42]
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        target = Path(tmp) / "case.flash.gguf"
        for line in sys.stdin:
            case = int(line)
            _reset_peak()
            base = status_bytes("VmHWM")
            t0 = time.perf_counter()
            if checkpoints and case % 3 == 2:
                folder = Path(tmp) / "checkpoint"
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(checkpoints[case // 3 % len(checkpoints)], folder)
                kind, mode = mutate_checkpoint(folder, seed, case), "convert"
                size = sum(f.stat().st_size for f in folder.iterdir())
                out = Path(tmp) / "out" / "model.flash.gguf"
                shutil.rmtree(out.parent, ignore_errors=True)
                out.parent.mkdir()
                outcome, detail = run_conversion(folder, out)
            else:
                seed_bytes, region, only_mode = flash_seeds[case % len(flash_seeds)]
                data, kind = mutate(seed_bytes, region, seed, case)
                target.write_bytes(data)
                size = len(data)
                mode = only_mode or ("hybrid", "predicted", "naive")[case // len(flash_seeds) % 3]
                outcome, detail = run_case(target, tokens, mode)
            grew = status_bytes("VmHWM") - base
            if outcome != "bug" and grew > MEMORY_FIXED + MEMORY_PER_FILE_BYTE * size:
                outcome, detail = "bug", f"peak memory grew by {grew >> 20} MiB"
            print(json.dumps(dict(case=case, kind=kind, mode=mode, outcome=outcome,
                                  detail=detail, seconds=time.perf_counter() - t0,
                                  grew=grew)), flush=True)


# ---- parent: hands out cases, counts crashes and hangs --------------------------------------

def _package_root() -> str:
    """The folder of the flashgguf this process imported (the sanitizer run's copy, say):
    the workers must test the same build."""
    import flashgguf

    return str(Path(flashgguf.__file__).resolve().parent.parent)


class Worker:
    def __init__(self, seed_files: list[Path], seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--seed", str(seed),
             *[str(p) for p in seed_files]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(HERE), _package_root(), os.environ.get("PYTHONPATH", "")])))
        self.case: int | None = None
        self.started = 0.0

    def give(self, case: int) -> None:
        assert self.proc.stdin is not None
        self.case, self.started = case, time.monotonic()
        self.proc.stdin.write(f"{case}\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def fuzz(seed_files: list[Path], cases: list[int], seed: int, n_workers: int,
         case_seconds: float = CASE_SECONDS) -> list[dict]:
    todo = list(reversed(cases))
    results: list[dict] = []
    workers = [Worker(seed_files, seed) for _ in range(max(1, min(n_workers, len(cases))))]
    try:
        for w in workers:
            if todo:
                w.give(todo.pop())
        while any(w.case is not None for w in workers):
            busy = {w.proc.stdout: w for w in workers if w.case is not None}
            ready, _, _ = select.select(list(busy), [], [], 0.5)
            for stream in ready:
                w = busy[stream]
                line = stream.readline()
                if line:
                    results.append(json.loads(line))
                else:  # the worker died on this case
                    code = w.proc.wait()
                    results.append(dict(case=w.case, outcome="crash",
                                        detail=f"worker exit status {code}"))
                    workers[workers.index(w)] = w = Worker(seed_files, seed)
                w.case = None
                if todo:
                    w.give(todo.pop())
            for i, w in enumerate(workers):
                if w.case is not None and time.monotonic() - w.started > case_seconds:
                    results.append(dict(case=w.case, outcome="hang",
                                        detail=f"no result within {case_seconds:.0f} s"))
                    w.stop()
                    workers[i] = Worker(seed_files, seed)
                    if todo:
                        workers[i].give(todo.pop())
    finally:
        for w in workers:
            w.stop()
    return sorted(results, key=lambda r: r["case"])


def make_seed_files(folder: Path) -> list[Path]:
    """What is mutated: flash GGUFs of a generated llama with the weight-only predictor
    (Q8_0), of a K-quant one whose gate is resident (version 4 layout), of the same with split
    rows (version 6) and of a qwen3moe mixture of experts (version 5), and a generated
    Hugging Face llama checkpoint (a folder)."""
    from gguf import GGMLQuantizationType as Q
    from hf_factory import TinyHF, write_tiny_checkpoint
    from model_factory import TinyModel, write_tiny_model
    from tiny_tokenizer import write_tiny_tokenizer

    from flashgguf.convert import ConvertOptions, convert_gguf

    tokenizer = write_tiny_tokenizer(folder / "tokenizer.gguf", n_merges=64)
    write_tiny_checkpoint(folder / "hf-llama", TinyHF("llama", n_embd=32, n_ff=64), tokenizer)
    out = [folder / "hf-llama"]
    for name, spec, kw in (
            ("q8", TinyModel(n_layer=2, n_embd=64, n_ff=96, seed=3), {}),
            ("q4k-gate", TinyModel(n_layer=2, n_embd=256, n_ff=256, ffn_type=Q.Q4_K, seed=4),
             dict(gate_resident=True, predictor=None)),
            ("q4k-split", TinyModel(n_layer=2, n_embd=256, n_ff=256, ffn_type=Q.Q4_K, seed=4),
             dict(gate_resident=True, two_stage=True, predictor=None)),
            ("moe", TinyModel(arch="qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2,
                              n_expert=4, n_expert_used=2, n_ff_exp=64, seed=5), {})):
        src = write_tiny_model(folder / f"{name}.gguf", spec, tokenizer)
        dst = folder / f"{name}.flash.gguf"
        convert_gguf(src, dst, ConvertOptions(progress=False, log=lambda _m: None, **kw))
        out.append(dst)
    return out


def summarize(results: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return dict(cases=len(results), counts=counts,
                findings=[r for r in results if r["outcome"] in ("bug", "crash", "hang")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seed_files", nargs="*", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--only", type=int, nargs="*", default=None, help="run just these cases")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(HERE))
        worker(args.seed_files, args.seed)
        return 0
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        seeds = args.seed_files or make_seed_files(Path(tmp))
        t0 = time.perf_counter()
        results = fuzz(seeds, args.only if args.only is not None else list(range(args.cases)),
                       args.seed, args.workers)
    summary = summarize(results)
    summary.update(seed=args.seed, seconds=time.perf_counter() - t0)
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}))
    for f in summary["findings"]:
        print(json.dumps(f))
    if args.json:
        args.json.write_text(json.dumps(dict(summary, results=results), indent=1))
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
