"""`vnca prepare-data`: binarized MNIST with matched labels -> `OUT/dataset.npz` + report + PNG.

Steps: read a source (raw files with sha256 checks, TFDS, or the bundled sample) -> label
matching (binarized train + valid jointly against MNIST train, binarized test against MNIST
test; see `vnca.data.matching`) -> write `dataset.npz` (no pickle; per split `{split}_x` uint8
(N, 28, 28) in {0, 1}, `{split}_y` int64, `{split}_mnist_index` int64; unpadded: padding is
the models' input step, `vnca.data.pad_images`), `match_report.json`, `matched_pairs.png` and
`digit_classifier.npz`: an independent digit classifier fit on the labelled train split
(`vnca.evaluation.classifier`), which the evaluate step uses to label reconstructions and
samples.

All input is read and checked before anything is written; the outputs are written into a
staging folder inside OUT and renamed into place, `dataset.npz` last, so a failed or
interrupted run never leaves a `dataset.npz` that looks complete. The staging folder of a run
that was killed (SIGKILL, a lost machine) is removed by the next run on the same OUT.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np

from vnca import artifacts, contracts
from vnca.data import matching
from vnca.data.raw import IMAGE_SIDE, RawData
from vnca.errors import UserError
from vnca.evaluation import classifier

SOURCES = ("raw", "tfds", "bundled")
GROUPS = {  # matched jointly: (binarized splits, MNIST reference split)
    "train+valid": (("train", "valid"), "train"),
    "test": (("test",), "test"),
}
FIGURE_SEED = 0
# Outputs are staged in OUT/.prepare-data-PID.partial and renamed into place.
STAGE_PREFIX, STAGE_SUFFIX = ".prepare-data-", ".partial"


def load_source(source: str, raw_dir=None, download: bool = False, tfds_dir=None,
                progress: bool = True) -> RawData:
    if source == "raw":
        from vnca.data import raw

        if not raw_dir:
            raise UserError("--source raw needs --raw-dir DIR (the folder with the .amat and "
                            "idx files, or where --download should put them)")
        if download:
            raw.download_raw(raw_dir)
        return raw.read_raw(raw_dir)
    if download:
        raise UserError(f"--download applies to --source raw only, not --source {source}")
    if source == "bundled":
        from vnca.data import bundled_source

        return bundled_source.read_bundled()
    if source == "tfds":
        from vnca.data import tfds_source

        return tfds_source.read_tfds(tfds_dir)
    raise UserError(f"unknown --source {source!r} (expected one of {', '.join(SOURCES)})")


def match_all(data: RawData, k: int = 16, chunk: int = 512,
              progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Label matching for every split. Returns (dataset arrays, report sections)."""
    arrays: dict[str, np.ndarray] = {}
    groups, splits, timing = {}, {}, {}
    for group, (bsplits, ref_split) in GROUPS.items():
        parts = [data.binarized[s] for s in bsplits]
        x_MxD = np.concatenate(parts) if len(parts) > 1 else parts[0]
        ref_x, ref_y = data.mnist_x[ref_split], data.mnist_y[ref_split]
        t0 = time.perf_counter()
        mt = matching.match(x_MxD, ref_x, ref_y, k=k, chunk=chunk, progress=progress,
                            desc=f"match {group} vs MNIST {ref_split}")
        timing[group] = round(time.perf_counter() - t0, 3)
        groups[group] = {
            "queries": "+".join(f"binarized {s}" for s in bsplits),
            "reference": f"MNIST {ref_split}",
            "n_queries": len(x_MxD),
            "n_references": len(ref_x),
            "top_k": int(mt.k),
            "seconds": timing[group],
            **matching.summarize(mt, x_MxD, ref_x),
        }
        r0 = 0
        for s, part in zip(bsplits, parts):
            rows = slice(r0, r0 + len(part))
            r0 += len(part)
            splits[s] = matching.summarize(mt, x_MxD, ref_x, rows)
            arrays[f"{s}_x"] = part.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).astype(np.uint8)
            arrays[f"{s}_y"] = mt.labels_M[rows].astype(np.int64)
            arrays[f"{s}_mnist_index"] = data.mnist_index[ref_split][mt.assigned_M[rows]]
            arrays[f"_{s}_margin"] = (mt.top_ll_MxK[rows, 0] - mt.top_ll_MxK[rows, 1]
                                      if mt.k > 1 else np.full(len(part), np.inf))
            arrays[f"_{s}_ref_row"] = mt.assigned_M[rows]
    return arrays, {"groups": groups, "splits": splits, "timing_s": timing}


