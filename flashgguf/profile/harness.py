"""What every flashgguf-profile subcommand stands on: model resolution (a plain GGUF is
converted into a scratch folder), options typed on a command line, memory caps through a
cgroup that charges the page cache, each measured run in its own child process, the page
cache dropped between runs, decode timing and the output (a table for people, --json for
machines)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FlashGGUFError
from ..format import is_flash_gguf
from ..options import budget_argument

MB = 1e6
MiB = 1 << 20
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
_PACKAGE = Path(__file__).resolve().parent.parent
PACKAGED_EVALUATION = _PACKAGE / "data" / "evaluation_head.txt"
# the project's workplace: the whole evaluation text beside a source checkout
SHARED_EVALUATION = _PACKAGE.parent.parent / "shared" / "data" / "brown" / "evaluation.txt"


class ProfileError(FlashGGUFError):
    """A profiling run that cannot be done as asked (bad input, a missing model, no rights)."""


class CgroupError(ProfileError):
    """No memory cgroup can be made here (no controller, or no rights)."""


# ---- inputs ------------------------------------------------------------------------------

def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _number_list(text: str, kind: type, what: str) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what} separated by commas") \
            from exc


def float_list(text: str) -> list[float]:
    return _number_list(text, float, "numbers")


def int_list(text: str) -> list[int]:
    return _number_list(text, int, "integers")


def size_list(text: str) -> list[int]:
    """"4K,64K,1M" -> bytes (K and M are KiB and MiB)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20}
    out = []
    for item in filter(None, (v.strip().upper().removesuffix("B").removesuffix("I")
                              for v in text.split(","))):
        digits = item.rstrip("KM")
        if not digits.isdigit() or int(digits) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: sizes are like 4K, 256K, 1M")
        out.append(int(digits) * units[item[len(digits):]])
    return out


