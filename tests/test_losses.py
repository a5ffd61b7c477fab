"""Loss terms against independently computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnca import losses


def test_kl_of_standard_normal_to_itself_is_zero():
    mean, std = jnp.zeros((3, 7)), jnp.ones((3, 7))
    np.testing.assert_allclose(losses.gaussian_kl(mean, std), np.zeros(3), atol=1e-7)


def test_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(4, 5)).astype(np.float32)
    std = rng.uniform(0.2, 2.0, size=(4, 5)).astype(np.float32)
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per dimension
    want = (np.log(1 / std) + (std**2 + mean**2) / 2 - 0.5).sum(-1)
    np.testing.assert_allclose(losses.gaussian_kl(mean, std), want, rtol=1e-5)


def test_kl_equals_expected_log_density_ratio():
    """E_q[log q(z) - log p(z)] by Monte Carlo agrees with the analytic KL."""
    mean, std = jnp.array([[0.5, -1.0, 2.0]]), jnp.array([[0.3, 1.5, 0.8]])
    z = mean + std * jax.random.normal(jax.random.key(0), (200_000, 3))
    ratio = losses.diag_gaussian_logpdf(z, mean, std) - losses.std_normal_logpdf(z)
    se = float(ratio.std() / math.sqrt(ratio.size))
    assert abs(float(ratio.mean()) - float(losses.gaussian_kl(mean, std)[0])) < 4 * se


def test_gaussian_logpdf_matches_scipy_formula():
    z, m, s = np.array([[0.1, 2.0]]), np.array([[0.0, 1.0]]), np.array([[1.0, 0.5]])
    want = (-0.5 * ((z - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)).sum()
    assert float(losses.diag_gaussian_logpdf(z, m, s)[0]) == pytest.approx(want, rel=1e-6)
    assert float(losses.std_normal_logpdf(z)[0]) == pytest.approx(
        (-0.5 * z**2 - 0.5 * np.log(2 * np.pi)).sum(), rel=1e-6)


def test_bernoulli_loglik_matches_probability_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(2, 4, 4)).astype(np.float32)
    x = (rng.uniform(size=(2, 4, 4)) > 0.5).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = (x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(2, -1).sum(-1)
    np.testing.assert_allclose(losses.bernoulli_loglik(logits, x), want, rtol=1e-5)


def test_neg_inf_padding_costs_nothing_and_stays_finite():
    logits = jnp.full((1, 4, 4), 1.5)
    x = jnp.zeros((1, 4, 4)).at[0, 1:3, 1:3].set(1.0)
    padded_logits = jnp.pad(logits, ((0, 0), (2, 2), (2, 2)), constant_values=-jnp.inf)
    padded_x = jnp.pad(x, ((0, 0), (2, 2), (2, 2)))
    ll = losses.bernoulli_loglik(padded_logits, padded_x)
    assert np.isfinite(ll).all()
    np.testing.assert_allclose(ll, losses.bernoulli_loglik(logits, x), rtol=1e-6)
    grad = jax.grad(lambda l: losses.bernoulli_loglik(l, padded_x).sum())(padded_logits)
    assert np.isfinite(grad).all()
    assert float(jnp.abs(grad[0, :2]).sum()) == 0.0  # padded pixels get no gradient


def test_iw_bound_with_one_sample_is_the_one_sample_elbo_estimate():
    rng = np.random.default_rng(2)
    log_px, log_pz, log_qz = (rng.normal(size=(5, 1)) for _ in range(3))
    np.testing.assert_allclose(losses.iw_bound(log_px, log_pz, log_qz),
                               (log_px + log_pz - log_qz)[:, 0], rtol=1e-6)


def _toy_bound(key, k, n_rep, x=1.3):
    """p(z)=N(0,1), p(x|z)=N(x; z, 1), q(z|x)=N(0.2, 0.9^2) (deliberately off the posterior)."""
    mean, std = jnp.full((n_rep, k, 1), 0.2), jnp.full((n_rep, k, 1), 0.9)
    z = mean + std * jax.random.normal(key, (n_rep, k, 1))
    log_px = (-0.5 * (x - z) ** 2 - 0.5 * math.log(2 * math.pi))[..., 0]
    return losses.iw_bound(log_px, losses.std_normal_logpdf(z), losses.diag_gaussian_logpdf(z, mean, std))


def test_iw_bound_increases_with_k_towards_log_evidence():
    x = 1.3
    log_evidence = -0.5 * x**2 / 2 - 0.5 * math.log(2 * math.pi * 2)  # x ~ N(0, 2)
    means, ses = [], []
    for i, k in enumerate([1, 4, 16, 64]):
        b = _toy_bound(jax.random.key(i), k, 20_000, x)
        means.append(float(b.mean()))
        ses.append(float(b.std() / math.sqrt(b.size)))
    for (m0, s0), (m1, s1) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert m1 > m0 + 2 * math.hypot(s0, s1)
    assert means[-1] <= log_evidence + 3 * ses[-1]
    assert log_evidence - means[-1] < 0.01


def test_bits_per_dim():
    assert losses.nats_to_bits_per_dim(-84.23, 784) == pytest.approx(84.23 / (784 * math.log(2)))
    assert losses.nats_to_bits_per_dim(-math.log(2) * 784, 784) == pytest.approx(1.0)
