"""Damage recovery of the non-doubling VNCA, measured as a log-likelihood.

Dimension letters: N images, B images in a batch, H/W grid, C cell channels, Z latent,
D steps before the damage, R recovery steps, S = D + R + 2 recorded states.

For a test image x: z ~ q(z|x), grow D NCA steps from the seed, then continue two runs from that
state with the same key (the same update masks): an undamaged one, and a damaged one whose
square of cells (all channels, so the logits there become 0 and the pixels grey, trap T13) is
zeroed first. Each runs R more steps. Every state s is scored as log p(x | logits = channel 0 of
s) in nats, giving the undamaged curve over steps 0, 1, ..., D + R and the damaged curve over
D (just damaged), D + 1, ..., D + R.

Damage is measured against the undamaged run at the same step, never against the state before
the damage (a model still improving would make any damage look repaired):

    recovered fraction = (damaged(D + R) - damaged(D)) / (undamaged(D + R) - damaged(D))

over the images' mean scores. It means something only when the damage lowered the score,
damaged(D) < undamaged(D + R); otherwise `summarize` says it is not meaningful and gives no
fraction. The square is fixed and centred (top = left = (H - size) // 2, size =
`model.damage_size`), so it always covers the middle of the digit and every image and run is
damaged alike; training damage (`VAE.damage`) draws the position at random instead.

The key of image i is `fold_in(key, i)` with i its index in the test split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vnca import losses
from vnca.evaluation.batching import map_padded
from vnca.models import nca
from vnca.models.vae import VAE


def centred_square(n: int, size: int) -> tuple[int, int]:
    """(top, left) of a size x size square centred on an n x n grid."""
    return (n - size) // 2, (n - size) // 2


def image_damage_run(model: VAE, params: dict, x_HxWx1: jax.Array, mean_Z: jax.Array,
                     std_Z: jax.Array, key: jax.Array, damage_at: int, recovery_steps: int,
                     top: int, left: int) -> dict:
    """One image grown D steps, then R more steps undamaged and damaged, with the same key:
    `ll_undamaged` [D + R + 1] and `ll_damaged` [R + 1] (nats), and the logits of both runs
    (`logits_undamaged` [D + R + 1, H, W], `logits_damaged` [R + 1, H, W])."""
    k_z, k_pre, k_post = jax.random.split(key, 3)
    z_1xZ = (mean_Z + std_Z * jax.random.normal(k_z, mean_Z.shape, mean_Z.dtype))[None]
    s0 = model.seed(z_1xZ)
    s_pre, pre_Dx1xHxWxC = model.grow(params, s0, k_pre, damage_at, record=True,
                                      max_steps=damage_at)
    s_hit = nca.damage_square(s_pre, top, left, model.cfg.damage_size)
    _, kept_Rx1xHxWxC = model.grow(params, s_pre, k_post, recovery_steps, record=True,
                                   max_steps=recovery_steps)
    _, hit_Rx1xHxWxC = model.grow(params, s_hit, k_post, recovery_steps, record=True,
                                  max_steps=recovery_steps)
    runs = {"undamaged": jnp.concatenate([s0[None], pre_Dx1xHxWxC, kept_Rx1xHxWxC], axis=0),
            "damaged": jnp.concatenate([s_hit[None], hit_Rx1xHxWxC], axis=0)}
    out = {}
    for name, states in runs.items():
        logits_SxHxW = model.to_logits(states)[:, 0]
        x_SxHxW = jnp.broadcast_to(x_HxWx1[..., 0], logits_SxHxW.shape)
        out[f"ll_{name}"] = losses.bernoulli_loglik(logits_SxHxW, x_SxHxW)
        out[f"logits_{name}"] = logits_SxHxW
    return out


def damage_batch(model: VAE, params: dict, x_BxHxWx1: jax.Array, index_B: jax.Array,
                 key: jax.Array, damage_at: int, recovery_steps: int) -> dict:
    mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index_B)
    top, left = centred_square(model.image_size, model.cfg.damage_size)
    run = functools.partial(image_damage_run, model, damage_at=damage_at,
                            recovery_steps=recovery_steps, top=top, left=left)
    return jax.vmap(run, in_axes=(None, 0, 0, 0, 0))(params, x_BxHxWx1, mean_BxZ, std_BxZ,
                                                     keys_B)


@functools.lru_cache(maxsize=4)
def _damage_fn(model: VAE, damage_at: int, recovery_steps: int):
    return jax.jit(functools.partial(damage_batch, model, damage_at=damage_at,
                                     recovery_steps=recovery_steps))


def damage_recovery(model: VAE, params: dict, x_NxHxWx1: np.ndarray, index_N: np.ndarray,
                    key: jax.Array, damage_at: int, recovery_steps: int, batch_size: int,
                    keep_frames: int = 8, progress: bool = True) -> dict:
    """Per-image curves `ll_undamaged_NxS` (steps 0..D+R) and `ll_damaged_NxR1` (steps
    D..D+R), in nats, and the logits of the first `keep_frames` images' runs (for figures)."""
    if model.variant != "nondoubling":
        raise ValueError("damage recovery is defined for the non-doubling VNCA")
    fn = _damage_fn(model, damage_at, recovery_steps)

    def batch(i, x_BxHxWx1, index_B):
        res = fn(params, np.asarray(x_BxHxWx1), np.asarray(index_B, np.int32), key)
        frames = max(0, keep_frames - i * batch_size)  # logits only of the images shown
        return {name: res[name][:frames] if name.startswith("logits") else res[name]
                for name in res}

    res = map_padded(batch, (x_NxHxWx1, index_N), batch_size, progress, "damage recovery")
    s, r1, side = damage_at + recovery_steps + 1, recovery_steps + 1, model.image_size
    if res is None:
        res = {"ll_undamaged": np.zeros((0, s)), "ll_damaged": np.zeros((0, r1)),
               "logits_undamaged": np.zeros((0, s, side, side)),
               "logits_damaged": np.zeros((0, r1, side, side))}
    return {"ll_undamaged_NxS": np.asarray(res["ll_undamaged"], np.float64),
            "ll_damaged_NxR1": np.asarray(res["ll_damaged"], np.float64),
            "logits_undamaged_FxSxHxW": np.asarray(res["logits_undamaged"], np.float32),
            "logits_damaged_FxR1xHxW": np.asarray(res["logits_damaged"], np.float32),
            "steps_undamaged_S": np.arange(s),
            "steps_damaged_R1": np.arange(damage_at, s)}


