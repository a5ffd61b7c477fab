"""The NCA's stride-1 convs: every algorithm computes the same convolution as a float64 direct
sum, forward and backward, and the algorithm changes neither the parameters nor the model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnca import config
from vnca.models import build_model
from vnca.models.kernels import CONV_ALGORITHMS, conv_stride1, winograd_tile
from vnca.models.layers import Conv, ConvTranspose, _uniform


@pytest.mark.parametrize("hw, tile", [(28, 4), (32, 4), (8, 4), (2, 2), (6, 2), (5, None)])
def test_winograd_tile_choice(hw, tile):
    assert winograd_tile(hw, hw) == tile


@pytest.mark.parametrize("algorithm", CONV_ALGORITHMS)
@pytest.mark.parametrize("hw", [28, 32, 2, 6, 5])    # F(4,3), F(4,3), F(2,3), F(2,3), im2col
def test_conv3x3_equals_direct_sum(algorithm, hw, direct_conv):
    kx, kw = jax.random.split(jax.random.key(hw))
    x = jax.random.normal(kx, (3, hw, hw, 16))
    w = jax.random.normal(kw, (3, 3, 16, 12)) / 12.0
    got = np.asarray(conv_stride1(x, w, 1, algorithm), np.float64)
    want = direct_conv(x, w, 1)
    assert got.shape == want.shape == (3, hw, hw, 12)
    # float32 rounding only: F(4,3)'s transforms (factors up to 8 and 1/24) cost ~1e-6 relative
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("hw", [8, 6])                # F(4,3), F(2,3)
def test_winograd_gradients_equal_direct_conv_gradients(hw, direct_conv):
    """The custom VJP against the gradients of the direct sum, worked out by hand."""
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, hw, hw, 6))
    w = jax.random.normal(kw, (3, 3, 6, 5)) / 7.0
    g = np.asarray(jax.random.normal(kg, (2, hw, hw, 5)), np.float64)

    def loss(alg):
        return lambda x, w: jnp.sum(conv_stride1(x, w, 1, alg) * g)

    gx, gw = jax.grad(loss("winograd"), argnums=(0, 1))(x, w)
    # d/dx of sum(g * conv(x, w)) is the full correlation of g with the flipped kernel; d/dw at
    # tap (i, j) is sum over positions of the shifted input times g.
    want_gx = direct_conv(g, np.flip(np.asarray(w), (0, 1)).transpose(0, 1, 3, 2), 1)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want_gw = np.stack([np.stack([np.einsum("bhwc,bhwf->cf", xp[:, i:i + hw, j:j + hw], g)
                                  for j in range(3)]) for i in range(3)])
    np.testing.assert_allclose(gx, want_gx, atol=2e-5 * np.abs(want_gx).max(), rtol=0)
    np.testing.assert_allclose(gw, want_gw, atol=2e-5 * np.abs(want_gw).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["doubling", "nondoubling", "baseline"])
def test_algorithms_share_parameters_and_decode_alike(variant):
    files = [f"configs/{variant}.yaml", "configs/smoke.yaml"]
    models = {a: build_model(config.load(files, [f"model.conv_algorithm={a}",
                                                 "model.update_prob=1.0"]))
              for a in CONV_ALGORITHMS}
    params = models["im2col"].init(jax.random.key(0))
    for m in models.values():
        assert (jax.tree_util.tree_structure(m.init(jax.random.key(0)))
                == jax.tree_util.tree_structure(params))
    # a non-zero last layer, so the state moves and the convs matter
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.01 if "kernel" in str(p[-1]) else v, params)
    z = jax.random.normal(jax.random.key(2), (2, models["im2col"].cfg.z_dim))
    logits = {a: np.asarray(m.decode(params, z, jax.random.key(3))) for a, m in models.items()}
    ref = logits["im2col"]
    assert np.isfinite(ref[np.isfinite(ref)]).all() and np.abs(ref[np.isfinite(ref)]).max() > 1e-3
    for a in ("winograd", "xla"):
        np.testing.assert_allclose(logits[a], ref, atol=1e-4 * np.abs(ref[np.isfinite(ref)]).max(),
                                   rtol=0)
    x = (jax.random.uniform(jax.random.key(4), (2, 32, 32, 1)) > 0.5).astype(jnp.float32)
    x = x[:, : models["im2col"].image_size, : models["im2col"].image_size]
    means = {a: np.asarray(m.encode(params, x)[0]) for a, m in models.items()}
    for a in ("winograd", "xla"):
        np.testing.assert_allclose(means[a], means["im2col"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("platform, want", [("cpu", "winograd"), ("gpu", "xla"),
                                            ("tpu", "xla"), ("rocm", "xla")])
def test_auto_resolves_per_backend_and_explicit_choices_stay(platform, want):
    from vnca.models.kernels import resolve_algorithm
    from vnca.models.vae import resolve_backend

    for variant in ("baseline", "doubling", "nondoubling"):
        cfg = config.load(f"configs/{variant}.yaml")
        assert cfg.model.conv_algorithm == "auto"  # the paper configs leave it to the backend
        assert resolve_backend(cfg, platform).model.conv_algorithm == want
    for explicit in CONV_ALGORITHMS:
        assert resolve_algorithm(explicit, platform) == explicit
    assert build_model(config.load("configs/doubling.yaml")).conv_algorithm == "winograd"


def test_unknown_algorithm_is_a_config_error():
    from vnca.errors import ConfigError
    with pytest.raises(ConfigError, match="conv_algorithm"):
        config.load(["configs/doubling.yaml"], ["model.conv_algorithm=fft"])


@pytest.mark.parametrize("layer, flax_layer, shape", [
    # the encoder's stride-2 conv
    (Conv(7, 5, 25 * 6, padding=2, stride=2),
     nn.Conv(7, (5, 5), strides=(2, 2), padding=((2, 2), (2, 2)),
             kernel_init=_uniform(1 / 150 ** 0.5), bias_init=_uniform(1 / 150 ** 0.5)),
     (2, 8, 8, 6)),
    # the baseline decoder's stride-2 transposed conv (torch padding 2, output padding 1) ...
    (ConvTranspose(7, 5, stride=2, torch_padding=2, output_padding=1),
     nn.ConvTranspose(7, (5, 5), strides=(2, 2), padding=((2, 3), (2, 3)),
                      kernel_init=_uniform(1 / 175 ** 0.5), bias_init=_uniform(1 / 175 ** 0.5)),
     (2, 4, 4, 6)),
    # ... and its last layer (torch padding 4: 32 -> 28)
    (ConvTranspose(1, 5, stride=1, torch_padding=4),
     nn.ConvTranspose(1, (5, 5), strides=(1, 1), padding=((0, 0), (0, 0)),
                      kernel_init=_uniform(1 / 25 ** 0.5), bias_init=_uniform(1 / 25 ** 0.5)),
     (2, 32, 32, 6)),
])
@pytest.mark.parametrize("algorithm", ["im2col", "xla"])
def test_matmul_layers_equal_flax_layers(layer, flax_layer, shape, algorithm):
    """Same parameter names, shapes and initial values as the flax layer (and PyTorch's init
    bounds), and the same outputs and input gradients, by im2col and by XLA's convs."""
    layer = layer.clone(algorithm=algorithm)
    x = jax.random.normal(jax.random.key(0), shape)
    params = layer.init(jax.random.key(1), x)
    want_params = flax_layer.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want_params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params)):
        np.testing.assert_array_equal(a, b)
    y, want = layer.apply(params, x), flax_layer.apply(params, x)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(layer.apply(params, x))))(x)
    want_g = jax.grad(lambda x: jnp.sum(jnp.sin(flax_layer.apply(params, x))))(x)
    np.testing.assert_allclose(g, want_g, atol=1e-5, rtol=1e-5)


