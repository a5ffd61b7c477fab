"""The pipeline's last step: one report over every trained and evaluated variant.

`build_report(eval_dirs, train_dirs, data_dir, out_dir)` reads the artifacts of the other steps
(file names from `vnca.artifacts`) and writes

* `OUT/report.html`: self-contained (every image is a base64 data URI, the style is inline), so
  it opens from a file with no server and Vertex AI can show it as an HTML artifact;
* `OUT/report.md` with the same content, its images copied to `OUT/figures/`.

Contents: the results table (our importance-weighted bound against the paper's and the
reproduction's, `vnca.reference`), training curves of all variants, every figure the
evaluation step produced (side by side across variants), evaluation scalars (damage recovery,
linear probe), the configurations, and the label-matching report of the dataset. A smoke run
gets a banner, so nobody mistakes a 20-step number for the paper's.

Which variant a directory holds is read from its files (`variant` in `summary.json` /
`metrics.json`), never from the order of the arguments. A missing directory or required file
raises `DataError` with one line naming the path; a missing optional figure shows "not produced".

Layout: loaders (`load_eval_dir`, `load_train_dir`, `load_data_dir`) do the I/O; pure functions
turn their contents into tables (`results_frame`, `format_results`, ...) and PNG bytes; a small
document model (`Table`, `Figures`, ...) is rendered twice, to HTML and to Markdown. Figures use
matplotlib's Agg canvas directly (no pyplot state). This module imports no JAX.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vnca import artifacts, reference
from vnca import config as vconfig
from vnca.errors import DataError, UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VARIANT_ORDER = ("baseline", "doubling", "nondoubling")
# Figures that only an NCA decoder has; for the baseline their absence is expected.
NCA_ONLY_FIGURES = ("growth.png", "damage_recovery.png", "damage_curve.png", "probe.png")
MISSING = "—"
CURVE_METRICS = (("loss", "loss (nats)"), ("kl", "KL (nats)"),
                 ("recon", "reconstruction (nats)"))
DPI = 100
SMALL_IMAGE_PX = 360  # narrower PNGs are shown scaled up to this width, unsmoothed

# ---------------------------------------------------------------------------------------------
# Loading (the only I/O on the input side).


@dataclasses.dataclass(frozen=True)
class EvalRun:
    path: Path
    variant: str
    name: str
    smoke: bool
    metrics: dict
    figures: dict  # file name -> Path of a readable PNG
    unreadable: dict  # file name -> why the file there could not be used
    arrays: dict  # name -> np.ndarray (empty when arrays.npz is absent or unreadable)


@dataclasses.dataclass(frozen=True)
class TrainRun:
    path: Path
    variant: str
    name: str
    smoke: bool
    summary: dict
    cfg: vconfig.Config
    records: list  # dicts from metrics.jsonl, in file order


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


def _read_json(path: Path) -> Any:
    _require_file(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None


def _read_json_object(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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


def _str_key(d: dict, key: str, path: Path) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: missing or empty '{key}'")
    return value


def load_eval_dir(path: str | Path) -> EvalRun:
    """Read one evaluation directory (`vnca evaluate --out`)."""
    d = _require_dir(path, "evaluation")
    metrics_path = d / artifacts.EVAL_METRICS
    metrics = _read_json_object(metrics_path)
    variant = _str_key(metrics, "variant", metrics_path)
    name = metrics.get("name") if isinstance(metrics.get("name"), str) else variant
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
            with np.load(arrays_path, allow_pickle=False) as npz:
                arrays = {k: np.asarray(npz[k]) for k in npz.files}
        except (OSError, ValueError, EOFError) as e:  # corrupt: re-plots fall back to the PNGs
            unreadable[artifacts.EVAL_ARRAYS] = f"unreadable ({e.__class__.__name__})"
    return EvalRun(path=d, variant=variant, name=name or variant,
                   smoke=bool(metrics.get("smoke", False)), metrics=metrics,
                   figures=figures, unreadable=unreadable, arrays=arrays)


def read_jsonl(path: Path) -> list:
    """JSON objects, one a line. A broken *last* line (a run interrupted mid-write) is dropped;
    a broken line elsewhere is a `DataError`."""
    _require_file(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not valid JSON") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def load_train_dir(path: str | Path) -> TrainRun:
    """Read one training directory (`vnca train --out`); checkpoints and params are not read."""
    d = _require_dir(path, "training")
    cfg_path = _require_file(d / artifacts.RESOLVED_CONFIG)
    try:
        cfg = vconfig.loads(cfg_path.read_text(), source=str(cfg_path))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read ({e.__class__.__name__})") from None
    summary_path = d / artifacts.TRAIN_SUMMARY
    summary = _read_json_object(summary_path)
    variant = summary.get("variant") if isinstance(summary.get("variant"), str) else None
    variant = variant or cfg.model.variant
    name = summary.get("name") if isinstance(summary.get("name"), str) else None
    records = read_jsonl(d / artifacts.TRAIN_METRICS)
    smoke = bool(summary.get("smoke", False)) or bool(cfg.smoke)
    return TrainRun(path=d, variant=variant, name=name or cfg.name or variant, smoke=smoke,
                    summary=summary, cfg=cfg, records=records)


def load_data_dir(path: str | Path) -> DataInfo:
    """Read the dataset directory's label-matching report (`vnca prepare-data --out`)."""
    d = _require_dir(path, "dataset")
    report = _read_json_object(d / artifacts.MATCH_REPORT)
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
    """[(label, EvalRun | None, TrainRun | None)] in variant order.

    An evaluation is paired with the training run of the same variant and name, or failing
    that with the only training run of its variant. Two directories of one kind for the same
    variant and name are ambiguous and raise `DataError`.
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
    pairs += [(run_label(t.variant, t.name), None, t) for t in unused]
    pairs.sort(key=lambda p: (_variant_rank((p[1] or p[2]).variant), p[0]))
    return pairs


RESULT_COLUMNS = [
    "variant", "ours_nats", "ours_stderr_nats", "bits_per_dim", "paper_nats",
    "reproduction_nats", "diff_paper_pct", "diff_reproduction_pct", "steps", "wall_time_s",
    "hardware", "n_devices", "k", "n_images", "smoke",
]


def results_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """One row per run with the raw numbers (None where unknown)."""
    rows = []
    for label, ev, tr in pairs:
        variant = (ev or tr).variant
        iw = ev.metrics.get("iwelbo") if ev is not None else None
        iw = iw if isinstance(iw, dict) else {}
        ours = _number(iw.get("mean_nats"))
        bpd = _number(iw.get("bits_per_dim"))
        if bpd is None and ours is not None:
            bpd = bits_per_dim(ours)
        paper = reference.PAPER_NATS.get(variant)
        repro = reference.REPRODUCTION_NATS.get(variant)
        summary = tr.summary if tr is not None else {}
        steps = _number(summary.get("steps"))
        n_dev = _number(summary.get("n_devices"))
        k = _number(iw.get("k"))
        n_images = _number(iw.get("n_images"))
        hardware = summary.get("hardware")
        rows.append({
            "variant": label,
            "ours_nats": ours,
            "ours_stderr_nats": _number(iw.get("stderr_nats")),
            "bits_per_dim": bpd,
            "paper_nats": paper,
            "reproduction_nats": repro,
            "diff_paper_pct": diff_percent(ours, paper),
            "diff_reproduction_pct": diff_percent(ours, repro),
            "steps": int(steps) if steps is not None else None,
            "wall_time_s": _number(summary.get("wall_time_s")),
            "hardware": hardware if isinstance(hardware, str) and hardware else None,
            "n_devices": int(n_dev) if n_dev is not None else None,
            "k": int(k) if k is not None else None,
            "n_images": int(n_images) if n_images is not None else None,
            "smoke": bool((ev is not None and ev.smoke) or (tr is not None and tr.smoke)),
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
    return format(x, ("+" if signed else "") + spec)


def format_results(df: pd.DataFrame) -> pd.DataFrame:
    """The results table as shown: strings, one column per reported quantity."""
    out = []
    for r in df.to_dict("records"):
        ours = MISSING
        if r["ours_nats"] is not None:
            ours = f"{r['ours_nats']:.2f}"
            if r["ours_stderr_nats"] is not None:
                ours += f" ± {r['ours_stderr_nats']:.2f}"
        hardware = r["hardware"] or MISSING
        if r["n_devices"] is not None and r["hardware"]:
            hardware += f" ({r['n_devices']} device{'s' if r['n_devices'] != 1 else ''})"
        out.append({
            "variant": r["variant"],
            "run": "SMOKE" if r["smoke"] else "full",
            "ours (nats, mean ± se)": ours,
            "bits/dim": _fmt(r["bits_per_dim"], ".4f"),
            "paper (nats)": _fmt(r["paper_nats"], ".2f"),
            "reproduction (nats)": _fmt(r["reproduction_nats"], ".2f"),
            "diff vs paper %": _fmt(r["diff_paper_pct"], ".2f", signed=True),
            "diff vs reproduction %": _fmt(r["diff_reproduction_pct"], ".2f", signed=True),
            "steps": _fmt(r["steps"], ","),
            "wall time": format_duration(r["wall_time_s"]),
            "hardware": hardware,
            "K": _fmt(r["k"], "d"),
            "n images": _fmt(r["n_images"], ","),
        })
    return pd.DataFrame(out)


def eval_details_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """Damage recovery, linear probe and t-SNE scalars per evaluated run (columns present in
    at least one run)."""
    rows = []
    for label, ev, _ in pairs:
        if ev is None:
            continue
        row: dict = {"variant": label}
        damage = ev.metrics.get("damage")
        if isinstance(damage, dict):
            for key, title in (("before", "LL before damage (nats)"),
                               ("after_damage", "LL after damage (nats)"),
                               ("after_recovery", "LL after recovery (nats)")):
                row[title] = _fmt(_number(damage.get(key)), ".2f")
            b, a, r = (_number(damage.get(k)) for k in ("before", "after_damage",
                                                         "after_recovery"))
            if None not in (b, a, r) and b != a:
                row["recovered % of damage"] = f"{100.0 * (r - a) / (b - a):.1f}"
            row["damage images"] = _fmt(_number(damage.get("n_images")), ",.0f")
        probe = ev.metrics.get("probe")
        if isinstance(probe, dict):
            acc = _number(probe.get("accuracy"))
            row["probe accuracy %"] = _fmt(None if acc is None else 100 * acc, ".2f")
            row["probe train / test images"] = (
                f"{_fmt(_number(probe.get('n_train_images')), ',.0f')} / "
                f"{_fmt(_number(probe.get('n_test_images')), ',.0f')}")
        tsne = ev.metrics.get("tsne")
        if isinstance(tsne, dict):
            row["t-SNE images"] = _fmt(_number(tsne.get("n_images")), ",.0f")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty or len(df.columns) <= 1:
        return pd.DataFrame()
    return df.fillna(MISSING)


def config_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """The settings that distinguish the runs, one column per training run."""
    cols = {}
    for label, _, tr in pairs:
        if tr is None:
            continue
        c = tr.cfg
        cols[label] = {
            "config name": c.name,
            "smoke": str(c.smoke),
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
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def plot_training_curves(curves: pd.DataFrame) -> bytes | None:
    if curves.empty:
        return None
    panels = [(m, t) for m, t in CURVE_METRICS if (curves["metric"] == m).any()]
    if (curves["metric"] == "val_elbo").any():
        panels.append(("val_elbo", "validation ELBO (nats)"))
    runs = list(dict.fromkeys(curves["run"]))
    palette = dict(zip(runs, sns.color_palette("colorblind", len(runs))))
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (ax, (metric, title)) in enumerate(zip(axes, panels)):
        sub = curves[curves["metric"] == metric]
        sns.lineplot(data=sub, x="step", y="value", hue="run", palette=palette, ax=ax,
                     estimator=None, sort=True, marker="o" if metric == "val_elbo" else None,
                     markersize=4, linewidth=1.2, legend=(i == 0))
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("training step (log)")
        ax.set_ylabel("")
        ax.grid(alpha=0.3)
    leg = axes[0].get_legend()
    if leg is not None:
        leg.set_title("")
    return _png(fig)


def _tsne_arrays(ev: EvalRun) -> tuple | None:
    xy, labels = ev.arrays.get("tsne_xy"), ev.arrays.get("tsne_labels")
    if xy is None or labels is None or xy.ndim != 2 or xy.shape[1] != 2:
        return None
    if labels.ndim != 1 or labels.shape[0] != xy.shape[0] or xy.shape[0] == 0:
        return None
    return xy.astype(float), labels


def plot_tsne_panels(runs: Sequence[tuple]) -> bytes | None:
    """One t-SNE panel per run, side by side, coloured by matched label."""
    data = [(label, a) for label, ev in runs if (a := _tsne_arrays(ev)) is not None]
    if not data:
        return None
    fig = Figure(figsize=(4.0 * len(data) + 0.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    classes = sorted({int(v) for _, (_, lab) in data for v in lab})
    palette = dict(zip(classes, sns.color_palette("tab10", max(len(classes), 1))))
    for i, (ax, (label, (xy_Nx2, lab_N))) in enumerate(zip(axes, data)):
        frame = pd.DataFrame({"x": xy_Nx2[:, 0], "y": xy_Nx2[:, 1],
                              "label": lab_N.astype(int)})
        sns.scatterplot(data=frame, x="x", y="y", hue="label", palette=palette, s=6,
                        linewidth=0, ax=ax, legend=(i == len(data) - 1))
        ax.set_title(f"{label} ({len(frame):,} images)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0), title="label",
                        frameon=False, markerscale=2)
    return _png(fig)


def _damage_curve(ev: EvalRun) -> tuple | None:
    steps, ll = ev.arrays.get("damage_curve_steps"), ev.arrays.get("damage_curve_ll")
    if steps is None or ll is None or steps.ndim != 1 or steps.shape != ll.shape:
        return None
    if steps.size == 0:
        return None
    return steps.astype(float), ll.astype(float)


def plot_recovery_curves(runs: Sequence[tuple]) -> bytes | None:
    """Log-likelihood over NCA steps around the damage, every run on one axis."""
    rows, damage_at = [], set()
    for label, ev in runs:
        c = _damage_curve(ev)
        if c is None:
            continue
        rows += [(label, s, v) for s, v in zip(*c)]
        dmg = ev.metrics.get("damage")
        at = _number(dmg.get("damage_at")) if isinstance(dmg, dict) else None
        if at is not None:
            damage_at.add(at)
    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["run", "NCA step", "log-likelihood (nats)"])
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(data=frame, x="NCA step", y="log-likelihood (nats)", hue="run", ax=ax,
                 estimator=None, marker="o", markersize=3)
    for at in sorted(damage_at):
        ax.axvline(at, color="0.3", linestyle="--", linewidth=1)
        ax.annotate("damage", (at, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Recovery after damage")
    return _png(fig)


def plot_match_distributions(hists: dict, percentiles: dict | None = None) -> bytes | None:
    """One panel per histogram (counts over nats) and per percentile summary (nats against
    percentile, log axes where the values allow), splits as lines."""
    percentiles = percentiles or {}
    if not hists and not percentiles:
        return None
    fields = [("hist", f) for f in hists] + [("pct", f) for f in percentiles]
    ncols = min(len(fields), 3)
    nrows = -(-len(fields) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
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
                         marker="o", markersize=4, estimator=None, ax=ax)
            ax.set_xscale("log")
            if (frame["nats"] > 0).all():
                ax.set_yscale("log")
            ax.set_title(f"{field.replace('_', ' ')} (percentiles)")
            ax.legend(frameon=False)
            continue
        log_x = False
        for split, (counts, edges) in hists[field].items():
            ax.stairs(counts, edges, label=split, color=colors.get(split), linewidth=1.4)
            log_x = log_x or (edges[0] > 0 and edges[-1] / edges[0] > 100)
        if log_x and all(e[0] > 0 for _, e in hists[field].values()):
            ax.set_xscale("log")
        ax.set_title(field.replace("_", " "))
        ax.set_xlabel("nats")
        ax.set_ylabel("images")
        ax.legend(frameon=False)
    return _png(fig)


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
    css: str = ""  # "smoke" makes the banner


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


def _figure_rows(pairs: Sequence[tuple]) -> list:
    """Blocks for every evaluation figure: one row per figure kind, runs side by side."""
    runs = [(label, ev) for label, ev, _ in pairs if ev is not None]
    blocks: list = []
    for fname, caption in artifacts.EVAL_FIGURES.items():
        blocks.append(Heading(caption, 3, anchor=f"fig-{fname.removesuffix('.png')}"))
        stem = fname.removesuffix(".png")
        if fname == "tsne.png":
            png = plot_tsne_panels(runs)
            if png is not None:
                blocks.append(Figures([Fig("t-SNE of every run, re-plotted from arrays.npz",
                                           png, "figures/tsne_panels.png")], "tsne-panels"))
        if fname == "damage_curve.png":
            png = plot_recovery_curves(runs)
            if png is not None:
                blocks.append(Figures([Fig("Recovery curves of every run, re-plotted from "
                                           "arrays.npz", png, "figures/recovery_curves.png")],
                                      "recovery-curves"))
        figs = []
        for label, ev in runs:
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
                figs.append(Fig(label, None, "", missing=why))
        blocks.append(Figures(figs, f"fig-{stem}-runs"))
    return blocks


def _smoke_text(pairs: Sequence[tuple]) -> str | None:
    smoke = []
    for label, ev, tr in pairs:
        if (ev is not None and ev.smoke) or (tr is not None and tr.smoke):
            steps = _number(tr.summary.get("steps")) if tr is not None else None
            smoke.append(label + (f" ({int(steps):,} steps)" if steps is not None else ""))
    if not smoke:
        return None
    return ("SMOKE RUN: " + ", ".join(smoke) + ". A smoke run trains a tiny model for seconds "
            "to test the pipeline; its numbers are NOT comparable with the paper's or the "
            "reproduction's.")


def report_blocks(pairs: Sequence[tuple], data: DataInfo) -> list:
    blocks: list = [Heading("Variational Neural Cellular Automata: reproduction report", 1)]
    smoke = _smoke_text(pairs)
    if smoke:
        blocks.append(Para(smoke, css="smoke"))
    blocks.append(Para(
        "Importance-weighted bound on the log-likelihood of the binarized MNIST test set "
        "(nats per image, higher is better; bits/dim per real 28x28 pixel, lower is better), "
        "next to the paper's (Palm et al., ICLR 2022) and the reproduction's (Aillet & "
        "Sondén, ReScience C 2023) numbers at K = 128. diff % = 100 (ours - reference) / "
        "|reference|: positive means our bound is higher. The paper reports no number for "
        "the baseline."))
    blocks.append(Heading("Results", 2, anchor="results-section"))
    blocks.append(Table(format_results(results_frame(pairs)), "results", numeric=True))

    trains = [(label, tr) for label, _, tr in pairs if tr is not None]
    blocks.append(Heading("Training curves", 2, anchor="training-curves"))
    blocks.append(Figures([Fig("Training loss, KL and reconstruction term (log step axis)",
                               plot_training_curves(curves_frame(trains)),
                               "figures/training_curves.png",
                               missing="not produced (no training records with step > 0)")],
                          "training-curves-fig"))

    details = eval_details_frame(pairs)
    if not details.empty:
        blocks.append(Heading("Damage recovery and probes", 2, anchor="eval-details-section"))
        blocks.append(Table(details, "eval-details", numeric=True))

    blocks.append(Heading("Evaluation figures", 2, anchor="figures"))
    blocks += _figure_rows(pairs)

    blocks.append(Heading("Dataset: label matching", 2, anchor="label-matching"))
    blocks.append(Para(f"From {data.path}: each binarized test/train image matched to its "
                       "MNIST source image by Bernoulli log-likelihood."))
    top = match_top_level(data.match_report)
    if top:
        blocks.append(Table(pd.DataFrame(top, columns=["field", "value"]), "match-summary"))
    table = match_table(data.match_report)
    if not table.empty:
        blocks.append(Table(table, "match-report"))
    else:
        blocks.append(Para("The match report has no per-split fields."))
    hist_png = plot_match_distributions(match_histograms(data.match_report),
                                        match_percentiles(data.match_report))
    pairs_png = data.matched_pairs.read_bytes() if data.matched_pairs is not None else None
    pairs_missing = "not produced" + (f" ({data.unreadable})" if data.unreadable else "")
    blocks.append(Figures([Fig(
        "Match margins: histograms and percentiles per split", hist_png,
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
    return blocks


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1400px;
 padding:0 16px;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
table.num td:not(:first-child),table.num th:not(:first-child){text-align:right}
.smoke{background:#fff3cd;border:2px solid #d39e00;color:#5c4400;padding:12px 16px;
 font-weight:600;font-size:1.1em;border-radius:4px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;flex:1 1 280px;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figure img.small{image-rendering:pixelated;width:min(100%,360px)}
figcaption{font-size:0.85em;color:#444;margin-top:2px}
.missing{color:#888;font-style:italic;border:1px dashed #ccc;padding:24px 8px;text-align:center}
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
            if b.css == "smoke":
                out.append(f'<div id="smoke-banner" class="smoke" role="alert">'
                           f"{html.escape(b.text)}</div>")
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
            out.append(f"> **{b.text}**" if b.css == "smoke" else b.text)
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


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(blocks: Sequence, out_dir: str | Path) -> Path:
    """Write `figures/`, `report.md` and, last, `report.html`; returns the HTML's path."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from None
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".figures."))
    try:
        for b in blocks:
            if isinstance(b, Figures):
                for f in b.figs:
                    if f.png is not None:
                        p = staging / Path(f.md_path).relative_to("figures")
                        p.parent.mkdir(parents=True, exist_ok=True)
                        p.write_bytes(f.png)
        final = out / "figures"
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
    evals = [load_eval_dir(d) for d in eval_dirs]
    trains = [load_train_dir(d) for d in train_dirs]
    data = load_data_dir(data_dir)
    pairs = pair_runs(evals, trains)
    return write_report(report_blocks(pairs, data), out_dir)
