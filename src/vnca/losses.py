"""Per-example loss terms of the VAE; pure functions of arrays returning `[B]`.

Dimension letters: B batch, H/W image height/width, Z latent size, K importance samples.

The evidence lower bound for an image x, with q(z|x) = N(mean, diag(std^2)) and p(z) = N(0, I):

    ELBO(x) = E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))

and the importance-weighted bound with K samples z_k ~ q(z|x) (Burda et al., 2016):

    L_K(x) = logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K  <=  log p(x)

Each importance weight uses the sampled log-densities, never the analytic KL (trap T4).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def bernoulli_loglik(logits_BxHxW: jax.Array, x_BxHxW: jax.Array) -> jax.Array:
    """Sum over pixels of log Bernoulli(x | sigmoid(logits)); -> [B].

    log p(x=1) = log_sigmoid(l) and log p(x=0) = log_sigmoid(-l). The value of the branch
    that does not apply is selected away with `where`, so a logit of -inf (padding) costs
    exactly 0 nats where x = 0 and no NaN reaches the sum or its gradient (trap T2).
    """
    x = x_BxHxW.astype(logits_BxHxW.dtype)
    pos = jnp.where(x > 0.5, logits_BxHxW, 0.0)
    neg = jnp.where(x > 0.5, 0.0, logits_BxHxW)
    ll = jnp.where(x > 0.5, jax.nn.log_sigmoid(pos), jax.nn.log_sigmoid(-neg))
    return ll.reshape(ll.shape[0], -1).sum(axis=-1)


def gaussian_kl(mean_BxZ: jax.Array, std_BxZ: jax.Array) -> jax.Array:
    """KL(N(mean, std^2) || N(0, 1)) summed over Z; -> [B]. Analytic (trap T3: q first)."""
    var = jnp.square(std_BxZ)
    kl = 0.5 * (var + jnp.square(mean_BxZ) - 1.0 - jnp.log(var))
    return kl.sum(axis=-1)


def diag_gaussian_logpdf(z_BxZ: jax.Array, mean_BxZ: jax.Array, std_BxZ: jax.Array) -> jax.Array:
    """log N(z | mean, diag(std^2)) summed over Z; -> [B] (any leading batch shape)."""
    u = (z_BxZ - mean_BxZ) / std_BxZ
    return (-0.5 * (jnp.square(u) + LOG_2PI) - jnp.log(std_BxZ)).sum(axis=-1)


def std_normal_logpdf(z_BxZ: jax.Array) -> jax.Array:
    """log N(z | 0, I) summed over Z; -> [B]."""
    return (-0.5 * (jnp.square(z_BxZ) + LOG_2PI)).sum(axis=-1)


def elbo(log_px_B: jax.Array, kl_B: jax.Array, beta: float = 1.0) -> jax.Array:
    """One-sample ELBO estimate per example: log p(x|z) - beta * KL; -> [B]."""
    return log_px_B - beta * kl_B


def iw_bound(log_px_BxK: jax.Array, log_pz_BxK: jax.Array, log_qz_BxK: jax.Array) -> jax.Array:
    """Importance-weighted bound L_K per example; -> [B]. K is the trailing axis."""
    logw_BxK = log_px_BxK + log_pz_BxK - log_qz_BxK
    k = logw_BxK.shape[-1]
    return jax.nn.logsumexp(logw_BxK, axis=-1) - math.log(k)


def nats_to_bits_per_dim(nats, n_pixels: int):
    """Negative log-likelihood in bits per pixel for a log-likelihood in nats (higher is better
    in nats, lower is better in bits/dim): -nats / (ln 2 * n_pixels)."""
    return -nats / (math.log(2.0) * n_pixels)
