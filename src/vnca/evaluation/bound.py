"""The importance-weighted bound L_K on test images, batched, with one key per image.

Dimension letters: N images, B images in a batch, K importance samples, Z latent, H/W image.

For an image x with q(z|x) = N(mean, diag(std^2)) and K samples z_k ~ q(z|x):

    L_K(x) = logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K

with the sampled log-densities in every weight (never the analytic KL, trap T4). The key of
image i is `fold_in(key, i)` with i its index in the test split, so a result does not depend on
the batch size, on the batch an image lands in, or on which other images are scored. From that
key come the K latent samples and one decoder key: the non-doubling NCA draws its step count
once per image (shared by the image's K samples, as O's one-image-at-a-time `test()` does, or
the fixed `model.eval_steps`) and an update mask per sample and step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vnca import losses
from vnca.evaluation.batching import map_padded
from vnca.models.vae import VAE

# Samples of one image decoded together: a working set that stays in cache (faster on the CPU,
# docs/performance.md) and less memory on any device. Wide devices are filled by batches of
# images instead: eval.batch_size x SAMPLE_CHUNK decodes per step.
SAMPLE_CHUNK = 8


def sample_chunk(k: int, limit: int = SAMPLE_CHUNK) -> int | None:
    """The largest divisor of K that is at most `limit`; None (decode all K at once) when K is
    at most `limit` or has no divisor in [limit / 2, limit]."""
    if k <= limit:
        return None
    best = max(d for d in range(1, limit + 1) if k % d == 0)
    return best if 2 * best >= limit else None


def image_key(key: jax.Array, index) -> jax.Array:
    """The key of the test image with index `index` (in the test split)."""
    return jax.random.fold_in(key, index)


def decode_samples(model: VAE, params: dict, z_KxZ: jax.Array, key: jax.Array,
                   chunk: int | None = None) -> jax.Array:
    """Logits `KxHxW` of one image's K samples at evaluation settings, all at once or `chunk`
    at a time (`lax.map`, a smaller working set). Chunked, the non-doubling NCA keeps the one
    step count `VAE.decode` would draw from `key` and takes chunk c's masks from
    `split(key)[1]` split per chunk."""
    k = z_KxZ.shape[0]
    if not chunk or chunk >= k:
        return model.decode(params, z_KxZ, key, eval_mode=True)
    if k % chunk:
        raise ValueError(f"K={k} is not a multiple of the sample chunk {chunk}")
    drawn, k_grow = model.draw_steps(key, eval_mode=True)
    n_steps = drawn if model.variant == "nondoubling" else None
    keys_C = jax.random.split(k_grow, k // chunk)
    z_CxJxZ = z_KxZ.reshape(k // chunk, chunk, z_KxZ.shape[-1])
    logits = jax.lax.map(
        lambda a: model.decode(params, a[0], a[1], n_steps=n_steps, eval_mode=True),
        (z_CxJxZ, keys_C))
    return logits.reshape(k, *logits.shape[2:])


def image_log_weights(model: VAE, params: dict, x_HxWx1: jax.Array, mean_Z: jax.Array,
                      std_Z: jax.Array, key: jax.Array, k: int, chunk: int | None = None) -> dict:
    """log p(x|z_k), log p(z_k), log q(z_k|x) for the K samples of one image; each [K]."""
    k_z, k_dec = jax.random.split(key)
    eps_KxZ = jax.random.normal(k_z, (k, mean_Z.shape[-1]), mean_Z.dtype)
    z_KxZ = mean_Z + std_Z * eps_KxZ
    logits_KxHxW = decode_samples(model, params, z_KxZ, k_dec, chunk)
    x_KxHxW = jnp.broadcast_to(x_HxWx1[..., 0], logits_KxHxW.shape)
    return {
        "log_px": losses.bernoulli_loglik(logits_KxHxW, x_KxHxW),
        "log_pz": losses.std_normal_logpdf(z_KxZ),
        "log_qz": losses.diag_gaussian_logpdf(z_KxZ, mean_Z, std_Z),
    }


def bound_terms(model: VAE, params: dict, x_BxHxWx1: jax.Array, index_B: jax.Array,
                key: jax.Array, k: int, chunk: int | None = None) -> dict:
    """Per-image bound L_K, the K-sample mean ELBO and mean log p(x|z); each [B]."""
    mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)
    keys_B = jax.vmap(image_key, in_axes=(None, 0))(key, index_B)
    w = jax.vmap(image_log_weights, in_axes=(None, None, 0, 0, 0, 0, None, None))(
        model, params, x_BxHxWx1, mean_BxZ, std_BxZ, keys_B, k, chunk)
    logw_BxK = w["log_px"] + w["log_pz"] - w["log_qz"]
    return {
        "iw": losses.iw_bound(w["log_px"], w["log_pz"], w["log_qz"]),
        "elbo": logw_BxK.mean(axis=-1),
        "log_px": w["log_px"].mean(axis=-1),
    }


@functools.lru_cache(maxsize=8)
def bound_fn(model: VAE, k: int, chunk: int | None = None) -> Callable:
    """Jitted `bound_terms(params, x, index, key)` for a model (hashable), K and chunk."""
    return jax.jit(functools.partial(bound_terms, model, k=k, chunk=chunk))


def iw_bound(model: VAE, params: dict, x_NxHxWx1: np.ndarray, index_N: np.ndarray,
             key: jax.Array, k: int, batch_size: int, progress: bool = True,
             devices: list | None = None, chunk: int | None = None) -> dict:
    """L_K, the K-sample mean ELBO and mean log p(x|z) of every image (numpy float64 [N]),
    scored `batch_size` images (x K decodes) at a time (`batching.map_padded`). With several
    devices (default: all) each batch is split across them, its size rounded up to a multiple
    of their number."""
    devices = list(devices or jax.devices())
    batch_size = int(math.ceil(batch_size / len(devices)) * len(devices))
    fn = bound_fn(model, k, chunk)
    put = _sharded_put(devices)
    params = put(params, replicate=True)

    def batch(_, x_BxHxWx1, index_B):
        return fn(params, put(np.asarray(x_BxHxWx1, np.float32)),
                  put(np.asarray(index_B, np.int32)), key)

    res = map_padded(batch, (x_NxHxWx1, index_N), batch_size, progress, f"IW bound K={k}")
    if res is None:
        return {name: np.zeros(0) for name in ("iw", "elbo", "log_px")}
    return {name: np.asarray(v, np.float64) for name, v in res.items()}


def _sharded_put(devices: list) -> Callable:
    """device_put that splits the leading axis over `devices` (or replicates); identity for 1."""
    if len(devices) == 1:
        return lambda tree, replicate=False: tree
    mesh = Mesh(np.asarray(devices), ("data",))
    split = NamedSharding(mesh, PartitionSpec("data"))
    full = NamedSharding(mesh, PartitionSpec())

    def put(tree, replicate: bool = False):
        return jax.device_put(tree, full if replicate else split)

    return put


def summarize(iw_N: np.ndarray, n_pixels: int) -> dict:
    """Mean, standard error (std with ddof=1 over sqrt(n)) and bits/dim of per-image bounds."""
    n = len(iw_N)
    mean = float(np.mean(iw_N)) if n else float("nan")
    stderr = float(np.std(iw_N, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "mean_nats": mean,
        "stderr_nats": stderr,
        "bits_per_dim": float(losses.nats_to_bits_per_dim(mean, n_pixels)),
        "stderr_bits_per_dim": float(stderr / (math.log(2.0) * n_pixels)),
        "n_pixels": int(n_pixels),
    }
