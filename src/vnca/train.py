"""Training: the sharded ELBO train step, the sample pool, orbax checkpoints, resume, logging.

Dimension letters: B global batch, H/W image (= cfg.data.pad_to), Z latent, C cell channels.

    train_step(state, x_BxHxWx1, key) -> (state, metrics)

is pure: the step's randomness is `fold_in(key, state['step'])` with `key` the run's `train`
key (`vnca.rng.named_keys`), so a step draws the same numbers on any number of devices and after
a resume. It is jitted once over a 1-D mesh `data` (every device JAX sees): the batch is sharded
along `data`, parameters and optimizer state are replicated, the pool is sharded along its slot
axis; XLA inserts the gradient all-reduce. The loss is the negative mean one-sample ELBO
(log p(x|z) - beta KL), the optimizer `chain(clip_by_global_norm(c), adam(lr))` (O; R's order
clips Adam's updates instead, `train.clip_order: after_adam`, trap T1).

The non-doubling run trains with O's sample pool (`vnca.pool`): the pool is part of the state,
its last n_pool batch rows start from pool states (some damaged) and all final states go back,
shuffled over the whole pool. Training images are `train` (default; `valid` is held out for
monitoring) or `train+valid` as O and R do (`train.train_split`).

The host side, top-down: `train_and_evaluate` checks the inputs, takes the run directory's lock
and its `Checkpointer`, and `_train` resumes (or starts) the run and hands it to a `TrainLoop`.
The loop feeds the batch of each step (`Feeder`) from per-epoch permutations `fold_in(data_key,
epoch)` (`DataOrder`: the data order is a function of the step; each process feeds the rows its
devices hold), keeps a step or two in flight (`StepQueue`), checks that the loss, the gradient
norm and the updated state are finite before every log record and checkpoint
(TrainingDivergedError otherwise; the checkpoints whose parameters gave the non-finite value are
set aside, so the newest one left is good and running again resumes from it), writes metrics
as JSON lines (`MetricsLog`), validates with the evaluation's bound (`vnca.evaluation.bound`) on
a fixed subset of `valid` (never `test`), and checkpoints (state + step, wall time and data
position). A first SIGINT or SIGTERM stops it after the current step with a checkpoint
(`StopSignals`; on a multi-process job every process after the same step). Only process 0
writes files other than checkpoints (orbax saves are collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vnca import artifacts, config, contracts, distributed, losses, pool, rng, tensorboard
from vnca.checkpoint import Checkpointer, RunLock
from vnca.config import Config
from vnca.errors import ConfigError, DataError, UserError
from vnca.evaluation import bound
from vnca.evaluation.batching import map_padded
from vnca.fileio import write_atomic
from vnca.models import build_model, count_params
from vnca.models.vae import VAE, resolve_backend
from vnca.provenance import source_commit

# Config keys that may differ when resuming into an existing output directory; everything else
# (model, data, seed, batch size, optimizer structure, pool) must match the checkpoint.
RESUMABLE_KEYS = ("name", "tier", "train.steps", "train.learning_rate", "train.beta",
                  "train.clip_norm", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.log_every", "train.val_every", "train.val_images",
                  "train.val_iw_samples", "eval", "hardware",
                  "model.remat", "model.conv_algorithm")  # the same math, computed differently


# ---------------------------------------------------------------------------------------------
# Pure pieces: optimizer, state, loss, train step.


def make_optimizer(tc: config.TrainConfig) -> optax.GradientTransformation:
    """Adam with global-norm clipping of the gradients (O) or of Adam's updates (R)."""
    clip, adam = optax.clip_by_global_norm(tc.clip_norm), optax.adam(tc.learning_rate)
    return optax.chain(clip, adam) if tc.clip_order == "before_adam" else optax.chain(adam, clip)


