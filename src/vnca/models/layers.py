"""Layer constructors with PyTorch's default initialisation (both O and R use it).

PyTorch initialises conv and linear weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
For a transposed conv, PyTorch's fan_in is out_channels * kh * kw (from its weight layout).

Stride-1 convs (every conv of the NCA update networks) are computed as matrix products over
im2col patches (`MatmulConv`). XLA:CPU compiles the gradient convolutions of a conv inside a
`lax.scan` (the backward loop of the NCA) to a layout that falls back to a naive loop, 25-60x
slower than a matmul of the same size; a dot in a loop is fast on every backend. The parameter
tree (`Conv_i/kernel` of shape (k, k, in, out), `Conv_i/bias`) is that of `nn.Conv`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """Stride-1 conv with symmetric zero padding, as one matmul over im2col patches (a 1x1 conv
    is a plain matmul). Same parameters as `nn.Conv` (the class is named Conv for that)."""

    features: int
    kernel: int
    fan_in: int
    padding: int = 0
    zero_init: bool = False
    use_bias: bool = True

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else _uniform(1.0 / math.sqrt(self.fan_in))
        k, c = self.kernel, x_BxHxWxC.shape[-1]
        w_KxKxCxF = self.param("kernel", init, (k, k, c, self.features))
        if k == 1 and self.padding == 0:
            y = jnp.dot(x_BxHxWxC, w_KxKxCxF[0, 0])
        else:
            _, h, w, _ = x_BxHxWxC.shape
            p = self.padding
            xp = jnp.pad(x_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)))
            ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
            cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(k)
                                    for j in range(k)], axis=-1)   # B x H x W x (k*k*C)
            y = jnp.dot(cols, w_KxKxCxF.reshape(k * k * c, self.features))
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


def conv(features: int, kernel: int, fan_in: int, *, stride: int = 1, padding: int = 0,
         zero_init: bool = False, use_bias: bool = True, name: str | None = None) -> nn.Module:
    if stride == 1:
        return Conv(features, kernel, fan_in, padding, zero_init, use_bias, name=name)
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), use_bias=use_bias,
        kernel_init=nn.initializers.zeros if zero_init else _uniform(bound),
        bias_init=nn.initializers.zeros if zero_init else _uniform(bound),
        name=name,
    )


def conv_transpose(features: int, kernel: int, *, stride: int, torch_padding: int,
                   output_padding: int = 0, name: str | None = None) -> nn.ConvTranspose:
    """Same output size as torch.nn.ConvTranspose2d(k, stride, padding, output_padding)."""
    bound = 1.0 / math.sqrt(features * kernel * kernel)
    lo = kernel - 1 - torch_padding
    pad = ((lo, lo + output_padding), (lo, lo + output_padding))
    return nn.ConvTranspose(
        features, (kernel, kernel), strides=(stride, stride), padding=pad,
        kernel_init=_uniform(bound), bias_init=_uniform(bound), name=name,
    )


def dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Dense(features, kernel_init=_uniform(bound), bias_init=_uniform(bound), name=name)