def option_items(text: str) -> dict[str, Any]:
    """"mode=gate,dram_budget=0.5" -> {"flash_mode": "gate", "flash_dram_budget": 0.5}."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not KEY=VALUE")
        key = key.strip().removeprefix("flash_").replace("-", "_")
        out[f"flash_{key}"] = budget_argument(value) if key == "dram_budget" else _scalar(value)
    return out


def _scalar(value: str) -> Any:
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def add_flash_options(p: argparse.ArgumentParser) -> None:
    """The flash_* options of flashgguf.Llama that a profiling run may set."""
    g = p.add_argument_group("flash options (flashgguf.Llama's flash_*; default: its own)")
    g.add_argument("--budget", type=budget_argument, default=None,
                   help="flash_dram_budget: bytes, a size (512MiB) or a share of the payload")
    g.add_argument("--mode", default=None, help="flash_mode: naive, hybrid, predicted, gate")
    g.add_argument("--window", type=int, default=None, help="flash_window (tokens)")
    g.add_argument("--gap", default=None, help="flash_coalesce_gap: rows or 'auto'")
    g.add_argument("--io", default=None, help="flash_io: auto, threads, io_uring")
    g.add_argument("--pinned-share", type=float, default=None, help="flash_pinned_share")
    g.add_argument("--gate-keep", type=float, default=None, help="flash_gate_keep")
    g.add_argument("--down-keep", type=float, default=None,
                   help="flash_down_keep (files converted with --two-stage)")
    g.add_argument("--recall", type=float, default=None, help="flash_predictor_recall")


def flash_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {"budget": "flash_dram_budget", "mode": "flash_mode", "window": "flash_window",
             "gap": "flash_coalesce_gap", "io": "flash_io", "pinned_share": "flash_pinned_share",
             "gate_keep": "flash_gate_keep", "down_keep": "flash_down_keep",
             "recall": "flash_predictor_recall"}
    out = {flash: getattr(args, name) for name, flash in names.items()
           if getattr(args, name, None) is not None}
    if "flash_coalesce_gap" in out and out["flash_coalesce_gap"] != "auto":
        out["flash_coalesce_gap"] = int(out["flash_coalesce_gap"])
    return out


def evaluation_text(path: Path | None) -> tuple[str, str]:
    """(text, where it came from): --text, else ../shared's evaluation text when present
    (the project's workplace), else the packaged excerpt of it (its first 20 KB)."""
    for candidate in (path, SHARED_EVALUATION, PACKAGED_EVALUATION):
        if candidate is not None and candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace"), str(candidate)
    raise ProfileError(f"no evaluation text: {path} does not exist")


@contextlib.contextmanager
def flash_model(path: Path, workdir: Path | None, quiet: bool,
                gate_resident: bool = False) -> Iterator[Path]:
    """path itself when it is a flash GGUF; else its conversion (default options) in a
    scratch folder that is removed on the way out, also on Ctrl-C."""
    if is_flash_gguf(path):
        yield path
        return
    from ..convert import ConvertOptions, convert_gguf

    with tempfile.TemporaryDirectory(prefix="flashgguf-profile-", dir=workdir) as tmp:
        out = Path(tmp) / (path.stem + ".flash.gguf")
        note(f"converting {path} into a scratch flash GGUF (flashgguf-convert defaults)", quiet)
        convert_gguf(path, out, ConvertOptions(progress=not quiet, gate_resident=gate_resident,
                                               log=lambda msg: note(msg, quiet)))
        yield out


def note(msg: str, quiet: bool = False) -> None:
    """Progress and context for people: stderr, so that stdout stays the result."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def progress_bar(total: float, desc: str, quiet: bool, unit: str = "it", **kw: Any) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False,
                file=sys.stderr, **kw)


# ---- the machine -------------------------------------------------------------------------

def load_average() -> float:
    return os.getloadavg()[0]


def drop_file_cache(path: Path) -> None:
    """Evict a file's clean pages so that the next reader pays for (and is charged) them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_read_bytes() -> int:
    """Bytes this process caused to be read from the device (/proc/self/io read_bytes)."""
    with open("/proc/self/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "read_bytes":
                return int(value)
    return 0


def status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (RssAnon, VmHWM, ...) in bytes; 0 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_anon() -> int:
    return status_bytes("RssAnon")


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh memory cgroup capped at `limit` bytes (page cache included); yields the
    cgroup.procs file a child writes its pid into; removed on the way out. v2 where the
    memory controller is enabled, else v1."""
    name = f"flashgguf-profile-{os.getpid()}-{time.monotonic_ns()}"
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


def cgroup_available() -> str | None:
    """None when memory caps can be set here, else why not."""
    try:
        with memory_cgroup(1 << 40):
            return None
    except CgroupError as exc:
        return str(exc)


def run_child(spec: dict[str, Any], cap: int | None, timeout: float) -> dict[str, Any]:
    """Run flashgguf.profile.child on spec in a fresh interpreter (under a memory cap when
    cap is given): its JSON result, or {"error": why}. The child is killed on Ctrl-C."""
    cmd = [sys.executable, "-m", "flashgguf.profile.child", json.dumps(spec)]
    try:
        if cap is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        else:
            with memory_cgroup(cap) as procs:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                      check=False,
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


# ---- models ------------------------------------------------------------------------------

def greedy_next_token(llm: Any) -> int:
    """Greedy next token from the last evaluated position (llama.cpp's logits: Llama.scores
    is only filled with logits_all=True)."""
    import llama_cpp

    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def per_token(stats: dict[str, float], n_ff_total: int) -> dict[str, float]:
    """A run's flash_stats() as per-token figures."""
    n = max(int(stats.get("tokens", 0)), 1)
    needed = stats.get("bytes_needed", 0)
    # a MoE runtime counts experts where the neuron runtime counts rows
    hits = stats.get("cache_hits", stats.get("expert_hits", 0))
    looked = hits + stats.get("cache_misses", stats.get("expert_misses", 0))
    return dict(
        tokens=int(stats.get("tokens", 0)),
        read_mib_per_token=stats.get("bytes_read", 0) / n / MiB,
        needed_mib_per_token=needed / n / MiB,
        over_fetch=stats["bytes_read"] / needed if needed else float("nan"),
        reads_per_token=stats.get("reads", 0) / n,
        mean_read_kib=stats.get("bytes_read", 0) / max(stats.get("reads", 0), 1) / 1024,
        hit_rate=hits / looked if looked else float("nan"),
        computed_share=stats.get("neurons_computed", 0) / n / max(n_ff_total, 1),
        predict_ms=1e3 * stats.get("time_predict_s", 0) / n,
        io_wait_ms=1e3 * stats.get("time_io_wait_s", 0) / n,
        ffn_ms=1e3 * stats.get("time_ffn_s", 0) / n)


# ---- output ------------------------------------------------------------------------------

def emit(result: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], None]) -> int:
    """--json: the result as one JSON document on stdout; else the table for people."""
    if as_json:
        json.dump(result, sys.stdout, indent=1, default=_jsonable)
        sys.stdout.write("\n")
    else:
        table(result)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
