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

The host loop feeds the batch of each step from per-epoch permutations `fold_in(data_key,
epoch)` (so the data order is a function of the step; each process feeds the rows its devices
hold), checks that the loss and gradient norm are finite before every log record and
checkpoint (TrainingDivergedError otherwise, the last checkpoint stays the last good one),
writes metrics as JSON lines, validates on a fixed subset of `valid` (never `test`),
checkpoints with orbax (state + step, wall time and data position) and resumes from the latest
complete checkpoint. Only process 0 writes files other than checkpoints (orbax saves are
collective).
"""

from __future__ import annotations

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

from vnca import artifacts, config, contracts, distributed, losses, pool, rng
from vnca.checkpoint import Checkpointer, RunLock
from vnca.config import Config
from vnca.errors import ConfigError, DataError, UserError
from vnca.fileio import write_atomic
from vnca.models import build_model, count_params
from vnca.models.vae import VAE, resolve_backend
from vnca.provenance import source_commit


class TrainingDivergedError(UserError):
    """The loss or gradient norm became NaN or infinite."""


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
              key: jax.Array) -> tuple[jax.Array, dict]:
    """Loss of a batch whose last n_pool rows are pool entries (image + grown state, some
    damaged); aux holds the metrics and the batch's final states for the pool."""
    b = x_BxHxWx1.shape[0]
    n_pool, n_damage = pool.pool_rows(cfg)
    k_z, k_damage, k_t, k_grow = jax.random.split(key, 4)
    fed = pool.take(pool_state, b, n_pool)
    use_B = fed["use_B"]
    x_BxHxWx1 = jnp.where(use_B[:, None, None, None], fed["images"], x_BxHxWx1)
    mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)
    z_BxZ = model.sample_z(mean_BxZ, std_BxZ, k_z)
    s_BxHxWxC = jnp.where(use_B[:, None, None, None], fed["states"], model.seed(z_BxZ))
    s_BxHxWxC = model.damage(s_BxHxWxC, k_damage, pool.damage_rows(b, n_pool, n_damage, use_B))
    s_BxHxWxC = model.grow(params, s_BxHxWxC, k_grow, model.sample_n_steps(k_t))
    log_px_B = losses.bernoulli_loglik(model.to_logits(s_BxHxWxC), x_BxHxWx1[..., 0])
    loss, metrics = _mean_terms(log_px_B, losses.gaussian_kl(mean_BxZ, std_BxZ), cfg.train.beta)
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
                return pool_loss(model, cfg, params, x_BxHxWx1, state["pool"], k_loss)
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
    """`eval_step(params, x_BxHxWx1, key) -> [B]` importance-weighted bound with K samples
    (K = 1: the one-sample ELBO with beta = 1), at evaluation settings (eval_mode)."""

    def eval_step(params, x_BxHxWx1, key):
        mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)

        def one(k):
            k_z, k_dec = jax.random.split(k)
            z_BxZ = model.sample_z(mean_BxZ, std_BxZ, k_z)
            logits = model.decode(params, z_BxZ, k_dec, eval_mode=True)
            return (losses.bernoulli_loglik(logits, x_BxHxWx1[..., 0]),
                    losses.std_normal_logpdf(z_BxZ),
                    losses.diag_gaussian_logpdf(z_BxZ, mean_BxZ, std_BxZ))

        log_px, log_pz, log_qz = jax.lax.map(one, jax.random.split(key, k_samples))
        return losses.iw_bound(log_px.T, log_pz.T, log_qz.T)

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
# Host side: files, checkpoints, the loop.


def _check_resumable(text: str, source: str, cfg: Config) -> None:
    """The run whose config is `text` must match `cfg` except in RESUMABLE_KEYS."""
    path = source
    try:
        old = config.loads(text, source)
    except ConfigError as e:
        raise ConfigError(f"{path}: cannot read the config of the run in this directory ({e})")
    a, b = config.flatten(config.to_dict(old)), config.flatten(config.to_dict(cfg))
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]
    if diff:
        raise ConfigError(f"{path}: the run in this directory has a different config "
                          f"({', '.join(diff)}); use a new --out or the same config")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    write_atomic(path, "".join(f"{line}\n" for line in keep))