def init_state(model: VAE, cfg: Config, key: jax.Array) -> dict:
    """{'step', 'params', 'opt_state'} and, for pool training, 'pool' (empty, like O's)."""
    params = model.init(key)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": make_optimizer(cfg.train).init(params)}
    if cfg.train.pool.enabled:
        state["pool"] = pool.init_pool(cfg.train.pool.size, model.image_size, cfg.model.z_dim)
    return state


def _mean_terms(log_px_B, kl_B, beta) -> tuple[jax.Array, dict]:
    elbo_B = losses.elbo(log_px_B, kl_B, beta)
    loss = -jnp.mean(elbo_B)
    return loss, {"kl": jnp.mean(kl_B), "recon": jnp.mean(log_px_B),
                  "elbo": jnp.mean(losses.elbo(log_px_B, kl_B, 1.0))}


def pool_loss(model: VAE, cfg: Config, params: dict, x_BxHxWx1: jax.Array, pool_state: dict,
              key: jax.Array, step: jax.Array | int = 0) -> tuple[jax.Array, dict]:
    """Loss of a batch whose last n_pool rows are pool entries (image + grown state, some
    damaged) from step `train.pool.start_step` on; aux holds the metrics and the batch's final
    states for the pool."""
    b = x_BxHxWx1.shape[0]
    p = cfg.train.pool
    n_pool, n_damage = pool.pool_rows(cfg)
    k_z, k_damage, k_t, k_grow = jax.random.split(key, 4)
    fed = pool.take(pool_state, b, n_pool)
    use_B = fed["use_B"] & (step >= p.start_step)
    x_BxHxWx1 = jnp.where(use_B[:, None, None, None], fed["images"], x_BxHxWx1)
    mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)
    z_BxZ = model.sample_z(mean_BxZ, std_BxZ, k_z)
    s_BxHxWxC = jnp.where(use_B[:, None, None, None], fed["states"], model.seed(z_BxZ))
    s_BxHxWxC = model.damage(s_BxHxWxC, k_damage, pool.damage_rows(b, n_pool, n_damage, use_B))
    s_BxHxWxC = model.grow(params, s_BxHxWxC, k_grow, model.sample_n_steps(k_t))
    log_px_B = losses.bernoulli_loglik(model.to_logits(s_BxHxWxC), x_BxHxWx1[..., 0])
    kl_B = losses.gaussian_kl(mean_BxZ, std_BxZ)
    if not p.kl_on_pool_rows:
        kl_B = jnp.where(use_B, 0.0, kl_B)
    loss, metrics = _mean_terms(log_px_B, kl_B, cfg.train.beta)
    metrics["pool_rows"] = jnp.sum(use_B).astype(jnp.float32)
    return loss, {"metrics": metrics, "images": x_BxHxWx1,
                  "states": jax.lax.stop_gradient(s_BxHxWxC)}


def make_train_step(model: VAE, cfg: Config) -> Callable:
    """The pure `train_step(state, x_BxHxWx1, key) -> (state, metrics)` of this config."""
    tx = make_optimizer(cfg.train)
    beta = cfg.train.beta
    use_pool = cfg.train.pool.enabled

    def train_step(state: dict, x_BxHxWx1: jax.Array, key: jax.Array):
        k_loss, k_pool = jax.random.split(jax.random.fold_in(key, state["step"]))

        def loss_fn(params):
            if use_pool:
                return pool_loss(model, cfg, params, x_BxHxWx1, state["pool"], k_loss,
                                 state["step"])
            t = model.forward(params, x_BxHxWx1, k_loss, beta)
            loss, metrics = _mean_terms(t["log_px"], t["kl"], beta)
            return loss, {"metrics": metrics}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
        if use_pool:
            n_pool, _ = pool.pool_rows(cfg)
            new["pool"] = pool.write_back(state["pool"], n_pool, aux["images"], aux["states"],
                                          k_pool)
        # Whether the state this step hands on (and a checkpoint would hold) is finite: the
        # loss and gradient are measured before the update and miss an update that overflows.
        finite = jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(
            (new["params"], new["opt_state"])) if jnp.issubdtype(leaf.dtype, jnp.floating)])
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "state_finite": jnp.all(finite).astype(jnp.float32), **aux["metrics"]}
        return new, metrics

    return train_step


