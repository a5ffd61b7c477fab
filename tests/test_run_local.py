"""`vnca run-local`: the whole pipeline through kfp.local (SubprocessRunner) on the bundled
sample with the smoke configs (the three variants, and the one-variant shape), its refusals, and how it finds a failed step without trusting
kfp.local's status (the same checks the docker runner relies on; tests/test_containers.py runs
them in real containers).

The end-to-end test is the suite's slowest (every step is a fresh Python process that imports
JAX and compiles its functions); it runs the README's main command as a user would.
"""

import json
import re
from pathlib import Path

import pytest

from vnca import artifacts
from vnca_pipeline import cli
from vnca_pipeline import local as run_local
from vnca_pipeline.variants import CONFIG_DIR, DEFAULT_VARIANTS


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


def _empty_raw_dir(tmp_path) -> Path:
    raw = tmp_path / "raw"  # outside --root, as a user's download folder would be
    raw.mkdir()
    return raw


def test_a_failing_step_ends_the_run_with_its_own_error_line(capsys, tmp_path):
    root, raw = tmp_path / "runs", _empty_raw_dir(tmp_path)
    err = _one_line_error(capsys, ["run-local", "--smoke", "--root", str(root),
                                   "--data-source", "raw", "--raw-dir", str(raw)])
    assert err.startswith("vnca run-local: error: step prepare-data failed: DataError: "
                          f"{raw}/binarized_mnist_test.amat[.gz]: file not found")
    assert "full log: " in err


def test_a_step_kfp_calls_a_success_without_its_outputs_fails_the_run(capsys, tmp_path,
                                                                      monkeypatch):
    """kfp.local's Docker handler reports SUCCESS for a container it finds already removed
    (always so with podman): with every step "succeeding" like that, the run still fails
    with the failed step's own error line, not a kfp error about a missing input."""
    from kfp.local import status, subprocess_task_handler

    handler = subprocess_task_handler.SubprocessTaskHandler
    real_run = handler.run
    monkeypatch.setattr(handler, "run", lambda self: (real_run(self), status.Status.SUCCESS)[1])
    root, raw = tmp_path / "runs", _empty_raw_dir(tmp_path)
    err = _one_line_error(capsys, ["run-local", "--smoke", "--root", str(root),
                                   "--data-source", "raw", "--raw-dir", str(raw)])
    assert err.startswith("vnca run-local: error: step prepare-data failed: DataError: ")
    assert "file not found" in err


def _fake_run(tmp_path, steps_done, names=("a", "b")) -> Path:
    """A run folder in which the steps `steps_done` left every file they must leave."""
    run = tmp_path / "vnca-2026-01-01-00-00-00-000000"
    expected = run_local.expected_outputs(list(names))
    for step in steps_done:
        for rel in expected[step]:
            (run / step / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / step / rel).write_text("x")
    return run


def _log(*steps_and_lines) -> str:
    out = []
    for step, lines in steps_and_lines:
        out.append(f"\x1b[36m2026-01-01 - INFO - Executing task '\x1b[96m{step}\x1b[0m'\x1b[0m")
        out += [f"    {line}" for line in lines]
        out.append(f"INFO - Task '{step}' finished with status SUCCESS")
    return "\n".join(out) + "\n"


def test_failed_step_names_the_first_step_without_its_files_and_its_error(tmp_path):
    names = ["a", "b"]
    steps = list(run_local.expected_outputs(names))
    assert steps == ["prepare-data", "train-a", "train-b", "evaluate-a", "evaluate-b", "report"]
    run = _fake_run(tmp_path, steps)
    log = _log(*[(s, ["fine"]) for s in steps])
    assert run_local.failed_step(run, names, log) is None

    # train-b ran (and "succeeded") but wrote no parameters; its traceback ends in an error.
    (run / "train-b" / "model" / artifacts.PARAMS).unlink()
    (run / "evaluate-b").rename(tmp_path / "gone")           # never ran
    log = _log(("prepare-data", []), ("train-a", ["ValueError: not me"]),
               ("train-b", ["Traceback (most recent call last):", "  File ...",
                            "vnca.errors.DataError: /data: dataset.npz is truncated",
                            "kfp chatter afterwards"]),
               ("evaluate-a", []), ("report", []))
    assert run_local.failed_step(run, names, log) == (
        "step train-b failed: DataError: /data: dataset.npz is truncated")

    # A step that logged no error line: the missing file is named instead.
    log = _log(("prepare-data", []), ("train-a", []), ("train-b", ["killed"]))
    assert run_local.failed_step(run, names, log) == (
        f"step train-b failed: it left no model/{artifacts.PARAMS} in {run / 'train-b'}")

    # An empty file is no output either; a step that never started "did not run".
    (run / "train-b" / "model" / artifacts.PARAMS).write_text("")
    log = _log(("prepare-data", []), ("train-a", []), ("train-b", []))
    assert run_local.failed_step(run, names, log).startswith("step train-b failed: it left no ")
    _fake_run(tmp_path, ["train-b"])
    assert run_local.failed_step(run, names, _log(("prepare-data", []))) == (
        f"step evaluate-b did not run (no evaluation/{artifacts.EVAL_METRICS} in "
        f"{run / 'evaluate-b'})")


