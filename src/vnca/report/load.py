"""Loading: the report's only reads on the input side, through the artifacts' contracts.

`load_eval_dir`, `load_train_dir` and `load_data_dir` read one directory each into a frozen
record; `pair_runs` pairs evaluations with training runs by the variant and name their files
state (never by argument order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from vnca import artifacts, contracts
from vnca import config as vconfig
from vnca.config import TIERS, VARIANTS, Tier, Variant
from vnca.errors import DataError, UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class EvalRun:
    path: Path
    metrics: contracts.EvalMetrics
    figures: dict  # file name -> Path of a readable PNG
    unreadable: dict  # file name -> why the file there could not be used
    arrays: dict  # name -> np.ndarray (empty when arrays.npz is absent or unreadable)

    @property
    def variant(self) -> Variant:
        return self.metrics.variant

    @property
    def name(self) -> str:
        return self.metrics.name or self.metrics.variant

    @property
    def tier(self) -> Tier:
        return self.metrics.tier


@dataclasses.dataclass(frozen=True)
class TrainRun:
    path: Path
    summary: contracts.TrainSummary
    cfg: vconfig.Config
    records: list  # contracts.TrainRecord / ValidRecord from metrics.jsonl, in file order

    @property
    def variant(self) -> Variant:
        return self.summary.variant

    @property
    def name(self) -> str:
        return self.summary.name or self.summary.variant

    @property
    def tier(self) -> Tier:
        return smallest_tier(self.summary.tier, self.cfg.tier)


@dataclasses.dataclass(frozen=True)
class DataInfo:
    path: Path
    match_report: contracts.MatchReport
    matched_pairs: Path | None
    unreadable: str | None  # why matched_pairs.png could not be used, if present but bad


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{what} directory not found: {p}")
    return p


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


def smallest_tier(*tiers: Tier | None) -> Tier | None:
    """The smallest of `tiers` (`config.TIERS` order); a report labels each run with the
    smallest tier among its evaluation, its training summary and its config."""
    known = [t for t in tiers if t is not None]
    return min(known, key=TIERS.index) if known else None


def load_eval_dir(path: str | Path) -> EvalRun:
    """Read one evaluation directory (`vnca evaluate --out`)."""
    d = _require_dir(path, "evaluation")
    metrics = contracts.EvalMetrics.read(d / artifacts.EVAL_METRICS)
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
    return EvalRun(path=d, metrics=metrics, figures=figures, unreadable=unreadable,
                   arrays=arrays)


def load_train_dir(path: str | Path) -> TrainRun:
    """Read one training directory (`vnca train --out`); checkpoints and params are not read."""
    d = _require_dir(path, "training")
    cfg_path = d / artifacts.RESOLVED_CONFIG
    if not cfg_path.is_file():
        raise DataError(f"missing file: {cfg_path}")
    try:
        cfg = vconfig.loads(cfg_path.read_text(), source=str(cfg_path), complete=True)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read ({e.__class__.__name__})") from None
    summary_path = d / artifacts.TRAIN_SUMMARY
    summary = contracts.TrainSummary.read(summary_path)
    if summary.variant != cfg.model.variant:
        raise DataError(f"{summary_path}: variant {summary.variant!r} differs from "
                        f"model.variant {cfg.model.variant!r} in {cfg_path}")
    records = contracts.read_train_log(d / artifacts.TRAIN_METRICS)
    return TrainRun(path=d, summary=summary, cfg=cfg, records=records)


def load_data_dir(path: str | Path) -> DataInfo:
    """Read the dataset directory's label-matching report (`vnca prepare-data --out`)."""
    d = _require_dir(path, "dataset")
    report = contracts.MatchReport.read(d / artifacts.MATCH_REPORT)
    pairs = d / artifacts.MATCHED_PAIRS_PNG
    problem = _png_problem(pairs) if pairs.exists() else None
    ok = pairs.exists() and problem is None
    return DataInfo(path=d, match_report=report, matched_pairs=pairs if ok else None,
                    unreadable=problem)


def run_label(variant: str, name: str) -> str:
    return variant if name in ("", variant) else f"{variant} ({name})"


def _variant_rank(variant: Variant) -> int:
    return VARIANTS.index(variant)


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