def make_eval_step(model: VAE, k_samples: int) -> Callable:
    """`eval_step(params, x_BxHxWx1, index_B, key) -> [B]`: the importance-weighted bound L_K
    of `vnca.evaluation.bound` with K samples (K = 1: the one-sample ELBO with beta = 1), at
    evaluation settings; image b's randomness comes from `fold_in(key, index_B[b])`."""
    chunk = bound.sample_chunk(k_samples)

    def eval_step(params, x_BxHxWx1, index_B, key):
        return bound.bound_terms(model, params, x_BxHxWx1, index_B, key, k_samples, chunk)["iw"]

    return eval_step


# ---------------------------------------------------------------------------------------------
# Data order: a function of (data key, step) only.


def _host_device():
    """The CPU device when the CPU backend is up (small host-side draws), else a local one."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


class DataOrder:
    """Global batch indices of step s: positions [s B, (s + 1) B) of the stream of epoch
    permutations `permutation(fold_in(data_key, epoch), N)` (a batch may span two epochs)."""

    def __init__(self, key: jax.Array, n: int, batch_size: int):
        self.key, self.n, self.batch_size = key, n, batch_size
        self._cache: dict[int, np.ndarray] = {}

    def epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            with jax.default_device(_host_device()):
                perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), self.n)
            self._cache = {epoch: np.asarray(perm)}  # keep one epoch
        return self._cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offs = pos // self.n, pos % self.n
        out = np.empty_like(pos)
        for e in np.unique(epochs):  # at most two
            m = epochs == e
            out[m] = self.epoch_perm(int(e))[offs[m]]
        return out


# ---------------------------------------------------------------------------------------------
# A run, top-down.


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
    latest = _check_prior_run(cfg, out, ckpt)
    finished = _finished_run(cfg, out, latest)
    if finished is not None:
        return finished  # finished already: nothing to do
    if main:
        write_atomic(out / artifacts.RESOLVED_CONFIG, config.dump(cfg))  # before step 0

    model, keys = build_model(cfg), rng.named_keys(cfg.train.seed)
    mesh = distributed.make_mesh(devices)
    abstract, state_sh, init_fn, step_fn = _programs(model, _step_config(cfg), mesh)
    state, meta = _restore_or_init(ckpt, latest, abstract, state_sh,
                                   lambda: init_fn(keys["init"]))
    start = int(meta["step"])
    log = MetricsLog(out / artifacts.TRAIN_METRICS, enabled=main,
                     event_dirs=tensorboard.log_dirs(out, cfg.name))
    log.truncate(start)

    feeder = Feeder(mesh, cfg.train.batch_size, cfg.data.pad_to)
    order = DataOrder(keys["data"], len(x_train), cfg.train.batch_size)
    val = Validator.maybe(model, cfg, x_valid, keys["valid"], mesh, feeder)
    hardware = distributed.hardware_string(devices)
    progress = Progress(cfg.train, start, ckpt.directory, hardware, main)
    loop = TrainLoop(cfg, state, meta, step_fn, lambda s: feeder.images(x_train, order.indices(s)),
                     keys["train"], val, log, ckpt, progress, stop, len(x_train))
    state = loop.run()
    log.close()
    summary = contracts.TrainSummary(
        variant=cfg.model.variant, name=cfg.name, steps=cfg.train.steps,
        wall_time_s=loop.clock.elapsed(), hardware=hardware, n_devices=len(devices),
        n_processes=jax.process_count(), smoke=cfg.smoke, tier=cfg.tier,
        param_count=count_params(abstract["params"]), final_loss=loop.final_loss,
        batch_size=cfg.train.batch_size, train_split=cfg.train.train_split,
        resumed_from_step=start, commit=source_commit(), precision=cfg.model.precision)
    if main:
        _write_model(out, state["params"], summary)
    return summary.to_dict()


def _restore_or_init(ckpt: Checkpointer, latest: int | None, abstract: dict, shardings: dict,
                     init: Callable[[], dict]) -> tuple[dict, dict]:
    """(state, meta) of the newest intact checkpoint, or of a fresh state at step 0."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = ckpt.restore_latest(target) if latest is not None else None
    if restored is None:
        return init(), {"step": 0, "elapsed_s": 0.0, "examples_seen": 0}
    return restored


