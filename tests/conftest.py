"""Fixtures shared by the test modules."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from vnca import artifacts, config
from vnca.errors import DataError


@pytest.fixture
def refuses_edited_copies(tmp_path):
    """`check(read, name, good, cases)`: for each `(edit, needle)` in `cases`, a copy of the
    JSON object `good` changed by `edit(copy)` and written to `tmp_path / name` is refused by
    `read(path)` with one `DataError` line that names the copy and contains `needle`."""

    def check(read, name: str, good: dict, cases) -> None:
        for edit, needle in cases:
            bad = json.loads(json.dumps(good))
            edit(bad)
            copy = tmp_path / name
            copy.write_text(json.dumps(bad))
            with pytest.raises(DataError) as e:
                read(copy)
            assert "\n" not in str(e.value) and str(e.value).startswith(f"{copy}: "), needle
            assert needle in str(e.value)

    return check


@pytest.fixture
def check_smoke_run():
    """`check(root, train_steps=None)`: see `_check_smoke_run`."""
    return _check_smoke_run


def _check_smoke_run(root: Path, train_steps: int | None = None) -> Path:
    """Every step of the one smoke run under `root` (a `vnca run-local` root, either runner)
    left its artifacts with sane values (and, if given, trained `train_steps` steps); returns
    the run's folder."""
    from vnca_pipeline import local as run_local
    from vnca_pipeline.variants import DEFAULT_VARIANTS

    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("vnca-")]
    assert len(runs) == 1, runs
    run = runs[0]
    log = (run / "run.log").read_text(errors="replace")
    assert run_local.failed_step(run, list(DEFAULT_VARIANTS), log) is None
    for step in run_local.expected_outputs(list(DEFAULT_VARIANTS)):
        assert f"Task '{step}' finished with status SUCCESS" in run_local.ANSI.sub("", log)
        # The steps ran as the calling user, so the outputs belong to it.
        assert (run / step / run_local.EXECUTOR_OUTPUT).stat().st_uid == os.getuid()

    # prepare-data: the dataset.
    with np.load(run / "prepare-data" / "dataset" / artifacts.DATASET) as npz:
        for split in artifacts.SPLITS:
            assert npz[f"{split}_x"].shape[1:] == (28, 28) and len(npz[f"{split}_x"]) > 0
    for name in DEFAULT_VARIANTS:
        # train: a finished model (final parameters, a checkpoint, its resolved smoke config).
        model = run / f"train-{name}" / "model"
        assert (model / artifacts.PARAMS).stat().st_size > 0
        assert any((model / artifacts.CHECKPOINTS).iterdir())
        resolved = config.load([model / artifacts.RESOLVED_CONFIG])
        assert (resolved.name, resolved.smoke) == (name, True)
        if train_steps is not None:
            assert resolved.train.steps == train_steps  # --set reached every variant
        # evaluate: a finite bound (a log-likelihood bound in nats is negative), and the
        # step's Metrics artifact carries the same bound (executor output).
        metrics = json.loads(
            (run / f"evaluate-{name}" / "evaluation" / artifacts.EVAL_METRICS).read_text())
        bound = metrics["iwelbo"]["mean_nats"]
        assert math.isfinite(bound) and bound < 0
        assert math.isfinite(metrics["iwelbo"]["stderr_nats"])
        logged = json.loads((run / f"evaluate-{name}" / run_local.EXECUTOR_OUTPUT).read_text())
        assert logged["artifacts"]["metrics"]["artifacts"][0]["metadata"]["iwelbo_nats"] == (
            pytest.approx(bound))

    # report: one HTML report naming every variant, and the Metrics with every bound.
    html = (run / "report" / "report_dir" / artifacts.REPORT_HTML).read_text()
    for name in DEFAULT_VARIANTS:
        assert name in html
    assert (run / "report" / "report_html").read_text() == html
    bounds = json.loads((run / "report" / run_local.EXECUTOR_OUTPUT).read_text())
    assert sorted(bounds["artifacts"]["bounds"]["artifacts"][0]["metadata"]) == sorted(
        f"{n}_iwelbo_nats" for n in DEFAULT_VARIANTS)
    return run