def _host_tree(tree):
    """Numpy copy of a replicated (possibly multi-host) pytree."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _state_shardings(abstract: dict, mesh) -> dict:
    repl, rows = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    n_dev = mesh.devices.size

    def pick(path, leaf):
        in_pool = any(getattr(p, "key", None) == "pool" for p in path)
        return rows if in_pool and leaf.shape and leaf.shape[0] % n_dev == 0 else repl

    return jax.tree_util.tree_map_with_path(pick, abstract)


def pad_images(x_NxHxW: np.ndarray, pad_to: int) -> np.ndarray:
    from vnca.data import pad_images as pad

    return pad(x_NxHxW, pad_to)


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
    return jax.jit(make_eval_step(model, k_samples), in_shardings=(repl, rows, repl),
                   out_shardings=repl)


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


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")


def check_batch(cfg: Config, n_devices: int) -> None:
    b = cfg.train.batch_size
    if b % n_devices:
        raise ConfigError(f"train.batch_size={b} must be a multiple of the number of devices "
                          f"({n_devices})")
    if b % jax.process_count():
        raise ConfigError(f"train.batch_size={b} must be a multiple of the number of "
                          f"processes ({jax.process_count()})")


class Interrupted(UserError):
    """SIGINT or SIGTERM stopped training; a checkpoint of the last finished step was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, the first SIGINT or SIGTERM only asks the loop to stop after the step it
    is on (`requested` holds the signal number); a second SIGINT aborts at once."""

    def __init__(self):
        self.requested: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving a "
              "checkpoint (Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


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


def train_and_evaluate(cfg: Config, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       steps: int | None = None, devices: list | None = None) -> dict:
    """Train one variant into `out_dir` (resuming from its latest checkpoint); returns the
    summary (`summary.json`). `devices` defaults to every device JAX sees."""
    distributed.maybe_initialize()
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {steps}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    out = Path(out_dir)
    devices = jax.devices() if devices is None else devices
    cfg = resolve_backend(cfg, devices[0].platform)  # "auto" settled once, recorded below
    check_batch(cfg, len(devices))
    x_train, x_valid = training_images(cfg, data_dir)  # fail on bad data before writing
    if len(x_train) == 0:
        raise UserError(f"{data_dir}: the train split is empty")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out) if distributed.is_main_process() else None
    if lock is not None:
        lock.acquire()
    ckpt = Checkpointer(out / artifacts.CHECKPOINTS, cfg.train.keep_checkpoints)
    try:
        with StopSignals() as stop:
            return _train(cfg, x_train, x_valid, out, devices, ckpt, stop)
    finally:
        ckpt.close()
        if lock is not None:
            lock.release()


# Steps dispatched ahead of the one the host waits for: enough to overlap feeding with
# computing, few enough that a stop or an error is seen within a step or two.
STEPS_IN_FLIGHT = 2


def _train(cfg: Config, x_train: np.ndarray, x_valid: np.ndarray, out: Path, devices: list,
           ckpt: Checkpointer, stop: StopSignals) -> dict:
    tc = cfg.train
    main = distributed.is_main_process()
    mesh = distributed.make_mesh(devices)
    cfg_path, params_path = out / artifacts.RESOLVED_CONFIG, out / artifacts.PARAMS
    summary_path, metrics_path = out / artifacts.TRAIN_SUMMARY, out / artifacts.TRAIN_METRICS
    latest = ckpt.latest_step()
    if latest is not None:
        text, source = _saved_config_text(cfg_path, ckpt, latest)
        if text:
            _check_resumable(text, source, cfg)
    if latest is not None and latest > tc.steps:
        raise ConfigError(f"{ckpt.directory}: holds step {latest}, past "
                          f"train.steps={tc.steps}; use a new --out or more steps")
    if latest == tc.steps and params_path.is_file() and summary_path.is_file():
        try:
            finished_run = contracts.TrainSummary.read(summary_path)
        except DataError:  # unreadable or of an older version: the run below rewrites it
            finished_run = None
        if finished_run is not None and finished_run.steps == tc.steps:
            return finished_run.to_dict()  # finished already: nothing to do
    if main:
        write_atomic(cfg_path, config.dump(cfg))  # the resolved config, before step 0

    model = build_model(cfg)
    keys = rng.named_keys(tc.seed)
    order = DataOrder(keys["data"], len(x_train), tc.batch_size)
    rows = distributed.batch_sharded(mesh)

    abstract, state_sh, init_fn, step_fn = _programs(model, _step_config(cfg), mesh)
    local_rows = distributed.process_rows(rows, tc.batch_size)

    def feed(x_uint8_NxHxW: np.ndarray, idx_B: np.ndarray) -> jax.Array:
        x = np.asarray(x_uint8_NxHxW[idx_B[local_rows]])
        return distributed.global_batch(pad_images(x, cfg.data.pad_to), rows, len(idx_B))

    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    restored = ckpt.restore_latest(target) if latest is not None else None
    if restored is None:
        state = init_fn(keys["init"])
        meta = {"step": 0, "elapsed_s": 0.0, "examples_seen": 0}
    else:
        state, meta = restored
    start = int(meta["step"])
    if main:
        _truncate_metrics(metrics_path, start)

    # Validation: a fixed subset of `valid` (never test), the same noise at every validation.
    val = _validator(model, cfg, x_valid, keys["valid"], mesh, feed)
    hardware = distributed.hardware_string(devices)
    t_segment = time.time()
    elapsed0 = float(meta.get("elapsed_s", 0.0))
    finished: list[tuple[int, dict]] = []  # steps whose metrics are not yet fetched
    in_flight: list[tuple[int, dict]] = []
    interval: list[dict] = []
    step_ends: list[float] = []
    t_interval, last_saved, final_loss = time.time(), start, meta.get("final_loss")

    def wait_for(n_left: int, bar) -> None:
        """Block until at most `n_left` dispatched steps are unfinished; count the rest."""
        while len(in_flight) > n_left:
            s, m = in_flight.pop(0)
            jax.block_until_ready(m)
            finished.append((s, m))
            step_ends.append(time.time())
            bar.update(1)
            if main and len(step_ends) == 4 and tc.steps - (s + 1) > 0:
                step_s = (step_ends[-1] - step_ends[1]) / 2  # step 1 carries the compilation
                bar.write(forecast(step_s, s + 1, tc.steps, tc.checkpoint_every,
                                   ckpt.directory, hardware), file=sys.stderr)

    def flush(bar) -> None:
        """Finish every dispatched step, fetch its metrics, stop on a non-finite value."""
        nonlocal final_loss
        wait_for(0, bar)
        host = jax.device_get([m for _, m in finished])
        for (s, _), m in zip(finished, host):
            bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(m[k]))]
            if not bad and float(m["state_finite"]) != 1.0:
                bad = ["the updated parameters"]
            if bad:
                value = "not finite" if bad[0].startswith("the") else f"{float(m[bad[0]])}"
                where = (f"the last good checkpoint is step {last_saved} in {ckpt.directory}"
                         if ckpt.latest_step() is not None else "no checkpoint yet")
                raise TrainingDivergedError(
                    f"training diverged: {bad[0]} is {value} at step {s + 1}; "
                    f"{where} (lower train.learning_rate or train.clip_norm and rerun)")
            interval.append({k: float(v) for k, v in m.items()})
            final_loss = float(m["loss"])
        finished.clear()

    def log_record(step: int, bar) -> None:
        nonlocal t_interval
        if not interval:
            return
        now = time.time()
        rec = {"step": step}
        for k in ("loss", "kl", "recon", "elbo", "grad_norm"):
            rec[k] = float(np.mean([m[k] for m in interval]))
        if "pool_rows" in interval[0]:
            rec["pool_rows"] = float(np.mean([m["pool_rows"] for m in interval]))
        rec["images_per_s"] = len(interval) * tc.batch_size / max(now - t_interval, 1e-9)
        rec["elapsed_s"] = elapsed0 + now - t_segment
        interval.clear()
        t_interval = now
        if main:
            _append_jsonl(metrics_path, rec)
            bar.set_postfix(loss=f"{rec['loss']:.2f}", kl=f"{rec['kl']:.2f}",
                            recon=f"{rec['recon']:.2f}", img_s=f"{rec['images_per_s']:.1f}")

    def save(done: int) -> None:
        nonlocal last_saved
        meta = {"step": done, "elapsed_s": elapsed0 + time.time() - t_segment,
                "examples_seen": done * tc.batch_size, "final_loss": final_loss,
                "data_epoch": done * tc.batch_size // len(x_train), "config": config.dump(cfg)}
        ckpt.save(done, state, meta)
        last_saved = done

    bar = _progress(tc.steps, start, main)
    done = start
    try:
        for s in range(start, tc.steps):
            if stop.requested:
                break
            x = feed(x_train, order.indices(s))
            state, m = step_fn(state, x, keys["train"])
            in_flight.append((s, m))
            wait_for(STEPS_IN_FLIGHT - 1, bar)
            done = s + 1
            is_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps
            is_log = done % tc.log_every == 0 or done == tc.steps
            is_val = tc.val_every > 0 and (done % tc.val_every == 0 or done == tc.steps)
            if is_log or is_ckpt or is_val:
                flush(bar)
            if is_log:
                log_record(done, bar)
            if is_val and val is not None:
                t0 = time.time()
                rec = {"step": done, "split": "valid", **val(state["params"])}
                t_interval += time.time() - t0  # validation time is not training throughput
                if main:
                    _append_jsonl(metrics_path, rec)
            if is_ckpt:
                save(done)
        flush(bar)
        if stop.requested:
            if done > last_saved:
                log_record(done, bar)
                save(done)
            name = signal.Signals(stop.requested).name
            where = (f"checkpoint {last_saved:,} is in {ckpt.directory} (run the same command "
                     "again to resume)" if ckpt.latest_step() is not None else
                     "no checkpoint was written")
            raise Interrupted(f"stopped by {name} at step {done:,} of {tc.steps:,}; {where}",
                              stop.requested)
    finally:
        bar.close()
    wall = elapsed0 + time.time() - t_segment
    summary = contracts.TrainSummary(
        variant=cfg.model.variant, name=cfg.name, steps=tc.steps, wall_time_s=wall,
        hardware=hardware, n_devices=len(devices), n_processes=jax.process_count(),
        smoke=cfg.smoke, tier=cfg.tier, param_count=count_params(abstract["params"]),
        final_loss=final_loss, batch_size=tc.batch_size, train_split=tc.train_split,
        resumed_from_step=start, commit=source_commit())
    if main:
        from vnca.models.model_io import save_params

        save_params(params_path, _host_tree(state["params"]))
        summary.write(summary_path)
    return summary.to_dict()


def _append_jsonl(path: Path, rec: dict) -> None:
    contracts.append_train_record(path, contracts.train_record(rec, str(path)))


def _validator(model: VAE, cfg: Config, x_valid: np.ndarray, key: jax.Array, mesh,
               feed: Callable) -> Callable | None:
    """`val(params) -> {'val_elbo', ...}` on a fixed subset of the validation split."""
    tc = cfg.train
    b = tc.batch_size
    n = min(tc.val_images, len(x_valid)) // b * b
    if n == 0 or tc.val_every <= 0:
        return None
    k_subset, k_noise = jax.random.split(key)
    with jax.default_device(_host_device()):
        subset = np.asarray(jax.random.permutation(k_subset, len(x_valid)))[:n]
    k = tc.val_iw_samples
    eval_fn = _eval_program(model, k, mesh)

    def val(params) -> dict:
        bounds = []
        for i in range(n // b):
            x = feed(x_valid, subset[i * b:(i + 1) * b])
            bounds.append(eval_fn(params, x, jax.random.fold_in(k_noise, i)))
        vals = np.concatenate([np.asarray(jax.device_get(v)) for v in bounds])
        # K = 1: the one-sample ELBO (beta = 1); K > 1: the importance-weighted bound.
        return {"val_elbo": float(vals.mean()), "val_images": n, "val_iw_samples": k}

    return val
