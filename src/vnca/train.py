"""Training: `train_and_evaluate(cfg, data_dir, out_dir)` trains one variant into `out_dir`,
resuming from its latest checkpoint.

The pieces live in `vnca.training`, top-down:

    step.py      the pure train step (the loss is `VAE.forward`'s one-sample ELBO, pool rows
                 included), the optimizer, the state, and their compiled programs (`StepKey`)
    data.py      training and validation images, the data order, the feeding of the devices,
                 the validation bound
    resume.py    whether the run already in `out_dir` may be resumed, and the state to resume
    loop.py      the loop of one segment: steps, metrics, validation, checkpoints, stops
    progress.py  the progress bar and forecast, the records' means, `metrics.jsonl` + TensorBoard
    signals.py   SIGINT / SIGTERM / preemption, and the errors that end a run

Here: check the inputs, take the run directory's lock and its `Checkpointer`, resume (or start)
the run, hand it to a `TrainLoop`, and write the parameters and `summary.json`. Only process 0
writes files other than checkpoints (orbax saves are collective). The names other modules and
the tests use are re-exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from vnca import artifacts, config, contracts, distributed, rng, tensorboard
from vnca.checkpoint import Checkpointer, RunLock
from vnca.config import Config
from vnca.errors import ConfigError, UserError
from vnca.fileio import write_atomic
from vnca.models import build_model, count_params
from vnca.models.vae import resolve_backend
from vnca.provenance import source_commit
from vnca.training.data import DataOrder, Feeder, Validator, check_batch, training_images
from vnca.training.loop import LoopParts, TrainLoop
from vnca.training.progress import MetricsLog, Progress, forecast, format_duration
from vnca.training.resume import RESUMABLE_KEYS, check_prior_run, finished_run, restore_or_init
from vnca.training.signals import Interrupted, StopSignals, TrainingDivergedError, not_finite
from vnca.training.step import (
    StepKey,
    eval_program,
    init_state,
    loss_fn,
    make_eval_step,
    make_optimizer,
    make_train_step,
    pool_loss,
    programs,
)

__all__ = [
    "RESUMABLE_KEYS", "DataOrder", "Feeder", "Interrupted", "MetricsLog", "Progress", "StepKey",
    "StopSignals", "TrainLoop", "TrainingDivergedError", "Validator", "build_model",
    "check_batch", "eval_program", "forecast", "format_duration", "init_state", "loss_fn",
    "make_eval_step", "make_optimizer", "make_train_step", "not_finite", "pool_loss",
    "programs", "rng", "train_and_evaluate", "training_images",
]


def train_and_evaluate(cfg: Config, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       steps: int | None = None, devices: list | None = None) -> dict:
    """Train one variant into `out_dir` (resuming from its latest checkpoint); returns the
    summary (`summary.json`). `devices` defaults to every device JAX sees."""
    distributed.maybe_initialize()
    devices = jax.devices() if devices is None else devices
    cfg = resolve_backend(_with_steps(cfg, steps), devices[0].platform)  # "auto" settled once
    distributed.warn_if_slow_precision(cfg.model.precision, devices[0].platform)
    check_batch(cfg, len(devices))
    x_train, x_valid = training_images(cfg, data_dir)  # fail on bad data before writing
    if len(x_train) == 0:
        raise UserError(f"{data_dir}: the train split is empty")
    out = _make_out_dir(out_dir)
    with (_run_lock(out),
          Checkpointer(out / artifacts.CHECKPOINTS, cfg.train.keep_checkpoints) as ckpt,
          StopSignals(distributed.stop_sync_available()) as stop):
        return _train(cfg, x_train, x_valid, out, devices, ckpt, stop)


def _with_steps(cfg: Config, steps: int | None) -> Config:
    """`cfg` with train.steps replaced by `steps` (the --steps option), if given."""
    if steps is None:
        return cfg
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def _make_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_lock(out: Path):
    """The run directory's lock, held by the process that writes files (the others: none)."""
    return RunLock(out) if distributed.is_main_process() else contextlib.nullcontext()


def _train(cfg: Config, x_train: np.ndarray, x_valid: np.ndarray, out: Path, devices: list,
           ckpt: Checkpointer, stop: StopSignals) -> dict:
    main = distributed.is_main_process()
    latest = check_prior_run(cfg, out, ckpt)
    finished = finished_run(cfg, out, latest)
    if finished is not None:
        return finished  # finished already: nothing to do
    if main:
        write_atomic(out / artifacts.RESOLVED_CONFIG, config.dump(cfg))  # before step 0

    model, keys = build_model(cfg), rng.named_keys(cfg.train.seed)
    mesh = distributed.make_mesh(devices)
    compiled = programs(model, cfg, mesh)
    state, meta = restore_or_init(ckpt, latest, compiled.abstract, compiled.shardings,
                                  lambda: compiled.init(keys["init"]))
    start = int(meta["step"])
    log = MetricsLog(out / artifacts.TRAIN_METRICS, enabled=main,
                     event_dirs=tensorboard.log_dirs(out, cfg.name))
    log.truncate(start)

    feeder = Feeder(mesh, cfg.train.batch_size, cfg.data.pad_to)
    order = DataOrder(keys["data"], len(x_train), cfg.train.batch_size)

    def step(state: dict, s: int) -> tuple[dict, dict]:
        return compiled.step(state, feeder.images(x_train, order.indices(s)), keys["train"])

    hardware = distributed.hardware_string(devices)
    parts = LoopParts(
        step=step, data_epoch=order.epoch, log=log, ckpt=ckpt,
        progress=Progress(cfg.train, start, ckpt.directory, hardware, main),
        val=Validator.maybe(model, cfg, x_valid, keys["valid"], mesh, feeder), stop=stop)
    loop = TrainLoop(cfg, parts, state, meta)
    state = loop.run()
    log.close()
    summary = contracts.TrainSummary(
        variant=cfg.model.variant, name=cfg.name, steps=cfg.train.steps,
        wall_time_s=loop.meter.elapsed(), hardware=hardware, n_devices=len(devices),
        n_processes=jax.process_count(), smoke=cfg.smoke, tier=cfg.tier,
        param_count=count_params(compiled.abstract["params"]), final_loss=loop.final_loss,
        batch_size=cfg.train.batch_size, train_split=cfg.train.train_split,
        resumed_from_step=start, commit=source_commit(), precision=cfg.model.precision)
    if main:
        _write_model(out, state["params"], summary)
    return summary.to_dict()


def _write_model(out: Path, params: dict, summary: contracts.TrainSummary) -> None:
    """The finished run's parameters, then its summary (whose presence means it finished)."""
    from vnca.models.model_io import save_params

    save_params(out / artifacts.PARAMS, _host_tree(params))
    summary.write(out / artifacts.TRAIN_SUMMARY)


def _host_tree(tree):
    """Numpy copy of a replicated (possibly multi-host) pytree."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)
