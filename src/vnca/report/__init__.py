"""The pipeline's last step: one report over every trained and evaluated variant.

`build_report(eval_dirs, train_dirs, data_dir, out_dir)` reads the artifacts of the other steps
and writes `OUT/report.html` (self-contained) and `OUT/report.md` (its images in
`OUT/figures/`). Which variant a directory holds is read from its files, never from the order
of the arguments; every evaluation must pair with a training run of its variant and vice
versa. The JSON artifacts are read through `vnca.contracts`: a missing directory or file, or a
malformed or outdated one, raises `DataError` with one line naming the path (and the key); a
missing figure shows "not produced".

    load.py      the reads: directories -> EvalRun / TrainRun / DataInfo, and their pairing
    tables.py    pure functions from the runs to pandas frames
    figures.py   the figures the report draws itself (PNG bytes, Agg canvas)
    render.py    the document model, rendered to HTML and Markdown, and the writes
    document.py  the content in reading order, and `build_report`

This package imports no JAX.
"""

from vnca.report.document import build_report, report_blocks, tier_banners
from vnca.report.figures import plot_recovery_curves, recovery_lines
from vnca.report.load import DataInfo, EvalRun, TrainRun, pair_runs, smallest_tier
from vnca.report.render import render_html, render_markdown
from vnca.report.tables import (
    TIER_LABELS,
    curves_frame,
    damage_frame,
    match_percentiles,
    match_table,
    recovered_text,
    results_frame,
)

__all__ = [
    "TIER_LABELS", "DataInfo", "EvalRun", "TrainRun", "build_report", "curves_frame",
    "damage_frame", "match_percentiles", "match_table", "pair_runs", "plot_recovery_curves",
    "recovered_text", "recovery_lines", "render_html", "render_markdown", "report_blocks",
    "results_frame", "smallest_tier", "tier_banners",
]