def _write_model(out: Path, params: dict, summary: contracts.TrainSummary) -> None:
    """The finished run's parameters, then its summary (whose presence means it finished)."""
    from vnca.models.model_io import save_params

    save_params(out / artifacts.PARAMS, _host_tree(params))
    summary.write(out / artifacts.TRAIN_SUMMARY)


def _host_tree(tree):
    """Numpy copy of a replicated (possibly multi-host) pytree."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


# ---------------------------------------------------------------------------------------------
# The run directory: a run already there, the metrics log.


def _check_resumable(text: str, source: str, cfg: Config) -> None:
    """The run whose config is `text` must match `cfg` except in RESUMABLE_KEYS."""
    try:
        old = config.loads(text, source)
    except ConfigError as e:
        raise ConfigError(f"{source}: cannot read the config of the run in this directory ({e})")
    a, b = config.flatten(config.to_dict(old)), config.flatten(config.to_dict(cfg))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]
    if diff:
        raise ConfigError(f"{source}: the run in this directory has a different config "
                          f"({', '.join(diff)}); use a new --out or the same config")


def _saved_config_text(cfg_path: Path, ckpt: Checkpointer, latest: int) -> tuple[str, str]:
    """(config text, where from) of the run in a directory: config.yaml, else the config the
    checkpoint's metadata holds."""
    if cfg_path.is_file():
        return cfg_path.read_text(), str(cfg_path)
    try:
        text = ckpt.read_meta(latest).get("config")
    except Exception:  # noqa: BLE001 - unreadable metadata: restore_latest sorts it out
        text = None
    return (text, f"{ckpt.directory}/{latest}") if text else ("", "")


def _check_prior_run(cfg: Config, out: Path, ckpt: Checkpointer) -> int | None:
    """The latest checkpoint's step, or None; a ConfigError when the run in `out` has another
    config or is past train.steps."""
    latest = ckpt.latest_step()
    if latest is None:
        return None
    text, source = _saved_config_text(out / artifacts.RESOLVED_CONFIG, ckpt, latest)
    if text:
        _check_resumable(text, source, cfg)
    if latest > cfg.train.steps:
        raise ConfigError(f"{ckpt.directory}: holds step {latest}, past "
                          f"train.steps={cfg.train.steps}; use a new --out or more steps")
    return latest


def _finished_run(cfg: Config, out: Path, latest: int | None) -> dict | None:
    """The summary of the run in `out` when it finished train.steps already, else None."""
    steps = cfg.train.steps
    summary_path = out / artifacts.TRAIN_SUMMARY
    if latest != steps or not (out / artifacts.PARAMS).is_file() or not summary_path.is_file():
        return None
    try:
        finished = contracts.TrainSummary.read(summary_path)
    except DataError:  # unreadable or of an older version: the run rewrites it
        return None
    return finished.to_dict() if finished.steps == steps else None


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


# ---------------------------------------------------------------------------------------------
# Inputs: the images, and global batches of them.


def pad_images(x_NxHxW: np.ndarray, pad_to: int) -> np.ndarray:
    from vnca.data import pad_images as pad

    return pad(x_NxHxW, pad_to)


def _load_split(data_dir, split: str) -> np.ndarray:
    from vnca.data import load_split

    x, _ = load_split(data_dir, split)
    return x


def training_images(cfg: Config, data_dir) -> tuple[np.ndarray, np.ndarray]:
    """(training images, validation images), uint8 N x 28 x 28; training is `train` or
    `train` followed by `valid` (train.train_split)."""
    x_valid = _load_split(data_dir, "valid")
    x_train = _load_split(data_dir, "train")
    if cfg.train.train_split == "train+valid":
        x_train = np.concatenate([x_train, x_valid])
    return x_train, x_valid


