"""The pipeline's last step: one report over every trained and evaluated variant.

`build_report(eval_dirs, train_dirs, data_dir, out_dir)` reads the artifacts of the other steps
(file names from `vnca.artifacts`) and writes

* `OUT/report.html`: self-contained (every image is a base64 data URI, the style is inline), so
  it opens from a file with no server and Vertex AI can show it as an HTML artifact;
* `OUT/report.md` with the same content, its images copied to `OUT/figures/`.

Contents, in reading order: the results table (our importance-weighted bound against the
paper's and the reproduction's, `vnca.reference`, the untrained model's bound, and how often an
independent digit classifier recognises reconstructions and prior samples), the prior samples'
label histogram, damage recovery and probe scalars, training curves, every figure the
evaluation step produced (each shown once: a figure the report re-plots from `arrays.npz` for
all variants replaces the per-variant PNGs), the dataset's label matching, the configurations,
and last the raw label-matching statistics. A run below the paper's scale (`tier` smoke, demo
or cpu) gets a banner, so nobody mistakes a 20-step number for the paper's.

Which variant a directory holds is read from its files (`variant` in `summary.json` /
`metrics.json`), never from the order of the arguments; every evaluation must pair with a
training run of its variant and vice versa. The JSON artifacts are read through the validating
readers of `vnca.artifacts`: a missing directory or required file, or a malformed one, raises
`DataError` with one line naming the path (and the key); a missing optional figure shows "not
produced" and a missing optional number "—" (older evaluation directories lack the newer
keys).

Legibility: the page is at most 1400 px wide and every image is shown at its own size (never
stretched to a column), so the report's figures are drawn at most `MAX_FIGURE_IN` inches wide at
`DPI`, with text of at least 10 points.

Layout: loaders (`load_eval_dir`, `load_train_dir`, `load_data_dir`) do the I/O; pure functions
turn their contents into tables (`results_frame`, `format_results`, ...) and PNG bytes; a small
document model (`Table`, `Figures`, ...) is rendered twice, to HTML and to Markdown. Figures use
matplotlib's Agg canvas directly (no pyplot state). This module imports no JAX.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vnca import artifacts, reference
from vnca import config as vconfig
from vnca.errors import DataError, UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VARIANT_ORDER = ("baseline", "doubling", "nondoubling")
# Figures that only an NCA decoder has; for the baseline their absence is expected.
NCA_ONLY_FIGURES = ("growth.png", "damage_recovery.png", "damage_curve.png", "probe.png")
# Figures the evaluation makes for the non-doubling model only (the paper's damage and probe).
NONDOUBLING_ONLY_FIGURES = ("damage_recovery.png", "damage_curve.png", "probe.png")
MISSING = "—"
CURVE_METRICS = (("loss", "loss (nats)"), ("kl", "KL (nats)"),
                 ("recon", "reconstruction (nats)"))
DPI = 100
MAX_FIGURE_IN = 13.2  # 1,320 px at DPI: the page's content width at a 1400 px window
FONT = {"axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 11,
        "ytick.labelsize": 11, "legend.fontsize": 11, "legend.title_fontsize": 11}
# Run sizes (config `tier`), smallest first; a report labels each run with the smallest tier
# among its evaluation and training directories.
TIERS = ("smoke", "demo", "cpu", "paper")
TIER_BANNERS = {
    "smoke": ("SMOKE RUN: {runs}. A smoke run trains a tiny model for seconds to test the "
              "pipeline; its numbers are NOT comparable with the paper's or the "
              "reproduction's."),
    "demo": ("Demo run: {runs}. Small models trained for minutes on the bundled 2,000-image "
             "sample on a CPU; not comparable with the paper."),
    "cpu": ("CPU-scale run: {runs}. Reduced models trained on the full data on a 2-core CPU; "
            "not the paper's configuration."),
}
TIER_LABELS = {"smoke": "SMOKE", "demo": "demo", "cpu": "CPU", "paper": "paper"}
RECONSTRUCTION_BAR = 0.8  # share of reconstructions the classifier should recognise
SMALL_IMAGE_PX = 360  # narrower PNGs are shown scaled up to this width, unsmoothed

# ---------------------------------------------------------------------------------------------
# Loading (the only I/O on the input side).


@dataclasses.dataclass(frozen=True)
class EvalRun:
    path: Path
    variant: str
    name: str
    tier: str | None  # one of TIERS; None when the directory does not say
    metrics: dict
    figures: dict  # file name -> Path of a readable PNG
    unreadable: dict  # file name -> why the file there could not be used
    arrays: dict  # name -> np.ndarray (empty when arrays.npz is absent or unreadable)

    @property
    def smoke(self) -> bool:
        return self.tier == "smoke"


@dataclasses.dataclass(frozen=True)
class TrainRun:
    path: Path
    variant: str
    name: str
    tier: str | None  # one of TIERS; None when the directory does not say
    summary: dict
    cfg: vconfig.Config
    records: list  # dicts from metrics.jsonl, in file order

    @property
    def smoke(self) -> bool:
        return self.tier == "smoke"


@dataclasses.dataclass(frozen=True)
class DataInfo:
    path: Path
    match_report: dict
    matched_pairs: Path | None
    unreadable: str | None  # why matched_pairs.png could not be used, if present but bad


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{what} directory not found: {p}")
    return p


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    return path


def png_dims(data: bytes) -> tuple:
    """(width, height) from a PNG's IHDR chunk; (0, 0) if the header is not there."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return 0, 0
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _png_problem(path: Path) -> str | None:
    """Why a PNG file cannot be embedded, or None if it looks fine."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except OSError as e:
        return f"cannot read ({e.__class__.__name__})"
    if not head:
        return "empty file"
    if head[:8] != PNG_SIGNATURE:
        return "not a PNG file"
    if 0 in png_dims(head):
        return "truncated PNG file"
    return None


def read_tier(d: dict) -> str | None:
    """The run's tier from `tier`, or from the older boolean `smoke`; None if neither says."""
    tier = d.get("tier")
    if tier in TIERS:
        return tier
    return "smoke" if d.get("smoke") is True else None


