"""The shape of every JSON artifact one step hands to another, written and read by one class.

    prepare-data -> DATA_DIR/match_report.json   MatchReport
    train        -> MODEL_DIR/summary.json       TrainSummary
                    MODEL_DIR/metrics.jsonl      TrainRecord or ValidRecord, one a line
    evaluate     -> EVAL_DIR/metrics.json        EvalMetrics

Each is a `vnca.schema` record: frozen, and checked by its field types whether it is built in
Python or read from a file. A writer builds one (or checks the dict it assembled with
`from_dict`) and calls `write`, which checks the object as a reader will before a byte is
written; a reader calls `read`. Any problem is one `DataError` line naming the file and the key
(`vnca.schema.explain`). A key the class does not declare is refused in both directions, so a
new key is a reviewed edit here. Sections whose shape depends on the data source or the config
(`provenance`, `method`, `eval_config`, ...) stay plain JSON objects.

Field types: those of `vnca.schema` (`Count`, `Positive`, `Finite`: a writer's NaN is written as
null, `Finite | None`; `Real`: the training log keeps NaN). `X | None` without a default: the
key is always written, its value may be null. A field defaulting to None is an optional section:
the key is absent when there is none. No field has another default: every key a class declares
is in every file its version writes.

Versions: every file (every line of metrics.jsonl) carries `version`, one integer per class.
When a class's shape changes, its `VERSION` goes up and `UPGRADES[v]` turns a file of version
`v` into one of `v + 1` (a key added gets the value the older code meant). A file without a
version (written before the artifacts had versions), or of a version with no upgrade, is refused
with one line naming the step to rerun.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import pydantic
from pydantic import field_validator

from vnca import artifacts, schema
from vnca.config import Precision, Tier, Variant
from vnca.errors import DataError
from vnca.fileio import write_atomic
from vnca.schema import Bool, Count, Finite, Positive, Real, Str

contract = schema.record


# ---------------------------------------------------------------------------------------------
# Bases.


class Contract(schema.Record):
    """A JSON object with declared keys; subclasses are `@contract` classes. A field's JSON key
    is its name, or its `pydantic.Field(alias=...)`; a field defaulting to None is optional."""

    ERROR = DataError

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Self:
        """`d` (a JSON object without `version`) checked and converted; `where` names it in
        errors."""
        return cls.parse(d, where)

    def to_dict(self) -> dict:
        """The JSON object (without `version`): optional sections that are None are left out."""
        out = {}
        for name, info in type(self).__pydantic_fields__.items():
            value = getattr(self, name)
            if not (value is None and info.default is None):
                out[info.alias or name] = _dump(value)
        return out


def _dump(v: Any) -> Any:
    if isinstance(v, Contract):
        return v.to_dict()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


class Versioned(Contract):
    """A contract stored with a `version`: a JSON file, or one line of a JSON-lines log."""

    VERSION: ClassVar[int] = 1
    # {v: f}: f turns the stored object (without `version`) of version v into one of v + 1.
    UPGRADES: ClassVar[dict[int, Callable[[dict], dict]]] = {}
    STEP: ClassVar[str]  # the command that writes it, named when a file must be rewritten

    def to_json(self) -> dict:
        return {"version": self.VERSION, **self.to_dict()}

    @classmethod
    def from_json(cls, d: Any, where: str) -> Self:
        """An object as stored (with `version`), upgraded to this version, checked and
        converted."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        rerun = f"rerun `{cls.STEP}` to write it again"
        if "version" not in d:
            raise DataError(f"{where}: no 'version' (written by an older vnca); {rerun}")
        version = d["version"]
        readable = (f"version {cls.VERSION}" if not cls.UPGRADES else
                    f"versions {min(cls.UPGRADES)} to {cls.VERSION}")
        if not (type(version) is int and (version == cls.VERSION or version in cls.UPGRADES)):
            raise DataError(f"{where}: version {schema.short(version)}, this vnca reads "
                            f"{readable}; {rerun}")
        d = {k: v for k, v in d.items() if k != "version"}
        for v in range(version, cls.VERSION):
            d = cls.UPGRADES[v](d)
        return cls.from_dict(d, where)


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
    min: Finite | None = None
    mean: Finite | None = None
    p0_1: Finite | None = pydantic.Field(default=None, alias="p0.1")
    p1: Finite | None = None
    p5: Finite | None = None
    p25: Finite | None = None
    p50: Finite | None = None
    p75: Finite | None = None
    p95: Finite | None = None
    max: Finite | None = None
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

    queries: Str
    reference: Str
    n_queries: Count
    n_references: Count
    top_k: Positive
    seconds: Finite


@contract
class ClassifierInfo(Contract):
    """The independent digit classifier (`vnca.evaluation.classifier`)."""

    kind: Str
    n_train: Count
    test_accuracy: Finite | None


@contract
class PairsFigure(Contract):
    file: Str
    seed: schema.Int()
    rows: dict


