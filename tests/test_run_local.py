"""`vnca run-local`: the whole pipeline through kfp.local (SubprocessRunner) on the bundled
sample with the smoke configs, and its refusals.

The end-to-end test is the suite's slowest (every step is a fresh Python process that imports
JAX and compiles its functions); it runs the README's main command as a user would.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.pipeline import DEFAULT_VARIANTS
from vnca import artifacts, cli, config


def _one_line_error(capsys, argv) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("vnca run-local: error: ")
    return err


def test_gs_root_is_refused_and_nothing_is_written(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(capsys, ["run-local", "--root", "gs://bucket/runs"])
    assert "gs://bucket/runs" in err and "vnca submit" in err
    assert list(tmp_path.iterdir()) == []  # in particular no folder named 'gs:'


def test_raw_source_needs_an_existing_raw_dir(capsys, tmp_path):
    err = _one_line_error(capsys, ["run-local", "--root", str(tmp_path), "--data-source", "raw"])
    assert "--raw-dir" in err
    err = _one_line_error(capsys, ["run-local", "--root", str(tmp_path), "--data-source", "raw",
                                   "--raw-dir", str(tmp_path / "missing")])
    assert "missing: directory not found" in err


# The smoke overlay, shortened further: JIT compilation in each step's fresh process dominates.
FAST = ["train.steps=3", "train.log_every=1", "train.val_every=3", "eval.probe_steps=10"]


def test_run_local_runs_every_step_end_to_end(capsys, tmp_path):
    root = tmp_path / "runs"
    sets = [arg for item in FAST for arg in ("--set", item)]
    assert cli.main(["run-local", "--smoke", "--root", str(root), *sets]) == 0
    out = capsys.readouterr().out
    report = Path(out.strip().splitlines()[-1].split("report: ", 1)[1])

    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("vnca-")]
    assert len(runs) == 1
    run = runs[0]
    assert report == run / "report" / "report_dir" / artifacts.REPORT_HTML

    # The terminal tells the story: a start and an end line per step, each step's time and
    # the headline numbers; kfp's and the libraries' chatter is only in run.log.
    steps = ["prepare-data"] + [f"{s}-{n}" for n in DEFAULT_VARIANTS
                                for s in ("train", "evaluate")] + ["report"]
    for step in steps:
        assert f"  {step} ..." in out and f"  {step} done in " in out
    assert "step times:" in out and "headline numbers (test split):" in out
    summary = out[out.index("step times:"):]
    for step in steps:
        assert f"  {step} " in summary
    for name in DEFAULT_VARIANTS:
        assert f"\n  {name} " in out[out.index("headline numbers"):]
    log = re.sub(r"\x1b\[[0-9;]*m", "", (run / "run.log").read_text())  # kfp's colours
    for chatter in ("executor_input", "Executing task", "finished with status SUCCESS",
                    "Looking for component"):
        assert chatter in log and chatter not in out
    assert "INFO" not in out and "[KFP Executor" not in out
    assert len(out.splitlines()) < 100       # a run printed about 430 lines before
    assert any(p.name.endswith("-cache") for p in (root / ".jax-cache").iterdir())

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
        assert resolved.train.steps == 3  # --set reached every variant
        # evaluate: a finite bound (a log-likelihood bound in nats is negative).
        metrics = json.loads((run / f"evaluate-{name}" / "evaluation" /
                              artifacts.EVAL_METRICS).read_text())
        bound = metrics["iwelbo"]["mean_nats"]
        assert math.isfinite(bound) and bound < 0
        assert math.isfinite(metrics["iwelbo"]["stderr_nats"])
        # The evaluate step's Metrics artifact carries the same bound (executor output).
        executor_output = json.loads(
            (run / f"evaluate-{name}" / "executor_output.json").read_text())
        logged = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert logged["iwelbo_nats"] == pytest.approx(bound)

    # report: one HTML report naming every variant, and the Metrics with every bound.
    html = report.read_text()
    for name in DEFAULT_VARIANTS:
        assert name in html
    assert (run / "report" / "report_html").read_text() == html
    report_output = json.loads((run / "report" / "executor_output.json").read_text())
    bounds = report_output["artifacts"]["bounds"]["artifacts"][0]["metadata"]
    assert sorted(bounds) == sorted(f"{n}_iwelbo_nats" for n in DEFAULT_VARIANTS)