class _FlaxResidualUpdate(nn.Module):
    """The doubling update built from flax's own nn.Conv layers (XLA convs), as a reference."""

    channels: int
    hidden: int
    n_blocks: int

    @nn.compact
    def __call__(self, s):
        def init(fan_in):
            return _uniform(1 / fan_in ** 0.5)

        h = nn.Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), name="Conv_0",
                    kernel_init=init(9 * self.channels), bias_init=init(9 * self.channels))(s)
        for i in range(self.n_blocks):
            c1 = nn.Conv(self.hidden, (1, 1), name=f"Conv_{2 * i + 1}",
                         kernel_init=init(self.hidden), bias_init=init(self.hidden))
            c2 = nn.Conv(self.hidden, (1, 1), name=f"Conv_{2 * i + 2}",
                         kernel_init=init(self.hidden), bias_init=init(self.hidden))
            h = h + c2(nn.elu(c1(h)))
        zeros = nn.initializers.zeros
        return nn.Conv(self.channels, (1, 1), name=f"Conv_{2 * self.n_blocks + 1}",
                       kernel_init=zeros, bias_init=zeros)(h)


@pytest.mark.parametrize("algorithm", ["winograd", "im2col"])
def test_residual_update_equals_flax_convs(algorithm):
    """The doubling update (its 1x1 tower on flattened cells) has the parameter tree and initial
    values of flax nn.Conv layers and computes the same function, forward and backward."""
    from vnca.models.nca import ResidualUpdate

    s = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
    ours = ResidualUpdate(6, 5, 2, algorithm)
    ref = _FlaxResidualUpdate(6, 5, 2)
    params = ours.init(jax.random.key(1), s)
    want_params = ref.init(jax.random.key(1), s)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want_params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params)):
        np.testing.assert_array_equal(a, b)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero last layer

    def loss(module, p, s):
        return jnp.sum(jnp.sin(module.apply(p, s)))

    y, want = ours.apply(params, s), ref.apply(params, s)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(y, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    g = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(params, s)
    want_g = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(params, s)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want_g)):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