def check_batch(cfg: Config, n_devices: int) -> None:
    b = cfg.train.batch_size
    if b % n_devices:
        raise ConfigError(f"train.batch_size={b} must be a multiple of the number of devices "
                          f"({n_devices})")
    if b % jax.process_count():
        raise ConfigError(f"train.batch_size={b} must be a multiple of the number of "
                          f"processes ({jax.process_count()})")


class Feeder:
    """Global batches of `batch_size` rows, sharded along `data`: each process puts in the
    block of rows its devices hold (`distributed.process_rows`)."""

    def __init__(self, mesh, batch_size: int, pad_to: int):
        self.sharding = distributed.batch_sharded(mesh)
        self.local = distributed.process_rows(self.sharding, batch_size)
        self.pad_to = pad_to

    def images(self, x_uint8_NxHxW: np.ndarray, idx_B: np.ndarray) -> jax.Array:
        """The padded float images `x[idx_B]`, `BxHxWx1`."""
        x = pad_images(np.asarray(x_uint8_NxHxW[idx_B[self.local]]), self.pad_to)
        return distributed.global_batch(x, self.sharding, len(idx_B))

    def rows(self, a_B: np.ndarray) -> jax.Array:
        """A per-row array (such as image indices) sharded like the images."""
        return distributed.global_batch(np.asarray(a_B[self.local]), self.sharding, len(a_B))


class Validator:
    """`val(params) -> {'val_elbo', ...}`: the mean bound L_K (K = train.val_iw_samples) of
    `vnca.evaluation.bound` on `index_N`, a fixed subset of the validation split (never test),
    image i's randomness from `fold_in(key, i)` with i its index in the split: the evaluation's
    bound on those images, the same noise at every validation."""

    def __init__(self, model: VAE, cfg: Config, x_valid: np.ndarray, key: jax.Array, mesh,
                 feeder: Feeder):
        tc = cfg.train
        n = min(tc.val_images, len(x_valid)) // tc.batch_size * tc.batch_size
        k_subset, self.key = jax.random.split(key)
        with jax.default_device(_host_device()):
            self.index_N = np.asarray(jax.random.permutation(k_subset, len(x_valid)))[:n]
        self.x_valid, self.feeder, self.batch_size = x_valid, feeder, tc.batch_size
        self.k = tc.val_iw_samples
        self.eval_fn = _eval_program(model, self.k, mesh)

    @classmethod
    def maybe(cls, model: VAE, cfg: Config, x_valid: np.ndarray, key: jax.Array, mesh,
              feeder: Feeder) -> Validator | None:
        """A validator, or None when the config validates never or on no image."""
        tc = cfg.train
        if tc.val_every <= 0 or min(tc.val_images, len(x_valid)) < tc.batch_size:
            return None
        return cls(model, cfg, x_valid, key, mesh, feeder)

    def __call__(self, params: dict) -> dict:
        def batch(_, idx_B):
            x = self.feeder.images(self.x_valid, idx_B)
            return self.eval_fn(params, x, self.feeder.rows(idx_B.astype(np.int32)), self.key)

        iw_N = map_padded(batch, (self.index_N,), self.batch_size)
        # K = 1: the one-sample ELBO (beta = 1); K > 1: the importance-weighted bound.
        return {"val_elbo": float(iw_N.mean()), "val_images": len(self.index_N),
                "val_iw_samples": self.k}


# ---------------------------------------------------------------------------------------------
# The loop.


