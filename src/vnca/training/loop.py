"""The training loop of one segment of a run: from a restored (or fresh) state to train.steps
or a stop.

It dispatches steps and keeps a step or two in flight (`StepQueue`), checks that the loss, the
gradient norm and the updated state are finite before every log record and checkpoint
(TrainingDivergedError otherwise; the checkpoints whose parameters gave the non-finite value are
set aside, so the newest one left is good and running again resumes from it), writes a training
record every train.log_every steps, validates every train.val_every steps and checkpoints every
train.checkpoint_every steps (state + step, wall time and data position). A stop signal
(`StopSignals`) stops it after the current step with a checkpoint; on a multi-process job every
process stops after the same step.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections import deque
from collections.abc import Callable

import jax

from vnca import config
from vnca.checkpoint import Checkpointer
from vnca.config import Config
from vnca.training.data import Validator
from vnca.training.progress import Meter, MetricsLog, Progress
from vnca.training.signals import Interrupted, StopSignals, TrainingDivergedError, not_finite

# Steps dispatched ahead of the one the host waits for: enough to overlap feeding with
# computing, few enough that a stop or an error is seen within a step or two.
STEPS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class LoopParts:
    """What a segment works with besides its config and state."""

    step: Callable[[dict, int], tuple[dict, dict]]  # (state, s) -> (state, metrics) of step s
    data_epoch: Callable[[int], int]  # the data stream's epoch after s steps
    log: MetricsLog
    ckpt: Checkpointer
    progress: Progress
    val: Validator | None
    stop: StopSignals


class StepQueue:
    """Dispatched steps whose metrics the host has not fetched yet."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self._in_flight: deque[tuple[int, dict]] = deque()
        self._finished: list[tuple[int, dict]] = []

    def push(self, step: int, metrics: dict) -> None:
        """Add a dispatched step; block until at most STEPS_IN_FLIGHT - 1 are unfinished."""
        self._in_flight.append((step, metrics))
        self._wait(STEPS_IN_FLIGHT - 1)

    def _wait(self, n_left: int) -> None:
        while len(self._in_flight) > n_left:
            step, m = self._in_flight.popleft()
            jax.block_until_ready(m)
            self._finished.append((step, m))
            self.progress.step_finished(step)

    def drain(self) -> list[tuple[int, dict]]:
        """Finish every dispatched step; (step, host metrics) of those not drained before."""
        self._wait(0)
        host = jax.device_get([m for _, m in self._finished])
        out = [(step, m) for (step, _), m in zip(self._finished, host)]
        self._finished.clear()
        return out


