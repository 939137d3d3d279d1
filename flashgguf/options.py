"""The flash_* options of flashgguf.Llama: parsing and checking, one error per bad value."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionError
from .format import FlashFile
from .predictor import LayerPredictor

MODES = ("naive", "hybrid", "predicted", "gate")
DEFAULT_MODE = "predicted"
# the default of files whose gate is resident (flashgguf-convert --gate-resident)
DEFAULT_GATE_MODE = "gate"
# flash_gate_keep: each token keeps the rows of its top 80% of |act(gate)| (CATS's score):
# SmolLM2, first 2,000 tokens of evaluation.txt, numpy forward (tools/selection.py,
# BENCHMARKS.md): 1.001x stock perplexity, reading 0.53 of the FFN's bytes per token.
DEFAULT_GATE_KEEP = 0.8
# flash_gate_per_layer: off. Spreading flash_gate_keep over the layers by their relative FFN
# output errors (flashgguf/gate_keep.py) kept SmolLM2's summed error but not its perplexity:
# 1.0763x stock against 1.0082x for one share (0.8, 50% budget, first 1,000 tokens of
# evaluation.txt token by token; BENCHMARKS.md). Layers whose output a few neurons dominate
# (SmolLM2's 11, 28 and 29) measure a small relative error at any share and were cut to 0.3.
# (Turning it on by default would also mean ordering rows at each layer's own share in
# convert/gguf_source.py: _gate_orders, which orders them at DEFAULT_GATE_KEEP.)
DEFAULT_GATE_PER_LAYER = False
# flash_gate_cache_bonus: a row already in DRAM is chosen by (1 + bonus) x |act(gate)|
# (cache-aware choice, as DIP-CA): 0 chooses by |act| alone.
DEFAULT_GATE_CACHE_BONUS = 0.0
# flash_down_keep (split files, flashgguf-convert --two-stage): of the rows flash_gate_keep
# chose, each token reads the down rows of its top down_keep x n_ff by |h| x ||down|| once h
# is exact. 0.5 kept both sizes within 3% of stock perplexity at a 50% budget, token by token
# (flashgguf-profile quality; BENCHMARKS.md, "Two stages at run time"): SmolLM2 1.0240x
# (1,000 tokens), Qwen2.5-Coder-1.5B 1.0228x (300 tokens; 0.4: 1.0290x).
DEFAULT_DOWN_KEEP = 0.5
# flash_expert_prefetch (mixtures of experts): each decode call guesses the next layer's
# experts (its input through the next router) and reads the guesses no slot holds while
# llama.cpp computes that layer's attention. Off: see BENCHMARKS.md ("Pinning and
# prefetching experts") for what it measured.
DEFAULT_EXPERT_PREFETCH = False
IO_BACKENDS = ("auto", "threads", "io_uring")
DEFAULT_IO = "auto"  # threads (BENCHMARKS.md: io_uring was not faster on this machine)
DEFAULT_WINDOW = 4
# Measured on this machine (then tools/bench_modes.py, now flashgguf-profile bench --caps none
# --modes; SmolLM2, decode tok/s): at a 50% budget,
# coalescing gap 2 / 8 / 32 rows -> 10-13 / 17 / 19 tok/s (fewer, larger reads win even
# though more bytes are read); pinned share 0.25 vs 0.5: tied at 50%, 27.7 vs 21.9 tok/s at
# 75%, and only 0.25 fits at 25% (with rank-32 predictors).
DEFAULT_PINNED_SHARE = 0.25
# flash_coalesce_gap "auto": misses are read in one read when the bytes between them cost
# less than a read's fixed cost, DEFAULT_COALESCE_BYTES of transfer (this machine's disk,
# then `tools/bench_caps.py --read-cost`, three runs: break-even gaps 18.8, 21.9 and 33.9 KiB,
# 24-48 us per read at 611-806 MB/s; now `flashgguf-profile io`, whose depth-16 fit gave
# 17.7 KiB on 2026-12-01; see BENCHMARKS.md).
DEFAULT_COALESCE_GAP = "auto"
DEFAULT_COALESCE_BYTES = 22 << 10
DEFAULT_IO_DEPTH = 16
DEFAULT_MAX_READ_BYTES = 256 << 10
# No budget given: the budget is this share of the RAM available at load (cgroup limits
# included) after the trunk, which llama.cpp maps; the rest is for the KV cache, compute
# buffers and the read engine. The payload stays all resident when it fits.
DEFAULT_RAM_SHARE = 0.8

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_budget(value: int | float | str, payload_nbytes: int) -> int:
    """flash_dram_budget -> bytes: an int of bytes, a "48MiB"/"1.5GiB" string, or a float
    fraction in (0, 1] of the FFN payload."""
    what = "flash_dram_budget"
    if isinstance(value, bool):
        raise OptionError(f"{what} must be bytes, a size string or a fraction, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise OptionError(f"{what} must be positive, got {value}")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise OptionError(
                f"{what} as a float is a fraction of the FFN payload in (0, 1], got {value}")
        return max(1, int(value * payload_nbytes))
    if isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise OptionError(f"{what}: cannot read {value!r} as a size (e.g. '48MiB', '1.5GiB')")
        nbytes = int(float(m.group(1)) * _UNITS[unit])
        if nbytes <= 0:
            raise OptionError(f"{what} must be positive, got {value!r}")
        return nbytes
    raise OptionError(f"{what} must be bytes, a size string or a fraction, got {value!r}")


def budget_argument(text: str) -> int | float | str:
    """A flash_dram_budget typed on a command line: digits are bytes ("50000000"), a
    decimal number is a fraction of the payload ("0.5"), anything else a size ("32MiB")."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2): no limit


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    try:
        fields = dict(line.split() for line in path.read_text().splitlines() if " " in line)
    except (OSError, ValueError):
        return 0
    return next((int(fields[k]) for k in keys if k in fields), 0)