def _pairs_figure(path: Path, data: RawData, arrays: dict, n_random: int = 8,
                  n_hard: int = 4) -> dict:
    """PNG of matched pairs: per split, random pairs and the pairs with the smallest margin."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    rng = np.random.default_rng(FIGURE_SEED)
    rows, layout = [], {}
    for bsplits, ref_split in GROUPS.values():
        for s in bsplits:
            n = len(arrays[f"{s}_y"])
            rand = rng.choice(n, size=min(n_random, n), replace=False)
            hard = np.argsort(arrays[f"_{s}_margin"], kind="stable")[:min(n_hard, n)]
            picks = np.concatenate([rand, hard])
            rows.append((s, ref_split, picks, len(rand)))
            layout[s] = {"random_rows": rand.tolist(), "smallest_margin_rows": hard.tolist()}
    ncols = max(len(r[2]) for r in rows)
    fig = Figure(figsize=(1.1 * ncols, 0.95 * len(rows) + 0.4), dpi=90)
    for i, (s, ref_split, picks, n_rand) in enumerate(rows):
        for j, row in enumerate(picks):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            ref_row = arrays[f"_{s}_ref_row"][row]
            pair = np.full((IMAGE_SIDE, 2 * IMAGE_SIDE + 2), 0.5)
            pair[:, :IMAGE_SIDE] = arrays[f"{s}_x"][row]
            pair[:, IMAGE_SIDE + 2:] = data.mnist_x[ref_split][ref_row].reshape(
                IMAGE_SIDE, IMAGE_SIDE) / 255.0
            ax.imshow(pair, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            tag = "" if j < n_rand else f"\nm={arrays[f'_{s}_margin'][row]:.1e}"
            ax.set_title(f"{s}[{row}]: {arrays[f'{s}_y'][row]}{tag}", fontsize=5.5, pad=2)
    fig.suptitle("binarized image | matched MNIST original  (label; m = top-1 minus top-2 LL, "
                 "nats, for the hardest pairs)", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.08, hspace=0.75)
    fig.savefig(path, format="png")
    return {"file": artifacts.MATCHED_PAIRS_PNG, "seed": FIGURE_SEED, "rows": layout}


def _summary_line(report: contracts.MatchReport) -> str:
    groups, splits = report.groups.values(), report.splits.values()
    changed = " + ".join(str(g.rows_changed_by_assignment) for g in groups)
    imp = sum(s.impossible_pixels.total for s in splits)
    lm = min((s.label_margin_nats.min for s in splits if s.label_margin_nats.min is not None),
             default=float("inf"))
    unresolved = sum(g.unresolved_rows for g in groups)
    text = (" / ".join(f"{s} {n}" for s, n in report.counts.items())
            + f" images labelled; assignment changed {changed} rows"
            + f"; {imp} impossible pixels; min label margin {lm:.2f} nats")
    return text + (f"; {unresolved} rows unresolved" if unresolved else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_stages(out: Path) -> list[Path]:
    """Remove the staging folders of earlier runs on `out` that were killed (their process is
    gone); another live run's folder is left alone. Returns what was removed."""
    removed = []
    for stage in out.glob(f"{STAGE_PREFIX}*{STAGE_SUFFIX}"):
        pid = stage.name[len(STAGE_PREFIX):-len(STAGE_SUFFIX)]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    return removed