def smallest_tier(*tiers: str | None) -> str | None:
    known = [t for t in tiers if t in TIERS]
    return min(known, key=TIERS.index) if known else None


def load_eval_dir(path: str | Path) -> EvalRun:
    """Read one evaluation directory (`vnca evaluate --out`)."""
    d = _require_dir(path, "evaluation")
    metrics_path = d / artifacts.EVAL_METRICS
    metrics = artifacts.read_eval_metrics(metrics_path)
    variant = metrics["variant"]
    name = metrics.get("name") or variant
    figures, unreadable = {}, {}
    for fname in artifacts.EVAL_FIGURES:
        p = d / fname
        if p.exists():
            problem = _png_problem(p)
            if problem is None:
                figures[fname] = p
            else:
                unreadable[fname] = problem
    arrays: dict = {}
    arrays_path = d / artifacts.EVAL_ARRAYS
    if arrays_path.is_file():
        try:
            arrays = artifacts.read_npz(arrays_path, what="arrays file")
        except DataError as e:  # corrupt: the re-plots fall back to the evaluation's own PNGs
            unreadable[artifacts.EVAL_ARRAYS] = str(e).removeprefix(f"{arrays_path}: ")
    return EvalRun(path=d, variant=variant, name=name or variant,
                   tier=read_tier(metrics), metrics=metrics,
                   figures=figures, unreadable=unreadable, arrays=arrays)


def load_train_dir(path: str | Path) -> TrainRun:
    """Read one training directory (`vnca train --out`); checkpoints and params are not read."""
    d = _require_dir(path, "training")
    cfg_path = _require_file(d / artifacts.RESOLVED_CONFIG)
    try:
        cfg = vconfig.loads(cfg_path.read_text(), source=str(cfg_path))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read ({e.__class__.__name__})") from None
    summary_path = d / artifacts.TRAIN_SUMMARY
    summary = artifacts.read_train_summary(summary_path)
    variant = summary["variant"]
    if variant != cfg.model.variant:
        raise DataError(f"{summary_path}: variant {variant!r} differs from model.variant "
                        f"{cfg.model.variant!r} in {cfg_path}")
    name = summary.get("name")
    records = artifacts.read_train_metrics(d / artifacts.TRAIN_METRICS)
    tier = smallest_tier(read_tier(summary), getattr(cfg, "tier", None))
    return TrainRun(path=d, variant=variant, name=name or cfg.name or variant, tier=tier,
                    summary=summary, cfg=cfg, records=records)


def load_data_dir(path: str | Path) -> DataInfo:
    """Read the dataset directory's label-matching report (`vnca prepare-data --out`)."""
    d = _require_dir(path, "dataset")
    report = artifacts.read_json_object(d / artifacts.MATCH_REPORT)
    pairs = d / artifacts.MATCHED_PAIRS_PNG
    problem = _png_problem(pairs) if pairs.exists() else None
    ok = pairs.exists() and problem is None
    return DataInfo(path=d, match_report=report, matched_pairs=pairs if ok else None,
                    unreadable=problem)


# ---------------------------------------------------------------------------------------------
# Pure helpers: numbers, labels, tables.


