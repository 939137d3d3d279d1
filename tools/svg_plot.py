"""A line plot as a standalone SVG (no plotting library): one polyline per series, x linear,
y (a perplexity ratio) on a log scale clipped at y_top, an optional shaded target region."""

from __future__ import annotations

import math
from pathlib import Path

Y_TICKS = (0.99, 1.0, 1.01, 1.03, 1.05, 1.1, 1.2, 1.3, 1.5)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def write_svg(path: Path, series: dict[str, list[tuple[float, float]]], x_label: str,
              y_label: str, x_range: tuple[float, float], target: tuple[float, float] | None,
              target_label: str = "", y_top: float = 1.5) -> None:
    """series: name -> (x, y) points. target (x, y): the region x <= target x, y <= target y
    is shaded. Points above y_top sit on the top edge."""
    width, height, left, right, top, bottom = 900, 460, 70, 330, 20, 50
    points = [p for pts in series.values() for p in pts]
    x0, x1 = min(x_range[0], min(x for x, _ in points)), x_range[1]
    y0 = min(0.995, min(y for _, y in points))
    y1 = min(y_top, max(max(y for _, y in points), 1.1))
    ly0, ly1 = math.log(y0), math.log(y1)

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def sy(v: float) -> float:
        frac = (math.log(min(max(v, y0), y1)) - ly0) / (ly1 - ly0)
        return height - bottom - frac * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if target is not None:
        out += [f'<rect x="{sx(x0):.1f}" y="{sy(target[1]):.1f}" '
                f'width="{sx(target[0]) - sx(x0):.1f}" height="{sy(y0) - sy(target[1]):.1f}" '
                'fill="#e6f4e6"/>',
                f'<text x="{sx(x0) + 4:.1f}" y="{sy(target[1]) - 4:.1f}" fill="#2a7a2a">'
                f'{target_label}</text>']
    for i in range(8):
        xv = x0 + (x1 - x0) * i / 7
        out.append(f'<line x1="{sx(xv):.1f}" y1="{sy(y0):.1f}" x2="{sx(xv):.1f}" '
                   f'y2="{sy(y1):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(xv):.1f}" y="{sy(y0) + 16:.1f}" '
                   f'text-anchor="middle">{xv:.0f}</text>')
    for yv in (y for y in Y_TICKS if y0 <= y <= y1):
        out.append(f'<line x1="{sx(x0):.1f}" y1="{sy(yv):.1f}" x2="{sx(x1):.1f}" '
                   f'y2="{sy(yv):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(x0) - 6:.1f}" y="{sy(yv) + 4:.1f}" '
                   f'text-anchor="end">{yv:g}</text>')
    out.append(f'<text x="{(sx(x0) + sx(x1)) / 2:.1f}" y="{height - 10}" text-anchor="middle">'
               f'{x_label}</text>')
    out.append(f'<text x="16" y="{(sy(y0) + sy(y1)) / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(sy(y0) + sy(y1)) / 2:.1f})">{y_label} '
               f'(log; top edge: &gt;= {y1:g})</text>')
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                   'stroke-width="2"/>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>'
                   for x, y in pts)
        ly = top + 20 + 18 * i
        out.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" '
                   f'y2="{ly}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{width - right + 38}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