@contract
class MatchReport(Artifact):
    """DATA_DIR/match_report.json, written by `vnca.data.prepare.prepare_data`."""

    STEP: ClassVar[str] = "vnca prepare-data"
    source: Literal["raw", "tfds", "bundled"]
    summary: Str
    counts: dict[str, Count]
    provenance: dict
    method: dict
    groups: dict[str, MatchGroup]
    splits: dict[str, MatchSummary]
    classifier: ClassifierInfo
    timing_s: dict[str, Finite]
    figure: PairsFigure

    @field_validator("counts", "splits")
    @classmethod
    def _one_per_split(cls, value: dict) -> dict:
        if sorted(value) != sorted(artifacts.SPLITS):
            raise schema.invalid(f"must have the keys {', '.join(artifacts.SPLITS)}")
        return value


# ---------------------------------------------------------------------------------------------
# train -> summary.json and metrics.jsonl (vnca.train)


def _float32_unless_stated(d: dict) -> dict:
    """TrainSummary and EvalMetrics version 1 -> 2: `precision` became a required key. A
    version 1 file written before the precision policy existed lacks it; its arithmetic was
    float32."""
    return {"precision": "float32", **d}


@contract
class TrainSummary(Artifact):
    """MODEL_DIR/summary.json, written last by `vnca.train.train_and_evaluate`."""

    STEP: ClassVar[str] = "vnca train"
    VERSION: ClassVar[int] = 2  # 2: `precision` required
    UPGRADES: ClassVar[dict] = {1: _float32_unless_stated}
    variant: Variant
    name: Str
    steps: Count
    wall_time_s: Finite
    hardware: Str
    n_devices: Positive
    n_processes: Positive
    smoke: Bool
    tier: Tier
    param_count: Count
    final_loss: Finite | None
    batch_size: Positive
    train_split: Literal["train", "train+valid"]
    resumed_from_step: Count
    commit: Str | None = None  # the code's git commit (`vnca.provenance`), when known
    # The precision policy of training's arithmetic (`model.precision`, also in config.yaml).
    precision: Precision


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
    mean_nats: Finite
    stderr_nats: Finite | None
    bits_per_dim: Finite
    stderr_bits_per_dim: Finite | None
    n_pixels: Positive
    elbo_mean_nats: Finite | None
    log_px_mean_nats: Finite | None
    batch_size: Positive
    sample_chunk: Positive
    images_per_second: Finite
    paper_nats: Finite | None
    reproduction_nats: Finite | None


@contract
class Untrained(Contract):
    """The same bound at the training run's initial parameters."""

    n_images: Count
    k: Positive
    mean_nats: Finite | None
    stderr_nats: Finite | None
    bits_per_dim: Finite | None
    stderr_bits_per_dim: Finite | None
    n_pixels: Positive
    trained_same_images_nats: Finite | None


@contract
class PriorSamples(Contract):
    n_images: Count
    mean_top_probability: Finite | None
    label_histogram: list[Count]


@contract
class Reconstruction(Contract):
    n_images: Count
    accuracy: Finite | None
    classifier_accuracy_originals: Finite | None


@contract
class Growth(Contract):
    n_examples: Count
    n_frames: Count


@contract
class DamageSquare(Contract):
    top: Count
    left: Count
    size: Count
    position: Str


@contract
class Damage(Contract):
    """Damage recovery (`vnca.evaluation.damage.summarize` and the settings)."""

    n_images: Count
    before: Finite | None
    before_stderr: Finite | None
    undamaged_final: Finite | None
    undamaged_final_stderr: Finite | None
    after_damage: Finite | None
    after_damage_stderr: Finite | None
    after_recovery: Finite | None
    after_recovery_stderr: Finite | None
    damage_drop: Finite | None
    meaningful: Bool
    recovered_fraction: Finite | None
    share_images_lower_after_damage: Finite | None
    damage_at: Count
    recovery_steps: Count
    square: DamageSquare


@contract
class Probe(Contract):
    """The linear probe on final cell states (`vnca.evaluation.probe`)."""

    accuracy: Finite | None
    image_accuracy: Finite | None
    chance: Finite | None
    n_train_images: Count
    n_test_images: Count
    n_train_cells: Count
    n_test_cells: Count
    final_train_loss: Finite | None
    steps: Count


@contract
class Tsne(Contract):
    """t-SNE of encoder means; k-nearest-neighbour label accuracy (k = KNN) of the means and
    of the embedding."""

    KNN: ClassVar[int] = 10
    n_images: Count
    knn10_accuracy_latent: Finite | None
    knn10_accuracy_tsne: Finite | None


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
    VERSION: ClassVar[int] = 2  # 2: `precision` required
    UPGRADES: ClassVar[dict] = {1: _float32_unless_stated}
    variant: Variant
    name: Str
    smoke: Bool
    tier: Tier
    model_dir: Str
    n_test_images: Count
    device: Str
    eval_config: dict
    eval_steps: Count | None
    # The precision policy of the evaluation's arithmetic (`model.precision`).
    precision: Precision
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
    seconds: dict[str, Finite]
    figures: list[Str]