@pytest.mark.parametrize("n, k, stride, torch_padding, output_padding", [
    (2, 5, 2, 2, 1), (16, 5, 2, 2, 1),   # the baseline decoder's layers
    (5, 3, 2, 1, 1), (4, 4, 2, 1, 0), (3, 5, 3, 2, 2),
])
def test_transposed_conv_phases_equal_the_dilated_conv(n, k, stride, torch_padding,
                                                       output_padding, direct_conv):
    """The s^2 phase convs of the undilated input compute the conv of the dilated input, values
    and gradients, against the float64 direct sum over the dilated input."""
    from vnca.models.kernels import conv_transpose_phases, dilate

    x = jax.random.normal(jax.random.key(0), (2, n, n, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 4))
    lo = k - 1 - torch_padding
    out = (n - 1) * stride + 1 + 2 * lo + output_padding - k + 1
    xd = np.pad(np.asarray(dilate(x, stride), np.float64),
                ((0, 0), (lo, lo + output_padding), (lo, lo + output_padding), (0, 0)))
    want = direct_conv(xd, w, 0)
    got = conv_transpose_phases(x, w, stride, lo, out)
    assert got.shape == want.shape == (2, out, out, 4)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    g = jax.random.normal(jax.random.key(2), want.shape)
    grads = jax.grad(lambda x, w: jnp.sum(conv_transpose_phases(x, w, stride, lo, out) * g),
                     argnums=(0, 1))(x, w)
    want_grads = jax.grad(lambda x, w: jnp.sum(
        conv_stride1(jnp.pad(dilate(x, stride), ((0, 0), (lo, lo + output_padding),
                                                 (lo, lo + output_padding), (0, 0))),
                     w, 0, "im2col") * g), argnums=(0, 1))(x, w)
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_transposed_conv_phases_decline_unequal_phases():
    """An output side that is not a multiple of the stride has phases of unequal sizes: the
    dilated im2col path computes it instead."""
    from vnca.models.kernels import conv_transpose_phases

    x = jnp.ones((1, 4, 4, 2))
    assert conv_transpose_phases(x, jnp.ones((5, 5, 2, 3)), 2, 2, 7) is None
