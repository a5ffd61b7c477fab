"""Latent space: encoder means, their t-SNE, interpolations, prior samples, reconstructions.

Dimension letters: N images, B batch, Z latent, H/W image, P interpolation points, S frames.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vnca.evaluation import threads
from vnca.evaluation.batching import map_padded
from vnca.models.vae import VAE


@functools.lru_cache(maxsize=4)
def _encode_fn(model: VAE):
    return jax.jit(lambda params, x: model.encode(params, x)[0])


def encoder_means(model: VAE, params: dict, x_NxHxWx1: np.ndarray, batch_size: int = 64,
                  progress: bool = True) -> np.ndarray:
    """Means of q(z|x), `NxZ` float32, encoded `batch_size` images at a time."""
    if not len(x_NxHxWx1):
        return np.zeros((0, model.cfg.z_dim), np.float32)
    fn = _encode_fn(model)
    return map_padded(lambda _, x: fn(params, x), (x_NxHxWx1,), batch_size, progress, "encode")


def tsne(means_NxZ: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE embedding (sklearn, PCA initialisation), `Nx2`; perplexity 30 or less for
    small N (it must stay below N).

    One OpenMP thread by default (`threads`): on a machine whose cores other work also uses,
    the threaded Barnes-Hut gradient spins and runs far slower (docs/performance.md)."""
    from sklearn.manifold import TSNE

    n = len(means_NxZ)
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threads.limit(1):
        return emb.fit_transform(np.asarray(means_NxZ, np.float64)).astype(np.float32)


def interpolation_pairs(labels_N: np.ndarray, order_N: np.ndarray, n_pairs: int) -> np.ndarray:
    """`n_pairs x 2` test indices: consecutive images of the shuffled order `order_N`, each pair
    with two different labels, no image used twice."""
    pairs, used = [], set()
    for i in order_N:
        if len(pairs) == n_pairs:
            break
        if i in used:
            continue
        for j in order_N:
            if j not in used and j != i and labels_N[j] != labels_N[i]:
                pairs.append((int(i), int(j)))
                used.update((int(i), int(j)))
                break
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def interpolation_latents(mean_a_Z: np.ndarray, mean_b_Z: np.ndarray, points: int) -> np.ndarray:
    """`P x Z` points z_a + t (z_b - z_a), t = 0, 1/(P-1), ..., 1: both ends included."""
    t_P = np.linspace(0.0, 1.0, points, dtype=np.float32)[:, None]
    return (1.0 - t_P) * mean_a_Z[None] + t_P * mean_b_Z[None]


@functools.lru_cache(maxsize=4)
def _decode_fn(model: VAE):
    return jax.jit(lambda params, z, key: model.decode(params, z, key, eval_mode=True))


def decode(model: VAE, params: dict, z_BxZ: np.ndarray, key: jax.Array) -> np.ndarray:
    """Bernoulli logits `BxHxW` at evaluation settings (one decoder key for the batch)."""
    return np.asarray(_decode_fn(model)(params, jnp.asarray(z_BxZ, jnp.float32), key))


def decode_batches(model: VAE, params: dict, z_NxZ: np.ndarray, key: jax.Array,
                   batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Bernoulli logits `NxHxW` decoded `batch_size` latents at a time; batch b's decoder key
    is `fold_in(key, b)`."""
    if not len(z_NxZ):
        side = model.image_size
        return np.zeros((0, side, side), np.float32)
    return map_padded(lambda i, z: decode(model, params, z, jax.random.fold_in(key, i)),
                      (np.asarray(z_NxZ, np.float32),), batch_size, progress, "decode")


def interpolations(model: VAE, params: dict, means_Px2xZ: np.ndarray, points: int,
                   key: jax.Array, batch_size: int | None = None) -> np.ndarray:
    """Logits `n_pairs x P x H x W`; each row is decoded with one key, so only z changes
    along it (the non-doubling NCA's step count and masks are the same at every point). With
    `batch_size` > P, a row is padded to that many latents, to reuse the program compiled for
    `decode_batches`."""
    rows = []
    for i, (a, b) in enumerate(means_Px2xZ):
        z_PxZ = interpolation_latents(a, b, points)
        pad = max(0, (batch_size or 0) - points)
        z_BxZ = np.concatenate([z_PxZ, np.repeat(z_PxZ[-1:], pad, 0)]) if pad else z_PxZ
        rows.append(decode(model, params, z_BxZ, jax.random.fold_in(key, i))[:points])
    return np.stack(rows) if rows else np.zeros((0, points, model.image_size, model.image_size))


@functools.lru_cache(maxsize=4)
def _recon_fn(model: VAE):
    def recon(params, x, key):
        k_z, k_dec = jax.random.split(key)
        mean, std = model.encode(params, x)
        z = model.sample_z(mean, std, k_z)
        return model.decode(params, z, k_dec, eval_mode=True)

    return jax.jit(recon)


def reconstructions(model: VAE, params: dict, x_NxHxWx1: np.ndarray, key: jax.Array,
                    batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Logits `NxHxW` of reconstructions: z ~ q(z|x), decoded at evaluation settings;
    batch b's key is `fold_in(key, b)`."""
    if not len(x_NxHxWx1):
        side = model.image_size
        return np.zeros((0, side, side), np.float32)
    fn = _recon_fn(model)
    return map_padded(lambda i, x: fn(params, np.asarray(x, np.float32),
                                      jax.random.fold_in(key, i)),
                      (x_NxHxWx1,), batch_size, progress, "reconstruct")


def growth(model: VAE, params: dict, z_BxZ: np.ndarray, key: jax.Array) -> np.ndarray:
    """Logits of every state from the seed to the final image, `SxBxHxW`. The non-doubling
    model takes `model.eval_steps` steps, or a T drawn from its range with this key."""
    drawn, k_grow = model.draw_steps(key, eval_mode=True)
    n_steps = int(drawn.n) if model.variant == "nondoubling" else None
    fn = jax.jit(lambda p, z, k: model.growth_stages(p, z, k, n_steps=n_steps))
    return np.asarray(fn(params, jnp.asarray(z_BxZ, jnp.float32), k_grow))