def test_error_lines():
    assert run_local.last_error(["x", "vnca.errors.ConfigError: bad key", "done"]) == (
        "ConfigError: bad key")
    assert run_local.last_error(["vnca prepare-data: error: no such file"]) == "no such file"
    assert run_local.last_error(["some error: not one", "KeyboardInterrupt"]) is None


class _FakeContainer:
    def __init__(self, chunks, code):
        self.chunks, self.code, self.removed = chunks, code, False

    def logs(self, stream, follow):
        assert stream and follow
        return iter(self.chunks)

    def wait(self):
        return {"StatusCode": self.code}

    def remove(self, force):
        self.removed = force


class _FakeClient:
    def __init__(self, container):
        self.container, self.run_args = container, None
        self.images = self

    def get(self, image):
        assert image == "img:latest"

    def run(self, **kwargs):
        self.run_args = kwargs
        return self.container

    @property
    def containers(self):
        return self


def test_run_container_returns_the_exit_code_and_removes_the_container(capsys):
    """The replacement for kfp.local's run_docker_container: the container's own exit code
    (kfp's returns 0 when the container is already gone), its output in whole lines (chunks
    split inside a line and inside a UTF-8 character), the container removed afterwards."""
    pytest.importorskip("docker")
    container = _FakeContainer([b"first li", b"ne\nna\xc3", b"\xafve\nlast"], 3)
    client = _FakeClient(container)
    code = run_local.run_container(client, "img", ["python", "-c", "..."], {"/r": {}},
                                   user="1:1")
    assert code == 3 and container.removed
    assert capsys.readouterr().out == "first line\nnaïve\nlast\n"
    assert "auto_remove" not in client.run_args and client.run_args["user"] == "1:1"


def test_docker_runner_mounts_extra_folders_read_only(tmp_path):
    pytest.importorskip("docker")
    runner = run_local._runner("docker", mounts=[tmp_path], environment={"A": "1"})
    args = runner.container_run_args
    (mount,) = args["mounts"]
    assert (mount["Source"], mount["Target"], mount["Type"], mount["ReadOnly"]) == (
        str(tmp_path), str(tmp_path), "bind", True)
    assert args["environment"] == {"HOME": "/tmp", "A": "1"}


# The smoke overlay, shortened further: JIT compilation in each step's fresh process dominates.
FAST = ["train.steps=3", "train.log_every=1", "train.val_every=3", "eval.probe_steps=10"]


@pytest.mark.slow
def test_run_local_runs_every_step_end_to_end(capsys, tmp_path, check_smoke_run):
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

    # Every step's artifacts, as the container test checks them.
    assert check_smoke_run(root, train_steps=3) == run

    # TensorBoard: the command to watch the runs, then where this run's event files are; each
    # variant's model holds one event file (one segment) with a point per logged step.
    assert f"watch training: tensorboard --logdir {root.resolve()}" in out
    assert f"TensorBoard event files: {run}/train-*/model/events.out.tfevents.*" in out
    _check_event_files(run)


def _check_event_files(run: Path) -> None:
    """Tags and step counts of the smoke run's event files (FAST: 3 steps, a training record
    at every step, one validation at step 3), read back with TensorBoard's own loader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_tags = {"train/loss", "train/kl", "train/recon", "train/elbo", "train/grad_norm",
                  "train/images_per_s"}
    for name in DEFAULT_VARIANTS:
        model = run / f"train-{name}" / "model"
        assert len(list(model.glob("events.out.tfevents.*"))) == 1, name
        acc = EventAccumulator(str(model))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        pool = {"train/pool_rows"} if name == "nondoubling" else set()  # the sample pool
        assert tags == train_tags | pool | {"valid/val_elbo"}, name
        for tag in train_tags | pool:
            assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3], (name, tag)
        assert [e.step for e in acc.Scalars("valid/val_elbo")] == [3], name


@pytest.mark.slow
def test_run_local_with_one_config_runs_the_one_variant_pipeline(capsys, tmp_path):
    root = tmp_path / "runs"
    sets = [arg for item in FAST for arg in ("--set", item)]
    assert cli.main(["run-local", "--smoke", "--root", str(root), "--config",
                     str(CONFIG_DIR / "baseline.yaml"), *sets]) == 0
    out = capsys.readouterr().out
    (run,) = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("vnca-")]
    steps = ["prepare-data", "train-baseline", "evaluate-baseline", "report"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == sorted(steps)
    log = (run / "run.log").read_text(errors="replace")
    assert run_local.failed_step(run, ["baseline"], log) is None
    for step in steps:
        assert f"  {step} done in " in out
    bounds = json.loads((run / "report" / run_local.EXECUTOR_OUTPUT).read_text())
    assert list(bounds["artifacts"]["bounds"]["artifacts"][0]["metadata"]) == [
        "baseline_iwelbo_nats"]
    assert "baseline" in (run / "report" / "report_dir" / artifacts.REPORT_HTML).read_text()
