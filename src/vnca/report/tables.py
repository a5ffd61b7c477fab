"""Tables: pure functions from the loaded runs (`vnca.report.load`) to pandas frames.

`results_frame` holds the raw numbers (None where a run has none); `format_results` and
`format_run_details` turn them into the strings shown. The other frames are shown as built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vnca import config, contracts, reference
from vnca.config import Tier
from vnca.report.load import EvalRun, TrainRun, smallest_tier

MISSING = "—"
CURVE_METRICS = (("loss", "loss (nats)"), ("kl", "KL (nats)"),
                 ("recon", "reconstruction (nats)"))
TIER_LABELS: dict[Tier, str] = {"smoke": "SMOKE", "demo": "demo", "cpu": "CPU", "paper": "paper"}
RECONSTRUCTION_BAR = 0.8  # share of reconstructions the classifier should recognise
RESULT_COLUMNS = [
    "variant", "ours_nats", "ours_stderr_nats", "bits_per_dim", "paper_nats",
    "reproduction_nats", "diff_paper_pct", "diff_reproduction_pct", "untrained_nats",
    "untrained_stderr_nats", "trained_same_images_nats", "untrained_n_images",
    "reconstruction_accuracy", "classifier_accuracy_originals", "prior_top_probability",
    "steps", "wall_time_s", "hardware", "n_devices", "k", "n_images", "tier", "smoke",
    "commit", "train_precision", "eval_precision", "departures",
]


def _cell(x: Any) -> Any:
    """A value read back from a frame: None for a gap (pandas holds a missing number as NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def diff_percent(ours: float | None, ref: float | None) -> float | None:
    """100 (ours - ref) / |ref|: positive when our bound (a log-likelihood) is higher."""
    if ours is None or ref is None or ref == 0:
        return None
    return 100.0 * (ours - ref) / abs(ref)


def _result_row(label: str, ev: EvalRun | None, tr: TrainRun | None) -> dict:
    variant = (ev or tr).variant
    m = ev.metrics if ev else None
    s = tr.summary if tr else None
    iw = m.iwelbo if m else None
    untrained = m.untrained if m else None
    recon = m.reconstruction if m else None
    prior = m.prior_samples if m else None
    ours = iw.mean_nats if iw else None
    paper = reference.PAPER_NATS.get(variant)
    repro = reference.REPRODUCTION_NATS.get(variant)
    tier = smallest_tier(ev.tier if ev else None, tr.tier if tr else None)
    return {
        "variant": label,
        "ours_nats": ours,
        "ours_stderr_nats": iw.stderr_nats if iw else None,
        "bits_per_dim": iw.bits_per_dim if iw else None,
        "paper_nats": paper,
        "reproduction_nats": repro,
        "diff_paper_pct": diff_percent(ours, paper),
        "diff_reproduction_pct": diff_percent(ours, repro),
        "untrained_nats": untrained.mean_nats if untrained else None,
        "untrained_stderr_nats": untrained.stderr_nats if untrained else None,
        "trained_same_images_nats": untrained.trained_same_images_nats if untrained else None,
        "untrained_n_images": untrained.n_images if untrained else None,
        "reconstruction_accuracy": recon.accuracy if recon else None,
        "classifier_accuracy_originals": recon.classifier_accuracy_originals if recon else None,
        "prior_top_probability": prior.mean_top_probability if prior else None,
        "steps": s.steps if s else None,
        "wall_time_s": s.wall_time_s if s else None,
        "hardware": (s.hardware or None) if s else None,
        "n_devices": s.n_devices if s else None,
        "k": iw.k if iw else None,
        "n_images": iw.n_images if iw else None,
        "tier": tier,
        "smoke": tier == "smoke",
        "commit": s.commit if s else None,
        "train_precision": tr.cfg.model.precision if tr else None,
        "departures": config.departures(tr.cfg) if tr else None,
        "eval_precision": m.precision if m else None,
    }


def results_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """One row per run with the raw numbers (None where unknown)."""
    rows = [_result_row(label, ev, tr) for label, ev, tr in pairs]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype(object)


def precision_text(train: str | None, evaluation: str | None) -> str:
    """The precision policy of a result: one name, or training's and evaluation's when they
    differ."""
    if train and evaluation and train != evaluation:
        return f"{train} (training), {evaluation} (evaluation)"
    return train or evaluation or MISSING


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
    x = _cell(x)
    if x is None:
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
        r = {k: _cell(v) for k, v in r.items()}
        untrained = _mean_se(r["untrained_nats"], r["untrained_stderr_nats"])
        trained_same = MISSING
        if r["trained_same_images_nats"] is not None:
            trained_same = f"{r['trained_same_images_nats']:.2f}"
            if r["untrained_n_images"] is not None:
                trained_same += f" ({int(r['untrained_n_images']):,} images)"
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


def short_commit(commit: str | None) -> str:
    """'0123456789ab' (+ '+dirty') of a full commit id; MISSING when unknown."""
    if not commit:
        return MISSING
    sha, dirty, _ = commit.partition("+dirty")
    return sha[:12] + ("+dirty" if dirty else "")


def format_run_details(df: pd.DataFrame) -> pd.DataFrame:
    """How each result was made: training steps, wall time, hardware, precision policy, K,
    test images and the code's commit."""
    out = []
    for r in df.to_dict("records"):
        r = {k: _cell(v) for k, v in r.items()}
        hardware = r["hardware"] or MISSING
        n_dev = r["n_devices"]
        if n_dev is not None and hardware != MISSING:
            n_dev = int(n_dev)
            hardware += f" ({n_dev} device{'s' if n_dev != 1 else ''})"
        out.append({
            "variant": r["variant"],
            "training steps": _fmt(r["steps"], ","),
            "training wall time": format_duration(r["wall_time_s"]),
            "hardware": hardware,
            "precision": precision_text(r["train_precision"], r["eval_precision"]),
            "K (importance samples)": _fmt(r["k"], "d"),
            "test images": _fmt(r["n_images"], ","),
            "commit": short_commit(r["commit"]),
            "departures from the paper's recipe": (MISSING if r["departures"] is None
                                                   else "; ".join(r["departures"]) or "none"),
        })
    return pd.DataFrame(out)


def classifier_text(pairs: Sequence[tuple]) -> str | None:
    """One sentence on the digit classifier the evaluations used (None without evaluations)."""
    seen: dict = {}
    for label, ev, _ in pairs:
        if ev is None:
            continue
        c = ev.metrics.classifier
        text = (f"{c.kind}, fit on {c.n_train:,} training images, {_pct(c.test_accuracy)} "
                "accurate on the test images")
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
        prior = ev.metrics.prior_samples if ev else None
        if prior is None:
            continue
        counts = prior.label_histogram
        row = {"variant": label, "samples": f"{prior.n_images:,}",
               "mean top-class probability": _fmt(prior.mean_top_probability, ".3f")}
        total = sum(counts)
        row.update({f"{d}": f"{c:,}" for d, c in enumerate(counts)})
        row["most common"] = (f"{int(np.argmax(counts))} ({100 * max(counts) / total:.0f} %)"
                              if total else MISSING)
        rows.append(row)
    return pd.DataFrame(rows)


def recovered_text(damage: contracts.Damage) -> str:
    """The recovered share of the damage, or why there is none to show."""
    if not damage.meaningful:
        return "not meaningful (damage did not lower the score)"
    if damage.recovered_fraction is None:
        return MISSING
    return f"{100 * damage.recovered_fraction:.1f} %"


def damage_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """Damage recovery per evaluated run that has it: mean log-likelihoods (± standard error)
    and the recovered share of the damage."""
    rows = []
    for label, ev, _ in pairs:
        damage = ev.metrics.damage if ev else None
        if damage is None:
            continue
        d = damage
        row: dict = {
            "variant": label,
            "before damage (nats)": _mean_se(d.before, d.before_stderr),
            "just after damage (nats)": _mean_se(d.after_damage, d.after_damage_stderr),
            "after recovery (nats)": _mean_se(d.after_recovery, d.after_recovery_stderr),
            "undamaged, same step (nats)": _mean_se(d.undamaged_final, d.undamaged_final_stderr),
        }
        row["recovered share of the damage"] = recovered_text(damage)
        row["damage at step / recovery steps"] = f"{damage.damage_at} / {damage.recovery_steps}"
        row["images"] = f"{damage.n_images:,}"
        rows.append(row)
    return pd.DataFrame(rows)


def latent_frame(pairs: Sequence[tuple]) -> pd.DataFrame:
    """Linear probe on cell states and label accuracy of the latent space per evaluated run
    (columns present in at least one run)."""
    k = contracts.Tsne.KNN
    rows = []
    for label, ev, _ in pairs:
        probe, tsne = (ev.metrics.probe, ev.metrics.tsne) if ev else (None, None)
        if probe is None and tsne is None:
            continue
        row: dict = {"variant": label}
        if probe is not None:
            acc = probe.accuracy
            row["probe accuracy %"] = _fmt(None if acc is None else 100 * acc, ".2f")
            row["probe train / test images"] = (f"{probe.n_train_images:,} / "
                                                f"{probe.n_test_images:,}")
        if tsne is not None:
            row["t-SNE images"] = f"{tsne.n_images:,}"
            for value, where in ((tsne.knn10_accuracy_latent, "encoder means"),
                                 (tsne.knn10_accuracy_tsne, "t-SNE")):
                if value is not None:
                    row[f"{k}-NN label accuracy, {where} %"] = f"{100 * value:.1f}"
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
            "parameters": f"{tr.summary.param_count:,}",
            "directory": str(tr.path),
        }
    if not cols:
        return pd.DataFrame()
    df = pd.DataFrame(cols)
    df.index.name = "setting"
    return df.reset_index()


