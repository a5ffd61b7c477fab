"""Damage recovery of the non-doubling VNCA, measured as a log-likelihood.

Dimension letters: N images, B images in a batch, H/W grid, C cell channels, Z latent,
D steps before the damage, R recovery steps, S = D + R + 2 recorded states.

For a test image x: z ~ q(z|x), grow D NCA steps from the seed, zero a square of cells (all
channels, so the logits there become 0 and the pixels grey, trap T13), then grow R more steps.
Every state s is scored as log p(x | logits = channel 0 of s) in nats, giving a curve over

    steps_S = [0, 1, ..., D, D, D + 1, ..., D + R]

where the first D is the state before the damage and the second the state just after it. The
square is fixed and centred (top = left = (H - size) // 2, size = `model.damage_size`), so it
always covers the middle of the digit and every image and run is damaged alike; training damage
(`VAE.damage`) draws the position at random instead.

The key of image i is `fold_in(key, i)` with i its index in the test split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vnca import losses
from vnca.models.vae import VAE


def centred_square(n: int, size: int) -> tuple[int, int]:
    """(top, left) of a size x size square centred on an n x n grid."""
    return (n - size) // 2, (n - size) // 2


def damage_square_at(s_BxHxWxC: jax.Array, top: int, left: int, size: int) -> jax.Array:
    """Zero every channel of the cells in rows [top, top+size) and columns [left, left+size)."""
    _, h, w, _ = s_BxHxWxC.shape
    ys, xs = jnp.arange(h), jnp.arange(w)
    in_y = (ys >= top) & (ys < top + size)
    in_x = (xs >= left) & (xs < left + size)
    hole_HxW = in_y[:, None] & in_x[None, :]
    return jnp.where(hole_HxW[None, :, :, None], 0.0, s_BxHxWxC)


def curve_steps(damage_at: int, recovery_steps: int) -> np.ndarray:
    """The step of every recorded state: 0..D, then D again (just damaged), then D+1..D+R."""
    return np.concatenate([np.arange(damage_at + 1), [damage_at],
                           np.arange(damage_at + 1, damage_at + recovery_steps + 1)])


def image_damage_run(model: VAE, params: dict, x_HxWx1: jax.Array, mean_Z: jax.Array,
                     std_Z: jax.Array, key: jax.Array, damage_at: int, recovery_steps: int,
                     top: int, left: int) -> tuple[jax.Array, jax.Array]:
    """(log p(x|state) [S], logits [S, H, W]) of one image grown, damaged and regrown."""
    k_z, k_pre, k_post = jax.random.split(key, 3)
    z_1xZ = (mean_Z + std_Z * jax.random.normal(k_z, mean_Z.shape, mean_Z.dtype))[None]
    s0 = model.seed(z_1xZ)
    s_pre, pre_Dx1xHxWxC = model.grow(params, s0, k_pre, damage_at, record=True,
                                      max_steps=damage_at)
    s_hit = damage_square_at(s_pre, top, left, model.cfg.damage_size)
    _, post_Rx1xHxWxC = model.grow(params, s_hit, k_post, recovery_steps, record=True,
                                   max_steps=recovery_steps)
    states = jnp.concatenate([s0[None], pre_Dx1xHxWxC, s_hit[None], post_Rx1xHxWxC], axis=0)
    logits_SxHxW = model.to_logits(states)[:, 0]
    x_SxHxW = jnp.broadcast_to(x_HxWx1[..., 0], logits_SxHxW.shape)
    return losses.bernoulli_loglik(logits_SxHxW, x_SxHxW), logits_SxHxW


def damage_batch(model: VAE, params: dict, x_BxHxWx1: jax.Array, index_B: jax.Array,
                 key: jax.Array, damage_at: int, recovery_steps: int) -> tuple:
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
    """Per-image curves `ll_NxS` (nats), the steps, and the logits of the first `keep_frames`
    images' states (for figures)."""
    if model.variant != "nondoubling":
        raise ValueError("damage recovery is defined for the non-doubling VNCA")
    fn = _damage_fn(model, damage_at, recovery_steps)
    n = len(x_NxHxWx1)
    lls, frames = [], []
    for start in tqdm(range(0, n, batch_size), desc="damage recovery", unit="batch",
                      disable=not progress, leave=False):
        stop = min(start + batch_size, n)
        rows = np.arange(start, start + batch_size).clip(max=stop - 1)
        ll_BxS, logits_BxSxHxW = jax.device_get(fn(params, np.asarray(x_NxHxWx1[rows]),
                                                   np.asarray(index_N[rows], np.int32), key))
        lls.append(np.asarray(ll_BxS[: stop - start], np.float64))
        if sum(len(f) for f in frames) < keep_frames:
            frames.append(np.asarray(logits_BxSxHxW[: stop - start], np.float32))
    steps = curve_steps(damage_at, recovery_steps)
    ll_NxS = np.concatenate(lls) if lls else np.zeros((0, len(steps)))
    logits = np.concatenate(frames)[:keep_frames] if frames else np.zeros((0, len(steps), 0, 0))
    return {"steps_S": steps, "ll_NxS": ll_NxS, "logits_FxSxHxW": logits}


def summarize(ll_NxS: np.ndarray, damage_at: int) -> dict:
    """Mean (and standard error) per-image log-likelihood before, just after and after recovery."""
    n = len(ll_NxS)
    cols = {"before": damage_at, "after_damage": damage_at + 1, "after_recovery": -1}
    out: dict = {"n_images": int(n)}
    for name, col in cols.items():
        v = ll_NxS[:, col]
        out[name] = float(v.mean()) if n else float("nan")
        out[f"{name}_stderr"] = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    if n:
        b, a, r = (ll_NxS[:, c] for c in cols.values())
        frac = (r - a)[b != a] / (b - a)[b != a]
        out["median_recovered_fraction"] = float(np.median(frac)) if frac.size else float("nan")
        out["share_images_lower_after_damage"] = float(np.mean(a < b))
        out["share_images_recovered_to_before"] = float(np.mean(r >= b))
    return out
