"""PNG figures of the evaluation step (matplotlib's Agg canvas; no pyplot state).

Every function takes numpy arrays (probabilities in [0, 1] unless named logits) and a path, and
writes the PNG under a temporary name that is renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CMAP = "gray"


def sigmoid(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


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
    fig = Figure(figsize=(max(3.0, cols * 0.6 + 0.4), grid.shape[0] * 0.6 + 0.6),
                 layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_tile(grid), cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def reconstructions(x_NxHxW: np.ndarray, probs_NxHxW: np.ndarray, path: str | Path,
                    cols: int = 8) -> Path:
    """Pairs side by side: test image (odd columns, 1-based) then its reconstruction."""
    pairs = np.stack([x_NxHxW, probs_NxHxW], axis=1).reshape(-1, *x_NxHxW.shape[1:])
    return image_grid(pairs, path, "Test images and reconstructions (probabilities)",
                      cols=2 * cols)


def strips(rows_RxSxHxW: np.ndarray, path: str | Path, title: str,
           col_titles: list[str] | None = None, max_cols: int = 48) -> Path:
    """One row per example, one column per frame (at most `max_cols`, evenly spaced, the first
    and last always shown)."""
    r, s = rows_RxSxHxW.shape[:2]
    cols = np.unique(np.linspace(0, s - 1, min(s, max_cols)).round().astype(int))
    grid = rows_RxSxHxW[:, cols]
    fig = Figure(figsize=(max(4.0, len(cols) * 0.45 + 0.4), r * 0.45 + 1.0),
                 layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_tile(grid), cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    _h, w = grid.shape[2:]
    if col_titles is not None:
        ax.set_xticks([j * (w + 1) + w / 2 for j in range(len(cols))])
        ax.set_xticklabels([col_titles[c] for c in cols], fontsize=6, rotation=90)
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    else:
        ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def damage_curve(steps_S: np.ndarray, ll_NxS: np.ndarray, damage_at: int, path: str | Path,
                 n_individual: int = 16) -> Path:
    """Mean log-likelihood over images per recorded state, +- one standard error, with a few
    single images behind it; the damage is a vertical drop at step `damage_at`."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for curve in ll_NxS[:n_individual]:
        ax.plot(steps_S, curve, color="0.75", linewidth=0.6)
    mean = ll_NxS.mean(axis=0)
    n = len(ll_NxS)
    se = ll_NxS.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
    ax.fill_between(steps_S, mean - se, mean + se, color="C0", alpha=0.3, linewidth=0)
    ax.plot(steps_S, mean, color="C0", linewidth=1.5, label=f"mean of {n} test images")
    ax.axvline(damage_at, color="0.3", linestyle="--", linewidth=1)
    ax.set_xlabel("NCA step")
    ax.set_ylabel("log p(x | state) (nats)")
    lo = np.percentile(ll_NxS, 2) if n else -1.0
    hi = ll_NxS.max() if n else 0.0
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Test reconstructions: damage at the dashed line, then regrowth", fontsize=9)
    return _save(fig, path)


def tsne_scatter(xy_Nx2: np.ndarray, labels_N: np.ndarray, path: str | Path, title: str) -> Path:
    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for c in np.unique(labels_N):
        sel = labels_N == c
        ax.scatter(xy_Nx2[sel, 0], xy_Nx2[sel, 1], s=3, color=f"C{int(c) % 10}",
                   label=str(int(c)), linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False, title="label")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def probe_panels(probs_IxHxW: np.ndarray, proba_IxHxWxL: np.ndarray, labels_I: np.ndarray,
                 path: str | Path) -> Path:
    """Rows: reconstruction, per-cell argmax class, per-cell max probability (R's figure)."""
    n = len(probs_IxHxW)
    fig = Figure(figsize=(1.3 * n + 1.2, 4.4), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    im_cls = im_conf = None
    for j in range(n):
        axes[0, j].imshow(probs_IxHxW[j], cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
        axes[0, j].set_title(f"label {int(labels_I[j])}", fontsize=8)
        im_cls = axes[1, j].imshow(proba_IxHxWxL[j].argmax(-1), cmap="tab10", vmin=-0.5,
                                   vmax=9.5, interpolation="nearest")
        im_conf = axes[2, j].imshow(proba_IxHxWxL[j].max(-1), cmap="viridis", vmin=0, vmax=1,
                                    interpolation="nearest")
        for i in range(3):
            axes[i, j].set_axis_off()
    if im_cls is not None:
        fig.colorbar(im_cls, ax=axes[1, :].tolist(), ticks=range(10), shrink=0.9,
                     label="class")
        fig.colorbar(im_conf, ax=axes[2, :].tolist(), shrink=0.9, label="max prob.")
    fig.suptitle("Linear probe on final cell states (held-out images)", fontsize=9)
    return _save(fig, path)
