"""Fault injection on `vnca train`: diverging updates, corrupt checkpoints, a checkpoint of
another model, two writers, SIGINT and SIGTERM at chosen and at random points, a full and a
read-only disk. Each fault must end in one line on stderr (never a traceback), lose nothing that
was saved, and resume to exactly the parameters of an uninterrupted run."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vnca import artifacts, checkpoint, train
from vnca.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
FAST = ("train.checkpoint_every=2", "train.log_every=1", "train.val_every=0",
        "train.batch_size=4", "train.keep_checkpoints=3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_dataset):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _ckpts(out: Path) -> list[int]:
    d = out / artifacts.CHECKPOINTS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _cli(data: Path, out: Path, *extra: str, variant: str = "baseline") -> list[str]:
    return [sys.executable, "-m", "vnca.cli", "train", "--config", f"configs/{variant}.yaml",
            "--config", "configs/smoke.yaml", "--data", str(data), "--out", str(out),
            *[a for kv in FAST for a in ("--set", kv)], *extra]


def _error_lines(stderr: str) -> list[str]:
    """Lines a user reads: the progress bar's redraws and warnings dropped."""
    lines = [seg.strip() for line in stderr.splitlines() for seg in line.split("\r")]
    return [ln for ln in lines if ln and not ln.startswith(("train:", "warning:"))
            and "stopping after the current step" not in ln]


def _assert_one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = _error_lines(stderr)
    assert len(lines) == 1, lines[-20:]
    assert lines[0].startswith("vnca train: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory, smoke_cfg):
    """params.msgpack bytes of uninterrupted baseline runs, by step count."""
    cache: dict[int, bytes] = {}

    def params(steps: int) -> bytes:
        if steps not in cache:
            out = tmp_path_factory.mktemp(f"straight{steps}")
            train.train_and_evaluate(smoke_cfg("baseline", *FAST), data_dir, out, steps=steps)
            cache[steps] = (out / artifacts.PARAMS).read_bytes()
        return cache[steps]

    return params


# -- divergence --------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_update_that_overflows_is_caught_before_anything_is_saved(data_dir, tmp_path, smoke_cfg):
    cfg = smoke_cfg("baseline", *FAST, "train.learning_rate=1e39", "train.checkpoint_every=1")
    with pytest.raises(train.TrainingDivergedError,
                       match="updated parameters is not finite at step 1; no checkpoint yet"):
        train.train_and_evaluate(cfg, data_dir, tmp_path, steps=1)
    assert not (tmp_path / artifacts.PARAMS).exists()
    assert not (tmp_path / artifacts.TRAIN_SUMMARY).exists()
    assert _ckpts(tmp_path) == []


@pytest.mark.slow
def test_every_checkpoint_of_a_diverging_run_is_finite(data_dir, tmp_path, smoke_cfg):
    cfg = smoke_cfg("baseline", *FAST, "train.learning_rate=1e30", "train.checkpoint_every=1",
                    "train.keep_checkpoints=50")
    with pytest.raises(train.TrainingDivergedError, match="training diverged: .* at step"):
        train.train_and_evaluate(cfg, data_dir, tmp_path, steps=30)
    import jax

    from vnca.models import build_model

    model = build_model(cfg)
    target = jax.eval_shape(lambda k: train.init_state(model, cfg, k), jax.random.key(0))
    written = []
    for where in (artifacts.CHECKPOINTS, checkpoint.DIVERGED_DIR):  # kept and set aside
        ckpt = checkpoint.Checkpointer(tmp_path / where, 50)
        try:
            for step in ckpt.steps():
                state = ckpt._mgr.restore(step, args=ckpt._ocp.args.Composite(
                    state=ckpt._ocp.args.StandardRestore(target)))["state"]
                assert checkpoint.all_finite(state), (where, step)
                written.append(step)
        finally:
            ckpt.close()
    assert written and max(written) < 30


# -- corrupt checkpoints -----------------------------------------------------------------------

def _truncate_json(step_dir: Path) -> None:
    p = step_dir / "state" / "_METADATA"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _zero_arrays(step_dir: Path) -> None:
    for p in (step_dir / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"\0" * p.stat().st_size)


def _empty_state(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "state")
    (step_dir / "state").mkdir()


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_json, _zero_arrays, _empty_state])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(
        data_dir, tmp_path, straight, corrupt, capfd, smoke_cfg):
    cfg = smoke_cfg("baseline", *FAST)
    train.train_and_evaluate(cfg, data_dir, tmp_path, steps=4)
    assert _ckpts(tmp_path) == [2, 4]
    corrupt(tmp_path / artifacts.CHECKPOINTS / "4")
    capfd.readouterr()
    summary = train.train_and_evaluate(cfg, data_dir, tmp_path, steps=6)
    err = capfd.readouterr().err
    assert summary["resumed_from_step"] == 2
    assert "skipped checkpoint 4" in err and checkpoint.CORRUPT_DIR in err
    assert (tmp_path / checkpoint.CORRUPT_DIR / "4").is_dir()
    assert (tmp_path / artifacts.PARAMS).read_bytes() == straight(6)


