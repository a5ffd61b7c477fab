"""The three VAEs: baseline conv decoder, doubling VNCA and non-doubling VNCA.

Dimension letters: B batch, H/W image (= cfg.data.pad_to), Z latent, C cell channels (= Z),
T steps, S growth frames.

`VAE` is a frozen description of the model (hashable, so jit can close over it) with pure
methods of (params, arrays, key). Parameters are a plain dict {'encoder': ..., 'decoder': ...}.
The Bernoulli logits are channel 0 of the final NCA state (every MNIST model of O and R).
`VAE.forward` is the one-sample ELBO of a batch, per example, for training (with or without the
sample pool's rows, `Start`) and for any caller that wants the terms.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vnca import losses
from vnca.config import Config, ModelConfig, max_nca_steps
from vnca.models import nca
from vnca.models.baseline import BaselineDecoder
from vnca.models.encoder import Encoder
from vnca.models.layers import resolve_algorithm


class DrawnSteps(NamedTuple):
    """A drawn NCA step count `n` (traced) and `floor`, the least value it can take (static):
    `grow` runs the first `floor` steps without the per-step `lax.cond` whose operands XLA
    copies at every step, so the floor travels with the count and no caller can forget it."""

    n: jax.Array
    floor: int


class Start(NamedTuple):
    """Batch rows that start from given grown states instead of a seed: the sample pool's rows
    (`vnca.pool.start`). Row b takes its image and starting state from here where `use_B[b]`,
    its state is damaged before growing where `damage_B[b]`, and its KL is not charged where
    `skip_kl_B[b]` (None: every row's KL is charged)."""

    images_BxHxWx1: jax.Array
    states_BxHxWxC: jax.Array
    use_B: jax.Array
    damage_B: jax.Array
    skip_kl_B: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class VAE:
    cfg: ModelConfig
    image_size: int = 32

    # -- modules -----------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        return self.cfg.variant

    @property
    def is_nca(self) -> bool:
        return self.cfg.variant in ("doubling", "nondoubling")

    @property
    def conv_algorithm(self) -> str:
        """The configured conv algorithm; "auto" (unresolved) means this process's backend."""
        return resolve_algorithm(self.cfg.conv_algorithm, jax.default_backend())

    def _encoder(self) -> Encoder:
        return Encoder(self.cfg.z_dim, self.image_size, self.cfg.conv_width, self.conv_algorithm,
                       self.cfg.precision)

    def _decoder(self):
        c, algorithm, p = self.cfg, self.conv_algorithm, self.cfg.precision
        if c.variant == "baseline":
            return BaselineDecoder(c.z_dim, c.baseline_output, c.conv_width, algorithm, p)
        if c.variant == "doubling":
            return nca.ResidualUpdate(c.z_dim, c.nca_hidden, c.n_residual_blocks, algorithm, p)
        return nca.SimpleUpdate(c.z_dim, c.nca_hidden, c.last_layer_bias, algorithm, p)

    def init(self, key: jax.Array) -> dict:
        k_enc, k_dec = jax.random.split(key)
        x = jnp.zeros((1, self.image_size, self.image_size, 1), jnp.float32)
        enc = self._encoder().init(k_enc, x)["params"]
        if self.variant == "baseline":
            dec_in = jnp.zeros((1, self.cfg.z_dim), jnp.float32)
        else:
            dec_in = jnp.zeros((1, 4, 4, self.cfg.z_dim), jnp.float32)
        dec = self._decoder().init(k_dec, dec_in)["params"]
        return {"encoder": enc, "decoder": dec}

    # -- encoder -----------------------------------------------------------------------------
    def encode(self, params: dict, x_BxHxWx1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q(z|x) as (mean, std); the head is a log-std (O) or a log-variance (R)."""
        h = self._encoder().apply({"params": params["encoder"]}, x_BxHxWx1)
        mean_BxZ, s_BxZ = jnp.split(h, 2, axis=-1)
        std_BxZ = jnp.exp(s_BxZ) if self.cfg.variance_head == "log_std" else jnp.exp(0.5 * s_BxZ)
        return mean_BxZ, std_BxZ

    @staticmethod
    def sample_z(mean_BxZ: jax.Array, std_BxZ: jax.Array, key: jax.Array) -> jax.Array:
        return mean_BxZ + std_BxZ * jax.random.normal(key, mean_BxZ.shape, mean_BxZ.dtype)

    # -- NCA pieces --------------------------------------------------------------------------
    def _update(self, params: dict):
        module = self._decoder()
        return lambda s: module.apply({"params": params["decoder"]}, s)

    def seed(self, z_BxZ: jax.Array) -> jax.Array:
        """Initial cell state: z in a 1x1 grid (doubling) or in every cell (non-doubling)."""
        if self.variant == "doubling":
            return z_BxZ[:, None, None, :]
        n = self.image_size
        return jnp.broadcast_to(z_BxZ[:, None, None, :], (z_BxZ.shape[0], n, n, z_BxZ.shape[-1]))

    @property
    def max_steps(self) -> int:
        return max_nca_steps(self.cfg)

    def sample_n_steps(self, key: jax.Array, eval_mode: bool = False) -> DrawnSteps:
        """Step count T of the non-doubling model: drawn from the training range, or the fixed
        `eval_steps` at evaluation when the config sets one (R: 36; O: null, i.e. drawn); with
        the least value it can take, which `grow` runs without a per-step cond."""
        c = self.cfg
        if eval_mode and c.eval_steps is not None:
            return DrawnSteps(jnp.asarray(c.eval_steps, jnp.int32), c.eval_steps)
        return DrawnSteps(nca.sample_n_steps(key, c.min_steps, c.max_steps, c.steps_inclusive),
                          c.min_steps)

    def draw_steps(self, key: jax.Array, eval_mode: bool = False) -> tuple[DrawnSteps, jax.Array]:
        """Split a decoding key: T drawn from its first half (`sample_n_steps`), and the
        growth key, its second half. Every decoding of the non-doubling model splits this way."""
        k_t, k_grow = jax.random.split(key)
        return self.sample_n_steps(k_t, eval_mode), k_grow

    def grow(self, params: dict, s_BxHxWxC: jax.Array, key: jax.Array,
             n_steps: int | DrawnSteps, record: bool = False, max_steps: int | None = None):
        """Non-doubling growth: `n_steps` NCA steps from the given state (a static int, or a
        drawn T from `sample_n_steps`)."""
        n, floor = n_steps if isinstance(n_steps, DrawnSteps) else (n_steps, 0)
        return nca.grow(self._update(params), s_BxHxWxC, key, n,
                        max_steps or max(self.max_steps, self.cfg.eval_steps or 0),
                        self.cfg.update_prob, self.cfg.remat, record, floor)

    def damage(self, s_BxHxWxC: jax.Array, key: jax.Array, rows_B: jax.Array | None = None):
        """Training damage: a `model.damage_size` square at a random position per row."""
        b, h, w, _ = s_BxHxWxC.shape
        top_B, left_B = nca.random_square(key, b, h, w, self.cfg.damage_size)
        return nca.damage_square(s_BxHxWxC, top_B, left_B, self.cfg.damage_size, rows_B)

    @staticmethod
    def to_logits(s_BxHxWxC: jax.Array) -> jax.Array:
        return s_BxHxWxC[..., 0]

    def _grow_doubling(self, params: dict, z_BxZ: jax.Array, key: jax.Array, record: bool):
        c = self.cfg
        update = self._update(params)
        s = self.seed(z_BxZ)
        stages = []
        for k in jax.random.split(key, c.n_doublings):
            s = nca.double(s)
            out = nca.grow(update, s, k, c.steps_per_stage, c.steps_per_stage, c.update_prob,
                           c.remat, record)
            if record:
                s, frames_TxBxhxwxC = out
                stages.append(frames_TxBxhxwxC)
            else:
                s = out
        return s, stages

    # -- decoder -----------------------------------------------------------------------------
    def final_state(self, params: dict, z_BxZ: jax.Array, key: jax.Array,
                    n_steps: int | DrawnSteps | None = None, eval_mode: bool = False):
        """The NCA's final state `BxHxWxC` for latents z: the doubling growth from `key`, or
        the non-doubling growth for `n_steps` (default: T drawn from `key`'s first half)."""
        if self.variant == "doubling":
            s, _ = self._grow_doubling(params, z_BxZ, key, record=False)
            return s
        drawn, k_grow = self.draw_steps(key, eval_mode)
        return self.grow(params, self.seed(z_BxZ), k_grow, drawn if n_steps is None else n_steps)

    def decode(self, params: dict, z_BxZ: jax.Array, key: jax.Array,
               n_steps: int | DrawnSteps | None = None, eval_mode: bool = False) -> jax.Array:
        """Bernoulli logits of p(x|z), `BxHxW`."""
        if self.variant == "baseline":
            return self._decoder().apply({"params": params["decoder"]}, z_BxZ)
        return self.to_logits(self.final_state(params, z_BxZ, key, n_steps, eval_mode))

    def growth_stages(self, params: dict, z_BxZ: jax.Array, key: jax.Array, n_steps=None,
                      eval_mode: bool = True) -> jax.Array:
        """Logits of every state from the seed to the final one, `SxBxHxW` at full size.

        Doubling: the seed and the state after each of the 5 x 8 steps (41 frames; a doubling
        itself changes nothing visible, each cell becomes a 2x2 block). Smaller grids are shown
        with every cell as a block. Non-doubling: the seed and the state after each step
        (1 + T frames).
        """
        n = self.image_size
        if self.variant == "doubling":
            s0 = self.seed(z_BxZ)
            _, stages = self._grow_doubling(params, z_BxZ, key, record=True)
            frames = [_upsample(self.to_logits(s0)[None], n)]
            frames += [_upsample(self.to_logits(f), n) for f in stages]
            return jnp.concatenate(frames, axis=0)
        if self.variant != "nondoubling":
            raise ValueError("growth stages exist only for the NCA variants")
        drawn, k_grow = self.draw_steps(key, eval_mode)
        if n_steps is None:
            n_steps, max_steps = drawn, None
        else:
            n_steps = max_steps = int(n_steps)
        s0 = self.seed(z_BxZ)
        _, frames_TxBxHxWxC = self.grow(params, s0, k_grow, n_steps, record=True,
                                        max_steps=max_steps)
        return jnp.concatenate([self.to_logits(s0)[None], self.to_logits(frames_TxBxHxWxC)], 0)

    # -- one-sample ELBO ---------------------------------------------------------------------
    def forward(self, params: dict, x_BxHxWx1: jax.Array, key: jax.Array, beta: float = 1.0,
                eval_mode: bool = False, start: Start | None = None) -> dict:
        """Per-example one-sample ELBO terms for padded images x (targets are x[..., 0]):
        `log_px`, `kl` (the KL charged), `elbo` = log_px - beta kl, each [B], and `logits`,
        `mean`, `std`, `z`.

        With `start` (the non-doubling model's sample pool) the rows it uses take their image
        and starting state from it (`Start`); the key then splits four ways, z, damage, T and
        growth (the pool's order since O), and the result also holds the images scored, `x`,
        and the final states, `state`. Without it the key splits into z and the decoding key.
        """
        if start is None:
            k_z, k_dec = jax.random.split(key)
        elif self.variant != "nondoubling":
            raise ValueError("only the non-doubling model starts rows from given states")
        else:
            k_z, k_damage, k_t, k_grow = jax.random.split(key, 4)
            x_BxHxWx1 = _pick(start.use_B, start.images_BxHxWx1, x_BxHxWx1)
        mean, std = self.encode(params, x_BxHxWx1)
        z = self.sample_z(mean, std, k_z)
        out = {}
        if start is None:
            logits = self.decode(params, z, k_dec, eval_mode=eval_mode)
        else:
            s = _pick(start.use_B, start.states_BxHxWxC, self.seed(z))
            s = self.damage(s, k_damage, start.damage_B)
            s = self.grow(params, s, k_grow, self.sample_n_steps(k_t, eval_mode))
            logits = self.to_logits(s)
            out = {"x": x_BxHxWx1, "state": s}
        log_px = losses.bernoulli_loglik(logits, x_BxHxWx1[..., 0])
        kl = losses.gaussian_kl(mean, std)
        if start is not None and start.skip_kl_B is not None:
            kl = jnp.where(start.skip_kl_B, 0.0, kl)
        return {"log_px": log_px, "kl": kl, "elbo": losses.elbo(log_px, kl, beta),
                "logits": logits, "mean": mean, "std": std, "z": z, **out}


def _pick(use_B: jax.Array, given_BxHxWxC: jax.Array, own_BxHxWxC: jax.Array) -> jax.Array:
    """Row b of `given` where use_B[b], else of `own`."""
    return jnp.where(use_B[:, None, None, None], given_BxHxWxC, own_BxHxWxC)


def _upsample(logits_TxBxhxw: jax.Array, n: int) -> jax.Array:
    f = n // logits_TxBxhxw.shape[-1]
    if f == 1:
        return logits_TxBxhxw
    return jnp.repeat(jnp.repeat(logits_TxBxhxw, f, axis=-2), f, axis=-1)


def resolve_backend(cfg: Config, platform: str | None = None) -> Config:
    """`cfg` with `model.conv_algorithm: auto` replaced by what it means on `platform`
    (default: JAX's default backend), as a run records it in its resolved config."""
    algorithm = resolve_algorithm(cfg.model.conv_algorithm, platform or jax.default_backend())
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              conv_algorithm=algorithm))


def build_model(cfg: Config) -> VAE:
    return VAE(cfg.model, cfg.data.pad_to)


def count_params(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