def cgroup_room(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes a memory cgroup still lets this process take: the tightest limit of its cgroup
    and their ancestors, minus that cgroup's anonymous memory (its page cache can be
    reclaimed; llama.cpp's mmap of the trunk lives there). v2 (memory.max) or v1
    (memory.limit_in_bytes); None when no limit applies. proc_cgroup is /proc/self/cgroup."""
    best: int | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            base, limit_name, stat_keys = root, "memory.max", ("anon",)
            if (root / "unified").is_dir() and not (root / "cgroup.controllers").exists():
                base = root / "unified"  # hybrid layout: v2 mounted beside v1
        elif "memory" in controllers.split(","):
            base, limit_name, stat_keys = root / "memory", "memory.limit_in_bytes", (
                "total_rss", "rss")
        else:
            continue
        folder = base / rel.lstrip("/")
        anon = _stat_value(folder / "memory.stat", stat_keys)
        while True:
            limit = _read_int(folder / limit_name)
            if limit is not None and limit < 1 << 60:  # v1 says "no limit" with a huge number
                room = max(limit - anon, 0)
                best = room if best is None else min(best, room)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return best


def available_ram() -> int:
    """Bytes of RAM available to new allocations: Linux MemAvailable (else physical RAM),
    or what this process's memory cgroup still allows when that is less."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        room = cgroup_room(Path("/proc/self/cgroup").read_text())
    except OSError:
        room = None
    return ram if room is None else min(ram, room)


@dataclass(frozen=True)
class FlashOptions:
    """The one options record, from flashgguf.Llama's flash_* arguments to the C runtime's
    fg_config: defaults here and nowhere else, checked once when the record is made (C
    still refuses bad values by code). Build it from user values with flash_options()."""

    # "dense": every bundle resident (read once at load); else streamed under dram_budget
    mode: str = "dense"
    dram_budget: int = 0  # bytes for cache slots + predictors (streaming modes)
    window: int = DEFAULT_WINDOW  # tokens an unused row is kept before it is the first to go
    pinned_share: float = DEFAULT_PINNED_SHARE
    coalesce_gap: int | str = DEFAULT_COALESCE_GAP  # rows, or "auto" (by bytes)
    coalesce_bytes: int = DEFAULT_COALESCE_BYTES
    io: str = DEFAULT_IO
    io_depth: int = DEFAULT_IO_DEPTH
    max_read_bytes: int = DEFAULT_MAX_READ_BYTES
    direct_io: bool = True
    max_tokens: int = 512  # most rows one FFN call may get (llama.cpp's n_ubatch)
    n_threads: int = 1
    n_threads_batch: int = 1
    read_log: int = 0  # tests: keep (offset, length) of the first N reads
    gate_keep: float = DEFAULT_GATE_KEEP  # mode "gate": share of rows each token keeps
    gate_cache_bonus: float = DEFAULT_GATE_CACHE_BONUS  # mode "gate": rows in DRAM preferred
    # mode "gate": spread gate_keep over the layers by the file's error curves (when stored)
    gate_per_layer: bool = DEFAULT_GATE_PER_LAYER
    # mode "gate" on split rows: share of rows whose down rows each token reads
    down_keep: float = DEFAULT_DOWN_KEEP
    # mixtures of experts: read each decode token's guessed next-layer experts ahead
    expert_prefetch: bool = DEFAULT_EXPERT_PREFETCH

    def __post_init__(self) -> None:
        if self.mode not in ("dense", *MODES):
            raise OptionError(f"flash_mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.gate_keep, bool) or not isinstance(self.gate_keep, (int, float)) \
                or not 0.0 < self.gate_keep <= 1.0:
            raise OptionError(f"flash_gate_keep must be in (0, 1], got {self.gate_keep!r}")
        if isinstance(self.down_keep, bool) or not isinstance(self.down_keep, (int, float)) \
                or not 0.0 < self.down_keep <= 1.0:
            raise OptionError(f"flash_down_keep must be in (0, 1], got {self.down_keep!r}")
        if not isinstance(self.gate_per_layer, bool):
            raise OptionError(f"flash_gate_per_layer must be a bool, got {self.gate_per_layer!r}")
        bonus = self.gate_cache_bonus
        if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) \
                or not 0.0 <= bonus <= 1e6:
            raise OptionError(f"flash_gate_cache_bonus must be a number >= 0, got {bonus!r}")
        if not _is_int(self.window) or self.window < 1:
            raise OptionError(f"flash_window must be an int >= 1 (tokens), got {self.window!r}")
        if isinstance(self.pinned_share, bool) or not isinstance(self.pinned_share, (int, float)) \
                or not 0.0 <= self.pinned_share <= 1.0:
            raise OptionError(f"flash_pinned_share must be in [0, 1], got {self.pinned_share!r}")
        if self.coalesce_gap != "auto" and (not _is_int(self.coalesce_gap)
                                            or self.coalesce_gap < 0):
            raise OptionError("flash_coalesce_gap must be 'auto' or an int >= 0 (rows), got "
                              f"{self.coalesce_gap!r}")
        if self.io not in IO_BACKENDS:
            raise OptionError(f"flash_io must be one of {', '.join(IO_BACKENDS)}, "
                              f"got {self.io!r}")
        int32 = (1 << 31) - 1
        for name, low, high in (("dram_budget", 0, 1 << 62), ("coalesce_bytes", 0, int32),
                                ("io_depth", 1, 1024), ("max_read_bytes", 4096, int32),
                                ("max_tokens", 1, int32), ("n_threads", 1, 1024),
                                ("n_threads_batch", 1, 1024), ("read_log", 0, int32)):
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                raise OptionError(f"{name} must be an int in [{low}, {high}], got {value!r}")
        if self.mode != "dense" and self.dram_budget < 1:
            raise OptionError(f"flash_mode={self.mode!r} streams the payload and needs a "
                              "positive dram_budget")

    @property
    def budget(self) -> int | None:
        """Bytes the payload streams under; None when every bundle is resident."""
        return None if self.mode == "dense" else self.dram_budget


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class BudgetClampWarning(UserWarning):
    """flash_dram_budget asked for more than the RAM available: it was lowered."""


def _clamped_to_ram(nbytes: int, payload_nbytes: int, trunk_nbytes: int) -> int:
    """A budget whose allocation (at most the payload) exceeds the RAM available after the
    trunk would end in swapping or the OOM killer, not in an error: it is lowered to the
    default share of that RAM, with a warning."""
    room = max(available_ram() - trunk_nbytes, 0)
    if min(nbytes, payload_nbytes) <= room:
        return nbytes
    clamped = max(int(DEFAULT_RAM_SHARE * room), 1)
    warnings.warn(BudgetClampWarning(
        f"flash_dram_budget of {nbytes:,} bytes is more than the {room:,} bytes of RAM "
        f"available after the model's trunk: lowered to {clamped:,} bytes "
        f"({DEFAULT_RAM_SHARE:g} of it)"), stacklevel=4)
    return clamped


def flash_options(payload_nbytes: int, budget: int | float | str | None = None,
                  mode: str = DEFAULT_MODE, window: int = DEFAULT_WINDOW,
                  pinned_share: float = DEFAULT_PINNED_SHARE,
                  coalesce_gap: int | str = DEFAULT_COALESCE_GAP, io: str = DEFAULT_IO,
                  trunk_nbytes: int = 0, offload: bool = True, **runtime: int) -> FlashOptions:
    """flashgguf.Llama's flash_* values -> the record. The one rule for what stays resident:
    nothing is streamed without offload; no budget means the default share of the RAM left
    after the trunk, and everything resident when the payload fits in it; predicted mode with
    a budget that holds the whole payload keeps it resident too (the baselines stream, to be
    measured), and so does gate mode. runtime: the record's other fields (threads,
    max_tokens, gate_keep, ...)."""
    if mode not in MODES:  # "dense" is the outcome of the rule below, not a user's choice
        raise OptionError(f"flash_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if budget is None:
        room = int(DEFAULT_RAM_SHARE * max(available_ram() - trunk_nbytes, 0))
        nbytes = None if payload_nbytes <= room else max(room, 1)
    else:
        nbytes = parse_budget(budget, payload_nbytes)
        if offload:
            nbytes = _clamped_to_ram(nbytes, payload_nbytes, trunk_nbytes)
    if nbytes is not None and nbytes >= payload_nbytes and mode in ("predicted", "gate"):
        nbytes = None  # the whole payload fits: nothing to predict or stream
    streaming = offload and nbytes is not None
    return FlashOptions(mode=mode if streaming else "dense",
                        dram_budget=nbytes if streaming else 0, window=window,
                        pinned_share=pinned_share, coalesce_gap=coalesce_gap, io=io,
                        direct_io=offload, **runtime)


def predictors_at_recall(flash: FlashFile, recall: float
                         ) -> tuple[list[LayerPredictor], list[float]]:
    """flash_predictor_recall: the file's predictors with each layer's threshold for this
    recall target (from the stored threshold curves), and each layer's expected active
    share at it (the budget's split weights)."""
    what = "flash_predictor_recall"
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) \
            or not math.isfinite(recall):
        raise OptionError(f"{what} must be a number, got {recall!r}")
    curves = [layer.predictor_curve for layer in flash.layers]
    if any(layer.predictor is None for layer in flash.layers) or any(c is None for c in curves):
        raise OptionError(
            f"{what}: {flash.path} stores no threshold curves (a ReLU-family predictor, whose "
            "threshold is fixed at exact zeros, a file without a predictor, or one converted "
            "by an older flashgguf)")
    lo, hi = float(curves[0].recall_targets[0]), float(curves[0].recall_targets[-1])
    if not lo <= recall <= hi:
        raise OptionError(f"{what} {recall} is outside the range the file's curves cover, "
                          f"[{lo:g}, {hi:g}]")
    predictors = [dataclasses.replace(layer.predictor, threshold=curve.threshold_at(recall))
                  for layer, curve in zip(flash.layers, curves, strict=True)]
    weights = [max(curve.density_at(recall), 1e-6) for curve in curves]
    return predictors, weights