@pytest.mark.slow
def test_no_intact_checkpoint_starts_over(data_dir, tmp_path, straight, smoke_cfg):
    cfg = smoke_cfg("baseline", *FAST)
    train.train_and_evaluate(cfg, data_dir, tmp_path, steps=4)
    for step in (2, 4):
        _zero_arrays(tmp_path / artifacts.CHECKPOINTS / str(step))
    summary = train.train_and_evaluate(cfg, data_dir, tmp_path, steps=6)
    assert summary["resumed_from_step"] == 0
    assert (tmp_path / artifacts.PARAMS).read_bytes() == straight(6)


@pytest.mark.slow
def test_resuming_another_model_without_its_config_file_is_one_line(data_dir, tmp_path, smoke_cfg):
    train.train_and_evaluate(smoke_cfg("baseline", *FAST), data_dir, tmp_path, steps=2)
    (tmp_path / artifacts.RESOLVED_CONFIG).unlink()
    other = smoke_cfg("baseline", *FAST, "model.z_dim=8")
    with pytest.raises(ConfigError, match=r"different config \(model.z_dim\)"):
        train.train_and_evaluate(other, data_dir, tmp_path, steps=4)
    # A checkpoint written before checkpoints held their config: the shapes decide.
    import jax

    from vnca.models import build_model

    model = build_model(other)
    target = jax.eval_shape(lambda k: train.init_state(model, other, k), jax.random.key(0))
    ckpt = checkpoint.Checkpointer(tmp_path / artifacts.CHECKPOINTS, 3)
    try:
        with pytest.raises(ConfigError, match=r"checkpoint 2 holds another model \(params\."):
            ckpt.restore_latest(target)
    finally:
        ckpt.close()
    assert _ckpts(tmp_path) == [2]  # a checkpoint of another model is not "corrupt"


