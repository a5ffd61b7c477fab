"""The report's content, in reading order, and `build_report`, which reads, assembles and writes.

Contents: the results table (our importance-weighted bound against the paper's and the
reproduction's, `vnca.reference`, the untrained model's bound, and how often an independent
digit classifier recognises reconstructions and prior samples), the prior samples' label
histogram, damage recovery and probe scalars, training curves, every figure the evaluation step
produced (each shown once: a figure the report re-plots from `arrays.npz` for all variants
replaces the per-variant PNGs), the dataset's label matching, the configurations, and last the
raw label-matching statistics. A run below the paper's scale (`tier` smoke, demo or cpu) gets a
banner, so nobody mistakes a 20-step number for the paper's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from vnca import artifacts
from vnca.config import TIERS, Tier
from vnca.errors import UserError
from vnca.report import figures
from vnca.report.load import (
    DataInfo,
    load_data_dir,
    load_eval_dir,
    load_train_dir,
    pair_runs,
    smallest_tier,
)
from vnca.report.render import Fig, Figures, Heading, Para, Table, write_report
from vnca.report.tables import (
    MISSING,
    RECONSTRUCTION_BAR,
    classifier_text,
    config_frame,
    curves_frame,
    damage_frame,
    format_results,
    format_run_details,
    latent_frame,
    match_percentiles,
    match_table,
    match_top_level,
    prior_labels_frame,
    results_frame,
)

# Figures that only an NCA decoder has; for the baseline their absence is expected.
NCA_ONLY_FIGURES = ("growth.png", "damage_recovery.png", "damage_curve.png", "probe.png")
# Figures the evaluation makes for the non-doubling model only (the paper's damage and probe).
NONDOUBLING_ONLY_FIGURES = ("damage_recovery.png", "damage_curve.png", "probe.png")
# Every tier below the paper's; `tier_banners` shows them smallest first.
TIER_BANNERS: dict[Tier, str] = {
    "smoke": ("SMOKE RUN: {runs}. A smoke run trains a tiny model for seconds to test the "
              "pipeline; its numbers are NOT comparable with the paper's or the "
              "reproduction's."),
    "demo": ("Demo run: {runs}. Small models trained for minutes on the bundled 2,000-image "
             "sample on a CPU; not comparable with the paper."),
    "cpu": ("CPU-scale run: {runs}. Reduced models trained on the full data on a 2-core CPU; "
            "not the paper's configuration."),
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


# Evaluation figures the report re-plots for every run at once from arrays.npz:
# file -> (plot function, arrays reader, figure id, title). A run the re-plot covers does not
# show its own PNG of that figure (each thing is shown once).
REPLOTS = {
    "tsne.png": (figures.plot_tsne_panels, figures.tsne_arrays, "tsne-panels",
                 "t-SNE of encoder means, one panel per run, coloured by matched label"),
    "damage_curve.png": (figures.plot_recovery_curves, figures.damage_curves, "recovery-curves",
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
            steps = tr.summary.steps if tr is not None else None
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
                               figures.plot_training_curves(curves_frame(trains)),
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
    blocks.append(Table(pd.DataFrame(top, columns=["field", "value"]), "match-summary"))
    pairs_png = data.matched_pairs.read_bytes() if data.matched_pairs is not None else None
    pairs_missing = "not produced" + (f" ({data.unreadable})" if data.unreadable else "")
    blocks.append(Figures([Fig(
        "Match margins: percentiles per split",
        figures.plot_match_percentiles(match_percentiles(data.match_report)),
        "figures/match_margins.png",
        missing="not produced (no values in the match report's distributions)")],
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
    blocks.append(Table(match_table(data.match_report), "match-report"))
    return blocks


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
