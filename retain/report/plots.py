"""Report figures, rendered headless to inline SVG (or base64 PNG) strings.

Figures are built with ``matplotlib.figure.Figure`` directly instead of pyplot: no GUI backend, no
global figure registry to leak, and saving goes through the Agg/SVG canvases. Text stays text in the
SVG (``svg.fonttype = none``), so numbers are searchable and the page stays small.
Inputs are plain data (lists, tuples), so the plots can be tested and reused without a Results file.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
import re
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

Point = tuple[str, float, float]
Series = tuple[str, Sequence[float], Sequence[float | None]]

# Text as <text> (searchable, small); a fixed hash salt so the same figure gives the same SVG.
_SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "retain", "font.size": 9}
_svg_counter = itertools.count(1)


# --- output ------------------------------------------------------------------------------------


def figure_to_svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element ready to inline in HTML (no XML prolog, no metadata)."""
    buf = io.BytesIO()
    with matplotlib.rc_context(_SVG_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue().decode("utf-8")
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    return _namespace_ids(text, f"rf{next(_svg_counter)}-")


def _namespace_ids(svg: str, prefix: str) -> str:
    """Prefix every id (and every reference to it) so several SVGs can share one HTML page.

    matplotlib names elements "figure_1", "axes_1"... in every figure; inlined side by side, those
    would collide and a clip path of one figure could be applied to another.
    """
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m[1]}"', svg)
    return re.sub(
        r'(url\(#|href="#)([^)"]+)',
        lambda m: f"{m[1]}{prefix}{m[2]}" if m[2] in ids else m[0],
        svg,
    )


def figure_to_png_base64(fig: Figure, dpi: int = 120) -> str:
    """The figure as base64 PNG text, for ``<img src="data:image/png;base64,...">``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


# --- R heatmap ---------------------------------------------------------------------------------


def heatmap_figure(
    matrix: Sequence[Sequence[float | None]], task_names: Sequence[str], title: str = ""
) -> Figure:
    """R as an annotated heatmap: rows = model states (base, after task i), columns = eval tasks."""
    data = np.array(matrix, dtype=float)  # None -> NaN, drawn blank
    T = len(task_names)
    fig = _new_figure(1.6 + 0.9 * max(T, 1), 1.2 + 0.55 * (T + 1))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(data):
        if not math.isnan(value):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color)
    crowded = T > 3
    ax.set_xticks(range(T), labels=list(task_names), rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_yticks(range(T + 1), labels=["base"] + [f"{i}: {name}" for i, name in enumerate(task_names, 1)])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training task")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def heatmap_svg(matrix: Sequence[Sequence[float | None]], task_names: Sequence[str], title: str = "") -> str:
    """SVG of the R heatmap for one strategy."""
    return figure_to_svg(heatmap_figure(matrix, task_names, title))


# --- lines -------------------------------------------------------------------------------------


#: One marker and one dash pattern per series, so lines lying on top of each other stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")
#: Smallest y-range of a score or retention axis: a 0.16% change must not fill the plot's height.
MIN_SCORE_SPAN = 0.05


def _plot_series(ax, series: Sequence[Series]) -> None:  # noqa: ANN001 (matplotlib Axes)
    for i, (label, xs, ys) in enumerate(series):
        y = np.array([np.nan if v is None else v for v in ys], dtype=float)
        ax.plot(np.asarray(xs, dtype=float), y, marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)],
                markersize=5 + 2 * ((len(series) - 1 - i) % 2), alpha=0.85, label=label)


def ensure_span(ax, span: float, axis: str = "y") -> None:  # noqa: ANN001 (matplotlib Axes)
    """Widen ``axis`` around its middle to at least ``span`` (autoscaling zooms into tiny changes)."""
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if high - low < span:
        middle = (low + high) / 2
        (ax.set_ylim if axis == "y" else ax.set_xlim)(middle - span / 2, middle + span / 2)


def line_figure(
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    reference: float | None = None,
    logx: bool = False,
    min_span: float | None = None,
) -> Figure:
    """Generic line plot: one line per (label, xs, ys) series, None ys drawn as gaps; ``min_span`` is the
    smallest y-range shown."""
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    _plot_series(ax, series)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    if min_span is not None:
        ensure_span(ax, min_span)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    return fig


def retention_plot_svg(series: Sequence[Series]) -> str:
    """General retention (1.0 = the base model) after each training task, one line per strategy."""
    fig = line_figure(
        series, xlabel="after training task (0 = base)", ylabel="general retention",
        title="General ability kept over the sequence", reference=1.0, min_span=MIN_SCORE_SPAN,
    )
    for ax in fig.axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    return figure_to_svg(fig)


def sweep_plot_svg(series: Sequence[Series], param: str) -> str:
    """Scores against a swept parameter (lambda, alpha...); log x when the values span decades."""
    xs = [x for _, sx, _ in series for x in sx]
    logx = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 100
    fig = line_figure(series, xlabel=param, ylabel="score", title=f"Sweep over {param}", logx=logx, min_span=MIN_SCORE_SPAN)
    return figure_to_svg(fig)


def budget_strengths_svg(series: Sequence[Series], title: str) -> str:
    """Each adapted strength against the global step (log y: strengths move in decades)."""
    fig = line_figure(series, xlabel="global step", ylabel="strength", title=title)
    for ax in fig.axes:
        ax.set_yscale("log")
    return figure_to_svg(fig)


def budget_quantity_svg(series: Sequence[Series], bound: float, ylabel: str, title: str) -> str:
    """A budgeted quantity at every check, with its bound as a dashed line."""
    return figure_to_svg(line_figure(series, xlabel="global step", ylabel=ylabel, title=title, reference=bound))


# --- learning vs forgetting --------------------------------------------------------------------


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points not dominated by another (both coordinates higher is better), sorted by x.

    A point is dominated when another is at least as good on both axes and better on one.
    """
    def dominated(p: Point) -> bool:
        return any(q[1] >= p[1] and q[2] >= p[2] and (q[1] > p[1] or q[2] > p[2]) for q in points)

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p[1], -p[2]))


def tradeoff_figure(points: Sequence[Point]) -> Figure:
    """New-task score (x) against general retention (y) per strategy, the Pareto front joined.

    Each strategy has its own marker and colour, named in a legend beside the plot: labels written next
    to the points overlapped wherever strategies ended close together. Points on the front are ringed.
    """
    fig = _new_figure(7.6, 4.2)
    ax = fig.add_subplot()
    front = pareto_front(points)
    on_front = {p[0] for p in front}
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], s=55, marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}", zorder=3, label=label,
                   edgecolors="black" if label in on_front else "none", linewidths=1.2)
    if front:
        ax.step([p[1] for p in front], [p[2] for p in front], where="post", color="tab:red",
                linewidth=1.2, alpha=0.7, label="Pareto front (ringed)")
    if points:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.margins(0.1)
    ensure_span(ax, MIN_SCORE_SPAN, "x")
    ensure_span(ax, MIN_SCORE_SPAN, "y")
    ax.set_xlabel("new-task score (higher is better)")
    ax.set_ylabel("general retention (higher is better)")
    ax.set_title("Learning vs forgetting")
    ax.grid(alpha=0.3)
    return fig


def tradeoff_scatter_svg(points: Sequence[Point]) -> str:
    """SVG of the learning-vs-forgetting scatter with its Pareto front."""
    return figure_to_svg(tradeoff_figure(points))
