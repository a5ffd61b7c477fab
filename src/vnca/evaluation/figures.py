"""PNG figures of the evaluation step (matplotlib's Agg canvas; no pyplot state).

Every function takes numpy arrays (probabilities in [0, 1] unless named logits) and a path, and
writes the PNG under a temporary name that is renamed when complete.

The report shows each PNG at its own size on a page at most 1400 px wide, so figures are at
most `MAX_WIDTH_IN` inches wide at `DPI` (wider strips show fewer, evenly spaced frames), text is
at least 10 points, and titles wrap to the figure's width instead of being clipped.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vnca.fileio import atomic_path

CMAP = "gray"
DPI = 100
MAX_WIDTH_IN = 13.0  # 1,300 px at DPI
CELL_IN = 0.6  # an image of a grid or strip, at most (60 px for 32 px: sharp and visible)
TITLE_PT = 12
LABEL_PT = 10


def sigmoid(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _wrap(text: str, width_in: float, fontsize: float = TITLE_PT) -> str:
    """`text` broken into lines that fit `width_in` inches at `fontsize` points."""
    chars = max(12, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def _tile(images_RxCxHxW: np.ndarray, gap: int = 1, fill: float = 1.0) -> np.ndarray:
    """One image of an R x C grid of H x W images separated by `gap` pixels of `fill`."""
    r, c, h, w = images_RxCxHxW.shape
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap), fill, np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = \
                images_RxCxHxW[i, j]
    return out


def _grid_rows(images_NxHxW: np.ndarray, cols: int) -> np.ndarray:
    n, h, w = images_NxHxW.shape
    rows = -(-n // cols)
    padded = np.ones((rows * cols, h, w), np.float32)
    padded[:n] = images_NxHxW
    return padded.reshape(rows, cols, h, w)


def image_grid(images_NxHxW: np.ndarray, path: str | Path, title: str, cols: int = 8) -> Path:
    grid = _grid_rows(images_NxHxW, cols)
    cell = min(CELL_IN, (MAX_WIDTH_IN - 0.4) / cols)
    width = max(4.0, cols * cell + 0.4)
    title = _wrap(title, width)
    fig = Figure(figsize=(width, grid.shape[0] * cell + 0.35 + 0.25 * title.count("\n") + 0.3),
                 layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_tile(grid), cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=TITLE_PT)
    return _save(fig, path)


def reconstructions(x_NxHxW: np.ndarray, probs_NxHxW: np.ndarray, path: str | Path,
                    cols: int = 8) -> Path:
    """Pairs side by side: test image (odd columns, 1-based) then its reconstruction."""
    pairs = np.stack([x_NxHxW, probs_NxHxW], axis=1).reshape(-1, *x_NxHxW.shape[1:])
    return image_grid(pairs, path, "Test images and reconstructions (probabilities)",
                      cols=2 * cols)


def strips(rows_RxSxHxW: np.ndarray, path: str | Path, title: str,
           col_titles: list[str] | None = None, max_cols: int = 32) -> Path:
    """One row per example, one column per frame (at most `max_cols`, evenly spaced, the first
    and last always shown), the column titles under the last row."""
    r, s = rows_RxSxHxW.shape[:2]
    cols = np.unique(np.linspace(0, s - 1, min(s, max_cols)).round().astype(int))
    grid = rows_RxSxHxW[:, cols]
    cell = min(CELL_IN, (MAX_WIDTH_IN - 0.4) / len(cols))
    width = max(5.0, len(cols) * cell + 0.4)
    title = _wrap(title, width)
    labels = [col_titles[c] for c in cols] if col_titles is not None else []
    # Column titles stay horizontal when the longest fits its column, else they turn 45 degrees.
    longest_in = max((len(t) for t in labels), default=0) * 0.6 * LABEL_PT / 72
    rotate = longest_in > cell * 0.95
    label_in = (0.3 + (longest_in * 0.71 if rotate else 0.0)) if labels else 0.0
    fig = Figure(figsize=(width, r * cell + 0.35 + 0.25 * title.count("\n") + label_in + 0.3),
                 layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_tile(grid), cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    _h, w = grid.shape[2:]
    if labels:
        ax.set_xticks([j * (w + 1) + w / 2 for j in range(len(cols))])
        ax.set_xticklabels(labels, fontsize=LABEL_PT, rotation=45 if rotate else 0,
                           ha="right" if rotate else "center",
                           rotation_mode="anchor" if rotate else "default")
        ax.tick_params(axis="x", length=0)
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    else:
        ax.set_axis_off()
    ax.set_title(title, fontsize=TITLE_PT)
    return _save(fig, path)


def _mean_se(ll_NxS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(ll_NxS)
    mean = ll_NxS.mean(axis=0)
    se = ll_NxS.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
    return mean, se


def damage_curve(steps_undamaged_S: np.ndarray, ll_undamaged_NxS: np.ndarray,
                 steps_damaged_R: np.ndarray, ll_damaged_NxR: np.ndarray,
                 path: str | Path) -> Path:
    """Mean log-likelihood (+- one standard error) over the test images per step, of the run
    without damage and of the damaged run that branches from it at the damage step."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    n = len(ll_undamaged_NxS)
    for steps, ll, colour, label in [
        (steps_undamaged_S, ll_undamaged_NxS, "C0", "undamaged"),
        (steps_damaged_R, ll_damaged_NxR, "C3", "damaged, then regrown"),
    ]:
        if not n:
            continue
        mean, se = _mean_se(ll)
        ax.fill_between(steps, mean - se, mean + se, color=colour, alpha=0.25, linewidth=0)
        ax.plot(steps, mean, color=colour, linewidth=2, label=label)
    if len(steps_damaged_R):
        ax.axvline(steps_damaged_R[0], color="0.3", linestyle="--", linewidth=1)
    if n:
        both = np.concatenate([ll_undamaged_NxS.mean(0), ll_damaged_NxR.mean(0)])
        lo, hi = np.percentile(both, 1), both.max()
        ax.set_ylim(lo - 0.08 * (hi - lo + 1e-9), hi + 0.08 * (hi - lo + 1e-9))
    ax.set_xlabel("NCA step", fontsize=12)
    ax.set_ylabel("log p(x | state) (nats)", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.legend(loc="lower right", fontsize=11)
    ax.grid(alpha=0.3)
    ax.set_title(f"Damage at the dashed line ({n} test images, mean ± s.e.)", fontsize=12)
    return _save(fig, path)


def tsne_scatter(xy_Nx2: np.ndarray, labels_N: np.ndarray, path: str | Path, title: str) -> Path:
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.add_subplot()
    size = float(np.clip(6000.0 / max(len(xy_Nx2), 1), 9.0, 40.0))  # ~4 px dots for thousands
    for c in np.unique(labels_N):
        sel = labels_N == c
        ax.scatter(xy_Nx2[sel, 0], xy_Nx2[sel, 1], s=size, color=f"C{int(c) % 10}",
                   label=str(int(c)), linewidths=0, alpha=0.85)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=max(1.0, 8.0 / np.sqrt(size)), fontsize=LABEL_PT + 1,
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="label",
              title_fontsize=LABEL_PT + 1)
    ax.set_title(_wrap(title, 5.0), fontsize=TITLE_PT)
    return _save(fig, path)