def _number(x: Any) -> float | None:
    """A finite float, or None for anything else (missing, bool, string, NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def run_label(variant: str, name: str) -> str:
    return variant if name in ("", variant) else f"{variant} ({name})"


def _variant_rank(variant: str) -> tuple:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER),
            variant)


def diff_percent(ours: float | None, ref: float | None) -> float | None:
    """100 (ours - ref) / |ref|: positive when our bound (a log-likelihood) is higher."""
    if ours is None or ref is None or ref == 0:
        return None
    return 100.0 * (ours - ref) / abs(ref)


def bits_per_dim(nats: float, n_pixels: int = reference.MNIST_PIXELS) -> float:
    """Negative log-likelihood in bits per pixel for a log-likelihood in nats."""
    return -nats / (math.log(2.0) * n_pixels)


def pair_runs(evals: Sequence[EvalRun], trains: Sequence[TrainRun]) -> list:
    """[(label, EvalRun, TrainRun)] in variant order.

    An evaluation is paired with the training run of the same variant and name, or failing
    that with the only training run of its variant. Two directories of one kind for the same
    variant and name are ambiguous and raise `DataError`; an evaluation or a training run left
    without a partner (e.g. a baseline evaluation beside a doubling model) raises `UserError`.
    """
    for runs, what in ((evals, "evaluation"), (trains, "training")):
        seen: dict = {}
        for r in runs:
            key = (r.variant, r.name)
            if key in seen:
                raise DataError(f"two {what} directories for {run_label(*key)}: "
                                f"{seen[key]} and {r.path}")
            seen[key] = r.path
    unused = list(trains)
    pairs = []
    for ev in evals:
        match = [t for t in unused if (t.variant, t.name) == (ev.variant, ev.name)]
        if not match:
            same_variant = [t for t in unused if t.variant == ev.variant]
            match = same_variant if len(same_variant) == 1 else []
        tr = match[0] if match else None
        if tr is not None:
            unused.remove(tr)
        pairs.append((run_label(ev.variant, ev.name), ev, tr))
    alone = [f"evaluation {ev.path} ({label})" for label, ev, tr in pairs if tr is None]
    alone += [f"training run {t.path} ({run_label(t.variant, t.name)})" for t in unused]
    if alone:
        raise UserError(
            f"cannot pair evaluations with training runs: {'; '.join(alone)} "
            f"{'has' if len(alone) == 1 else 'have'} no partner of the same variant; pass each "
            "run's model directory (--train) and its evaluation (--evals)")
    pairs.sort(key=lambda p: (_variant_rank((p[1] or p[2]).variant), p[0]))
    return pairs


RESULT_COLUMNS = [
    "variant", "ours_nats", "ours_stderr_nats", "bits_per_dim", "paper_nats",
    "reproduction_nats", "diff_paper_pct", "diff_reproduction_pct", "untrained_nats",
    "untrained_stderr_nats", "trained_same_images_nats", "untrained_n_images",
    "reconstruction_accuracy", "classifier_accuracy_originals", "prior_top_probability",
    "steps", "wall_time_s", "hardware", "n_devices", "k", "n_images", "tier", "smoke",
]


def _section(ev: EvalRun | None, key: str) -> dict:
    """metrics[key] of an evaluation when it is a dict, else {} (absent in older runs)."""
    value = ev.metrics.get(key) if ev is not None else None
    return value if isinstance(value, dict) else {}


def _int(x: Any) -> int | None:
    x = _number(x)
    return int(x) if x is not None else None


def results_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """One row per run with the raw numbers (None where unknown)."""
    rows = []
    for label, ev, tr in pairs:
        variant = (ev or tr).variant
        iw = _section(ev, "iwelbo")
        untrained = _section(ev, "untrained")
        recon = _section(ev, "reconstruction")
        ours = _number(iw.get("mean_nats"))
        bpd = _number(iw.get("bits_per_dim"))
        if bpd is None and ours is not None:
            bpd = bits_per_dim(ours)
        paper = reference.PAPER_NATS.get(variant)
        repro = reference.REPRODUCTION_NATS.get(variant)
        summary = tr.summary if tr is not None else {}
        hardware = summary.get("hardware")
        tier = smallest_tier(ev.tier if ev else None, tr.tier if tr else None)
        rows.append({
            "variant": label,
            "ours_nats": ours,
            "ours_stderr_nats": _number(iw.get("stderr_nats")),
            "bits_per_dim": bpd,
            "paper_nats": paper,
            "reproduction_nats": repro,
            "diff_paper_pct": diff_percent(ours, paper),
            "diff_reproduction_pct": diff_percent(ours, repro),
            "untrained_nats": _number(untrained.get("mean_nats")),
            "untrained_stderr_nats": _number(untrained.get("stderr_nats")),
            "trained_same_images_nats": _number(untrained.get("trained_same_images_nats")),
            "untrained_n_images": _int(untrained.get("n_images")),
            "reconstruction_accuracy": _number(recon.get("accuracy")),
            "classifier_accuracy_originals": _number(recon.get("classifier_accuracy_originals")),
            "prior_top_probability": _number(
                _section(ev, "prior_samples").get("mean_top_probability")),
            "steps": _int(summary.get("steps")),
            "wall_time_s": _number(summary.get("wall_time_s")),
            "hardware": hardware if isinstance(hardware, str) and hardware else None,
            "n_devices": _int(summary.get("n_devices")),
            "k": _int(iw.get("k")),
            "n_images": _int(iw.get("n_images")),
            "tier": tier,
            "smoke": tier == "smoke",
        })
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype(object)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds) // 60
    if minutes < 60:
        return f"{minutes} min {round(seconds) % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _fmt(x: float | None, spec: str, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    if spec.endswith("d"):  # pandas holds an integer column with a gap as floats
        x = int(x)
    return format(x, ("+" if signed else "") + spec)


def _mean_se(mean: float | None, se: float | None, spec: str = ".2f") -> str:
    if mean is None:
        return MISSING
    return format(mean, spec) + (f" ± {format(se, spec)}" if se is not None else "")


def _pct(share: float | None) -> str:
    return MISSING if share is None else f"{100 * share:.1f} %"


def format_results(df: pd.DataFrame) -> pd.DataFrame:
    """The results table as shown: strings, one column per reported quantity (how each run
    was made is in `format_run_details`)."""
    out = []
    for r in df.to_dict("records"):
        untrained = _mean_se(r["untrained_nats"], r["untrained_stderr_nats"])
        trained_same = MISSING
        if r["trained_same_images_nats"] is not None:
            trained_same = f"{r['trained_same_images_nats']:.2f}"
            if r["untrained_n_images"] is not None:
                trained_same += f" ({r['untrained_n_images']:,} images)"
        recon = _pct(r["reconstruction_accuracy"])
        if recon != MISSING and r["classifier_accuracy_originals"] is not None:
            recon += f" (classifier {_pct(r['classifier_accuracy_originals'])})"
        out.append({
            "variant": r["variant"],
            "run": TIER_LABELS.get(r["tier"], "full"),
            "ours (nats, mean ± se)": _mean_se(r["ours_nats"], r["ours_stderr_nats"]),
            "bits/dim": _fmt(r["bits_per_dim"], ".4f"),
            "paper (nats)": _fmt(r["paper_nats"], ".2f"),
            "reproduction (nats)": _fmt(r["reproduction_nats"], ".2f"),
            "diff vs paper %": _fmt(r["diff_paper_pct"], ".2f", signed=True),
            "diff vs reproduction %": _fmt(r["diff_reproduction_pct"], ".2f", signed=True),
            "untrained model (nats)": untrained,
            "trained, same images (nats)": trained_same,
            "reconstructions recognised": recon,
            "prior samples: mean top-class probability": _fmt(r["prior_top_probability"], ".3f"),
        })
    return pd.DataFrame(out)


def format_run_details(df: pd.DataFrame) -> pd.DataFrame:
    """How each result was made: training steps, wall time, hardware, K and test images."""
    out = []
    for r in df.to_dict("records"):
        hw, n_dev = r["hardware"], _int(r["n_devices"])  # NaN where another row has a value
        hardware = hw if isinstance(hw, str) and hw else MISSING
        if n_dev is not None and hardware != MISSING:
            hardware += f" ({n_dev} device{'s' if n_dev != 1 else ''})"
        out.append({
            "variant": r["variant"],
            "training steps": _fmt(r["steps"], ","),
            "training wall time": format_duration(r["wall_time_s"]),
            "hardware": hardware,
            "K (importance samples)": _fmt(r["k"], "d"),
            "test images": _fmt(r["n_images"], ","),
        })
    return pd.DataFrame(out)


def classifier_text(pairs: Sequence[tuple]) -> str | None:
    """One sentence on the digit classifier the evaluations used (None if none says)."""
    seen: dict = {}
    for label, ev, _ in pairs:
        c = _section(ev, "classifier")
        if not c:
            continue
        kind = c.get("kind") if isinstance(c.get("kind"), str) else "classifier"
        n, acc = _int(c.get("n_train")), _number(c.get("test_accuracy"))
        text = (f"{kind}, fit on {_fmt(n, ',')} training images, {_pct(acc)} accurate on the "
                "test images")
        seen.setdefault(text, []).append(label)
    if not seen:
        return None
    if len(seen) == 1:
        return f"Digit classifier: {next(iter(seen))}."
    return "Digit classifiers: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in seen.items()) + "."


def prior_labels_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """Per evaluated run: how many prior samples the digit classifier puts in each class."""
    rows = []
    for label, ev, _ in pairs:
        prior = _section(ev, "prior_samples")
        hist = prior.get("label_histogram")
        counts = [_int(c) for c in hist] if isinstance(hist, list) and len(hist) == 10 else None
        if not prior or counts is None or None in counts:
            continue
        row = {"variant": label, "samples": _fmt(_int(prior.get("n_images")), ","),
               "mean top-class probability": _fmt(_number(prior.get("mean_top_probability")),
                                                  ".3f")}
        total = sum(counts)
        row.update({f"{d}": f"{c:,}" for d, c in enumerate(counts)})
        row["most common"] = (f"{int(np.argmax(counts))} ({100 * max(counts) / total:.0f} %)"
                              if total else MISSING)
        rows.append(row)
    return pd.DataFrame(rows)


def recovered_text(damage: dict) -> str:
    """The recovered share of the damage, or why there is none to show."""
    if damage.get("meaningful") is False:
        return "not meaningful (damage did not lower the score)"
    fraction = _number(damage.get("recovered_fraction"))
    if damage.get("meaningful") is not True or fraction is None:
        return MISSING
    return f"{100 * fraction:.1f} %"


def damage_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """Damage recovery per evaluated run that has it: mean log-likelihoods (± standard error)
    and the recovered share of the damage."""
    rows = []
    for label, ev, _ in pairs:
        damage = _section(ev, "damage")
        if not damage:
            continue
        row: dict = {"variant": label}
        for key, title in (("before", "before damage"), ("after_damage", "just after damage"),
                           ("after_recovery", "after recovery"),
                           ("undamaged_final", "undamaged, same step")):
            row[f"{title} (nats)"] = _mean_se(_number(damage.get(key)),
                                              _number(damage.get(f"{key}_stderr")))
        row["recovered share of the damage"] = recovered_text(damage)
        at, steps = _int(damage.get("damage_at")), _int(damage.get("recovery_steps"))
        row["damage at step / recovery steps"] = f"{_fmt(at, 'd')} / {_fmt(steps, 'd')}"
        row["images"] = _fmt(_int(damage.get("n_images")), ",")
        rows.append(row)
    return pd.DataFrame(rows)


_KNN_KEY = re.compile(r"^knn(\d+)_accuracy_(latent|tsne)$")


def latent_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """Linear probe on cell states and label accuracy of the latent space per evaluated run
    (columns present in at least one run)."""
    rows = []
    for label, ev, _ in pairs:
        probe, tsne = _section(ev, "probe"), _section(ev, "tsne")
        if not probe and not tsne:
            continue
        row: dict = {"variant": label}
        if probe:
            acc = _number(probe.get("accuracy"))
            row["probe accuracy %"] = _fmt(None if acc is None else 100 * acc, ".2f")
            row["probe train / test images"] = (
                f"{_fmt(_int(probe.get('n_train_images')), ',')} / "
                f"{_fmt(_int(probe.get('n_test_images')), ',')}")
        if tsne:
            row["t-SNE images"] = _fmt(_int(tsne.get("n_images")), ",")
            for key, value in tsne.items():
                m = _KNN_KEY.match(key)
                if m and (v := _number(value)) is not None:
                    where = "encoder means" if m.group(2) == "latent" else "t-SNE"
                    row[f"{m.group(1)}-NN label accuracy, {where} %"] = f"{100 * v:.1f}"
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # The probe's columns first, whichever run comes first in the table.
    cols = ["variant"] + sorted(df.columns[1:], key=lambda c: not c.startswith("probe"))
    return df[cols].fillna(MISSING)


def config_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """The settings that distinguish the runs, one column per training run."""
    cols = {}
    for label, _, tr in pairs:
        if tr is None:
            continue
        c = tr.cfg
        cols[label] = {
            "config name": c.name,
            "tier": c.tier,
            "train steps (config)": f"{c.train.steps:,}",
            "batch size": str(c.train.batch_size),
            "learning rate": f"{c.train.learning_rate:g}",
            "beta": f"{c.train.beta:g}",
            "clip norm / order": f"{c.train.clip_norm:g} / {c.train.clip_order}",
            "z dim": str(c.model.z_dim),
            "NCA hidden": str(c.model.nca_hidden),
            "pad to": str(c.data.pad_to),
            "update probability": f"{c.model.update_prob:g}",
            "pool": (f"{c.train.pool.size} states" if c.train.pool.enabled else "off"),
            "parameters": _fmt(_number(tr.summary.get("param_count")), ",.0f"),
            "directory": str(tr.path),
        }
    if not cols:
        return pd.DataFrame()
    df = pd.DataFrame(cols)
    df.index.name = "setting"
    return df.reset_index()


def curves_frame(trains: Iterable[tuple]) -> pd.DataFrame:
    """Long frame (run, step, metric, value) of the training records with step > 0 (the step
    axis is logarithmic); validation records give the `val_elbo` metric."""
    rows = []
    for label, tr in trains:
        for rec in tr.records:
            step = _number(rec.get("step"))
            if step is None or step <= 0:
                continue
            if rec.get("split") == "valid":
                v = _number(rec.get("val_elbo"))
                if v is not None:
                    rows.append((label, step, "val_elbo", v))
                continue
            for key, _ in CURVE_METRICS:
                v = _number(rec.get(key))
                if v is not None:
                    rows.append((label, step, key, v))
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])


def _scalar_text(v: Any) -> str | None:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, str):
        return v
    return None


def _compact(v: Any, limit: int = 24) -> str | None:
    """One-line text for a scalar, a short list of scalars or a flat dict of scalars."""
    s = _scalar_text(v)
    if s is not None or v is None:
        return s
    if isinstance(v, list) and 0 < len(v) <= limit:
        parts = [_scalar_text(x) for x in v]
        return None if None in parts else ", ".join(parts)
    if isinstance(v, dict) and 0 < len(v) <= limit:
        parts = [(k, _scalar_text(x)) for k, x in v.items()]
        if any(p is None for _, p in parts):
            return None
        return ", ".join(f"{k}: {p}" for k, p in parts)
    return None


def match_splits(report: dict) -> dict:
    """{split: dict of fields} from a match report, whether the splits sit at the top level
    or under a `splits` key."""
    root = report.get("splits") if isinstance(report.get("splits"), dict) else report
    known = [s for s in artifacts.SPLITS if isinstance(root.get(s), dict)]
    if known:
        return {s: root[s] for s in known}
    # Splits under other names (e.g. a jointly matched "train_valid" group): every section.
    return {k: v for k, v in root.items() if isinstance(v, dict)}


def match_table(report: dict) -> pd.DataFrame:
    """Rows: every field that reads as one line in at least one split; columns: splits."""
    splits = match_splits(report)
    fields: dict = {}
    for split, data in splits.items():
        for key, value in data.items():
            text = _compact(value)
            if text is None and isinstance(value, dict):  # one level down (e.g. percentiles)
                for sub, v in value.items():
                    t = _compact(v)
                    if t is not None:
                        fields.setdefault(f"{key}.{sub}", {})[split] = t
                continue
            if text is not None:
                fields.setdefault(key, {})[split] = text
    if not fields:
        return pd.DataFrame()
    df = pd.DataFrame.from_dict(fields, orient="index", columns=list(splits)).fillna(MISSING)
    df.index.name = "field"
    return df.reset_index()


def match_top_level(report: dict) -> list:
    """(key, text) for scalar fields outside the splits (source, summary, ...)."""
    splits = set(match_splits(report))
    out = []
    for k, v in report.items():
        if k in splits or k == "splits":
            continue
        t = _compact(v)
        if t is not None:
            out.append((k, t))
    return out


_COUNT_KEYS = ("counts", "count", "hist", "histogram")
_EDGE_KEYS = ("edges", "bin_edges", "bins")


def _histogram(d: Any) -> tuple | None:
    if not isinstance(d, dict):
        return None
    counts = next((d[k] for k in _COUNT_KEYS if isinstance(d.get(k), list)), None)
    edges = next((d[k] for k in _EDGE_KEYS if isinstance(d.get(k), list)), None)
    if counts is None or edges is None or len(edges) != len(counts) + 1 or not counts:
        return None
    try:
        c = np.asarray(counts, dtype=float)
        e = np.asarray(edges, dtype=float)
    except (TypeError, ValueError):
        return None
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(e)) and np.all(np.diff(e) > 0)):
        return None
    return c, e


def match_histograms(report: dict) -> dict:
    """{field: {split: (counts, edges)}} for every histogram found in the splits (a field that
    is itself a histogram, or has one under `histogram`/`hist`)."""
    out: dict = {}
    for split, data in match_splits(report).items():
        for key, value in data.items():
            h = _histogram(value)
            if h is None and isinstance(value, dict):
                h = next((_histogram(value[k]) for k in ("histogram", "hist")
                          if _histogram(value.get(k)) is not None), None)
            if h is not None:
                out.setdefault(key, {})[split] = h
    return out


_PERCENTILE_KEY = re.compile(r"^p(\d+(?:\.\d+)?)$")


def _percentiles(d: Any) -> tuple | None:
    """(percent levels, values) from keys like p1, p50, p99.9 (at least three finite ones)."""
    if not isinstance(d, dict):
        return None
    pairs = sorted((float(m.group(1)), v) for k, x in d.items()
                   if (m := _PERCENTILE_KEY.match(str(k))) and (v := _number(x)) is not None)
    if len(pairs) < 3 or not all(0 < q < 100 for q, _ in pairs):
        return None
    return np.array([q for q, _ in pairs]), np.array([v for _, v in pairs])


def match_percentiles(report: dict) -> dict:
    """{field: {split: (levels, values)}} for every percentile summary in the splits (a field
    that holds p-keys itself, or under `percentiles`)."""
    out: dict = {}
    for split, data in match_splits(report).items():
        for key, value in data.items():
            q = _percentiles(value)
            if q is None and isinstance(value, dict):
                q = _percentiles(value.get("percentiles"))
            if q is not None:
                out.setdefault(key, {})[split] = q
    return out


# ---------------------------------------------------------------------------------------------
# Figures (Agg canvas, PNG bytes).


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
        ax.set_title(title)
        ax.set_xlabel("training step (log)")
        ax.set_ylabel("")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=palette[r], linewidth=2) for r in runs]
    fig.legend(handles, runs, loc="outside upper center", ncols=len(runs), frameon=False)
    return _png(fig)


def _tsne_arrays(ev: EvalRun) -> tuple | None:
    xy, labels = ev.arrays.get("tsne_xy"), ev.arrays.get("tsne_labels")
    if xy is None or labels is None or xy.ndim != 2 or xy.shape[1] != 2:
        return None
    if labels.ndim != 1 or labels.shape[0] != xy.shape[0] or xy.shape[0] == 0:
        return None
    return xy.astype(float), labels


@_legible
def plot_tsne_panels(runs: Sequence[tuple]) -> bytes | None:
    """One t-SNE panel per run (at most three a row), coloured by matched label."""
    data = [(label, a) for label, ev in runs if (a := _tsne_arrays(ev)) is not None]
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
def plot_match_distributions(hists: dict, percentiles: dict | None = None) -> bytes | None:
    """One panel per histogram (counts over nats) and per percentile summary (nats against
    percentile, log axes where the values allow), splits as lines."""
    percentiles = percentiles or {}
    if not hists and not percentiles:
        return None
    fields = [("hist", f) for f in hists] + [("pct", f) for f in percentiles]
    ncols = min(len(fields), 3)
    nrows = -(-len(fields) // ncols)
    fig = Figure(figsize=(min(MAX_FIGURE_IN, 4.4 * ncols), 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(fields):]:
        ax.set_visible(False)
    splits = list(dict.fromkeys([s for d in (*hists.values(), *percentiles.values())
                                 for s in d]))
    colors = dict(zip(splits, sns.color_palette("colorblind", len(splits))))
    for ax, (kind, field) in zip(axes, fields):
        ax.grid(alpha=0.3)
        if kind == "pct":
            frame = pd.DataFrame([(split, q, v) for split, (qs, vs) in percentiles[field].items()
                                  for q, v in zip(qs, vs)],
                                 columns=["split", "percentile", "nats"])
            sns.lineplot(data=frame, x="percentile", y="nats", hue="split", palette=colors,
                         marker="o", markersize=5, estimator=None, ax=ax)
            ax.set_xscale("log")
            if (frame["nats"] > 0).all():
                ax.set_yscale("log")
            ax.set_title(f"{field.replace('_', ' ')} (percentiles)")
            ax.legend(frameon=False)
            continue
        log_x = False
        for split, (counts, edges) in hists[field].items():
            ax.stairs(counts, edges, label=split, color=colors.get(split), linewidth=1.6)
            log_x = log_x or (edges[0] > 0 and edges[-1] / edges[0] > 100)
        if log_x and all(e[0] > 0 for _, e in hists[field].values()):
            ax.set_xscale("log")
        ax.set_title(f"{field.replace('_', ' ')} (histogram)")
        ax.set_xlabel("nats")
        ax.set_ylabel("images")
        ax.legend(frameon=False)
    return _png(fig)


def match_caption(hists: dict, percentiles: dict) -> str:
    """Says which kinds of panel the match-distribution figure holds."""
    kinds = [k for k, present in (("histograms", hists), ("percentiles", percentiles))
             if present]
    return "Match margins: " + (" and ".join(kinds) or "none") + " per split"


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Document model, rendered to HTML and Markdown.


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclasses.dataclass
class Para:
    text: str
    banner: str = ""  # a tier ("smoke", "demo", "cpu"): the text is that tier's banner


@dataclasses.dataclass
class Table:
    frame: pd.DataFrame
    table_id: str
    numeric: bool = False  # right-align the cells after the first column


@dataclasses.dataclass
class Fig:
    title: str
    png: bytes | None  # None: not produced
    md_path: str  # relative to OUT, used when png is not None
    caption: str = ""
    missing: str = "not produced"


@dataclasses.dataclass
class Figures:
    figs: list
    fig_id: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


# Evaluation figures the report re-plots for every run at once from arrays.npz:
# file -> (plot function, arrays reader, figure id, title). A run the re-plot covers does not
# show its own PNG of that figure (each thing is shown once).
REPLOTS = {
    "tsne.png": (plot_tsne_panels, _tsne_arrays, "tsne-panels",
                 "t-SNE of encoder means, one panel per run, coloured by matched label"),
    "damage_curve.png": (plot_recovery_curves, damage_curves, "recovery-curves",
                         ("Log-likelihood over NCA steps: undamaged run (solid) and the "
                          "damaged run branching off it (dashed)")),
}


def _figure_rows(pairs: Sequence[tuple]) -> list:
    """Blocks for every evaluation figure: one heading per figure kind, then either the report's
    re-plot of all runs or the runs' own PNGs side by side (each at its own size)."""
    runs = [(label, ev) for label, ev, _ in pairs if ev is not None]
    blocks: list = []
    for fname, caption in artifacts.EVAL_FIGURES.items():
        stem = fname.removesuffix(".png")
        blocks.append(Heading(caption, 3, anchor=f"fig-{stem}"))
        covered: set = set()
        if fname in REPLOTS:
            plot, reader, fig_id, title = REPLOTS[fname]
            png = plot(runs)
            if png is not None:
                covered = {label for label, ev in runs if reader(ev) is not None}
                blocks.append(Figures([Fig(title, png, f"figures/{fig_id}.png")], fig_id))
        figs = []
        for label, ev in runs:
            if label in covered:
                continue
            path = ev.figures.get(fname)
            if path is not None:
                figs.append(Fig(label, path.read_bytes(),
                                f"figures/{_slug(label)}/{fname}"))
            else:
                why = "not produced"
                if fname in ev.unreadable:
                    why = f"not produced ({fname}: {ev.unreadable[fname]})"
                elif ev.variant == "baseline" and fname in NCA_ONLY_FIGURES:
                    why = "not produced (no NCA in the baseline)"
                elif ev.variant == "doubling" and fname in NONDOUBLING_ONLY_FIGURES:
                    why = "not produced (evaluated for the non-doubling model only)"
                figs.append(Fig(label, None, "", missing=why))
        if figs:
            blocks.append(Figures(figs, f"fig-{stem}-runs"))
    return blocks