class TrainLoop:
    """One segment of a run, from a restored (or fresh) state to train.steps or a stop:
    dispatch steps, fetch their metrics a step or two late, log, validate, checkpoint."""

    def __init__(self, cfg: Config, state: dict, meta: dict, step_fn: Callable,
                 batch: Callable[[int], jax.Array], key: jax.Array, val: Validator | None,
                 log: MetricsLog, ckpt: Checkpointer, progress: Progress, stop: StopSignals,
                 n_train: int):
        self.cfg, self.tc = cfg, cfg.train
        self.state, self.step_fn, self.batch, self.key = state, step_fn, batch, key
        self.val, self.log, self.ckpt, self.stop = val, log, ckpt, stop
        self.progress, self.n_train = progress, n_train
        self.queue = StepQueue(progress)
        self.clock = Clock(float(meta.get("elapsed_s", 0.0)))
        self.interval = Interval(self.tc.batch_size, self.clock)
        self.last_saved, self.final_loss = int(meta["step"]), meta.get("final_loss")
        self.start = self.last_saved

    def run(self) -> dict:
        """Train to train.steps (Interrupted when a signal stops it first); the final state."""
        done = self.start
        try:
            while True:
                # Asked before every step and after the last, on every process alike.
                stop = self.stop.should_stop(done - self.start)
                if stop or done >= self.tc.steps:
                    break
                self.state, metrics = self.step_fn(self.state, self.batch(done), self.key)
                self.queue.push(done, metrics)
                done += 1
                self._after_step(done)
            self._flush()
            if stop:
                self._stop(done)
            self.ckpt.prune(done)  # finished: the final checkpoint has no next loss to wait for
        finally:
            self.progress.close()
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
        if is_val and self.val is not None:
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
            self.interval.add(m)
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
        rec = self.interval.record(done)
        if rec is not None:
            self.log.append(rec)
            self.progress.show(rec)

    def _validate(self, done: int) -> None:
        t0 = time.time()
        rec = {"step": done, "split": "valid", **self.val(self.state["params"])}
        self.interval.exclude(time.time() - t0)
        self.log.append(rec)

    def _save(self, done: int) -> None:
        b = self.tc.batch_size
        meta = {"step": done, "elapsed_s": self.clock.elapsed(), "examples_seen": done * b,
                "final_loss": self.final_loss, "data_epoch": done * b // self.n_train,
                "config": config.dump(self.cfg)}
        self.ckpt.save(done, self.state, meta)
        self.last_saved = done

    def _stop(self, done: int) -> None:
        """After a stop signal: log and save the last finished step, then raise Interrupted."""
        if done > self.last_saved:
            self._log(done)
            self._save(done)
        # Processes that stopped at the sync point without a signal of their own: SIGTERM,
        # JAX's preemption notice.
        signum = self.stop.requested or signal.SIGTERM
        by, also = ((f"a SIGTERM or SIGINT to one of the {jax.process_count()} processes",
                     ", where all of them stopped") if self.stop.synced
                    else (signal.Signals(signum).name, ""))
        where = (f"checkpoint {self.last_saved:,} is in {self.ckpt.directory} (run the same "
                 "command again to resume)" if self.ckpt.latest_step() is not None else
                 "no checkpoint was written")
        raise Interrupted(f"stopped by {by} at step {done:,} of {self.tc.steps:,}{also}; "
                          f"{where}", signum)


def _due(every: int, done: int, last: int) -> bool:
    """Whether something done every `every` steps (0: never) and at the last step is due."""
    return every > 0 and (done % every == 0 or done == last)


# ---------------------------------------------------------------------------------------------
# Progress: the bar, the forecast, the steps in flight, the interval's means.


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
    """The progress bar (process 0 only) and, once three steps after the first are timed, one
    forecast line."""

    def __init__(self, tc: config.TrainConfig, start: int, ckpt_dir: Path, hardware: str,
                 enabled: bool):
        from tqdm.auto import tqdm

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


# Steps dispatched ahead of the one the host waits for: enough to overlap feeding with
# computing, few enough that a stop or an error is seen within a step or two.
STEPS_IN_FLIGHT = 2