def probe_panels(probs_IxHxW: np.ndarray, proba_IxHxWxL: np.ndarray, labels_I: np.ndarray,
                 path: str | Path) -> Path:
    """Rows: reconstruction, per-cell argmax class, per-cell max probability (R's figure)."""
    n = len(probs_IxHxW)
    fig = Figure(figsize=(min(MAX_WIDTH_IN, 1.6 * n + 1.8), 5.6), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    im_cls = im_conf = None
    for j in range(n):
        axes[0, j].imshow(probs_IxHxW[j], cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
        axes[0, j].set_title(f"label {int(labels_I[j])}", fontsize=LABEL_PT + 1)
        im_cls = axes[1, j].imshow(proba_IxHxWxL[j].argmax(-1), cmap="tab10", vmin=-0.5,
                                   vmax=9.5, interpolation="nearest")
        im_conf = axes[2, j].imshow(proba_IxHxWxL[j].max(-1), cmap="viridis", vmin=0, vmax=1,
                                    interpolation="nearest")
        for i in range(3):
            axes[i, j].set_axis_off()
    if im_cls is not None:
        for im, row, label, ticks in ((im_cls, 1, "class", range(10)),
                                      (im_conf, 2, "max prob.", None)):
            bar = fig.colorbar(im, ax=axes[row, :].tolist(), ticks=ticks, shrink=0.95)
            bar.set_label(label, fontsize=LABEL_PT + 1)
            bar.ax.tick_params(labelsize=LABEL_PT - 1 if ticks is not None else LABEL_PT)
    for i, name in enumerate(("reconstruction", "per-cell class", "per-cell confidence")):
        axes[i, 0].text(-0.12, 0.5, name, transform=axes[i, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=LABEL_PT)
    fig.suptitle(_wrap("Linear probe on final cell states (held-out images)",
                       min(MAX_WIDTH_IN, 1.6 * n + 1.8)), fontsize=TITLE_PT)
    return _save(fig, path)
