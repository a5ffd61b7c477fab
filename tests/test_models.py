"""Architecture facts: parameter counts, doubling, zero-init, active-step mask, jit and remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnca import config, losses
from vnca.models import build_model, count_params, nca

SMOKE = "configs/smoke.yaml"


def _model(variant, *overrides, smoke=False):
    files = [f"configs/{variant}.yaml"] + ([SMOKE] if smoke else [])
    return build_model(config.load(files, list(overrides)))


@pytest.mark.parametrize("variant, overrides, want", [
    ("doubling", [], 6_585_088),                                  # R's tests.py assert
    ("baseline", [], 10_282_497),
    ("nondoubling", [], 5_042_304),                               # O: no bias on the last conv
    ("nondoubling", ["model.last_layer_bias=true"], 5_042_432),   # R
    ("nondoubling", ["data.pad_to=32"], 5_042_304),               # grid size changes nothing
    ("baseline", ["model.baseline_output=model_padding"], 10_282_497),
])
def test_parameter_counts(variant, overrides, want):
    model = _model(variant, *overrides)
    assert count_params(jax.eval_shape(model.init, jax.random.key(0))) == want


def test_encoder_parameter_count():
    model = _model("doubling")
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert count_params(shapes["encoder"]) == 5_402_880


def test_doubling_copies_each_cell_into_a_2x2_block():
    s = jnp.arange(2 * 3 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 3, 2)
    d = nca.double(s)
    assert d.shape == (2, 6, 6, 2)
    for i in range(3):
        for j in range(3):
            block = d[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            np.testing.assert_array_equal(block, jnp.broadcast_to(s[:, i:i + 1, j:j + 1], block.shape))


@pytest.mark.parametrize("variant", ["doubling", "nondoubling"])
def test_fresh_nca_step_leaves_state_unchanged(variant):
    model = _model(variant, smoke=True)
    params = model.init(jax.random.key(0))
    s = jax.random.normal(jax.random.key(1), (2, 8, 8, model.cfg.z_dim))
    out = nca.nca_step(model._update(params), s, jax.random.key(2), model.cfg.update_prob)
    np.testing.assert_array_equal(out, s)


def _perturbed(params, key, scale=0.05):
    """Give the zero-initialised last layer non-zero weights so steps change the state."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("n_steps", [0, 1, 3, 5])
def test_active_step_mask_runs_exactly_n_steps(n_steps):
    model = _model("nondoubling", "model.update_prob=1.0", smoke=True)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1))
    update = model._update(params)
    s0 = jax.random.normal(jax.random.key(2), (2, 6, 6, model.cfg.z_dim))
    got = nca.grow(update, s0, jax.random.key(3), jnp.asarray(n_steps), 8, 1.0)
    want = s0
    for _ in range(n_steps):
        want = want + update(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if n_steps:
        assert not np.allclose(got, s0)


@pytest.mark.parametrize("n_steps", [3, 6])
def test_step_floor_and_static_steps_give_the_same_states(n_steps):
    """Slots below `min_steps` run without the cond, and a static n_steps skips the rest; the
    states (masks, p = 0.5, drawn from the same per-slot keys) and recorded frames are those of
    the all-cond scan."""
    model = _model("nondoubling", smoke=True)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1))
    update = model._update(params)
    s0 = jax.random.normal(jax.random.key(2), (2, 6, 6, model.cfg.z_dim))
    key = jax.random.key(3)
    base, base_frames = nca.grow(update, s0, key, jnp.asarray(n_steps), 8, 0.5, record=True)
    for n, floor in [(jnp.asarray(n_steps), 3), (n_steps, 0)]:
        got, frames = nca.grow(update, s0, key, n, 8, 0.5, record=True, min_steps=floor)
        np.testing.assert_allclose(got, base, rtol=1e-6, atol=1e-6)
        assert frames.shape == base_frames.shape == (8, *s0.shape)
        np.testing.assert_allclose(frames, base_frames, rtol=1e-6, atol=1e-6)
    assert not np.allclose(base_frames[0], base_frames[2])   # the steps did something


def test_stochastic_update_mask_is_per_cell_and_shared_across_channels():
    update = lambda s: jnp.ones_like(s)
    s0 = jnp.zeros((4, 32, 32, 3))
    s1 = nca.nca_step(update, s0, jax.random.key(0), 0.5)
    assert set(np.unique(s1)) == {0.0, 1.0}
    np.testing.assert_array_equal(s1[..., 0], s1[..., 1])
    frac = float(s1[..., 0].mean())
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / s1[..., 0].size)


@pytest.mark.parametrize("inclusive, top_seen", [(True, 64), (False, 63)])
def test_step_count_range_inclusive_or_not(inclusive, top_seen):
    keys = jax.random.split(jax.random.key(0), 4000)
    t = jax.vmap(lambda k: nca.sample_n_steps(k, 32, 64, inclusive))(keys)
    assert int(t.min()) == 32 and int(t.max()) == top_seen


