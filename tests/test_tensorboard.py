"""TensorBoard event files of a training run (`vnca.tensorboard`, `vnca.train.MetricsLog`), read
back with TensorBoard's own loader: the tags and steps of every record, visible while the run
is on, a resumed segment replacing the steps it logs again, the AIP_TENSORBOARD_LOG_DIR copy
(through /gcs/ for a gs:// URL), and a real training run."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from vnca import artifacts, contracts, tensorboard, train

pytest.importorskip("tensorboard")  # the reader (the dev extra); the writer is tensorboardX

TRAIN_TAGS = {"train/loss", "train/kl", "train/recon", "train/elbo", "train/grad_norm",
              "train/images_per_s"}


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows the event files in `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _record(step: int, bias: float = 0.0, pool_rows: float | None = None):
    return contracts.TrainRecord(step=step, loss=step + bias, kl=0.5 * step, recon=-step,
                                 elbo=-step - bias, grad_norm=2.0, pool_rows=pool_rows,
                                 images_per_s=100.0 + bias, elapsed_s=float(step))


def _valid(step: int, val_elbo: float):
    return contracts.ValidRecord(step=step, split="valid", val_elbo=val_elbo, val_images=8,
                                 val_iw_samples=1)


def test_every_record_is_scalars_at_its_step_and_visible_before_close(tmp_path):
    log = tensorboard.EventLog([(tmp_path, True)], last_step=0)
    for step in (1, 2, 3):
        log.write(_record(step, pool_rows=4.0 * step))
    log.write(_valid(3, -99.5))
    seen = _scalars(tmp_path)  # not closed: a watcher sees what is logged as it is logged
    assert set(seen) == TRAIN_TAGS | {"train/pool_rows", "valid/val_elbo"}
    for tag in TRAIN_TAGS | {"train/pool_rows"}:
        assert [s for s, _ in seen[tag]] == [1, 2, 3], tag
    assert seen["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert seen["train/pool_rows"] == [(1, 4.0), (2, 8.0), (3, 12.0)]
    assert seen["valid/val_elbo"] == [(3, -99.5)]
    log.close()
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("events.out.tfevents.") and path.name.endswith(
        ".from-step-000000000")


def test_records_reach_the_os_at_once_and_the_disk_every_few_seconds(tmp_path, monkeypatch):
    """Each record is flushed to the OS (a reader sees it, above); fsync, 4 ms here and an
    upload on a /gcs/ mount, runs at most every FSYNC_EVERY_S seconds and at the end."""
    synced = []
    monkeypatch.setattr(tensorboard.os, "fsync", lambda fd: synced.append(fd))
    log = tensorboard.EventLog([(tmp_path, True)], last_step=0)
    for step in range(1, 51):
        log.write(_record(step))
    assert synced == []  # 50 records in well under FSYNC_EVERY_S
    assert [s for s, _ in _scalars(tmp_path)["train/loss"]] == list(range(1, 51))
    log.close()
    assert len(synced) == 1
    monkeypatch.setattr(tensorboard, "FSYNC_EVERY_S", 0.0)
    log = tensorboard.EventLog([(tmp_path / "b", True)], last_step=0)
    for step in range(1, 4):
        log.write(_record(step))
    assert len(synced) == 1 + 2 + 3  # the two opening events, then each record
    log.close()


def test_a_run_without_a_pool_has_no_pool_tag(tmp_path):
    log = tensorboard.EventLog([(tmp_path, True)], last_step=0)
    log.write(_record(1))
    assert set(_scalars(tmp_path)) == TRAIN_TAGS
    assert tensorboard.scalars(_record(1)) == {
        "train/loss": 1.0, "train/kl": 0.5, "train/recon": -1.0, "train/elbo": -1.0,
        "train/grad_norm": 2.0, "train/images_per_s": 100.0}


def test_a_resumed_segment_replaces_the_steps_it_logs_again(tmp_path):
    """A run killed after logging step 6 resumes from its checkpoint at step 4: steps 5 and 6
    are logged again, in a new file; TensorBoard shows every step once, the new value."""
    first = tensorboard.EventLog([(tmp_path, True)], last_step=0)
    for step in range(1, 7):
        first.write(_record(step))
    first.write(_valid(6, -50.0))
    first.close()
    second = tensorboard.EventLog([(tmp_path, True)], last_step=4)
    for step in range(5, 9):
        second.write(_record(step, bias=1000.0))
    second.write(_valid(8, -40.0))
    second.close()

    assert len(list(tmp_path.iterdir())) == 2  # one file per segment
    seen = _scalars(tmp_path)
    for tag in TRAIN_TAGS:
        assert [s for s, _ in seen[tag]] == list(range(1, 9)), tag
    assert seen["train/loss"] == [(s, s + (1000.0 if s > 4 else 0.0)) for s in range(1, 9)]
    assert seen["valid/val_elbo"] == [(8, -40.0)]  # step 6's validation came after step 4


def test_log_dirs_add_the_vertex_tensorboard_dir_through_the_gcs_mount(tmp_path):
    assert tensorboard.log_dirs(tmp_path, "doubling", env={}) == [(tmp_path, True)]
    env = {"AIP_TENSORBOARD_LOG_DIR": "gs://bucket/jobs/123/logs/"}
    assert tensorboard.log_dirs(tmp_path, "doubling", env=env) == [
        (tmp_path, True), (Path("/gcs/bucket/jobs/123/logs/doubling"), False)]
    env = {"AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "tb")}
    assert tensorboard.log_dirs(tmp_path, "x", env=env)[1] == (tmp_path / "tb" / "x", False)


def test_a_failing_copy_is_dropped_with_one_warning_and_the_run_dir_goes_on(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    log = tensorboard.EventLog([(tmp_path / "run", True), (tmp_path / "file" / "tb", False)], 0)
    log.write(_record(1))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train: warning: TensorBoard copy in ")
    assert [s for s, _ in _scalars(tmp_path / "run")["train/loss"]] == [1]

    # A copy that fails mid-run (a full disk, a FUSE error) is dropped the same way.
    log = tensorboard.EventLog([(tmp_path / "run2", True), (tmp_path / "copy", False)], 0)
    log.write(_record(1))
    copy = log.files[1][0]

    def full(event):
        raise OSError(28, "No space left on device")

    copy._write = full
    log.write(_record(2))
    log.write(_record(3))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert [s for s, _ in _scalars(tmp_path / "run2")["train/loss"]] == [1, 2, 3]
    assert [s for s, _ in _scalars(tmp_path / "copy")["train/loss"]] == [1]

    # The run directory itself is an output: its failure is the run's.
    with pytest.raises(OSError):
        tensorboard.EventLog([(tmp_path / "file" / "run", True)], 0)


def test_metrics_log_writes_jsonl_and_events_and_only_when_enabled(tmp_path):
    on = train.MetricsLog(tmp_path / "on" / artifacts.TRAIN_METRICS, enabled=True,
                          event_dirs=[(tmp_path / "on", True)])
    (tmp_path / "on").mkdir()
    on.truncate(0)
    on.append(dataclasses.asdict(_record(1)))
    on.append({"step": 1, "split": "valid", "val_elbo": -9.0, "val_images": 8,
               "val_iw_samples": 1})
    on.close()
    lines = (tmp_path / "on" / artifacts.TRAIN_METRICS).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 1]
    assert _scalars(tmp_path / "on")["valid/val_elbo"] == [(1, -9.0)]

    # Another process than 0: no file at all.
    off = train.MetricsLog(tmp_path / "off" / artifacts.TRAIN_METRICS, enabled=False,
                           event_dirs=[(tmp_path / "off", True)])
    off.truncate(0)
    off.append(dataclasses.asdict(_record(1)))
    off.close()
    assert not (tmp_path / "off").exists()


FAST = ("train.log_every=1", "train.checkpoint_every=2", "train.val_every=2",
        "train.val_images=8", "train.batch_size=4")


@pytest.mark.slow
def test_a_training_run_writes_every_record_to_tensorboard_and_resumes(
        tmp_path, smoke_cfg, make_dataset, monkeypatch):
    """A real run with AIP_TENSORBOARD_LOG_DIR set: event files in the run directory and in
    `<that dir>/<config name>/`, a tag per metric with a point per logged step; then the run,
    killed after logging step 4 but before its checkpoint, resumes from step 2 and TensorBoard
    shows steps 3 and 4 once, with the resumed segment's values (those of metrics.jsonl)."""
    data = make_dataset(tmp_path / "data")
    out, tb = tmp_path / "run", tmp_path / "vertex-tb"
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", str(tb))
    cfg = smoke_cfg("baseline", *FAST)
    train.train_and_evaluate(cfg, data_dir=data, out_dir=out, steps=4)

    def check(log_dir):
        records = contracts.read_train_log(out / artifacts.TRAIN_METRICS)
        seen = _scalars(log_dir)
        assert set(seen) == TRAIN_TAGS | {"valid/val_elbo"}
        for tag in TRAIN_TAGS:
            assert [s for s, _ in seen[tag]] == [1, 2, 3, 4], tag
        assert [s for s, _ in seen["valid/val_elbo"]] == [2, 4]
        want = [r.images_per_s for r in records if isinstance(r, contracts.TrainRecord)]
        got = [v for _, v in seen["train/images_per_s"]]
        assert got == pytest.approx(want, rel=1e-6)  # TensorBoard keeps float32
        return seen

    check(out)
    check(tb / cfg.name)

    # As if killed after logging step 4, before checkpointing it: step 2 is the last checkpoint.
    shutil.rmtree(out / artifacts.CHECKPOINTS / "4")
    (out / artifacts.PARAMS).unlink()
    (out / artifacts.TRAIN_SUMMARY).unlink()
    before = _scalars(out)["train/images_per_s"]
    summary = train.train_and_evaluate(cfg, data_dir=data, out_dir=out, steps=4)
    assert summary["resumed_from_step"] == 2
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    after = check(out)["train/images_per_s"]
    check(tb / cfg.name)
    assert after[:2] == before[:2] and after[2:] != before[2:]  # throughput differs
