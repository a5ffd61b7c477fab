"""TensorBoard event files of a training run: every record of metrics.jsonl, as scalars at its step.

The training loop's `MetricsLog` hands each record it appends to `metrics.jsonl` to an
`EventLog`, which writes it to an event file in the run directory (the Model artifact, next to
metrics.jsonl) and, when `AIP_TENSORBOARD_LOG_DIR` is set (Vertex AI sets it for a custom job
that has a TensorBoard instance), to `<that directory>/<config name>/` as well; a `gs://` value
is written through the step's `/gcs/` mount (`vnca.storage.mounted_path`). Only the process that
writes files (process 0) has one.

Tags: `train/<key>` for the training record's loss, kl, recon, elbo, grad_norm, images_per_s
and pool_rows (non-doubling runs with a pool), `valid/<key>` for the validation record's
val_elbo: the keys of metrics.jsonl (`vnca.contracts.TrainRecord`, `ValidRecord`). Each record
is one event at its step, written and flushed to the OS when it is logged, so `tensorboard
--logdir` on the same machine shows a run as it trains; the file is fsynced at most every
FSYNC_EVERY_S seconds and when the segment ends (on the /gcs/ mount an fsync is the upload, so
the Cloud Storage copy lags by at most that, and a killed process's file is uploaded when the
kernel closes it). Nothing is written between log records.

Resume: each segment of a run (a start, or a resume from a checkpoint at step C) writes a new
event file (`events.out.tfevents.<time>.<host>.from-step-<C>`) whose first event is a
SessionLog START at step C + 1. The records after C that the previous segment logged are logged
again by this one (metrics.jsonl drops them, `MetricsLog.truncate`); TensorBoard, reading the
files in order, drops every point at or after the START's step from the earlier files (its
"purge orphaned data", on by default in both its loaders), so it shows each step once, with the
new segment's value. Vertex AI TensorBoard's uploader sends every point and ignores the marker:
it may show two points at a repeated step (the same numbers, a resumed step draws the same
randomness; only images_per_s differs).

Writer: tensorboardX (protobuf and numpy only, no TensorFlow): its Event and Summary protos and
its TFRecord CRC, framed and flushed here. Not its `SummaryWriter`, whose `flush()` does not
wait for its background thread, nor its `EventsWriter`, which fsyncs every record (the cost is
in docs/running.md, "Watching a run").

A write to the run directory that fails raises, as metrics.jsonl's would; the
AIP_TENSORBOARD_LOG_DIR copy is a view, not an output: if it cannot be opened or written, one
warning line goes to stderr and the run goes on without it.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from vnca import contracts

# Set by Vertex AI in a custom job created with a TensorBoard instance (a gs:// URL).
LOG_DIR_ENV = "AIP_TENSORBOARD_LOG_DIR"
# metrics.jsonl keys written as scalars, per record type; the tag is `<split>/<key>`.
SCALARS = {
    contracts.TrainRecord: ("train", ("loss", "kl", "recon", "elbo", "grad_norm",
                                      "images_per_s", "pool_rows")),
    contracts.ValidRecord: ("valid", ("val_elbo",)),
}
EVENT_FILE_PREFIX = "events"  # -> events.out.tfevents.<time>.<host>.from-step-<C>
# Seconds between fsyncs of an event file (every write is flushed to the OS at once): an fsync
# per record would slow short steps, and on a /gcs/ (Cloud Storage FUSE) mount it uploads the
# whole file.
FSYNC_EVERY_S = 5.0


def scalars(record: contracts.TrainRecord | contracts.ValidRecord) -> dict[str, float]:
    """The record's scalars as {tag: value}; a field that is None (no pool) is left out."""
    split, keys = SCALARS[type(record)]
    return {f"{split}/{k}": float(v) for k in keys if (v := getattr(record, k)) is not None}


def log_dirs(run_dir: str | os.PathLike, name: str,
             env: Mapping[str, str] | None = None) -> list[tuple[Path, bool]]:
    """[(directory, required)]: the run directory, then `<AIP_TENSORBOARD_LOG_DIR>/<name>`
    when `env` (default: the process environment) sets it, a gs:// URL read through /gcs/."""
    from vnca.storage import mounted_path

    env = os.environ if env is None else env
    dirs = [(Path(run_dir), True)]
    extra = env.get(LOG_DIR_ENV, "").strip()
    if extra:
        dirs.append((Path(mounted_path(extra)) / name, False))
    return dirs


class EventFile:
    """One segment's event file in `log_dir`, resuming after step `last_step`: tensorboardX's
    Event protos and CRC in TFRecord framing, each event flushed to the OS when written."""

    def __init__(self, log_dir: str | os.PathLike, last_step: int):
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / (f"{EVENT_FILE_PREFIX}.out.tfevents.{int(time.time()):010d}."
                               f"{socket.gethostname()}.from-step-{last_step:09d}")
        self._file = open(self.path, "wb")  # noqa: SIM115 - kept open for the segment
        self._synced = time.monotonic()
        self._write(Event(file_version="brain.Event:2"))
        # Readers drop every point at or after this step that earlier files hold.
        self._write(Event(step=last_step + 1, session_log=SessionLog(status=SessionLog.START)))

    def write(self, record: contracts.TrainRecord | contracts.ValidRecord) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=t, simple_value=v) for t, v in scalars(record).items()]
        if values:
            self._write(Event(step=record.step, summary=Summary(value=values)))

    def _write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        event.wall_time = time.time()
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                         + struct.pack("<I", masked_crc32c(data)))
        self._file.flush()  # to the OS: a reader on this machine sees it now
        if time.monotonic() - self._synced >= FSYNC_EVERY_S:
            self._sync()

    def _sync(self) -> None:
        os.fsync(self._file.fileno())  # to the disk; on a /gcs/ (FUSE) mount, the upload
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._sync()
            self._file.close()


class EventLog:
    """The event files of one segment: one per `(directory, required)` of `dirs`
    (`log_dirs`). A directory that is not required is dropped, with one warning line, at the
    first error."""

    def __init__(self, dirs: Sequence[tuple[Path, bool]], last_step: int):
        self.files: list[tuple[EventFile, bool]] = []
        for d, required in dirs:
            try:
                self.files.append((EventFile(d, last_step), required))
            except OSError as e:
                if required:
                    raise
                _warn(d, e)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f, _ in self.files]

    def write(self, record: contracts.TrainRecord | contracts.ValidRecord) -> None:
        for item in list(self.files):
            f, required = item
            try:
                f.write(record)
            except OSError as e:
                if required:
                    raise
                self.files.remove(item)
                _warn(f.path.parent, e)

    def close(self) -> None:
        for f, _ in self.files:
            try:
                f.close()
            except OSError:
                pass
        self.files = []


def _warn(directory: Path, e: OSError) -> None:
    print(f"train: warning: TensorBoard copy in {directory} ({LOG_DIR_ENV}) stopped: "
          f"{e.strerror or e}; metrics.jsonl and the run directory's event file go on",
          file=sys.stderr, flush=True)
