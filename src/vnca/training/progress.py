"""What a run reports while it trains: the tqdm progress bar and its one forecast line, the
interval means and throughput of each training record, and the metrics log (`metrics.jsonl`
and TensorBoard event files, `vnca.tensorboard`).

Only the process that writes files (process 0) shows the bar and writes the log.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vnca import config, contracts, tensorboard
from vnca.fileio import write_atomic


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def forecast(step_s: float, start: int, steps: int, checkpoint_every: int, ckpt_dir: Path,
             hardware: str) -> str:
    """One line: what the rest of the run will take at `step_s` seconds a step, and when and
    where its next checkpoint lands."""
    left = steps - start
    nxt = min((start // checkpoint_every + 1) * checkpoint_every, steps)
    return (f"train: {step_s:.3g} s/step on {hardware}: {left:,} steps left, about "
            f"{format_duration(left * step_s)}; next checkpoint at step {nxt:,} (in about "
            f"{format_duration((nxt - start) * step_s)}) in {ckpt_dir}")


class Progress:
    """The progress bar (tqdm, process 0 only) and, once three steps after the first are
    timed, one forecast line."""

    def __init__(self, tc: config.TrainConfig, start: int, ckpt_dir: Path, hardware: str,
                 enabled: bool):
        self.tc, self.ckpt_dir, self.hardware, self.enabled = tc, ckpt_dir, hardware, enabled
        self.bar = tqdm(total=tc.steps, initial=start, disable=not enabled, unit="step",
                        dynamic_ncols=True, desc="train")
        self._ends: list[float] = []

    def step_finished(self, step: int) -> None:
        """Step `step` (0-based) finished on the device."""
        self._ends.append(time.time())
        self.bar.update(1)
        left = self.tc.steps - (step + 1)
        if self.enabled and len(self._ends) == 4 and left > 0:
            step_s = (self._ends[-1] - self._ends[1]) / 2  # step 1 carries the compilation
            self.bar.write(forecast(step_s, step + 1, self.tc.steps, self.tc.checkpoint_every,
                                    self.ckpt_dir, self.hardware), file=sys.stderr)

    def show(self, rec: dict) -> None:
        self.bar.set_postfix(loss=f"{rec['loss']:.2f}", kl=f"{rec['kl']:.2f}",
                             recon=f"{rec['recon']:.2f}", img_s=f"{rec['images_per_s']:.1f}")

    def close(self) -> None:
        self.bar.close()


class Meter:
    """The run's wall time (earlier segments' from the checkpoint plus this one's), and the host
    metrics of the steps since the last training record with the time they took (validation
    excluded): the record's means and throughput."""

    MEANS = ("loss", "kl", "recon", "elbo", "grad_norm")

    def __init__(self, batch_size: int, elapsed_before: float):
        self.batch_size, self.before = batch_size, elapsed_before
        self.t0 = self.interval_t0 = time.time()
        self.steps: list[dict] = []

    def elapsed(self, now: float | None = None) -> float:
        return self.before + (time.time() if now is None else now) - self.t0

    def add(self, m: dict) -> None:
        self.steps.append({k: float(v) for k, v in m.items()})

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (validation) is not training throughput."""
        self.interval_t0 += seconds

    def record(self, step: int) -> dict | None:
        """The training record of the interval ending at `step` (None if it is empty); starts
        the next interval."""
        if not self.steps:
            return None
        now = time.time()
        keys = self.MEANS + (("pool_rows",) if "pool_rows" in self.steps[0] else ())
        rec = {"step": step, **{k: float(np.mean([m[k] for m in self.steps])) for k in keys}}
        rec["images_per_s"] = len(self.steps) * self.batch_size / max(now - self.interval_t0,
                                                                      1e-9)
        rec["elapsed_s"] = self.elapsed(now)
        self.steps.clear()
        self.interval_t0 = now
        return rec


class MetricsLog:
    """`metrics.jsonl`: one training or validation record a line (`vnca.contracts`), and the
    same records as TensorBoard scalars in an event file per segment in each of `event_dirs`
    (`vnca.tensorboard.log_dirs`: the run directory, and AIP_TENSORBOARD_LOG_DIR's when set),
    opened by `truncate`; only the process that writes files (`enabled`) touches them."""

    def __init__(self, path: Path, enabled: bool, event_dirs=()):
        self.path, self.enabled, self.event_dirs = path, enabled, list(event_dirs)
        self.events: tensorboard.EventLog | None = None

    def truncate(self, last_step: int) -> None:
        """Start the segment that resumes after `last_step` (0: a fresh run): drop the records
        logged after it (they will be logged again) and lines cut by a kill, and open the
        segment's event files (TensorBoard drops the earlier files' points after it)."""
        if not self.enabled:
            return
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= last_step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
            write_atomic(self.path, "".join(f"{line}\n" for line in keep))
        self.close()
        self.events = tensorboard.EventLog(self.event_dirs, last_step)

    def append(self, rec: dict) -> None:
        if self.enabled:
            record = contracts.train_record(rec, str(self.path))
            contracts.append_train_record(self.path, record)
            if self.events is not None:
                self.events.write(record)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