def tier_banners(pairs: Sequence[tuple]) -> list:
    """[(tier, text)] for every tier below the paper's among the runs, smallest first."""
    by_tier: dict = {}
    for label, ev, tr in pairs:
        tier = smallest_tier(ev.tier if ev else None, tr.tier if tr else None)
        if tier in TIER_BANNERS:
            steps = _int(tr.summary.get("steps")) if tr is not None else None
            by_tier.setdefault(tier, []).append(
                label + (f" ({steps:,} steps)" if steps is not None else ""))
    return [(t, TIER_BANNERS[t].format(runs=", ".join(by_tier[t])))
            for t in TIERS if t in by_tier]


def _quality_text(pairs: Sequence[tuple]) -> str:
    text = ("Do the models make digits? An independent digit classifier (not part of any model) "
            "labels each test reconstruction (its Bernoulli means): 'reconstructions "
            "recognised' is the share it labels as the test image's digit, beside the "
            "classifier's own accuracy on those original images (the ceiling); "
            f"{100 * RECONSTRUCTION_BAR:.0f} % or more is the bar. 'prior samples: mean "
            "top-class probability' is how sure the classifier is, on average, about samples "
            "decoded from the prior (near 1: they look like digits; 0.1: noise). 'untrained "
            "model' is the same bound at the initial parameters, beside the trained model's "
            "on the same test images.")
    clf = classifier_text(pairs)
    return text + (" " + clf if clf else "")


