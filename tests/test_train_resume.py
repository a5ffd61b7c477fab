"""Resume after SIGKILL: `vnca train` killed after its first checkpoint and started again
finishes with exactly the parameters of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vnca import artifacts, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
FAST = ("train.checkpoint_every=2", "train.log_every=2", "train.val_every=3",
        "train.val_images=8", "train.batch_size=4", "train.pool.size=8")


def _ckpt_steps(out: Path) -> list[int]:
    d = out / artifacts.CHECKPOINTS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_sigkill_then_restart_matches_an_uninterrupted_run(tmp_path, smoke_cfg, make_dataset):
    data = make_dataset(tmp_path / "data")
    cfg = smoke_cfg("nondoubling", *FAST)  # pool variant: params, Adam state and pool resume
    train.train_and_evaluate(cfg, data_dir=data, out_dir=tmp_path / "straight", steps=STEPS)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vnca.cli", "train", "--config", "configs/nondoubling.yaml",
           "--config", "configs/smoke.yaml", "--data", str(data), "--out", str(killed),
           "--steps", str(STEPS)] + [a for kv in FAST for a in ("--set", kv)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not _ckpt_steps(killed) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    at_kill = _ckpt_steps(killed)
    assert at_kill and max(at_kill) < STEPS
    assert not (killed / artifacts.PARAMS).exists()

    summary = train.train_and_evaluate(cfg, data_dir=data, out_dir=killed, steps=STEPS)
    assert summary["resumed_from_step"] == max(at_kill) >= 2
    assert summary["steps"] == STEPS
    a = (tmp_path / "straight" / artifacts.PARAMS).read_bytes()
    b = (killed / artifacts.PARAMS).read_bytes()
    assert a == b  # bit-identical parameters
