"""Stopping a run: the stop signals (SIGINT, SIGTERM, a multi-host preemption notice), a
non-finite step, and the errors that end a run with one line and an exit status.

`StopSignals` makes a first signal stop training after the current step with a checkpoint (on a
multi-process job every process after the same step, through `vnca.distributed`); `not_finite`
names what is not finite in a step's metrics, which ends the run with `TrainingDivergedError`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
from typing import Self

from vnca import distributed
from vnca.errors import UserError


class TrainingDivergedError(UserError):
    """The loss, the gradient norm or the updated state became NaN or infinite; the checkpoints
    whose parameters gave it were set aside, so that running again resumes from a good one."""


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped training; a checkpoint of the last finished step was saved
    (on a multi-process job, by every process at the same step)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, the first SIGINT or SIGTERM only asks the loop to stop, with a checkpoint,
    after the step it is on (`requested`: the signal number, if this process got one); a second
    SIGINT aborts at once.

    One process: `should_stop` is true from the first signal on. The processes of a
    multi-process job (`synced`) must stop after the same step, or the collective checkpoint
    save waits forever for the ones that went on, so they use JAX's preemption sync point
    (`distributed.reached_stop_point`): a SIGTERM to any process is its preemption notice,
    caught by the C++ handler `jax.distributed.initialize` installed (a Python SIGTERM handler
    would replace it, so none is installed), a first SIGINT raises that SIGTERM, and the
    notice reaches the other processes through the coordination service, which picks the step
    all of them stop after."""

    def __init__(self, synced: bool = False):
        self.synced = synced
        self.requested: int | None = None
        self._old: dict = {}

    def should_stop(self, n_done: int) -> bool:
        """Whether to stop now, with `n_done` steps of this segment finished; ask once per step
        (n_done = 0, 1, 2, ...), on every process."""
        if self.synced:
            return distributed.reached_stop_point(n_done)
        return self.requested is not None

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        after = "the step all processes agree on" if self.synced else "the current step"
        print(f"\n{signal.Signals(signum).name}: stopping after {after} and saving a checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)
        if self.synced:
            signal.raise_signal(signal.SIGTERM)  # JAX's preemption notice

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            sigs = (signal.SIGINT,) if self.synced else (signal.SIGINT, signal.SIGTERM)
            for sig in sigs:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def not_finite(m: dict) -> str | None:
    """What is not finite in one step's host metrics ('loss is nan', ...), or None."""
    for k in ("loss", "grad_norm"):
        if not math.isfinite(float(m[k])):
            return f"{k} is {float(m[k])}"
    if float(m["state_finite"]) != 1.0:
        return "the updated parameters is not finite"
    return None