def test_damage_zeroes_a_square_in_the_chosen_rows_only():
    s = jnp.ones((3, 28, 28, 4))
    rows = jnp.array([True, False, True])
    top_B, left_B = nca.random_square(jax.random.key(0), 3, 28, 28, 14)
    d = nca.damage_square(s, top_B, left_B, 14, rows)
    zero_cells = (d == 0).all(-1).sum(axis=(1, 2))
    np.testing.assert_array_equal(zero_cells, [14 * 14, 0, 14 * 14])
    for b in (0, 2):
        ys, xs = np.nonzero(np.asarray((d[b] == 0).all(-1)))
        assert ys.max() - ys.min() == 13 and xs.max() - xs.min() == 13
        assert (ys.min(), xs.min()) == (int(top_B[b]), int(left_B[b]))
    # a fixed position for every row (evaluation's centred square)
    c = nca.damage_square(s, 7, 7, 14)
    np.testing.assert_array_equal(np.asarray((c == 0).all(-1))[1, 7:21, 7:21], True)
    assert int((c == 0).all(-1).sum()) == 3 * 14 * 14


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["baseline", "doubling", "nondoubling"])
def test_jit_equals_no_jit(variant):
    model = _model(variant, smoke=True)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1), 0.01)
    n = model.image_size
    x = jnp.pad((jax.random.uniform(jax.random.key(2), (2, 28, 28, 1)) > 0.8).astype(jnp.float32),
                ((0, 0), ((n - 28) // 2,) * 2, ((n - 28) // 2,) * 2, (0, 0)))
    eager = model.forward(params, x, jax.random.key(3))
    jitted = jax.jit(model.forward)(params, x, jax.random.key(3))
    for k in ("log_px", "kl", "elbo"):
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-4, atol=1e-3)
    assert np.isfinite(eager["elbo"]).all()


@pytest.mark.slow
def test_remat_does_not_change_gradients():
    model = _model("doubling", smoke=True)
    no_remat = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, remat=False))
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1), 0.01)
    x = (jax.random.uniform(jax.random.key(2), (2, 32, 32, 1)) > 0.8).astype(jnp.float32)

    def loss(m):
        return lambda p: -m.forward(p, x, jax.random.key(3))["elbo"].mean()

    g1 = jax.grad(loss(model))(params)
    g2 = jax.grad(loss(no_remat))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["winograd", "xla"])
def test_remat_keeps_the_tower_outputs_and_recomputes_only_the_rest(monkeypatch, algorithm):
    """`nca.REMAT_POLICY`: the backward pass of a checkpointed NCA step recomputes everything
    but the residual tower's 1x1 dots, i.e. saving nothing would cost exactly those dots'
    forward FLOPs more, counted here by hand (the last 1x1 conv's output is never needed by
    the backward pass, so neither recomputes it)."""
    from vnca.plan import count_flops

    model = _model("doubling", f"model.conv_algorithm={algorithm}", smoke=True)
    params = model.init(jax.random.key(0))
    b = 2
    x = jnp.zeros((b, 32, 32, 1))

    def grad_flops(m):
        g = jax.grad(lambda p: -m.forward(p, x, jax.random.key(3))["elbo"].mean())
        return count_flops(jax.make_jaxpr(g)(params))

    c = model.cfg
    kept = grad_flops(model)
    saved_all = grad_flops(dataclasses.replace(model, cfg=dataclasses.replace(c, remat=False)))
    monkeypatch.setattr(nca, "REMAT_POLICY", None)  # jax.checkpoint's default: keep nothing
    kept_nothing = grad_flops(model)
    cells = sum(4 ** s for s in range(1, c.n_doublings + 1)) * c.steps_per_stage
    tower = 2 * b * cells * 2 * c.n_residual_blocks * c.nca_hidden ** 2
    assert kept_nothing - kept == tower
    assert kept > saved_all  # the 3x3 conv is still recomputed


def test_doubling_growth_stages_end_at_the_decoded_image():
    model = _model("doubling", smoke=True)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1), 0.02)
    z = jax.random.normal(jax.random.key(2), (2, model.cfg.z_dim))
    frames = model.growth_stages(params, z, jax.random.key(3))
    c = model.cfg
    assert frames.shape == (1 + c.n_doublings * c.steps_per_stage, 2, 32, 32)
    np.testing.assert_allclose(frames[-1], model.decode(params, z, jax.random.key(3)), rtol=1e-5)
    np.testing.assert_allclose(frames[0], jnp.broadcast_to(z[:, None, None, 0], (2, 32, 32)))


def test_nondoubling_growth_stages_follow_the_steps():
    model = _model("nondoubling", "model.update_prob=1.0", smoke=True)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1), 0.02)
    z = jax.random.normal(jax.random.key(2), (2, model.cfg.z_dim))
    frames = model.growth_stages(params, z, jax.random.key(3), n_steps=3)
    assert frames.shape == (4, 2, 28, 28)
    final = model.grow(params, model.seed(z), jax.random.key(4), 3)
    np.testing.assert_allclose(frames[-1], model.to_logits(final), rtol=1e-5, atol=1e-5)


def test_baseline_neg_inf_padding_scores_only_the_28x28_image():
    model = _model("baseline", smoke=True)
    params = _perturbed(model.init(jax.random.key(0)), jax.random.key(1), 0.01)
    z = jax.random.normal(jax.random.key(2), (3, model.cfg.z_dim))
    logits = model.decode(params, z, jax.random.key(3))
    assert logits.shape == (3, 32, 32)
    assert np.isneginf(logits[:, :2]).all() and np.isneginf(logits[:, :, -2:]).all()
    x28 = (jax.random.uniform(jax.random.key(4), (3, 28, 28)) > 0.8).astype(jnp.float32)
    x32 = jnp.pad(x28, ((0, 0), (2, 2), (2, 2)))
    np.testing.assert_allclose(losses.bernoulli_loglik(logits, x32),
                               losses.bernoulli_loglik(logits[:, 2:-2, 2:-2], x28), rtol=1e-6)


def test_variance_heads():
    m = _model("doubling", smoke=True)
    params = m.init(jax.random.key(0))
    x = jnp.zeros((1, 32, 32, 1))
    _, std_logstd = m.encode(params, x)
    m_var = dataclasses.replace(m, cfg=dataclasses.replace(m.cfg, variance_head="log_var"))
    _, std_logvar = m_var.encode(params, x)
    np.testing.assert_allclose(std_logvar, jnp.sqrt(std_logstd), rtol=1e-5)
