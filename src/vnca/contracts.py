"""The shape of every JSON artifact one step hands to another, written and read by one class.

    prepare-data -> DATA_DIR/match_report.json   MatchReport
    train        -> MODEL_DIR/summary.json       TrainSummary
                    MODEL_DIR/metrics.jsonl      TrainRecord or ValidRecord, one a line
    evaluate     -> EVAL_DIR/metrics.json        EvalMetrics

Each is a frozen dataclass. A writer builds one (or checks the dict it assembled with
`from_dict`) and calls `write`, which checks the object against its class before a byte is
written; a reader calls `read`, which checks the file the same way. Any problem is one
`DataError` line naming the file and the key. A key the class does not declare is refused in
both directions, so a new key is a reviewed edit here. Sections whose shape depends on the data
source or the config (`provenance`, `method`, `eval_config`, ...) stay plain JSON objects.

Versions: every file (every line of metrics.jsonl) carries `version`, one integer per class.
A file without it (written before the artifacts had versions) or with another version is
refused with one line naming the step to rerun; older shapes are not read.

Field types: `int`, `Count` (>= 0), `Positive` (>= 1), `float` (finite: a writer's NaN is
written as null, `float | None`), `Real` (any float, NaN included: the training log), `bool`,
`str`, `Literal[...]`, `X | None` (the key is present, its value may be null), a field that
defaults to None (an optional section: the key is absent when there is none), a field with
another default (a key added later: a file written before it reads as the default), `list[X]`,
`dict[str, X]`, `dict` (any JSON object) and nested contracts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, Union

from vnca import artifacts
from vnca.config import Precision, Variant
from vnca.errors import DataError
from vnca.fileio import write_atomic

Tier = Literal["paper", "cpu", "demo", "smoke"]  # config.Config.tier


@dataclasses.dataclass(frozen=True)
class _AtLeast:
    value: int


_NON_FINITE = "non-finite allowed"
Count = Annotated[int, _AtLeast(0)]
Positive = Annotated[int, _AtLeast(1)]
Real = Annotated[float, _NON_FINITE]

contract = dataclasses.dataclass(frozen=True, kw_only=True)


# ---------------------------------------------------------------------------------------------
# Checking one value against its annotation.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    text = repr(v) if isinstance(v, float) else json.dumps(v, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, *marks = args
        for m in marks:
            if isinstance(m, _AtLeast):
                return "a non-negative integer" if m.value == 0 else f"an integer >= {m.value}"
        return "a number" if _NON_FINITE in marks else _describe(base)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict or (isinstance(tp, type) and issubclass(tp, Contract)):
        return "an object"
    return {int: "an integer", float: "a finite number", bool: "true or false",
            str: "a string"}[tp]


def _parse(value: Any, tp: Any, where: str, name: str, what: str | None = None) -> Any:
    """`value` (a JSON value) checked against the annotation `tp`; contracts are built.
    `what`: how the error names the expected value (`tp`'s description by default)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    ok = True
    if origin is Annotated:
        base, *marks = args
        if _NON_FINITE in marks:
            ok = _is_number(value)
            value = float(value) if ok else value
        else:
            value = _parse(value, base, where, name, what or _describe(tp))
            ok = all(value >= m.value for m in marks if isinstance(m, _AtLeast))
    elif origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported annotation {tp}")
        return _parse(value, inner[0], where, name, what or _describe(tp))
    elif origin is Literal:
        ok = value in args and not isinstance(value, bool)
    elif origin is list or tp is list:
        ok = isinstance(value, list)
        if ok and args:
            value = [_parse(v, args[0], where, f"{name}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        ok = isinstance(value, dict)
        if ok and args:
            value = {k: _parse(v, args[1], where, f"{name}.{k}") for k, v in value.items()}
    elif isinstance(tp, type) and issubclass(tp, Contract):
        if isinstance(value, dict):
            return tp._from(value, where, name + ".")
        ok = False
    elif tp is float:
        ok = _is_number(value) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is int:
        ok = _is_int(value)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported annotation {tp}")
    if not ok:
        raise DataError(f"{where}: '{name}' must be {what or _describe(tp)}, got "
                        f"{_short(value)}")
    return value


def _dump(v: Any) -> Any:
    if isinstance(v, Contract):
        return v.to_dict()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------------
# Bases.


class Contract:
    """A JSON object with declared keys; subclasses are `@contract` dataclasses. A field's JSON
    key is its name, or `metadata={"key": ...}`; a field defaulting to None is optional."""

    @classmethod
    @functools.cache
    def _fields(cls) -> tuple:
        hints = typing.get_type_hints(cls, include_extras=True)
        return tuple((f.metadata.get("key", f.name), f.name, hints[f.name], f.default is None,
                      f.default is not dataclasses.MISSING) for f in dataclasses.fields(cls))

    @classmethod
    def _from(cls, d: dict, where: str, prefix: str = "") -> Self:
        kwargs = {}
        for key, attr, tp, _, has_default in cls._fields():
            if key in d:
                kwargs[attr] = _parse(d[key], tp, where, prefix + key)
            elif not has_default:
                raise DataError(f"{where}: missing '{prefix}{key}' ({_describe(tp)})")
        declared = {key for key, *_ in cls._fields()}
        for key in d:
            if key not in declared:
                raise DataError(f"{where}: unknown key '{prefix}{key}' (not declared in "
                                f"vnca.contracts.{cls.__name__})")
        obj = cls(**kwargs)
        obj._check(where, prefix)
        return obj

    def _check(self, where: str, prefix: str) -> None:
        """Checks across fields (none by default); raise `DataError` naming `where`."""

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Self:
        """`d` (a JSON object without `version`) checked and converted; `where` names it in
        errors."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        return cls._from(d, where)

    def to_dict(self) -> dict:
        """The JSON object (without `version`): optional sections that are None are left out."""
        return {key: _dump(getattr(self, attr)) for key, attr, _, optional, _ in self._fields()
                if not (optional and getattr(self, attr) is None)}


class Versioned(Contract):
    """A contract stored with a `version`: a JSON file, or one line of a JSON-lines log."""

    VERSION: ClassVar[int] = 1
    STEP: ClassVar[str]  # the command that writes it, named when a file must be rewritten

    def to_json(self) -> dict:
        return {"version": self.VERSION, **self.to_dict()}

    @classmethod
    def from_json(cls, d: Any, where: str) -> Self:
        """An object as stored (with `version`), checked and converted."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        rerun = f"rerun `{cls.STEP}` to write it again"
        if "version" not in d:
            raise DataError(f"{where}: no 'version' (written by an older vnca); {rerun}")
        if not (_is_int(d["version"]) and d["version"] == cls.VERSION):
            raise DataError(f"{where}: version {_short(d['version'])}, this vnca reads version "
                            f"{cls.VERSION}; {rerun}")
        return cls._from({k: v for k, v in d.items() if k != "version"}, where)


class Artifact(Versioned):
    """A versioned contract that is a whole JSON file."""

    def write(self, path: str | os.PathLike) -> Path:
        """Check this object as a reader will, then write it atomically to `path`."""
        data = self.to_json()
        type(self).from_json(data, str(path))
        text = json.dumps(data, indent=1, allow_nan=False) + "\n"
        write_atomic(path, text)
        return Path(path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Self:
        return cls.from_json(read_json_object(path), str(path))


def read_json_object(path: str | os.PathLike) -> Any:
    """The JSON value in file `path`; `DataError` if it is missing, unreadable or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None


# ---------------------------------------------------------------------------------------------
# prepare-data -> match_report.json (vnca.data.prepare, vnca.data.matching.summarize)


@contract
class Distribution(Contract):
    """`vnca.data.matching.distribution`: figures of the finite values; only `n` when none."""

    PERCENTILES: ClassVar[dict] = {0.1: "p0_1", 1.0: "p1", 5.0: "p5", 25.0: "p25",
                                   50.0: "p50", 75.0: "p75", 95.0: "p95"}
    n: Count
    min: float | None = None
    mean: float | None = None
    p0_1: float | None = dataclasses.field(default=None, metadata={"key": "p0.1"})
    p1: float | None = None
    p5: float | None = None
    p25: float | None = None
    p50: float | None = None
    p75: float | None = None
    p95: float | None = None
    max: float | None = None
    count_below_1: Count | None = None
    count_below_10: Count | None = None
    count_below_50: Count | None = None

    def percentiles(self) -> list[tuple[float, float]]:
        """[(percent, value)] in increasing order; empty when there were no values."""
        return [(q, getattr(self, f)) for q, f in self.PERCENTILES.items()
                if getattr(self, f) is not None]


@contract
class Collisions(Contract):
    distinct: Count
    references: Count
    rows: Count


@contract
class ImpossiblePixels(Contract):
    total: Count
    pairs_with_any: Count


@contract
class MatchSummary(Contract):
    """`vnca.data.matching.summarize` for one split (or one jointly matched group)."""

    n: Count
    collisions_before_assignment: Collisions
    collisions_after_assignment: Collisions
    rows_changed_by_assignment: Count
    labels_changed_by_assignment: Count
    unresolved_rows: Count
    assigned_rank_histogram: list[Count]
    margin_top1_top2_nats: Distribution
    label_margin_nats: Distribution
    assigned_loglik_nats: Distribution
    impossible_pixels: ImpossiblePixels
    label_histogram: list[Count]


@contract
class MatchGroup(MatchSummary):
    """A group of binarized splits matched jointly against one MNIST split."""

    queries: str
    reference: str
    n_queries: Count
    n_references: Count
    top_k: Positive
    seconds: float


@contract
class ClassifierInfo(Contract):
    """The independent digit classifier (`vnca.evaluation.classifier`)."""

    kind: str
    n_train: Count
    test_accuracy: float | None


@contract
class PairsFigure(Contract):
    file: str
    seed: int
    rows: dict


@contract
class MatchReport(Artifact):
    """DATA_DIR/match_report.json, written by `vnca.data.prepare.prepare_data`."""

    STEP: ClassVar[str] = "vnca prepare-data"
    source: Literal["raw", "tfds", "bundled"]
    summary: str
    counts: dict[str, Count]
    provenance: dict
    method: dict
    groups: dict[str, MatchGroup]
    splits: dict[str, MatchSummary]
    classifier: ClassifierInfo
    timing_s: dict[str, float]
    figure: PairsFigure

    def _check(self, where: str, prefix: str) -> None:
        for key in ("counts", "splits"):
            if sorted(getattr(self, key)) != sorted(artifacts.SPLITS):
                raise DataError(f"{where}: '{prefix}{key}' must have the keys "
                                f"{', '.join(artifacts.SPLITS)}")


# ---------------------------------------------------------------------------------------------
# train -> summary.json and metrics.jsonl (vnca.train)


@contract
class TrainSummary(Artifact):
    """MODEL_DIR/summary.json, written last by `vnca.train.train_and_evaluate`."""

    STEP: ClassVar[str] = "vnca train"
    variant: Variant
    name: str
    steps: Count
    wall_time_s: float
    hardware: str
    n_devices: Positive
    n_processes: Positive
    smoke: bool
    tier: Tier
    param_count: Count
    final_loss: float | None
    batch_size: Positive
    train_split: Literal["train", "train+valid"]
    resumed_from_step: Count
    commit: str | None = None  # the code's git commit (`vnca.provenance`), when known
    # The precision policy of training's arithmetic (`model.precision`, also in config.yaml);
    # summaries written before the policy existed trained in float32.
    precision: Precision = "float32"


@contract
class TrainRecord(Versioned):
    """A line of metrics.jsonl: training terms averaged over the steps since the last line."""

    STEP: ClassVar[str] = "vnca train"
    step: Count
    loss: Real
    kl: Real
    recon: Real
    elbo: Real
    grad_norm: Real
    pool_rows: Real | None = None  # non-doubling runs with a sample pool
    images_per_s: Real
    elapsed_s: Real


@contract
class ValidRecord(Versioned):
    """A line of metrics.jsonl with `split: valid`: the bound on a fixed validation subset."""

    STEP: ClassVar[str] = "vnca train"
    step: Count
    split: Literal["valid"]
    val_elbo: Real
    val_images: Positive
    val_iw_samples: Positive


def train_record(d: Any, where: str, stored: bool = False) -> TrainRecord | ValidRecord:
    """One metrics.jsonl record: a `ValidRecord` when it has `split`, else a `TrainRecord`.
    `stored`: `d` is a line as stored (with `version`), not a writer's dict."""
    cls = ValidRecord if isinstance(d, dict) and "split" in d else TrainRecord
    return cls.from_json(d, where) if stored else cls.from_dict(d, where)


def append_train_record(path: str | os.PathLike, record: TrainRecord | ValidRecord) -> None:
    """Append `record` (checked as a reader will) as one line of `path`."""
    data = record.to_json()
    train_record(data, str(path), stored=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(data) + "\n")


def read_train_log(path: str | os.PathLike) -> list[TrainRecord | ValidRecord]:
    """MODEL_DIR/metrics.jsonl, every line checked. A broken *last* line (a run interrupted
    mid-write) is dropped; any other bad line is a `DataError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not valid JSON") from None
        records.append(train_record(d, f"{path}: line {i + 1}", stored=True))
    return records


# ---------------------------------------------------------------------------------------------
# evaluate -> metrics.json (vnca.evaluate)


@contract
class IwBound(Contract):
    """The importance-weighted bound on the test images (`vnca.evaluation.bound`)."""

    k: Positive
    n_images: Positive
    mean_nats: float
    stderr_nats: float | None
    bits_per_dim: float
    stderr_bits_per_dim: float | None
    n_pixels: Positive
    elbo_mean_nats: float | None
    log_px_mean_nats: float | None
    batch_size: Positive
    sample_chunk: Positive
    images_per_second: float
    paper_nats: float | None
    reproduction_nats: float | None


@contract
class Untrained(Contract):
    """The same bound at the training run's initial parameters."""

    n_images: Count
    k: Positive
    mean_nats: float | None
    stderr_nats: float | None
    bits_per_dim: float | None
    stderr_bits_per_dim: float | None
    n_pixels: Positive
    trained_same_images_nats: float | None


@contract
class PriorSamples(Contract):
    n_images: Count
    mean_top_probability: float | None
    label_histogram: list[Count]


@contract
class Reconstruction(Contract):
    n_images: Count
    accuracy: float | None
    classifier_accuracy_originals: float | None


@contract
class Growth(Contract):
    n_examples: Count
    n_frames: Count


@contract
class DamageSquare(Contract):
    top: Count
    left: Count
    size: Count
    position: str


@contract
class Damage(Contract):
    """Damage recovery (`vnca.evaluation.damage.summarize` and the settings)."""

    n_images: Count
    before: float | None
    before_stderr: float | None
    undamaged_final: float | None
    undamaged_final_stderr: float | None
    after_damage: float | None
    after_damage_stderr: float | None
    after_recovery: float | None
    after_recovery_stderr: float | None
    damage_drop: float | None
    meaningful: bool
    recovered_fraction: float | None
    share_images_lower_after_damage: float | None
    damage_at: Count
    recovery_steps: Count
    square: DamageSquare


@contract
class Probe(Contract):
    """The linear probe on final cell states (`vnca.evaluation.probe`)."""

    accuracy: float | None
    image_accuracy: float | None
    chance: float | None
    n_train_images: Count
    n_test_images: Count
    n_train_cells: Count
    n_test_cells: Count
    final_train_loss: float | None
    steps: Count


@contract
class Tsne(Contract):
    """t-SNE of encoder means; k-nearest-neighbour label accuracy (k = KNN) of the means and
    of the embedding."""

    KNN: ClassVar[int] = 10
    n_images: Count
    knn10_accuracy_latent: float | None
    knn10_accuracy_tsne: float | None


@contract
class Interpolation(Contract):
    n_pairs: Count
    points: Count
    labels: list[list[Count]]


@contract
class EvalMetrics(Artifact):
    """EVAL_DIR/metrics.json, written last by `vnca.evaluate.evaluate`. A section left out
    (None) does not apply to the variant or was switched off in the eval config."""

    STEP: ClassVar[str] = "vnca evaluate"
    variant: Variant
    name: str
    smoke: bool
    tier: Tier
    model_dir: str
    n_test_images: Count
    device: str
    eval_config: dict
    eval_steps: Count | None
    # The precision policy of the evaluation's arithmetic (`model.precision`); files written
    # before the policy existed computed in float32.
    precision: Precision = "float32"
    iwelbo: IwBound
    untrained: Untrained | None = None
    classifier: ClassifierInfo
    prior_samples: PriorSamples | None = None
    reconstruction: Reconstruction | None = None
    growth: Growth | None = None
    damage: Damage | None = None
    probe: Probe | None = None
    tsne: Tsne | None = None
    interpolation: Interpolation | None = None
    seconds: dict[str, float]
    figures: list[str]