def curves_frame(trains: Iterable[tuple]) -> pd.DataFrame:
    """Long frame (run, step, metric, value) of the finite training records with step > 0
    (the step axis is logarithmic); validation records give the `val_elbo` metric."""
    rows = []
    for label, tr in trains:
        for rec in tr.records:
            if rec.step <= 0:
                continue
            if isinstance(rec, contracts.ValidRecord):
                values = [("val_elbo", rec.val_elbo)]
            else:
                values = [(key, getattr(rec, key)) for key, _ in CURVE_METRICS]
            rows += [(label, rec.step, key, v) for key, v in values if math.isfinite(v)]
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])


# -- the dataset's match report ------------------------------------------------------------------


def _scalar_text(v: Any) -> str | None:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
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


def match_table(report: contracts.MatchReport) -> pd.DataFrame:
    """Rows: every field of the per-split summaries that reads as one line in at least one
    split (long histograms do not); columns: splits."""
    fields: dict = {}
    for split, summary in report.splits.items():
        for key, value in summary.to_dict().items():
            text = _compact(value)
            if text is not None:
                fields.setdefault(key, {})[split] = text
    df = pd.DataFrame.from_dict(fields, orient="index", columns=list(report.splits))
    df = df.fillna(MISSING)
    df.index.name = "field"
    return df.reset_index()


def match_top_level(report: contracts.MatchReport) -> list:
    """(key, text) for the fields outside the per-split and per-group summaries that read as
    one line (source, summary, counts, ...)."""
    out = []
    for k, v in report.to_dict().items():
        if k in ("splits", "groups"):
            continue
        t = _compact(v)
        if t is not None:
            out.append((k, t))
    return out


def match_percentiles(report: contracts.MatchReport) -> dict:
    """{field: {split: (percent levels, values)}} for every distribution in the per-split
    summaries that has values."""
    out: dict = {}
    for split, summary in report.splits.items():
        for f in dataclasses.fields(summary):
            dist = getattr(summary, f.name)
            if isinstance(dist, contracts.Distribution) and (pct := dist.percentiles()):
                out.setdefault(f.name, {})[split] = (np.array([q for q, _ in pct]),
                                                     np.array([v for _, v in pct]))
    return out