class StepQueue:
    """Dispatched steps whose metrics the host has not fetched yet."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self._in_flight: list[tuple[int, dict]] = []
        self._finished: list[tuple[int, dict]] = []

    def push(self, step: int, metrics: dict) -> None:
        """Add a dispatched step; block until at most STEPS_IN_FLIGHT - 1 are unfinished."""
        self._in_flight.append((step, metrics))
        self._wait(STEPS_IN_FLIGHT - 1)

    def _wait(self, n_left: int) -> None:
        while len(self._in_flight) > n_left:
            step, m = self._in_flight.pop(0)
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


class Clock:
    """Wall time of the whole run: the time of earlier segments (from the checkpoint) plus
    this one's."""

    def __init__(self, elapsed_before: float):
        self.before, self.t0 = elapsed_before, time.time()

    def elapsed(self, now: float | None = None) -> float:
        return self.before + (time.time() if now is None else now) - self.t0


class Interval:
    """Host metrics of the steps since the last training record and the time they took
    (validation excluded): the record's means and throughput."""

    MEANS = ("loss", "kl", "recon", "elbo", "grad_norm")

    def __init__(self, batch_size: int, clock: Clock):
        self.batch_size, self.clock = batch_size, clock
        self.steps: list[dict] = []
        self.t0 = time.time()

    def add(self, m: dict) -> None:
        self.steps.append({k: float(v) for k, v in m.items()})

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (validation) is not training throughput."""
        self.t0 += seconds

    def record(self, step: int) -> dict | None:
        """The training record of the interval ending at `step` (None if it is empty); starts
        the next interval."""
        if not self.steps:
            return None
        now = time.time()
        keys = self.MEANS + (("pool_rows",) if "pool_rows" in self.steps[0] else ())
        rec = {"step": step, **{k: float(np.mean([m[k] for m in self.steps])) for k in keys}}
        rec["images_per_s"] = len(self.steps) * self.batch_size / max(now - self.t0, 1e-9)
        rec["elapsed_s"] = self.clock.elapsed(now)
        self.steps.clear()
        self.t0 = now
        return rec


# ---------------------------------------------------------------------------------------------
# Stopping: signals, divergence.


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


# ---------------------------------------------------------------------------------------------
# Compiled programs, cached per (model, config, mesh).


def _state_shardings(abstract: dict, mesh) -> dict:
    repl, rows = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    n_dev = mesh.devices.size

    def pick(path, leaf):
        in_pool = any(getattr(p, "key", None) == "pool" for p in path)
        return rows if in_pool and leaf.shape and leaf.shape[0] % n_dev == 0 else repl

    return jax.tree_util.tree_map_with_path(pick, abstract)


def _step_config(cfg: Config) -> Config:
    """The fields the compiled programs depend on (loop-only fields reset), as a cache key."""
    t = cfg.train
    return dataclasses.replace(
        cfg, name="", tier="paper", eval=config.EvalConfig(), hardware=config.HardwareConfig(),
        train=config.TrainConfig(batch_size=t.batch_size, learning_rate=t.learning_rate,
                                 beta=t.beta, clip_norm=t.clip_norm, clip_order=t.clip_order,
                                 pool=t.pool))


@functools.lru_cache(maxsize=8)
def _programs(model: VAE, cfg: Config, mesh):
    """(abstract state, its shardings, jitted init, jitted train step) for a config and mesh;
    cached so that repeated runs in one process (tests, resume) compile once."""
    rows, repl = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    abstract = jax.eval_shape(lambda k: init_state(model, cfg, k), jax.random.key(0))
    state_sh = _state_shardings(abstract, mesh)
    init_fn = jax.jit(lambda k: init_state(model, cfg, k), out_shardings=state_sh)
    step_fn = jax.jit(make_train_step(model, cfg), in_shardings=(state_sh, rows, repl),
                      out_shardings=(state_sh, repl), donate_argnums=0)
    return abstract, state_sh, init_fn, step_fn


@functools.lru_cache(maxsize=8)
def _eval_program(model: VAE, k_samples: int, mesh):
    repl, rows = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    return jax.jit(make_eval_step(model, k_samples), in_shardings=(repl, rows, rows, repl),
                   out_shardings=repl)
