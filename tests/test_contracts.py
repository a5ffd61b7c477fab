"""The artifact contracts (`vnca.contracts`): how values are checked, versions, and that a
writer refuses what a reader would. Each artifact as its real step writes it is read back in
tests/test_data_bundled.py (match_report.json), tests/test_train.py (summary.json,
metrics.jsonl) and tests/test_evaluate_run.py (metrics.json); tests/test_report.py builds the
report from contract objects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vnca import contracts
from vnca.data import matching
from vnca.errors import DataError

ARTIFACTS = [(contracts.MatchReport, "vnca prepare-data"), (contracts.TrainSummary, "vnca train"),
             (contracts.TrainRecord, "vnca train"), (contracts.ValidRecord, "vnca train"),
             (contracts.EvalMetrics, "vnca evaluate")]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("cls, step", ARTIFACTS)
def test_a_file_without_or_with_another_version_is_refused(cls, step):
    newer = cls.VERSION + 1
    for stored, needle in (({"step": 1}, "no 'version' (written by an older vnca)"),
                           ({"version": newer}, f"version {newer}, this vnca reads version"),
                           ({"version": 0}, "version 0, this vnca reads version"),
                           ({"version": True}, "version true")):
        with pytest.raises(DataError) as e:
            cls.from_json(stored, "f.json")
        msg = _one_line(e)
        assert msg.startswith("f.json: ") and needle in msg
        assert msg.endswith(f"rerun `{step}` to write it again")


@pytest.mark.parametrize("value, needle", [
    ({"distinct": 1, "references": 0}, "missing 'rows' (a non-negative integer)"),
    ({"distinct": 1, "references": 0, "rows": -1}, "'rows' must be a non-negative integer, got -1"),
    ({"distinct": 1, "references": 0, "rows": True}, "'rows' must be a non-negative integer, got true"),
    ({"distinct": 1, "references": 0, "rows": 2.0}, "'rows' must be a non-negative integer, got 2.0"),
    ({"distinct": 1, "references": 0, "rows": 2, "hist": [1]}, ("unknown key 'hist' (known "
     "keys of vnca.contracts.Collisions: distinct, references, rows)")),
    ([1, 2], "expected a JSON object, got list"),
])
def test_values_are_checked_and_named(value, needle):
    with pytest.raises(DataError) as e:
        contracts.Collisions.from_dict(value, "x.json")
    assert _one_line(e) == f"x.json: {needle}"


def test_nested_keys_are_named_by_their_path():
    d = {"n": 3, "collisions_before_assignment": {"distinct": 1, "references": 0, "rows": 0}}
    with pytest.raises(DataError, match=r"^r\.json: missing 'collisions_after_assignment' "):
        contracts.MatchSummary.from_dict(d, "r.json")
    d["collisions_after_assignment"] = {"distinct": 1, "references": "0", "rows": 0}
    with pytest.raises(DataError, match=r"'collisions_after_assignment\.references' must be"):
        contracts.MatchSummary.from_dict(d, "r.json")


def test_numbers_finite_or_null_and_the_training_log_keeps_nan():
    assert contracts.Distribution.from_dict({"n": 2, "min": 1}, "d").min == 1.0  # int -> float
    for bad in (float("nan"), float("inf"), "1.5", True):
        with pytest.raises(DataError, match="'mean' must be a finite number or null"):
            contracts.Distribution.from_dict({"n": 2, "mean": bad}, "d")
    record = {"version": 1, "step": 3, "loss": float("nan"), "kl": 1.0, "recon": -2.0,
              "elbo": -3.0, "grad_norm": float("inf"), "images_per_s": 5, "elapsed_s": 0.5}
    r = contracts.train_record(record, "log", stored=True)
    assert isinstance(r, contracts.TrainRecord) and math.isnan(r.loss) and r.pool_rows is None
    assert r.to_json() == dict(record, images_per_s=5.0)  # pool_rows: absent, not null
    valid = contracts.train_record({"version": 1, "step": 3, "split": "valid", "val_elbo": -9.5,
                                    "val_images": 8, "val_iw_samples": 1}, "log", stored=True)
    assert isinstance(valid, contracts.ValidRecord)
    with pytest.raises(DataError, match="'split' must be one of \"valid\""):
        contracts.train_record(dict(valid.to_json(), split="test"), "log", stored=True)


SUMMARY = {"variant": "baseline", "name": "baseline", "steps": 3, "wall_time_s": 1.5,
           "hardware": "1 x cpu", "n_devices": 1, "n_processes": 1, "smoke": True,
           "tier": "smoke", "param_count": 10, "final_loss": 1.0, "batch_size": 8,
           "train_split": "train", "resumed_from_step": 0, "precision": "float32"}


def test_a_contract_is_checked_when_built_and_again_before_it_is_written(tmp_path,
                                                                         report_inputs):
    with pytest.raises(DataError) as e:
        contracts.TrainSummary(**dict(SUMMARY, wall_time_s=float("nan")))
    assert _one_line(e) == ("vnca.contracts.TrainSummary: 'wall_time_s' must be a finite "
                            "number, got nan")
    summary = contracts.TrainSummary(**SUMMARY)
    path = tmp_path / "summary.json"
    summary.write(path)
    assert json.loads(path.read_text()) == {"version": 2, **summary.to_dict()}
    assert contracts.TrainSummary.read(path) == summary
    # A frozen contract's lists can still be changed in place: `write` checks it again.
    metrics = report_inputs.eval_metrics("doubling")
    metrics.figures.append(3)
    path = tmp_path / "metrics.json"
    with pytest.raises(DataError) as e:
        metrics.write(path)
    n = len(metrics.figures) - 1
    assert _one_line(e) == f"{path}: 'figures[{n}]' must be a string, got 3"
    assert not path.exists()


@pytest.mark.parametrize("cls", [contracts.TrainSummary, contracts.EvalMetrics])
def test_precision_is_required_from_version_2_and_version_1_is_upgraded(tmp_path, cls,
                                                                      report_inputs):
    """Version 2 added `precision` as a required key. A version 1 file is upgraded: without the
    key (written before the precision policy existed) its arithmetic was float32."""
    if cls is contracts.TrainSummary:
        current = contracts.TrainSummary(**SUMMARY)
    else:
        current = report_inputs.eval_metrics("baseline", precision="bf16_operands")
    d = current.to_dict()
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"version": 1, **d}))  # v1, written with the policy
    assert cls.read(path) == current
    path.write_text(json.dumps({"version": 1, **{k: v for k, v in d.items()
                                                  if k != "precision"}}))
    assert cls.read(path).precision == "float32"
    path.write_text(json.dumps({"version": 2, **{k: v for k, v in d.items()
                                                  if k != "precision"}}))
    with pytest.raises(DataError) as e:
        cls.read(path)
    assert _one_line(e) == (f"{path}: missing 'precision' (one of \"float32\", "
                            "\"bf16_operands\")")
    path.write_text(json.dumps({"version": 1, **d, "precision": "fp8"}))
    with pytest.raises(DataError) as e:
        cls.read(path)
    assert "'precision' must be one of" in _one_line(e)


@pytest.mark.parametrize("cls", [c for c, _ in ARTIFACTS])
def test_every_version_below_the_current_one_that_is_read_has_its_upgrade(cls):
    assert sorted(cls.UPGRADES) == list(range(min(cls.UPGRADES, default=cls.VERSION),
                                              cls.VERSION))


def test_a_log_line_cut_by_a_kill_is_dropped_only_at_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    record = contracts.ValidRecord(step=1, split="valid", val_elbo=-9.0, val_images=8,
                                   val_iw_samples=1)
    contracts.append_train_record(path, record)
    with path.open("a") as f:
        f.write('{"version": 1, "st')
    assert contracts.read_train_log(path) == [record]
    with path.open("a") as f:
        f.write("\n" + json.dumps(record.to_json()) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl: line 2 is not valid JSON$"):
        contracts.read_train_log(path)


def test_matching_distribution_is_a_distribution():
    values = np.array([0.5, 2.0, 20.0, 80.0, np.inf])
    d = matching.distribution(values)
    dist = contracts.Distribution.from_dict(d, "d")
    assert dist.to_dict() == d
    assert [q for q, _ in dist.percentiles()] == [0.1, 1, 5, 25, 50, 75, 95]
    assert dist.percentiles()[4] == (50.0, d["p50"])
    empty = matching.distribution(np.array([np.nan]))
    assert contracts.Distribution.from_dict(empty, "d").percentiles() == []
