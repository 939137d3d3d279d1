#!/usr/bin/env python3
"""The trade-off plot of issue 11: perplexity against FFN bytes fetched per token, one curve
per selection policy, the oracle as the bound, from tools/selection.py's --json results.

    python tools/plot_selection.py RESULTS.json [MORE.json ...] --svg plot.svg
                                   [--point "LABEL|PERCENT|RATIO" ...]

x: bytes fetched per token as a share of the FFN's bytes (selection.py's READ: the rows a
token needs, no cache; the resident gate is not counted, it is read once). y: perplexity /
stock llama.cpp on the same tokens. --point adds measured end-to-end runs (the runtime's
bytes read per token with its cache at a budget, e.g. from flashgguf-profile quality --run), one
series per label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from svg_plot import write_svg

FAMILIES = {  # selection.py's policy name prefix -> the curve's name
    "oracle": "oracle: top by |h| ||down|| (bound)",
    "cats": "CATS: top by |act(gate)|",
    "gate": "gate score x rms(u) x ||down||",
    "two": "two stages, down chosen on exact h",
    "dense": "dense",
}


def curves(paths: list[Path]) -> tuple[dict[str, list[tuple[float, float]]], str]:
    series: dict[str, set[tuple[float, float]]] = {}
    names = set()
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        names.add(f"{data['model']}, {data['tokens']} tokens")
        for r in data["results"]:
            if r.get("ratio_stock") is None:
                raise SystemExit(f"{path}: run without stock llama.cpp's anchor (--no-stock)")
            family = FAMILIES.get(r["policy"].split()[0], r["policy"].split()[0])
            series.setdefault(family, set()).add((100.0 * r["read"], r["ratio_stock"]))
    return {k: sorted(v) for k, v in series.items()}, "; ".join(sorted(names))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="tools/selection.py --json files")
    p.add_argument("--svg", type=Path, required=True)
    p.add_argument("--point", action="append", default=[], help='"LABEL|PERCENT|RATIO"')
    args = p.parse_args()
    series, title = curves(args.results)
    for spec in args.point:
        label, x, y = spec.split("|")
        series.setdefault(label, []).append((float(x), float(y)))
    write_svg(args.svg, series, f"FFN bytes fetched per token (% of the FFN) - {title}",
              "perplexity / stock llama.cpp", (30.0, 100.0), (60.0, 1.03),
              "&lt;= 1.03x stock")
    print(f"wrote {args.svg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
