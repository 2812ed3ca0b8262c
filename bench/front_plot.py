"""The retention-vs-gain front of ``retain bench --seeds`` folders: one point per item (means over seeds), its
95% intervals as bars, the corner a user wants (>= 0.98 retention at >= 0.95 of full's gain) shaded, and
each item's declared compute per optimizer step in a printed table (one forward+backward of the model = 1,
as the strategies declare their extra passes; timings of benches run side by side under load are too
noisy to rank by, ``bench/*_overhead.py`` measure those alone).

    python bench/front_plot.py runs/seeds_a runs/seeds_b --reference full --out docs/front.png \
        [--title "stories-contracts"] [--label-only a,b,c]

The share of full's gain is ``gain / reference gain`` (means over seeds); its bar is the gain interval
divided by the reference's mean gain. An item on the front is one no other item beats on both means.
Folders are combined as ``bench/seed_table.py`` does (the same item and seed in two folders must agree).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_table import load_runs  # noqa: E402  (a sibling script)

from retain.results.aggregate import aggregate_seeds  # noqa: E402
from retain.results.schema import Aggregate, StrategyRun  # noqa: E402

CORNER_RETENTION, CORNER_SHARE = 0.98, 0.95


@dataclass
class Point:
    name: str
    seeds: int
    share: float
    share_bar: tuple[float, float]
    retention: float
    retention_bar: tuple[float, float]
    step_cost: float | None  # declared forward+backward passes per step (plain training = 1)

    @property
    def in_corner(self) -> bool:
        return self.retention_bar[0] >= CORNER_RETENTION and self.share_bar[0] >= CORNER_SHARE


def declared_passes(runs: list[StrategyRun], name: str) -> float | None:
    """1 + the extra passes the item's strategies declare for their settings (``guide.catalogue.extra_passes``)."""
    from retain.guide.catalogue import Hybrid, extra_passes

    run = next((r for r in runs if r.name == name), None)
    if run is None or not run.config.get("strategies"):
        return None
    specs = []
    for entry in run.config["strategies"]:
        entry = dict(entry) if isinstance(entry, dict) else {"name": entry}
        specs.append((entry.pop("name"), tuple(sorted((k, v) for k, v in entry.items() if v is not None))))
    return 1.0 + extra_passes(Hybrid(tuple(specs), summary=""))


def points(aggregates: list[Aggregate], runs: list[StrategyRun], reference: str) -> list[Point]:
    ref = next(a for a in aggregates if a.name == reference)
    assert ref.gain is not None, f"{reference} has no gain"
    ref_gain = ref.gain.value
    out = []
    for a in aggregates:
        if a.gain is None or a.general_retention is None:
            continue
        g_lo, g_hi = a.gain.interval or [a.gain.value, a.gain.value]
        r_lo, r_hi = a.general_retention.interval or [a.general_retention.value] * 2
        out.append(Point(
            a.name, len(a.seeds), a.gain.value / ref_gain, (g_lo / ref_gain, g_hi / ref_gain),
            a.general_retention.value, (r_lo, r_hi), declared_passes(runs, a.name),
        ))
    return out


def on_front(all_points: list[Point]) -> set[str]:
    """Items no other item beats on both means (ties kept)."""
    return {p.name for p in all_points
            if not any(q.share >= p.share and q.retention >= p.retention and (q.share, q.retention) != (p.share, p.retention)
                       for q in all_points)}


def short_label(name: str) -> str:
    """``full+replay@replay.mode=append@replay.ratio=0.5`` -> ``full+replay(mode=append,ratio=0.5)``: the
    settings without their strategy prefix, so labels fit beside the points."""
    head, *settings = name.split("@")
    return head + ("(" + ",".join(s.split(".", 1)[-1] for s in settings) + ")" if settings else "")


def plot(all_points: list[Point], front: set[str], out: Path, title: str, labelled: set[str] | None,
         min_retention: float | None = None) -> None:
    """Two panels: every item (left) and the region near the corner (right, retention >= 0.85 and at
    least 0.7 of full's gain), where most labels are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, near) = plt.subplots(1, 2, figsize=(13, 6), dpi=110, gridspec_kw={"width_ratios": [1, 1.4]})
    low = min(p.retention_bar[0] for p in all_points) - 0.03 if min_retention is None else min_retention
    panels = ((whole, (min(0.0, min(p.share_bar[0] for p in all_points)) - 0.02, 1.08), (low, 1.01), 0.85),
              (near, (0.7, 1.05), (0.85, 1.0), None))
    for ax, xlim, ylim, label_below in panels:
        ax.fill_between([CORNER_SHARE, xlim[1]], CORNER_RETENTION, ylim[1], color="tab:green", alpha=0.15,
                        label=f"corner: retention >= {CORNER_RETENTION}, gain share >= {CORNER_SHARE}")
        for p in all_points:
            if not (xlim[0] <= p.share <= xlim[1] and ylim[0] <= p.retention <= ylim[1]):
                continue
            color = "tab:red" if p.name in front else "tab:blue"
            ax.errorbar(p.share, p.retention,
                        xerr=[[p.share - p.share_bar[0]], [p.share_bar[1] - p.share]],
                        yerr=[[p.retention - p.retention_bar[0]], [p.retention_bar[1] - p.retention]],
                        fmt="o", color=color, ms=4, capsize=2, lw=0.8)
            wanted = labelled is None or p.name in labelled or p.name in front
            if wanted and (label_below is None or p.retention < label_below or p.share < 0.7):  # not in the right panel
                ax.annotate(short_label(p.name), (p.share, p.retention), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", annotation_clip=True)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.set_xlabel("share of full fine-tuning's gain on the new task (report part)")
    whole.set_ylabel("general retention (report part)")
    whole.set_title("every item (labels near the corner: right)", fontsize=9)
    near.set_title("near the corner", fontsize=9)
    near.legend(loc="lower left", fontsize=7)
    fig.suptitle(f"{title}: red = on the front (no item better on both), bars = 95% interval", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.09, top=0.9, wspace=0.12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", default="full")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: print only)")
    parser.add_argument("--title", default="stories-contracts, default budget")
    parser.add_argument("--min-retention", type=float, default=None, help="lower end of the y axis (zoom)")
    parser.add_argument("--label-only", default=None, help="comma-separated items to label (front items always are)")
    args = parser.parse_args()
    _, runs = load_runs(args.folders, args.reference)
    all_points = points(aggregate_seeds(runs), runs, args.reference)
    front = on_front(all_points)
    print("| item | seeds | share of full's gain | retention | passes per step (declared) | on front | in corner |")
    print("|:---|---:|---:|---:|---:|:---:|:---:|")
    for p in sorted(all_points, key=lambda q: -q.retention):
        cost = f"{p.step_cost:.2f}" if p.step_cost is not None else "—"
        print(f"| {p.name} | {p.seeds} | {p.share:.3f} [{p.share_bar[0]:.3f}, {p.share_bar[1]:.3f}] | "
              f"{p.retention:.3f} [{p.retention_bar[0]:.3f}, {p.retention_bar[1]:.3f}] | {cost} | "
              f"{'yes' if p.name in front else ''} | {'yes' if p.in_corner else 'no'} |")
    if args.out is not None:
        labelled = set(args.label_only.split(",")) if args.label_only else None
        plot(all_points, front, args.out, args.title, labelled, args.min_retention)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