def report_blocks(pairs: Sequence[tuple], data: DataInfo) -> list:
    blocks: list = [Heading("Variational Neural Cellular Automata: reproduction report", 1)]
    for tier, text in tier_banners(pairs):
        blocks.append(Para(text, banner=tier))
    blocks.append(Para(
        "Importance-weighted bound on the log-likelihood of the binarized MNIST test set "
        "(nats per image, higher is better; bits/dim per real 28x28 pixel, lower is better), "
        "next to the paper's (Palm et al., ICLR 2022) and the reproduction's (Aillet & "
        "Sondén, ReScience C 2023) numbers at K = 128. diff % = 100 (ours - reference) / "
        "|reference|: positive means our bound is higher. The paper reports no number for "
        "the baseline."))
    blocks.append(Heading("Results", 2, anchor="results-section"))
    results = results_frame(pairs)
    blocks.append(Table(format_results(results), "results", numeric=True))
    blocks.append(Para(_quality_text(pairs)))
    labels = prior_labels_frame(pairs)
    if not labels.empty:
        blocks.append(Heading("Prior samples: the classifier's label for each sample", 3,
                              anchor="prior-labels-section"))
        blocks.append(Table(labels, "prior-labels", numeric=True))
    blocks.append(Heading("How each run was made", 3, anchor="run-details-section"))
    blocks.append(Table(format_run_details(results), "run-details", numeric=True))

    damage = damage_frame(pairs)
    if not damage.empty:
        blocks.append(Heading("Damage recovery", 2, anchor="damage-section"))
        blocks.append(Para(
            "Mean log-likelihood (nats ± one standard error) of the test reconstructions at "
            "the damage step, just after the damage, and after the recovery steps, beside the "
            "same run without damage at that last step. Recovered share = (after recovery - "
            "just after damage) / (undamaged - just after damage); not meaningful when the "
            "damage did not lower the score below the undamaged run's."))
        blocks.append(Table(damage, "damage", numeric=True))
    latent = latent_frame(pairs)
    if not latent.empty:
        blocks.append(Heading("Linear probe and latent space", 2, anchor="latent-section"))
        blocks.append(Table(latent, "latent", numeric=True))

    trains = [(label, tr) for label, _, tr in pairs if tr is not None]
    blocks.append(Heading("Training curves", 2, anchor="training-curves"))
    blocks.append(Figures([Fig("Training loss, KL and reconstruction term (log step axis)",
                               plot_training_curves(curves_frame(trains)),
                               "figures/training_curves.png",
                               missing="not produced (no training records with step > 0)")],
                          "training-curves-fig"))

    blocks.append(Heading("Evaluation figures", 2, anchor="figures"))
    blocks += _figure_rows(pairs)

    blocks.append(Heading("Dataset: label matching", 2, anchor="label-matching"))
    blocks.append(Para(f"From {data.path}: each binarized test/train image matched to its "
                       "MNIST source image by Bernoulli log-likelihood. The raw statistics "
                       "per split are at the end of the report."))
    top = match_top_level(data.match_report)
    if top:
        blocks.append(Table(pd.DataFrame(top, columns=["field", "value"]), "match-summary"))
    hists = match_histograms(data.match_report)
    pcts = match_percentiles(data.match_report)
    pairs_png = data.matched_pairs.read_bytes() if data.matched_pairs is not None else None
    pairs_missing = "not produced" + (f" ({data.unreadable})" if data.unreadable else "")
    blocks.append(Figures([Fig(
        match_caption(hists, pcts), plot_match_distributions(hists, pcts),
        "figures/match_margins.png",
        missing="not produced (no histogram or percentiles in the match report)")],
        "match-distributions"))
    blocks.append(Figures([Fig(
        "Matched pairs (binarized image and its MNIST source)", pairs_png,
        "figures/matched_pairs.png", missing=pairs_missing)], "match-pairs"))

    if trains:
        blocks.append(Heading("Configurations", 2, anchor="configs-section"))
        blocks.append(Table(config_frame(pairs), "configs"))
    sources = [(label, str(ev.path) if ev else MISSING, str(tr.path) if tr else MISSING)
               for label, ev, tr in pairs]
    blocks.append(Heading("Inputs", 2, anchor="inputs"))
    blocks.append(Table(pd.DataFrame(sources, columns=["variant", "evaluation", "training"]),
                        "inputs-table"))

    blocks.append(Heading("Raw statistics: label matching per split", 2,
                          anchor="match-report-section"))
    table = match_table(data.match_report)
    if not table.empty:
        blocks.append(Table(table, "match-report"))
    else:
        blocks.append(Para("The match report has no per-split fields."))
    return blocks


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;
 padding:0 16px;color:#1b1b1b;line-height:1.45;box-sizing:border-box}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
