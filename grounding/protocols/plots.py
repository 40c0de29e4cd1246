"""The protocols' figures as PNG files (matplotlib, drawn off-screen, written atomically).

- ``scatter_with_spread``: one labelled point per method at its mean over seeds, ±1 std error bars on both axes,
  every seed's own result as a small dot (``grounding.protocols.forgetting``);
- ``curve_with_spread``: a metric against a setting (k of a k-shot sweep, a data fraction), mean over seeds with
  a ±1 std band and every seed's value as a dot (``grounding.protocols.sweep``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from grounding.utils import write_atomic

#: one point: (label, x mean, x std or None, y mean, y std or None, [(x, y) of each seed])
Point = tuple[str, float, float | None, float, float | None, Sequence[tuple[float | None, float | None]]]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: the file is the output
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6.4, 4.8), dpi=100)


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    write_atomic(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)


def scatter_with_spread(points: Sequence[Point], path: str | Path, xlabel: str, ylabel: str, title: str,
                        guides: Sequence[tuple[str, float, str]] = ()) -> None:
    """``path``: a scatter of ``points`` (see ``Point``), axes from 0, a legend entry per label; ``guides``:
    dashed lines (``"x"`` or ``"y"``, the value, a label), e.g. a goal's thresholds."""
    plt, figure, axes = _figure()
    for axis, value, label in guides:
        line = axes.axvline if axis == "x" else axes.axhline
        line(value, color="grey", linestyle="--", linewidth=1, label=label)
    for index, (label, x, x_std, y, y_std, seeds) in enumerate(points):
        color = f"C{index % 10}"
        dots = [(sx, sy) for sx, sy in seeds if sx is not None and sy is not None]
        if dots:
            axes.scatter([d[0] for d in dots], [d[1] for d in dots], s=12, color=color, alpha=0.4)
        axes.errorbar([x], [y], xerr=None if x_std is None else [x_std], yerr=None if y_std is None else [y_std],
                      fmt="o", markersize=7, capsize=3, color=color, label=label)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if points or guides:
        axes.legend(fontsize="small")
    _save(plt, figure, Path(path))


def curve_with_spread(curves: dict[str, Sequence[tuple[float, float | None, float | None, Sequence[float]]]],
                      path: str | Path, xlabel: str, ylabel: str, title: str, log_x: bool = False) -> None:
    """``path``: one line per entry of ``curves`` (name -> [(x, mean, std, [each seed's value])] in x order),
    a ±1 std band where the std is defined."""
    plt, figure, axes = _figure()
    for index, (name, values) in enumerate(curves.items()):
        color = f"C{index % 10}"
        shown = [(x, mean, std) for x, mean, std, _ in values if mean is not None]
        if not shown:
            continue
        axes.plot([p[0] for p in shown], [p[1] for p in shown], marker="o", color=color, label=name)
        band = [(x, mean, std) for x, mean, std in shown if std is not None]
        if band:
            axes.fill_between([p[0] for p in band], [p[1] - p[2] for p in band], [p[1] + p[2] for p in band],
                              color=color, alpha=0.2)
        for x, _, _, seeds in values:
            axes.scatter([x] * len(seeds), seeds, s=10, color=color, alpha=0.5)
    if log_x:
        axes.set_xscale("log")
    if not axes.lines:
        axes.text(0.5, 0.5, "no finished values yet", ha="center", va="center", transform=axes.transAxes)
    axes.set_ylim(bottom=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small")
    _save(plt, figure, Path(path))