def prepare_data(source: str = "bundled", out_dir: str | os.PathLike = "data",
                 raw_dir: str | os.PathLike | None = None, download: bool = False,
                 tfds_dir: str | os.PathLike | None = None, *, k: int = 16, chunk: int = 512,
                 progress: bool = True) -> contracts.MatchReport:
    """Read `source`, match labels, write the dataset artifact into `out_dir`; returns the
    match report (match_report.json), whose `summary` is one line."""
    t_start = time.perf_counter()
    out = artifacts.check_out_dir(out_dir)
    data = load_source(source, raw_dir, download, tfds_dir, progress)
    t_read = time.perf_counter() - t_start
    arrays, sections = match_all(data, k=k, chunk=chunk, progress=progress)
    counts = {s: len(arrays[f"{s}_y"]) for s in artifacts.SPLITS}
    t0 = time.perf_counter()
    digit_classifier = classifier.fit(arrays["train_x"], arrays["train_y"], seed=0,
                                      x_test_NxHxW=arrays["test_x"], y_test_N=arrays["test_y"])
    t_classifier = time.perf_counter() - t0
    report = {
        "source": source,
        "summary": "",  # filled in below, from the checked report
        "counts": counts,
        "provenance": data.provenance,
        "method": {
            "score": "Bernoulli log-likelihood sum_d x log p + (1 - x) log(1 - p), "
                     "p = clip(pixel / 255, eps, 1 - eps)",
            "eps": matching.EPS,
            "computation": "float32 matrix product per chunk of queries; exact top-k via block "
                           "maxima; top-k rescored in float64",
            "chunk_rows": chunk,
            "assignment": "scipy min_weight_full_bipartite_matching on the top-k candidates, "
                          "cost = LL_top1 - LL + 1 (train+valid jointly, test separately)",
            "label_margin": "best LL minus the best LL of an MNIST image with another label",
            "impossible_pixel": "x = 1 where the MNIST pixel is 0, or x = 0 where it is 255",
            "images": "stored unpadded 28x28 uint8 {0,1}; models pad (vnca.data.pad_images)",
        },
        "groups": sections["groups"],
        "splits": sections["splits"],
        "classifier": {"kind": classifier.KIND,
                       "n_train": digit_classifier.n_train,
                       "test_accuracy": digit_classifier.test_accuracy},
        "timing_s": {"read": round(t_read, 3), **{f"match {g}": t for g, t in
                                                   sections["timing_s"].items()},
                     "classifier": round(t_classifier, 3)},
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(out)
        stage = out / f"{STAGE_PREFIX}{os.getpid()}{STAGE_SUFFIX}"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
    except OSError as e:
        raise UserError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    try:
        report["figure"] = _pairs_figure(stage / artifacts.MATCHED_PAIRS_PNG, data, arrays)
        report["timing_s"]["total"] = round(time.perf_counter() - t_start, 3)
        checked = contracts.MatchReport.from_dict(report, str(out / artifacts.MATCH_REPORT))
        checked = dataclasses.replace(checked, summary=_summary_line(checked))
        checked.write(stage / artifacts.MATCH_REPORT)
        with open(stage / artifacts.DATASET, "wb") as f:
            np.savez_compressed(f, **{k_: v for k_, v in arrays.items()
                                      if not k_.startswith("_")})
        digit_classifier.save(stage / artifacts.DIGIT_CLASSIFIER)
        for name in (artifacts.MATCHED_PAIRS_PNG, artifacts.MATCH_REPORT,
                     artifacts.DIGIT_CLASSIFIER, artifacts.DATASET):
            os.replace(stage / name, out / name)
    except OSError as e:
        raise UserError(f"{out}: cannot write the dataset artifact ({e.strerror or e})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return checked