table.num td:not(:first-child),table.num th:not(:first-child){text-align:right}
table.num td{white-space:nowrap}
.banner{background:#fff3cd;border:2px solid #d39e00;color:#5c4400;padding:12px 16px;
 font-weight:600;font-size:1.1em;border-radius:4px;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:16px 24px;align-items:flex-start;margin:8px 0}
figure{margin:0;flex:0 1 auto;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figure img.small{image-rendering:pixelated;width:min(100%,360px)}
figcaption{font-size:0.95em;color:#333;margin-top:4px;font-weight:600}
.missing{color:#888;font-style:italic;border:1px dashed #ccc;padding:12px 8px;text-align:center;
 width:240px}
"""


def render_html(blocks: Sequence) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>VNCA report</title>", f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            if b.banner:
                out.append(f'<div id="{html.escape(b.banner)}-banner" class="banner" '
                           f'role="alert">{html.escape(b.text)}</div>')
            else:
                out.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Table):
            out.append(b.frame.to_html(index=False, table_id=b.table_id, escape=True,
                                       border=0, na_rep=MISSING,
                                       classes="num" if b.numeric else None))
        elif isinstance(b, Figures):
            fid = f' id="{html.escape(b.fig_id)}"' if b.fig_id else ""
            out.append(f'<div class="row"{fid}>')
            for f in b.figs:
                title = html.escape(f.title)
                if f.png is not None:
                    data = base64.b64encode(f.png).decode("ascii")
                    w, h = png_dims(f.png)
                    # Small images (raw digit grids) are scaled up without smoothing.
                    small = ' class="small"' if w < SMALL_IMAGE_PX else ""
                    out.append(f'<figure><img{small} src="data:image/png;base64,{data}" '
                               f'width="{w}" height="{h}" alt="{title}">'
                               f"<figcaption>{title}</figcaption></figure>")
                else:
                    out.append(f'<figure><div class="missing">{html.escape(f.missing)}</div>'
                               f"<figcaption>{title}</figcaption></figure>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |",
             "|" + "|".join(["---"] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def render_markdown(blocks: Sequence) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(f"> **{b.text}**" if b.banner else b.text)
        elif isinstance(b, Table):
            out.append(markdown_table(b.frame))
        elif isinstance(b, Figures):
            for f in b.figs:
                if f.png is not None:
                    out.append(f"**{f.title}**\n\n![{f.title}]({f.md_path})")
                else:
                    out.append(f"**{f.title}**: *{f.missing}*")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point (I/O on the output side).


def _temp_name(path: Path) -> Path:
    """A fresh hidden sibling of `path`. Files and folders are then created with plain
    open/mkdir, so they get the umask's modes like every other artifact (mkstemp and mkdtemp
    would make them 0600 and 0700)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(blocks: Sequence, out_dir: str | Path) -> Path:
    """Write `figures/`, `report.md` and, last, `report.html`; returns the HTML's path."""
    out = artifacts.make_out_dir(out_dir)
    final = out / "figures"
    staging = _temp_name(final)
    try:
        staging.mkdir()
        for b in blocks:
            if isinstance(b, Figures):
                for f in b.figs:
                    if f.png is not None:
                        p = staging / Path(f.md_path).relative_to("figures")
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_bytes(f.png)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_atomic(out / artifacts.REPORT_MD, render_markdown(blocks).encode("utf-8"))
    html_path = out / artifacts.REPORT_HTML
    _write_atomic(html_path, render_html(blocks).encode("utf-8"))
    return html_path


def build_report(eval_dirs: Sequence[str | Path], train_dirs: Sequence[str | Path],
                 data_dir: str | Path, out_dir: str | Path) -> Path:
    """Read every evaluation and training directory and the dataset directory; write
    `OUT/report.html` (self-contained) and `OUT/report.md` (+ `OUT/figures/`). Returns the path
    of `report.html`."""
    if not eval_dirs:
        raise UserError("no evaluation directories given (--evals)")
    artifacts.check_out_dir(out_dir)  # before the reading and plotting
    evals = [load_eval_dir(d) for d in eval_dirs]
    trains = [load_train_dir(d) for d in train_dirs]
    data = load_data_dir(data_dir)
    pairs = pair_runs(evals, trains)
    return write_report(report_blocks(pairs, data), out_dir)