def summarize(ll_undamaged_NxS: np.ndarray, ll_damaged_NxR1: np.ndarray, damage_at: int) -> dict:
    """Mean (and standard error) log-likelihoods of the two runs and the recovered fraction.

    `before`: the state the damage hits (step D); `after_damage`: just damaged; `undamaged_final`
    and `after_recovery`: step D + R without and with the damage. `recovered_fraction` is None
    and `meaningful` False when the damage did not lower the mean score below the undamaged
    run's final one (there is nothing to recover)."""
    u, d = np.asarray(ll_undamaged_NxS, np.float64), np.asarray(ll_damaged_NxR1, np.float64)
    n = len(u)
    cols = {"before": u[:, damage_at] if n else u[:, :0], "undamaged_final": u[:, -1] if n else
            u[:, :0], "after_damage": d[:, 0] if n else d[:, :0],
            "after_recovery": d[:, -1] if n else d[:, :0]}
    out: dict = {"n_images": int(n)}
    for name, v in cols.items():
        out[name] = float(v.mean()) if n else float("nan")
        out[f"{name}_stderr"] = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    gap = out["undamaged_final"] - out["after_damage"]
    out["damage_drop"] = gap if n else float("nan")
    out["meaningful"] = bool(n and gap > 0)
    out["recovered_fraction"] = (
        (out["after_recovery"] - out["after_damage"]) / gap if out["meaningful"] else None)
    out["share_images_lower_after_damage"] = (
        float(np.mean(cols["after_damage"] < cols["undamaged_final"])) if n else float("nan"))
    return out
