"""A diverged run's advice can be followed literally: `vnca train` at a learning rate that makes
the loss non-finite stops with one line naming the last good checkpoint (one whose parameters
gave a finite loss and gradient; the checkpoints whose parameters gave the non-finite loss are
moved to `OUT/ckpt-diverged`), and the same command with a lower learning rate resumes from
exactly that checkpoint and trains to the end with finite losses, even with
train.keep_checkpoints=1."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vnca import artifacts, checkpoint, cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ("train.checkpoint_every=1", "train.log_every=1", "train.val_every=0",
        "train.batch_size=4", "train.keep_checkpoints=1")
DIVERGING = "train.learning_rate=1e30"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_dataset):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _train(capfd, data: Path, out: Path, steps: int, *sets: str) -> tuple[int, str]:
    """`vnca train` (baseline, smoke) in this process: (exit status, stderr)."""
    capfd.readouterr()
    rc = cli.main(["train", "--config", str(ROOT / "configs/baseline.yaml"), "--config",
                   str(ROOT / "configs/smoke.yaml"), "--data", str(data), "--out", str(out),
                   "--steps", str(steps), *[a for kv in (*FAST, *sets) for a in ("--set", kv)]])
    return rc, capfd.readouterr().err


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [seg.strip() for line in stderr.splitlines() for seg in line.split("\r")]
    lines = [ln for ln in lines if ln and not ln.startswith(("train", "warning:"))]
    assert len(lines) == 1, lines[-20:]
    assert lines[0].startswith("vnca train: error: training diverged: "), lines[0]
    return lines[0]


def _ckpts(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / artifacts.CHECKPOINTS).iterdir() if p.name.isdigit())


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / artifacts.TRAIN_METRICS).read_text().splitlines()]


@pytest.mark.slow
def test_the_advice_after_divergence_resumes_from_a_good_checkpoint(capfd, data_dir, tmp_path):
    rc, err = _train(capfd, data_dir, tmp_path, 4)
    assert rc == 0, err[-3000:]
    assert _ckpts(tmp_path) == [4]

    rc, err = _train(capfd, data_dir, tmp_path, 10, DIVERGING)  # learning_rate is resumable
    assert rc == 2
    line = _error_line(err)
    m = re.search(r"diverged: (loss|grad_norm) is \S+ at step (\d+); the last good checkpoint "
                  r"is step (\d+) in (\S+) \(checkpoints? ([\d, ]+), whose parameters gave it, "
                  r"moved to (\S+)\); run the same command again with a lower "
                  r"train.learning_rate \(now 1e\+30\) to resume from checkpoint (\d+)$", line)
    assert m, line
    bad_step, good, moved = int(m[2]), int(m[3]), [int(s) for s in m[5].split(", ")]
    assert good == int(m[7]) == 4  # step 5's loss (of checkpoint 4's parameters) was finite
    assert moved == list(range(good + 1, bad_step))  # their parameters gave the bad loss
    assert Path(m[4]) == tmp_path / artifacts.CHECKPOINTS
    assert Path(m[6]) == tmp_path / checkpoint.DIVERGED_DIR
    assert _ckpts(tmp_path) == [good]  # kept although train.keep_checkpoints=1
    assert sorted(int(p.name) for p in Path(m[6]).iterdir()) == moved
    summary = json.loads((tmp_path / artifacts.TRAIN_SUMMARY).read_text())
    assert summary["steps"] == 4  # the diverged run wrote no model over the 4-step one

    # The advice, literally: the same command with a lower learning rate.
    rc, err = _train(capfd, data_dir, tmp_path, 10, "train.learning_rate=1e-5")
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / artifacts.TRAIN_SUMMARY).read_text())
    assert summary["resumed_from_step"] == good
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 11))  # the bad records were dropped
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in recs)
    assert _ckpts(tmp_path) == [10]


@pytest.mark.slow
def test_a_run_without_a_good_checkpoint_is_told_to_start_over(capfd, data_dir, tmp_path):
    """At 1e30 from the start, step 1's update is finite (checkpoint 1 is written) but gives a
    non-finite loss at step 2: no checkpoint is good, and the advice says so."""
    rc, err = _train(capfd, data_dir, tmp_path, 10, DIVERGING)
    assert rc == 2
    line = _error_line(err)
    assert re.search(r"at step 2; no good checkpoint is left \(checkpoint 1, whose parameters "
                     r"gave it, moved to \S+\); run the same command again with a lower "
                     r"train.learning_rate \(now 1e\+30\) to start over$", line), line
    assert _ckpts(tmp_path) == []

    rc, err = _train(capfd, data_dir, tmp_path, 2)
    assert rc == 0, err[-3000:]
    assert json.loads((tmp_path / artifacts.TRAIN_SUMMARY).read_text())["resumed_from_step"] == 0
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path))


def test_rotation_deletes_only_checkpoints_whose_loss_was_seen_finite(tmp_path):
    """`train.keep_checkpoints` counts verified checkpoints (their parameters gave a finite
    loss): newer ones stay until their loss is known, so a bad one never pushes out the last
    good one; set-aside checkpoints leave the manager and the directory."""
    state = {"params": {"w": np.zeros(3, np.float32)}}
    with checkpoint.Checkpointer(tmp_path / artifacts.CHECKPOINTS, keep=1) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state, {"step": step})
        assert ckpt.steps() == [1, 2, 3, 4]  # orbax rotates nothing by itself
        ckpt.prune(verified=2)
        assert ckpt.steps() == _ckpts(tmp_path) == [2, 3, 4]
        assert ckpt.set_aside([3, 4]) == tmp_path / checkpoint.DIVERGED_DIR
        assert ckpt.steps() == _ckpts(tmp_path) == [2]
        assert sorted(p.name for p in (tmp_path / checkpoint.DIVERGED_DIR).iterdir()) == ["3", "4"]
        ckpt.prune(verified=4)
        assert ckpt.steps() == [2]
        assert ckpt.set_aside([]) is None
