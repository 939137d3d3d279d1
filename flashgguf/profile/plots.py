"""PNG plots of flashgguf-profile's results (--plot FILE.png), with matplotlib, an optional
extra (pip install 'flashgguf[plot]'): without it the tables stay and one line says how to
get the plots."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import note

HINT = "no plot: matplotlib is not installed (pip install 'flashgguf[plot]')"


def write_plot(path: Path | None, draw: Callable[[Any], None], quiet: bool) -> str | None:
    """Draw into a new figure and save it to path (atomically): the path written, or None
    (no path asked for, or no matplotlib: then a hint on stderr)."""
    if path is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        note(HINT, quiet)
        return None
    from ..format.output import atomic_output

    fig = plt.figure(figsize=(8, 5), dpi=110)
    try:
        draw(fig)
        fig.tight_layout()
        with atomic_output(Path(path)) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return os.fspath(path)


def bench_plot(result: dict[str, Any]) -> Callable[[Any], None]:
    """Decode tok/s against the memory cap, one line per run (no background load); bars
    per run when nothing was capped."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ok = [m for m in result["medians"] if "tok_s" in m and m["busy"] == 0]
        if all(m["cap_mb"] is None for m in ok):
            labels = [f"{m['name']} ({m['threads']} thr)" for m in ok]
            ax.barh(labels, [m["tok_s"] for m in ok])
            ax.set_xlabel("decode tokens/s (median), no memory cap")
            ax.set_title(Path(result["source"]).name)
            return
        lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for m in result["medians"]:
            if "tok_s" in m and m["busy"] == 0 and m["cap_mb"] is not None:
                lines.setdefault((m["name"], m["threads"]), []).append((m["cap_mb"], m["tok_s"]))
        for (name, threads), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{name} ({threads} thr)")
        ax.set_xlabel("memory cap, MB (page cache charged)")
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(Path(result["source"]).name)
        ax.grid(alpha=0.3)
        ax.legend()
    return draw


def quality_plot(result: dict[str, Any]) -> Callable[[Any], None]:
    """Perplexity / stock against neurons computed and against bytes read per token."""
    def draw(fig: Any) -> None:
        runs = result["runs"]
        for k, (key, label) in enumerate((("computed", "share of FFN neurons computed"),
                                          ("read_mib_per_token", "FFN MiB read per token"))):
            ax = fig.add_subplot(1, 2, k + 1)
            ax.scatter([r[key] for r in runs], [r["ratio"] for r in runs])
            for r in runs:
                extra = [f"{a.removeprefix('predictor_')}={b}" for a, b in r["setting"].items()
                         if a not in ("mode", "dram_budget")]
                ax.annotate(" ".join([r["mode"], *extra]), (r[key], r["ratio"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("perplexity / stock llama.cpp")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{Path(result['source']).name}: {result['tokens']} tokens")
    return draw


def timeline_plot(result: dict[str, Any]) -> Callable[[Any], None]:
    """Each decode token's time, stacked: predict, I/O wait, FFN arithmetic, the rest."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        rows = result["per_token"]
        x = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for key, label in (("predict_ms", "predict"), ("io_wait_ms", "I/O wait"),
                           ("ffn_ms", "FFN arithmetic"), ("rest_ms", "rest of the graph")):
            values = [r[key] for r in rows]
            ax.bar(x, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xlabel("decode token")
        ax.set_ylabel("ms")
        ax.set_title(f"{Path(result['model']).name}: mode {result['mode']}, "
                     f"{result['tok_s']:.2f} tok/s")
        ax.legend()
    return draw
