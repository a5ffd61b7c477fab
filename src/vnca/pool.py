"""Sample pool of grown cell states for the non-doubling VNCA (O's damage training, Fig. 9).

Dimension letters: P pool slots, B batch, N = P - n_pool + B candidates, H/W grid, C channels.

O keeps a Python list of (image, final state). Once it is non-empty, each batch pops the first
n_pool = B * batch_share entries; their images replace the last n_pool rows of the batch and
their states replace those rows' seeds, and the first n_damage = n_pool * damage_share of them
are damaged. After the step all B final states are appended, the list is shuffled and cut to P.

Here the pool is a fixed-size array pytree with a `filled` flag per slot, starting empty as O
does (R prefills it with encodings of the untrained encoder, a state O never sees):

    take:       slots [0, n_pool) feed rows [B - n_pool, B) where the slot is filled;
    start:      those rows as the model's `Start` (`VAE.forward`), from train.pool.start_step
                on, the first n_damage of them damaged, their KL charged or not
                (train.pool.kl_on_pool_rows);
    write_back: the P - n_pool slots not taken plus the B new final states form N candidates,
                a uniform random permutation over all N (then filled slots first, stable) picks
                the P kept, so the pool is shuffled globally: any slot can move anywhere,
                across device blocks when the pool is sharded (R shuffled only whole per-device
                blocks, trap T7).

Everything is a pure function of arrays and a key, so the pool is part of the jitted train state
and of every checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vnca.config import Config, TrainConfig
from vnca.models.vae import Start


def pool_rows(cfg: Config | TrainConfig) -> tuple[int, int]:
    """(n_pool, n_damage): batch rows fed from the pool, and how many of those are damaged,
    for a config or its train section."""
    tc = cfg.train if isinstance(cfg, Config) else cfg
    n_pool = round(tc.batch_size * tc.pool.batch_share)
    return n_pool, round(n_pool * tc.pool.damage_share)


def init_pool(size: int, image_size: int, channels: int) -> dict:
    """An empty pool: zero images and states, no slot filled."""
    return {
        "images": jnp.zeros((size, image_size, image_size, 1), jnp.float32),
        "states": jnp.zeros((size, image_size, image_size, channels), jnp.float32),
        "filled": jnp.zeros((size,), jnp.bool_),
    }


def take(pool: dict, batch_size: int, n_pool: int) -> dict:
    """Pool entries laid out as batch rows: rows [B - n_pool, B) come from slots [0, n_pool).

    Returns `images`, `states` (zeros in rows not fed) and `use_B`, true where a row takes its
    image and starting state from a filled slot.
    """
    lead = batch_size - n_pool

    def rows(a):
        pad = [(lead, 0)] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(a[:n_pool], pad)

    return {"images": rows(pool["images"]), "states": rows(pool["states"]),
            "use_B": rows(pool["filled"])}


def start(pool: dict, tc: TrainConfig, batch_size: int, step: jax.Array | int) -> Start:
    """The batch rows of training step `step` that start from pool entries (`take`): none
    before train.pool.start_step, the first n_damage of them damaged (`damage_rows`), their
    KL not charged unless train.pool.kl_on_pool_rows."""
    n_pool, n_damage = pool_rows(tc)
    fed = take(pool, batch_size, n_pool)
    use_B = fed["use_B"] & (step >= tc.pool.start_step)
    return Start(fed["images"], fed["states"], use_B,
                 damage_rows(batch_size, n_pool, n_damage, use_B),
                 None if tc.pool.kl_on_pool_rows else use_B)


def damage_rows(batch_size: int, n_pool: int, n_damage: int, use_B: jax.Array) -> jax.Array:
    """Rows damaged before growing: the first n_damage pool rows that took a filled slot."""
    i = jnp.arange(batch_size)
    lead = batch_size - n_pool
    return use_B & (i >= lead) & (i < lead + n_damage)


def write_back(pool: dict, n_pool: int, images_BxHxWx1: jax.Array, states_BxHxWxC: jax.Array,
               key: jax.Array) -> dict:
    """Drop the n_pool taken slots, add the B new entries, shuffle all and keep P (filled first)."""
    size = pool["filled"].shape[0]
    b = images_BxHxWx1.shape[0]
    cand = {
        "images": jnp.concatenate([pool["images"][n_pool:], images_BxHxWx1], 0),
        "states": jnp.concatenate([pool["states"][n_pool:], states_BxHxWxC], 0),
        "filled": jnp.concatenate([pool["filled"][n_pool:], jnp.ones((b,), jnp.bool_)], 0),
    }
    order_N = shuffle_order(cand["filled"], key)[:size]
    return {k: jnp.take(v, order_N, axis=0) for k, v in cand.items()}


def shuffle_order(filled_N: jax.Array, key: jax.Array) -> jax.Array:
    """A uniform random permutation of N, then stably sorted so filled entries come first."""
    perm_N = jax.random.permutation(key, filled_N.shape[0])
    return perm_N[jnp.argsort(~filled_N[perm_N], stable=True)]
