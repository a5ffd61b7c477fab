"""Multi-host training for real: two JAX processes on this machine (coordinator on 127.0.0.1,
gloo collectives, 4 CPU devices each) train the non-doubling VNCA with its sample pool to the
parameters of one process with 8 devices, through a checkpoint both write and both resume; a
SIGTERM to one of them stops both after the same step, with one checkpoint, and resuming from
it ends with the parameters of a run that was never stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


def _env(devices: int, cache: Path | None = None, **extra: str) -> dict:
    """A CPU process with `devices` devices; with `cache`, compiled programs are kept there
    for the next process (XLA compiles the same program to the same code: numbers unchanged)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **extra)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """One compilation cache for this module's processes: each later one skips compiling."""
    return tmp_path_factory.mktemp("jax-cache")


def _run_processes(cmds_envs: list[tuple[list[str], dict]],
                   signal_one: Callable[[list[subprocess.Popen]], None] | None = None,
                   expect: int = 0) -> list[str]:
    """Start every command at once (then call `signal_one` with them, if given), wait for all
    (killing all on a failure or a timeout); every exit status must be `expect`."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, env in cmds_envs]
    outs = []
    try:
        if signal_one is not None:
            signal_one(procs)
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outs.append(out)
        for p, out in zip(procs, outs):
            assert p.returncode == expect, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _two_hosts(data: Path, out: Path, steps: int, *extra: str, cache: Path,
               **kwargs) -> list[str]:
    port = _free_port()
    return _run_processes([
        ([*_train_cmd(data, out, steps), *extra],
         _env(4, cache, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
              JAX_PROCESS_ID=str(i)))
        for i in range(2)], **kwargs)


def _params(out: Path) -> list[np.ndarray]:
    tree = serialization.msgpack_restore((out / artifacts.PARAMS).read_bytes())
    return jax.tree_util.tree_leaves(tree)


def _losses(out: Path) -> list[float]:
    lines = (out / artifacts.TRAIN_METRICS).read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_from_their_checkpoint(tmp_path, make_dataset,
                                                                       compile_cache):
    data = make_dataset(tmp_path / "data", n_train=64)
    one, two = tmp_path / "one", tmp_path / "two"
    _run_processes([(_train_cmd(data, one, 4), _env(8))])

    _two_hosts(data, two, 2, cache=compile_cache)  # both write checkpoint 2 ...
    assert sorted(p.name for p in (two / artifacts.CHECKPOINTS).iterdir()) == ["2"]
    _two_hosts(data, two, 4, cache=compile_cache)  # ... and both resume from it
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


def _logged_step(out: Path) -> int:
    """The step of the newest record in metrics.jsonl (0 if none yet)."""
    path = out / artifacts.TRAIN_METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def _ckpts(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / artifacts.CHECKPOINTS).iterdir() if p.name.isdigit())


def _stop_line(out: str) -> str:
    """The one error line of a stopped process."""
    assert "Traceback" not in out, out[-3000:]
    lines = [ln.strip() for ln in out.splitlines() if "vnca train: error:" in ln]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path, make_dataset,
                                                                  compile_cache):
    """The collective checkpoint save needs every process: a SIGTERM to process 1 only (the one
    that writes no files) stops both after one step (JAX's preemption sync point), both save
    that step's checkpoint together and exit 143 with one line; two processes resume from it to
    the parameters, bit for bit, of two processes that were never stopped."""
    data = make_dataset(tmp_path / "data", n_train=64)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    sent = {}

    def sigterm_to_process_1(procs: list[subprocess.Popen]) -> None:
        deadline = time.time() + TIMEOUT_S
        while (_logged_step(stopped) < 2 and all(p.poll() is None for p in procs)
               and time.time() < deadline):
            time.sleep(0.05)
        sent["after"] = _logged_step(stopped)
        procs[1].send_signal(signal.SIGTERM)
        sent["at"] = time.time()

    many = 1000  # no regular checkpoint: the only one is the stop's
    outs = _two_hosts(data, stopped, many, "--set", f"train.checkpoint_every={many}",
                      cache=compile_cache, signal_one=sigterm_to_process_1,
                      expect=128 + signal.SIGTERM)
    stop_s = time.time() - sent["at"]
    lines = [_stop_line(out) for out in outs]
    steps = {int(line.split(" at step ")[1].split()[0].replace(",", "")) for line in lines}
    assert len(steps) == 1, lines  # the same step on both
    (n,) = steps
    assert sent["after"] + 1 <= n < many, (sent, lines)
    assert "one of the 2 processes" in lines[0] and f"checkpoint {n:,} is in" in lines[0]
    assert _ckpts(stopped) == [n]  # saved once, by both, for that step
    assert _logged_step(stopped) == n
    assert stop_s < 120, stop_s  # the notice, the sync protocol, a step or two, a save (no hang)

    _two_hosts(data, stopped, n + 2, "--set", "train.keep_checkpoints=1", cache=compile_cache)
    summary = json.loads((stopped / artifacts.TRAIN_SUMMARY).read_text())
    assert (summary["resumed_from_step"], summary["n_processes"]) == (n, 2)
    assert _ckpts(stopped) == [n + 2]  # both deleted checkpoint n together
    _two_hosts(data, straight, n + 2, cache=compile_cache)
    assert ((stopped / artifacts.PARAMS).read_bytes()
            == (straight / artifacts.PARAMS).read_bytes())


SIGINT_SCRIPT = """
import json, os, signal, time
from vnca import distributed
from vnca.train import StopSignals

def sigterm_caught():  # whether a handler (Python's or C++'s) catches SIGTERM
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("SigCgt:"))
    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)

distributed.maybe_initialize()
caught_before = sigterm_caught()
with StopSignals(distributed.stop_sync_available()) as stop:
    n, t0 = 0, time.time()
    while not stop.should_stop(n) and time.time() - t0 < 60:
        if n == 3:
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        n += 1
print(json.dumps({"synced": stop.synced, "requested": stop.requested, "n": n,
                  "caught_before": caught_before, "caught_after": sigterm_caught()}))
"""


def test_a_sigint_becomes_the_preemption_notice_every_process_hears():
    """On a multi-process job a first SIGINT raises SIGTERM, JAX's preemption notice, whose
    C++ handler (installed by `jax.distributed.initialize`) stays in place: no Python handler
    replaces it, before, during or after training."""
    env = _env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="1",
               JAX_PROCESS_ID="0")
    r = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["synced"] and got["requested"] == signal.SIGINT
    assert got["caught_before"] and got["caught_after"]
    assert 4 <= got["n"] < 100, got  # the sync point: one past the counter at the notice
    assert "stopping after the step all processes agree on" in r.stderr
