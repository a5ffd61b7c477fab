"""The images a run trains and validates on, and how they reach the devices.

Dimension letters: N images, B global batch, H/W image (= cfg.data.pad_to).

Training images are `train` (default; `valid` is held out for monitoring) or `train+valid` as O
and R do (`train.train_split`). The batch of step s is a function of (data key, s) only
(`DataOrder`): positions [s B, (s + 1) B) of a stream of per-epoch permutations, so a resumed run
sees the same batches. Each process feeds the rows its devices hold (`Feeder`). Validation is
the evaluation's bound (`vnca.evaluation.bound`) on a fixed subset of `valid`, never `test`.
"""

from __future__ import annotations

import jax
import numpy as np

from vnca import distributed
from vnca.config import Config
from vnca.data import load_split, pad_images
from vnca.errors import ConfigError
from vnca.evaluation.batching import map_padded
from vnca.models.vae import VAE
from vnca.training.step import eval_program


def training_images(cfg: Config, data_dir) -> tuple[np.ndarray, np.ndarray]:
    """(training images, validation images), uint8 N x 28 x 28; training is `train` or
    `train` followed by `valid` (train.train_split)."""
    x_valid, _ = load_split(data_dir, "valid")
    x_train, _ = load_split(data_dir, "train")
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


def host_device():
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
            with jax.default_device(host_device()):
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

    def epoch(self, steps_done: int) -> int:
        """The epoch the data stream is in after `steps_done` steps."""
        return steps_done * self.batch_size // self.n


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
        with jax.default_device(host_device()):
            self.index_N = np.asarray(jax.random.permutation(k_subset, len(x_valid)))[:n]
        self.x_valid, self.feeder, self.batch_size = x_valid, feeder, tc.batch_size
        self.k = tc.val_iw_samples
        self.eval_fn = eval_program(model, self.k, mesh)

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
