"""Figures the report draws itself: PNG bytes from matplotlib's Agg canvas (no pyplot state).

Legibility: the page is at most 1400 px wide and every image is shown at its own size (never
stretched to a column), so figures are drawn at most `MAX_FIGURE_IN` inches wide at `DPI`, with
text of at least 10 points.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vnca.report.load import EvalRun
from vnca.report.tables import CURVE_METRICS

DPI = 100
MAX_FIGURE_IN = 13.2  # 1,320 px at DPI: the page's content width at a 1400 px window
FONT = {"axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 11,
        "ytick.labelsize": 11, "legend.fontsize": 11, "legend.title_fontsize": 11}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with mpl.rc_context(FONT):
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _legible(plot):
    """Run a plotting function with the report's font sizes (text takes them when created)."""
    @functools.wraps(plot)
    def wrapped(*args, **kwargs):
        with mpl.rc_context(FONT):
            return plot(*args, **kwargs)
    return wrapped


@_legible
def plot_training_curves(curves: pd.DataFrame) -> bytes | None:
    if curves.empty:
        return None
    panels = [(m, t) for m, t in CURVE_METRICS if (curves["metric"] == m).any()]
    if (curves["metric"] == "val_elbo").any():
        panels.append(("val_elbo", "validation ELBO (nats)"))
    runs = list(dict.fromkeys(curves["run"]))
    palette = dict(zip(runs, sns.color_palette("colorblind", len(runs))))
    fig = Figure(figsize=(min(MAX_FIGURE_IN, 4.4 * len(panels)), 3.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, panels):
        sub = curves[curves["metric"] == metric]
        sns.lineplot(data=sub, x="step", y="value", hue="run", palette=palette, ax=ax,
                     estimator=None, sort=True, marker="o" if metric == "val_elbo" else None,
                     markersize=5, linewidth=1.6, legend=False)
        ax.set_xscale("log")
        # Label decades only: on a panel spanning less than a decade the minor labels
        # (2x10^2, 3x10^2, ...) run into one another.
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        ax.set_title(title)
        ax.set_xlabel("training step (log)")
        ax.set_ylabel("")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=palette[r], linewidth=2) for r in runs]
    fig.legend(handles, runs, loc="outside upper center", ncols=len(runs), frameon=False)
    return _png(fig)


def tsne_arrays(ev: EvalRun) -> tuple | None:
    xy, labels = ev.arrays.get("tsne_xy"), ev.arrays.get("tsne_labels")
    if xy is None or labels is None or xy.ndim != 2 or xy.shape[1] != 2:
        return None
    if labels.ndim != 1 or labels.shape[0] != xy.shape[0] or xy.shape[0] == 0:
        return None
    return xy.astype(float), labels


@_legible
def plot_tsne_panels(runs: Sequence[tuple]) -> bytes | None:
    """One t-SNE panel per run (at most three a row), coloured by matched label."""
    data = [(label, a) for label, ev in runs if (a := tsne_arrays(ev)) is not None]
    if not data:
        return None
    ncols = min(len(data), 3)
    nrows = -(-len(data) // ncols)
    side = min(4.2, (MAX_FIGURE_IN - 1.0) / ncols)
    fig = Figure(figsize=(side * ncols + 1.0, side * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(data):]:
        ax.set_visible(False)
    classes = sorted({int(v) for _, (_, lab) in data for v in lab})
    palette = dict(zip(classes, sns.color_palette("tab10", max(len(classes), 1))))
    for ax, (label, (xy_Nx2, lab_N)) in zip(axes, data):
        # Dots as large as the panel allows: ~4 px for thousands of points, larger for few.
        size = float(np.clip(6000.0 / len(xy_Nx2), 9.0, 40.0))
        for c in classes:
            sel = lab_N.astype(int) == c
            ax.scatter(xy_Nx2[sel, 0], xy_Nx2[sel, 1], s=size, color=palette[c],
                       linewidths=0, alpha=0.85)
        ax.set_title(f"{label} ({len(xy_Nx2):,} images)")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], linestyle="", marker="o", markersize=8, color=palette[c])
               for c in classes]
    fig.legend(handles, [str(c) for c in classes], loc="outside right center", title="label",
               frameon=False)
    return _png(fig)


