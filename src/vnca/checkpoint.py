"""Checkpoints of a training run, and the lock that gives a run directory one writer.

`Checkpointer` wraps an orbax CheckpointManager over `OUT/ckpt`: items `state` (the train
state) and `meta` (JSON: step, wall time, data position and the run's resolved config). It keeps
the newest `keep` checkpoints that are *verified* (the training loop saw the loss and gradient
of their parameters finite: checkpoint s's are those of step s + 1) and every newer one, so a
checkpoint whose parameters turn out to give a non-finite loss never pushed out the last good
one (`prune`); the loop then moves such checkpoints to `OUT/ckpt-diverged/<step>`
(`set_aside`). It restores the newest *intact* checkpoint: one whose files cannot be read, or
whose parameters are not finite, is moved to `OUT/ckpt-corrupt/<step>` with a warning naming
it, and the next older one is tried. A checkpoint of a different model (parameter or pool
shapes) is never taken for a corrupt one: it is a ConfigError naming the first differing array.

`RunLock` is an exclusive `flock` on `OUT/.lock`, released by the kernel when the process
ends however it ends (SIGKILL included), so a stale lock cannot exist; a second writer gets one
line naming the holder.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Self

import jax
import numpy as np

from vnca.config import flatten
from vnca.errors import ConfigError, UserError, environment_problem

CORRUPT_DIR = "ckpt-corrupt"
DIVERGED_DIR = "ckpt-diverged"
LOCK_FILE = ".lock"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _flat_shapes(tree: dict) -> dict[str, tuple]:
    """{'a.b.c': shape} of a nested dict whose leaves have a `.shape`."""
    return {name: tuple(leaf.shape) for name, leaf in flatten(tree).items()}


def all_finite(tree) -> bool:
    """True when every floating-point leaf of `tree` is finite (host or device arrays)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.asarray(jax.device_get(leaf.addressable_data(0) if hasattr(
            leaf, "addressable_data") else leaf))
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            return False
    return True


class Checkpointer:
    """Save and restore `{'state', 'meta'}` checkpoints in `directory` (keeps `keep`)."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.keep = keep
        self._ocp = ocp
        # No max_to_keep: orbax would delete the oldest checkpoint as it saves a new one, before
        # anything is known about the new one's parameters; `prune` deletes verified ones only.
        opts = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                            cleanup_tmp_directories=True,
                                            enable_async_checkpointing=False)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)
        # The training loop owns JAX's preemption sync point (`vnca.train.StopSignals` counts
        # the steps of its segment, 0, 1, 2, ...); orbax's save would also call it, with the
        # checkpoint's global step, and move the counter the sync protocol reads.
        self._mgr.reached_preemption = lambda step: False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Write checkpoint `step`; a full or read-only disk is one UserError line, and the
        partial files are removed so that the disk is no fuller than before."""
        ocp = self._ocp
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.CRITICAL)  # orbax logs each failed write of a failed save
        try:
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self._mgr.wait_until_finished()
        except Exception as e:
            problem = environment_problem(e)
            if problem is None:
                raise
            self._remove_partial(step)
            last = [s for s in self.steps() if s != step]
            kept = f"checkpoint {last[-1]} is intact" if last else "no checkpoint was kept"
            raise UserError(f"{self.directory}: cannot write checkpoint {step} "
                            f"({problem.rsplit(': ', 1)[-1]}); {kept}; fix that and run the same "
                            "command again to resume") from None
        finally:
            absl.setLevel(level)

    def _remove_partial(self, step: int) -> None:
        """Remove what a failed save of `step` left. Orbax's writer threads may still be adding
        files when the save's error arrives (seen under load: one file left behind), so wait
        for them, then remove until nothing is left (a few tries)."""
        try:
            self._mgr.wait_until_finished()
        except Exception:  # noqa: BLE001, S110 -- the same failure again; the files matter
            pass
        for _ in range(20):
            partials = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
            if not partials:
                return
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            time.sleep(0.05)

    def prune(self, verified: int) -> None:
        """Delete the oldest checkpoints until `keep` are left of those with step <= `verified`
        (their parameters gave a finite loss and gradient); newer ones stay. Every process
        calls it alike (orbax's delete is collective)."""
        good = [s for s in self.steps() if s <= verified]
        for step in good[:-self.keep]:
            self._mgr.delete(step)

    def set_aside(self, steps: list[int]) -> Path | None:
        """Move checkpoints `steps` to `OUT/ckpt-diverged/<step>` (process 0 moves, the others
        wait); where they went, or None when there were none."""
        if not steps:
            return None
        dest = self.directory.parent / DIVERGED_DIR
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for step in steps:
                if (dest / str(step)).exists():
                    shutil.rmtree(dest / str(step))
                shutil.move(str(self.directory / str(step)), dest / str(step))
        if jax.process_count() > 1:
            self._ocp.multihost.sync_global_processes(
                f"vnca_set_aside_{'_'.join(map(str, steps))}")
        self._mgr.reload()
        return dest

    def read_meta(self, step: int) -> dict:
        ocp = self._ocp
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"]

    def _check_shapes(self, step: int, target: dict) -> None:
        """ConfigError if checkpoint `step` holds other parameter or pool shapes than
        `target`; any error reading its metadata propagates (a corrupt checkpoint)."""
        saved = self._mgr.item_metadata(step)["state"].tree
        for part in ("params", "pool"):
            if part not in target:
                continue
            want = _flat_shapes(target[part])
            have = _flat_shapes(saved.get(part, {}))
            for name in sorted(set(want) | set(have)):
                if want.get(name) != have.get(name):
                    raise ConfigError(
                        f"{self.directory}: checkpoint {step} holds another model "
                        f"({part}.{name}: {have.get(name)} in the checkpoint, {want.get(name)} "
                        "in this config); use a new --out or the run's own config")

    def _quarantine(self, step: int, why: str) -> None:
        dest = self.directory.parent / CORRUPT_DIR / str(step)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), dest)
        self._mgr.reload()
        _warn(f"skipped checkpoint {step} in {self.directory} ({why}); moved it to {dest}")

    def restore_latest(self, target: dict) -> tuple[dict, dict] | None:
        """(state, meta) of the newest intact checkpoint, or None when there is none."""
        ocp = self._ocp
        for step in reversed(self.steps()):
            try:
                self._check_shapes(step, target)
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                self._quarantine(step, f"unreadable: {_one_line(e)}")
                continue
            state, meta = out["state"], out["meta"]
            if not isinstance(meta, dict) or int(meta.get("step", -1)) != step:
                self._quarantine(step, "its metadata does not name its step")
                continue
            if not all_finite({"params": state["params"], "opt_state": state["opt_state"]}):
                self._quarantine(step, "parameters or optimizer state not finite")
                continue
            return state, meta
        return None

    def close(self) -> None:
        self._mgr.close()


class RunLock:
    """Exclusive lock on a run directory for the life of this process (or until release)."""

    def __init__(self, run_dir: Path, what: str = "vnca train"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import errno
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.path.parent}: in use by another run ({holder}); wait "
                                "for it to finish or use another --out") from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. a FUSE mount
                os.close(fd)
                _warn(f"{self.path.parent}: this file system cannot lock files; make sure no "
                      "other run writes here")
                return self
            os.close(fd)
            raise
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.what}, pid {os.getpid()} on {socket.gethostname()} since {now}\n"
                 .encode())
        self._fd = fd
        return self

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
