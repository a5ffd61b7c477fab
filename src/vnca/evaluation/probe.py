"""Linear probe: does a single cell of the non-doubling VNCA's final state know the digit?

Dimension letters: N images, B images in a batch, H/W grid, C cell channels, Z latent,
M cells (examples), L classes.

Every cell of a test reconstruction's final state (z ~ q(z|x), T steps as at evaluation) is one
C-dimensional example labelled with its image's digit, background cells included (as R's
probe). Unlike R, which split its 10.24M cells at random (cells of one image on both sides), the
split is by *image* (trap T9): a shuffled permutation of the images puts a fraction of them, with
all their cells, in the held-out set. A softmax classifier on standardised features is trained
with Adam on minibatches of training cells; the accuracy is over held-out cells, and also per
held-out image by majority vote of its cells.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vnca.evaluation.batching import map_padded
from vnca.models.vae import VAE

N_CLASSES = 10


def image_final_state(model: VAE, params: dict, mean_Z: jax.Array, std_Z: jax.Array,
                      key: jax.Array) -> jax.Array:
    """Final state `HxWxC` of one image's reconstruction, grown as `VAE.decode` grows it."""
    k_z, k_dec = jax.random.split(key)
    z_1xZ = (mean_Z + std_Z * jax.random.normal(k_z, mean_Z.shape, mean_Z.dtype))[None]
    return model.final_state(params, z_1xZ, k_dec, eval_mode=True)[0]


def final_state_batch(model: VAE, params: dict, x_BxHxWx1: jax.Array, index_B: jax.Array,
                      key: jax.Array) -> jax.Array:
    mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index_B)
    return jax.vmap(image_final_state, in_axes=(None, None, 0, 0, 0))(
        model, params, mean_BxZ, std_BxZ, keys_B)


@functools.lru_cache(maxsize=4)
def _state_fn(model: VAE):
    return jax.jit(functools.partial(final_state_batch, model))


def final_states(model: VAE, params: dict, x_NxHxWx1: np.ndarray, index_N: np.ndarray,
                 key: jax.Array, batch_size: int, progress: bool = True) -> np.ndarray:
    """Final cell states `NxHxWxC` (float32) of the images' reconstructions."""
    fn = _state_fn(model)

    def batch(_, x_BxHxWx1, index_B):
        return fn(params, np.asarray(x_BxHxWx1), np.asarray(index_B, np.int32), key)

    states = map_padded(batch, (x_NxHxWx1, index_N), batch_size, progress, "probe states")
    if states is None:
        side = model.image_size
        return np.zeros((0, side, side, model.cfg.z_dim), np.float32)
    return np.asarray(states, np.float32)


def split_images(n_images: int, key: jax.Array, test_fraction: float = 0.2) -> tuple:
    """(train, test) image indices into range(n_images): disjoint, covering, shuffled."""
    perm = np.asarray(jax.random.permutation(key, n_images))
    n_test = min(max(1, round(test_fraction * n_images)), n_images - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def cells(states_NxHxWxC: np.ndarray, labels_N: np.ndarray, images: np.ndarray) -> tuple:
    """(features MxC, labels M, image index M) of every cell of the given images."""
    s = states_NxHxWxC[images]
    per_image = s.shape[1] * s.shape[2]
    return (s.reshape(-1, s.shape[-1]), np.repeat(labels_N[images], per_image),
            np.repeat(images, per_image))


def fit(feats_MxC: np.ndarray, labels_M: np.ndarray, key: jax.Array, steps: int,
        batch_size: int = 4096, learning_rate: float = 1e-2) -> dict:
    """Softmax regression on standardised features, Adam with cosine decay, `steps` minibatches
    drawn with replacement."""
    mu_C = feats_MxC.mean(axis=0)
    sigma_C = feats_MxC.std(axis=0) + 1e-6
    f = jnp.asarray((feats_MxC - mu_C) / sigma_C, jnp.float32)
    y = jnp.asarray(labels_M, jnp.int32)
    m, c = f.shape
    batch = min(batch_size, m)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
    w = {"w": jnp.zeros((c, N_CLASSES), jnp.float32), "b": jnp.zeros((N_CLASSES,), jnp.float32)}

    def loss_fn(w, f_b, y_b):
        logits = f_b @ w["w"] + w["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_b).mean()

    @jax.jit
    def train(w, f, y, key):
        def step(carry, i):
            w, opt = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, m)
            loss, g = jax.value_and_grad(loss_fn)(w, f[idx], y[idx])
            updates, opt = tx.update(g, opt, w)
            return (optax.apply_updates(w, updates), opt), loss

        (w, _), loss_T = jax.lax.scan(step, (w, tx.init(w)), jnp.arange(steps))
        return w, loss_T

    w, loss_T = train(w, f, y, key)
    return {"w": np.asarray(w["w"]), "b": np.asarray(w["b"]), "mu": mu_C, "sigma": sigma_C,
            "loss": np.asarray(loss_T)}


def predict_proba(probe: dict, feats_MxC: np.ndarray) -> np.ndarray:
    logits = ((feats_MxC - probe["mu"]) / probe["sigma"]) @ probe["w"] + probe["b"]
    logits = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def linear_probe(states_NxHxWxC: np.ndarray, labels_N: np.ndarray, key: jax.Array,
                 steps: int, test_fraction: float = 0.2) -> dict:
    """Split by image, fit on the training images' cells, score the held-out images' cells."""
    k_split, k_fit = jax.random.split(key)
    n, h, w, _ = states_NxHxWxC.shape
    train_img, test_img = split_images(n, k_split, test_fraction)
    f_tr, y_tr, img_tr = cells(states_NxHxWxC, labels_N, train_img)
    f_te, y_te, img_te = cells(states_NxHxWxC, labels_N, test_img)
    probe = fit(f_tr, y_tr, k_fit, steps)
    proba_MxL = predict_proba(probe, f_te)
    pred_M = proba_MxL.argmax(axis=-1)
    votes_IxL = np.stack([np.bincount(p, minlength=N_CLASSES)
                          for p in pred_M.reshape(len(test_img), h * w)])
    majority = np.bincount(y_tr, minlength=N_CLASSES).argmax()
    return {
        "accuracy": float(np.mean(pred_M == y_te)),
        "image_accuracy": float(np.mean(votes_IxL.argmax(-1) == labels_N[test_img])),
        "chance": float(np.mean(y_te == majority)),
        "n_train_images": len(train_img),
        "n_test_images": len(test_img),
        "n_train_cells": len(y_tr),
        "n_test_cells": len(y_te),
        "final_train_loss": float(probe["loss"][-10:].mean()) if len(probe["loss"]) else None,
        "train_images": train_img,
        "test_images": test_img,
        "train_cell_images": img_tr,
        "test_cell_images": img_te,
        "test_proba_IxHxWxL": proba_MxL.reshape(len(test_img), h, w, N_CLASSES),
    }
