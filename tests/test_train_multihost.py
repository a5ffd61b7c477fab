"""Multi-host training for real: two JAX processes on this machine (coordinator on 127.0.0.1,
gloo collectives, 4 CPU devices each) train the non-doubling VNCA with its sample pool to the
parameters of one process with 8 devices, through a checkpoint both write and both resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from vnca import artifacts

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("train.batch_size=8", "train.pool.size=16", "train.checkpoint_every=2",
            "train.val_every=0", "train.log_every=1")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "vnca.cli", "train", "--config", "configs/nondoubling.yaml",
            "--config", "configs/smoke.yaml", "--data", str(data), "--out", str(out),
            "--steps", str(steps), *[a for kv in SETTINGS for a in ("--set", kv)]]


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **extra)
    return env


def _run_processes(cmds_envs: list[tuple[list[str], dict]]) -> list[str]:
    """Start every command at once, wait for all (killing all on a failure or a timeout)."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, env in cmds_envs]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _two_hosts(data: Path, out: Path, steps: int) -> list[str]:
    port = _free_port()
    return _run_processes([
        (_train_cmd(data, out, steps),
         _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
              JAX_PROCESS_ID=str(i)))
        for i in range(2)])


def _params(out: Path) -> list[np.ndarray]:
    tree = serialization.msgpack_restore((out / artifacts.PARAMS).read_bytes())
    return jax.tree_util.tree_leaves(tree)


def _losses(out: Path) -> list[float]:
    lines = (out / artifacts.TRAIN_METRICS).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_from_their_checkpoint(tmp_path, make_dataset):
    data = make_dataset(tmp_path / "data", n_train=64)
    one, two = tmp_path / "one", tmp_path / "two"
    _run_processes([(_train_cmd(data, one, 4), _env(8))])

    _two_hosts(data, two, 2)  # both write checkpoint 2 ...
    assert sorted(p.name for p in (two / artifacts.CHECKPOINTS).iterdir()) == ["2"]
    _two_hosts(data, two, 4)  # ... and both resume from it
    summary = json.loads((two / artifacts.TRAIN_SUMMARY).read_text())
    assert (summary["n_processes"], summary["n_devices"]) == (2, 8)
    assert summary["resumed_from_step"] == 2
    assert json.loads((one / artifacts.TRAIN_SUMMARY).read_text())["n_processes"] == 1

    # Pool rows are in use from step 2 on, so the losses check the pool's global shuffle.
    rec = json.loads((two / artifacts.TRAIN_METRICS).read_text().splitlines()[-1])
    assert rec["pool_rows"] > 0
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    a, b = _params(one), _params(two)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # the same up to the order of float32 reductions
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