def damage_curves(ev: EvalRun) -> tuple | None:
    """(steps_S, ll_NxS undamaged, steps_R1, ll_NxR1 damaged) from arrays.npz, or None when
    absent or of inconsistent shapes."""
    a = ev.arrays
    arrays = [a.get(k) for k in ("damage_steps_undamaged", "damage_ll_undamaged",
                                 "damage_steps_damaged", "damage_ll_damaged")]
    if any(x is None for x in arrays):
        return None
    steps_u, ll_u, steps_d, ll_d = (np.asarray(x, float) for x in arrays)
    if steps_u.ndim != 1 or steps_d.ndim != 1 or ll_u.ndim != 2 or ll_d.ndim != 2:
        return None
    if (ll_u.shape[1] != steps_u.size or ll_d.shape[1] != steps_d.size
            or len(ll_u) != len(ll_d) or len(ll_u) == 0 or steps_d.size == 0):
        return None
    return steps_u, ll_u, steps_d, ll_d


def recovery_lines(runs: Sequence[tuple]) -> list:
    """[(run label, "undamaged" | "damaged", steps, mean, standard error, n images)]: two lines
    per run with damage arrays, the mean log-likelihood over its test images per NCA step."""
    lines = []
    for label, ev in runs:
        c = damage_curves(ev)
        if c is None:
            continue
        steps_u, ll_u, steps_d, ll_d = c
        for what, steps, ll in (("undamaged", steps_u, ll_u), ("damaged", steps_d, ll_d)):
            n = len(ll)
            se = ll.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(ll.shape[1])
            lines.append((label, what, steps, ll.mean(axis=0), se, n))
    return lines


@_legible
def plot_recovery_curves(runs: Sequence[tuple]) -> bytes | None:
    """Mean log-likelihood (± one standard error) over NCA steps of every run with damage
    arrays: the undamaged run (solid) and the damaged run branching off it (dashed)."""
    lines = recovery_lines(runs)
    if not lines:
        return None
    labels = list(dict.fromkeys(line[0] for line in lines))
    colours = dict(zip(labels, sns.color_palette("colorblind", len(labels))))
    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    ax = fig.subplots()
    damage_at = set()
    for label, what, steps, mean, se, n in lines:
        colour = colours[label]
        ax.fill_between(steps, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)
        text = "undamaged" if what == "undamaged" else "damaged, then regrown"
        ax.plot(steps, mean, "-" if what == "undamaged" else "--", color=colour, linewidth=2,
                label=f"{label}: {text} ({n:,} images)")
        if what == "damaged":
            damage_at.add(float(steps[0]))
    for at in sorted(damage_at):
        ax.axvline(at, color="0.3", linestyle=":", linewidth=1.2)
        ax.annotate(f"damage (step {at:g})", (at, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -16), textcoords="offset points", fontsize=11)
    # The first steps of growth score far below the rest; keep the range around the damage.
    lo = min(np.percentile(line[3], 1) for line in lines)
    hi = max(line[3].max() for line in lines)
    ax.set_ylim(lo - 0.08 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    ax.set_xlabel("NCA step")
    ax.set_ylabel("log p(x | state) (nats)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", frameon=True, framealpha=0.9)
    ax.set_title("Damage recovery: mean over test images ± one standard error")
    return _png(fig)


@_legible
def plot_match_percentiles(percentiles: dict) -> bytes | None:
    """One panel per distribution of the match report (`tables.match_percentiles`): nats
    against percentile, log axes where the values allow, splits as lines."""
    if not percentiles:
        return None
    ncols = min(len(percentiles), 3)
    nrows = -(-len(percentiles) // ncols)
    fig = Figure(figsize=(min(MAX_FIGURE_IN, 4.4 * ncols), 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(percentiles):]:
        ax.set_visible(False)
    splits = list(dict.fromkeys(s for d in percentiles.values() for s in d))
    colors = dict(zip(splits, sns.color_palette("colorblind", len(splits))))
    for ax, (field, by_split) in zip(axes, percentiles.items()):
        ax.grid(alpha=0.3)
        frame = pd.DataFrame([(split, q, v) for split, (qs, vs) in by_split.items()
                              for q, v in zip(qs, vs)], columns=["split", "percentile", "nats"])
        sns.lineplot(data=frame, x="percentile", y="nats", hue="split", palette=colors,
                     marker="o", markersize=5, estimator=None, ax=ax)
        ax.set_xscale("log")
        if (frame["nats"] > 0).all():
            ax.set_yscale("log")
        ax.set_title(f"{field.replace('_', ' ')} (percentiles)")
        ax.legend(frameon=False)
    return _png(fig)