# -- two writers -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_trainer_on_one_directory_gets_one_line_naming_the_holder(data_dir, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    lock = checkpoint.RunLock(tmp_path, what="the first trainer").acquire()
    try:
        r = subprocess.run(check=False, args=_cli(data_dir, tmp_path, "--steps", "2"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert r.returncode == 2
    _assert_one_error_line(r.stderr, "in use by another run", "the first trainer",
                           f"pid {os.getpid()}")
    assert _ckpts(tmp_path) == []
    with pytest.raises(UserError):  # and in-process, against a holder in another process
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sys, time; from vnca.checkpoint import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"),
            str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            checkpoint.RunLock(tmp_path).acquire()
        finally:
            holder.kill()
            holder.wait()
    checkpoint.RunLock(tmp_path).acquire().release()  # free again once the holder is gone


# -- signals -----------------------------------------------------------------------------------

def _last_logged_step(out: Path) -> int:
    p = out / artifacts.TRAIN_METRICS
    if not p.is_file():
        return 0
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    import json

    return max((json.loads(ln)["step"] for ln in lines), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_within_seconds_saves_and_resumes_exactly(data_dir, tmp_path, straight,
                                                                  sig, smoke_cfg):
    proc = subprocess.Popen(_cli(data_dir, tmp_path, "--steps", "100000"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while _last_logged_step(tmp_path) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        stop_s = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert stop_s < 30
    line = _assert_one_error_line(err, f"stopped by {signal.Signals(sig).name} at step")
    stopped = int(line.split(" at step ")[1].split()[0].replace(",", ""))
    assert stopped >= 3 and max(_ckpts(tmp_path)) == stopped  # the last finished step is saved
    assert f"checkpoint {stopped:,} is in" in line
    target = stopped + 2
    summary = train.train_and_evaluate(smoke_cfg("baseline", *FAST), data_dir, tmp_path,
                                       steps=target)
    assert summary["resumed_from_step"] == stopped
    assert (tmp_path / artifacts.PARAMS).read_bytes() == straight(target)


@pytest.mark.slow
def test_signals_at_random_points_lose_nothing(data_dir, tmp_path, straight):
    """SIGTERM, SIGINT and SIGKILL at seeded random times (during start-up, compilation,
    steps or checkpoint writes); then the run is finished and must match a straight run."""
    rs = random.Random(13)
    steps = 12
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(_cli(data_dir, tmp_path, "--steps", str(steps),
                                     "--set", "train.checkpoint_every=1"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(rs.uniform(1.0, 12.0))
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode in (0, 128 + sig, -sig), err[-3000:]
        if proc.returncode == 128 + sig:
            _assert_one_error_line(err, f"stopped by {signal.Signals(sig).name}")
        assert "Traceback" not in err, err[-3000:]
    r = subprocess.run(check=False, args=_cli(data_dir, tmp_path, "--steps", str(steps)), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / artifacts.PARAMS).read_bytes() == straight(steps)


# -- full and read-only disks ------------------------------------------------------------------

def _mount_tmpfs(path: Path, *options: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(check=False, args=["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(check=False, args=["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(data_dir, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=3m")
    try:
        out = disk / "run"
        r = subprocess.run(check=False, args=_cli(data_dir, out, "--steps", "4", "--set",
                                "train.checkpoint_every=1", variant="doubling"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2
        _assert_one_error_line(r.stderr, "No space left on device", "cannot write checkpoint 1")
        leftovers = [p for p in (out / artifacts.CHECKPOINTS).rglob("*") if p.is_file()]
        assert leftovers == []
    finally:
        _umount(disk)


def test_writer_tasks_of_a_failed_save_are_not_logged_but_other_task_errors_are(caplog):
    """Orbax's writer tasks of a failed save end with the disk's error, and asyncio logs each
    one ("Task exception was never retrieved", with its traceback) whenever the garbage
    collector gets to it, even after the save's one line; the CLI's filter drops exactly those."""
    import asyncio
    import errno
    import gc
    import logging

    from vnca.errors import QuietFailedWrites

    async def fail(exc):
        raise exc

    def orphan(exc):
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail(exc))
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del task
        gc.collect()

    log = logging.getLogger("asyncio")
    saved = log.filters[:], log.disabled, log.propagate  # an in-process CLI run added the filter
    log.filters = [f for f in saved[0] if not isinstance(f, QuietFailedWrites)]
    log.disabled, log.propagate = False, True
    full = ValueError('RESOURCE_EXHAUSTED: Failed writing: "/d/x": No space left on device')
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        orphan(full)
        assert "never retrieved" in caplog.text  # asyncio does log it: the filter is needed
        caplog.clear()
        log.addFilter(QuietFailedWrites())
        orphan(full)
        orphan(OSError(errno.EROFS, "Read-only file system"))
        assert caplog.text == ""
        orphan(ValueError("a bug in a task"))
        assert "a bug in a task" in caplog.text
    finally:
        log.filters, log.disabled, log.propagate = saved


@pytest.mark.slow
def test_a_read_only_output_is_one_line(data_dir, tmp_path):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "size=1m", "ro")
    try:
        r = subprocess.run(check=False, args=_cli(data_dir, disk / "run", "--steps", "2"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2
        _assert_one_error_line(r.stderr, "Read-only file system", str(disk / "run"))
    finally:
        _umount(disk)


# -- the forecast a long run prints ------------------------------------------------------------

def test_the_forecast_names_the_run_length_and_the_first_checkpoint():
    line = train.forecast(19.4, 0, 100_000, 1_000, Path("/o/ckpt"), "1 x cpu")
    assert "100,000 steps left, about 22.5 days" in line
    assert "next checkpoint at step 1,000 (in about 5.4 h) in /o/ckpt" in line
    assert "about 5 min" in train.forecast(3.0, 900, 1000, 1000, Path("c"), "x")
    assert np.isclose(float(line.split(" s/step")[0].split()[-1]), 19.4)