class TrainLoop:
    """One segment of a run: dispatch steps, fetch their metrics a step or two late, log,
    validate, checkpoint. `run` returns the final state; `final_loss` and `meter.elapsed()`
    are the run's last loss and wall time."""

    def __init__(self, cfg: Config, parts: LoopParts, state: dict, meta: dict):
        self.cfg, self.tc, self.parts, self.state = cfg, cfg.train, parts, state
        self.ckpt = parts.ckpt
        self.queue = StepQueue(parts.progress)
        self.meter = Meter(self.tc.batch_size, float(meta.get("elapsed_s", 0.0)))
        self.last_saved, self.final_loss = int(meta["step"]), meta.get("final_loss")
        self.start = self.last_saved

    def run(self) -> dict:
        """Train to train.steps (Interrupted when a signal stops it first); the final state."""
        done = self.start
        try:
            while True:
                # Asked before every step and after the last, on every process alike.
                stop = self.parts.stop.should_stop(done - self.start)
                if stop or done >= self.tc.steps:
                    break
                self.state, metrics = self.parts.step(self.state, done)
                self.queue.push(done, metrics)
                done += 1
                self._after_step(done)
            self._flush()
            if stop:
                self._stop(done)
            self.ckpt.prune(done)  # finished: the final checkpoint has no next loss to wait for
        finally:
            self.parts.progress.close()
        return self.state

    def _after_step(self, done: int) -> None:
        tc = self.tc
        is_ckpt = _due(tc.checkpoint_every, done, tc.steps)
        is_log = _due(tc.log_every, done, tc.steps)
        is_val = _due(tc.val_every, done, tc.steps)
        if is_log or is_ckpt or is_val:
            self._flush()
        if is_log:
            self._log(done)
        if is_val and self.parts.val is not None:
            self._validate(done)
        if is_ckpt:
            self._save(done)

    def _flush(self) -> None:
        """Fetch the metrics of every dispatched step; stop on a non-finite value. The loss and
        gradient of step s (0-based) are those of the parameters after s updates, checkpoint
        s's: once they are finite, checkpoint s is verified, and verified checkpoints beyond
        train.keep_checkpoints go (`Checkpointer.prune`)."""
        drained = self.queue.drain()
        for step, m in drained:
            bad = not_finite(m)
            if bad:
                self._diverged(step, m, bad)
            self.meter.add(m)
            self.final_loss = float(m["loss"])
        if drained:
            self.ckpt.prune(drained[-1][0])

    def _diverged(self, step: int, m: dict, bad: str) -> None:
        """Set aside the checkpoints whose parameters gave the non-finite step `step` (0-based)
        and raise TrainingDivergedError naming the newest one left, which is good."""
        # A finite loss and gradient with a non-finite update: checkpoint `step` is still good.
        finite = all(math.isfinite(float(m[k])) for k in ("loss", "grad_norm"))
        first_bad = step + 1 if finite else step
        moved = [s for s in self.ckpt.steps() if s >= first_bad]
        dest = self.ckpt.set_aside(moved)
        aside = (f" ({'checkpoint' if len(moved) == 1 else 'checkpoints'} "
                 f"{', '.join(map(str, moved))}, whose parameters gave it, moved to {dest})"
                 if moved else "")
        good = self.ckpt.latest_step()
        if good is not None:
            where = f"the last good checkpoint is step {good} in {self.ckpt.directory}{aside}"
            then = f"resume from checkpoint {good}"
        else:
            where = f"no good checkpoint is left{aside}" if moved else "no checkpoint yet"
            then = "start over"
        raise TrainingDivergedError(
            f"training diverged: {bad} at step {step + 1}; {where}; run the same command again "
            f"with a lower train.learning_rate (now {self.tc.learning_rate:g}) to {then}")

    def _log(self, done: int) -> None:
        rec = self.meter.record(done)
        if rec is not None:
            self.parts.log.append(rec)
            self.parts.progress.show(rec)

    def _validate(self, done: int) -> None:
        t0 = time.time()
        rec = {"step": done, "split": "valid", **self.parts.val(self.state["params"])}
        self.meter.exclude(time.time() - t0)
        self.parts.log.append(rec)

    def _save(self, done: int) -> None:
        meta = {"step": done, "elapsed_s": self.meter.elapsed(),
                "examples_seen": done * self.tc.batch_size, "final_loss": self.final_loss,
                "data_epoch": self.parts.data_epoch(done), "config": config.dump(self.cfg)}
        self.ckpt.save(done, self.state, meta)
        self.last_saved = done

    def _stop(self, done: int) -> None:
        """After a stop signal: log and save the last finished step, then raise Interrupted."""
        if done > self.last_saved:
            self._log(done)
            self._save(done)
        # Processes that stopped at the sync point without a signal of their own: SIGTERM,
        # JAX's preemption notice.
        stop = self.parts.stop
        signum = stop.requested or signal.SIGTERM
        by, also = ((f"a SIGTERM or SIGINT to one of the {jax.process_count()} processes",
                     ", where all of them stopped") if stop.synced
                    else (signal.Signals(signum).name, ""))
        where = (f"checkpoint {self.last_saved:,} is in {self.ckpt.directory} (run the same "
                 "command again to resume)" if self.ckpt.latest_step() is not None else
                 "no checkpoint was written")
        raise Interrupted(f"stopped by {by} at step {done:,} of {self.tc.steps:,}{also}; "
                          f"{where}", signum)


def _due(every: int, done: int, last: int) -> bool:
    """Whether something done every `every` steps (0: never) and at the last step is due."""
    return every > 0 and (done % every == 0 or done == last)
