"""The pure pieces of training: optimizer, state, loss, train step, eval step, and their
compiled programs (cached by `StepKey`).

Dimension letters: B global batch, H/W image (= cfg.data.pad_to), Z latent, C cell channels.

    train_step(state, x_BxHxWx1, key) -> (state, metrics)

is pure: the step's randomness is `fold_in(key, state['step'])` with `key` the run's `train`
key (`vnca.rng.named_keys`), so a step draws the same numbers on any number of devices and after
a resume. The loss is the negative mean one-sample ELBO (log p(x|z) - beta KL) of `VAE.forward`,
whose per-example terms already hold the sample pool's rows when the pool is on; the optimizer is
`chain(clip_by_global_norm(c), adam(lr))` (O; R's order clips Adam's updates instead,
`train.clip_order: after_adam`, trap T1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vnca import config, distributed, losses, pool
from vnca.config import Config
from vnca.evaluation import bound
from vnca.models.vae import VAE


def make_optimizer(tc: config.TrainConfig) -> optax.GradientTransformation:
    """Adam with global-norm clipping of the gradients (O) or of Adam's updates (R)."""
    clip, adam = optax.clip_by_global_norm(tc.clip_norm), optax.adam(tc.learning_rate)
    return optax.chain(clip, adam) if tc.clip_order == "before_adam" else optax.chain(adam, clip)


def init_state(model: VAE, cfg: Config, key: jax.Array) -> dict:
    """{'step', 'params', 'opt_state'} and, for pool training, 'pool' (empty, like O's)."""
    return _init_state(model, cfg.train, key)


def _init_state(model: VAE, tc: config.TrainConfig, key: jax.Array) -> dict:
    params = model.init(key)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": make_optimizer(tc).init(params)}
    if tc.pool.enabled:
        state["pool"] = pool.init_pool(tc.pool.size, model.image_size, model.cfg.z_dim)
    return state


def loss_fn(model: VAE, tc: config.TrainConfig, params: dict, x_BxHxWx1: jax.Array,
            key: jax.Array, pool_state: dict | None = None,
            step: jax.Array | int = 0) -> tuple[jax.Array, dict]:
    """The negative mean one-sample ELBO of a batch, and aux {'metrics'}; with `pool_state`,
    the batch's pool rows of step `step` (`vnca.pool.start`) start from pool entries, and aux
    also holds the images scored and the final states, for the pool's write-back."""
    start = None if pool_state is None else pool.start(pool_state, tc, x_BxHxWx1.shape[0], step)
    t = model.forward(params, x_BxHxWx1, key, tc.beta, start=start)
    metrics = {"kl": jnp.mean(t["kl"]), "recon": jnp.mean(t["log_px"]),
               "elbo": jnp.mean(losses.elbo(t["log_px"], t["kl"], 1.0))}
    aux = {"metrics": metrics}
    if start is not None:
        metrics["pool_rows"] = jnp.sum(start.use_B).astype(jnp.float32)
        aux.update(images=t["x"], states=jax.lax.stop_gradient(t["state"]))
    return -jnp.mean(t["elbo"]), aux


def pool_loss(model: VAE, cfg: Config, params: dict, x_BxHxWx1: jax.Array, pool_state: dict,
              key: jax.Array, step: jax.Array | int = 0) -> tuple[jax.Array, dict]:
    """`loss_fn` of a batch whose last n_pool rows are pool entries (from step
    `train.pool.start_step` on)."""
    return loss_fn(model, cfg.train, params, x_BxHxWx1, key, pool_state, step)


def make_train_step(model: VAE, cfg: Config) -> Callable:
    """The pure `train_step(state, x_BxHxWx1, key) -> (state, metrics)` of this config."""
    return _make_train_step(model, cfg.train)


def _make_train_step(model: VAE, tc: config.TrainConfig) -> Callable:
    tx = make_optimizer(tc)
    use_pool = tc.pool.enabled

    def train_step(state: dict, x_BxHxWx1: jax.Array, key: jax.Array):
        k_loss, k_pool = jax.random.split(jax.random.fold_in(key, state["step"]))

        def batch_loss(params):
            return loss_fn(model, tc, params, x_BxHxWx1, k_loss, state.get("pool"),
                           state["step"])

        (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
        if use_pool:
            n_pool, _ = pool.pool_rows(tc)
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
# Compiled programs, cached by what they depend on.


@dataclasses.dataclass(frozen=True)
class StepKey:
    """What the compiled init and train step of a run depend on, and nothing else: the model
    (its config and image size), the train settings the step reads, and the mesh. Runs whose
    configs differ only in the loop's settings (steps, logging, checkpoints, validation, seed,
    names, evaluation, hardware) share one compilation, so tests and a resume in one process
    compile once; the step is built from `train`, so it cannot read a setting the key lacks."""

    model: VAE
    train: config.TrainConfig  # the fields below; the others at their defaults
    mesh: Mesh

    @classmethod
    def of(cls, model: VAE, cfg: Config, mesh: Mesh) -> StepKey:
        t = cfg.train
        step_fields = config.TrainConfig(
            batch_size=t.batch_size, learning_rate=t.learning_rate, beta=t.beta,
            clip_norm=t.clip_norm, clip_order=t.clip_order, pool=t.pool)
        return cls(model, step_fields, mesh)


class Programs(NamedTuple):
    """A run's compiled programs: the abstract state and its shardings, `init(key) -> state`
    and `step(state, x_BxHxWx1, key) -> (state, metrics)` (donating the state)."""

    abstract: dict
    shardings: dict
    init: Callable
    step: Callable


def programs(model: VAE, cfg: Config, mesh: Mesh) -> Programs:
    """The compiled programs of a config on a mesh: the batch sharded along `data`, parameters
    and optimizer state replicated, the pool sharded along its slot axis (XLA inserts the
    gradient all-reduce); built once per `StepKey`."""
    return _compile(StepKey.of(model, cfg, mesh))


@functools.lru_cache(maxsize=8)
def _compile(key: StepKey) -> Programs:
    model, tc, mesh = key.model, key.train, key.mesh
    rows, repl = distributed.batch_sharded(mesh), distributed.replicated(mesh)
    abstract = jax.eval_shape(lambda k: _init_state(model, tc, k), jax.random.key(0))
    state_sh = _state_shardings(abstract, mesh)
    init_fn = jax.jit(lambda k: _init_state(model, tc, k), out_shardings=state_sh)
    step_fn = jax.jit(_make_train_step(model, tc), in_shardings=(state_sh, rows, repl),
                      out_shardings=(state_sh, repl), donate_argnums=0)
    return Programs(abstract, state_sh, init_fn, step_fn)


def _state_shardings(abstract: dict, mesh: Mesh) -> dict:
    repl, rows = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    n_dev = mesh.devices.size

    def pick(path, leaf):
        in_pool = any(getattr(p, "key", None) == "pool" for p in path)
        return rows if in_pool and leaf.shape and leaf.shape[0] % n_dev == 0 else repl

    return jax.tree_util.tree_map_with_path(pick, abstract)


@functools.lru_cache(maxsize=8)
def eval_program(model: VAE, k_samples: int, mesh: Mesh) -> Callable:
    """`make_eval_step` compiled for a mesh (parameters replicated, images and their indices
    sharded), once per (model, K, mesh)."""
    repl, rows = distributed.replicated(mesh), distributed.batch_sharded(mesh)
    return jax.jit(make_eval_step(model, k_samples), in_shardings=(repl, rows, rows, repl),
                   out_shardings=repl)
