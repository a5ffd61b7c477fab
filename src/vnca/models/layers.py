"""Flax layers with PyTorch's default initialisation (both O and R use it); the arithmetic is
`vnca.models.kernels`'.

Dimension letters: B batch, H/W grid, C input and F output channels, K kernel side (in
`Dense`, the input size).

PyTorch initialises conv and linear weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
For a transposed conv, PyTorch's fan_in is out_channels * kh * kw (from its weight layout).
Each layer has the parameters (names, shapes, initial values) of the flax layer it is named
after, whatever the conv algorithm or precision, so checkpoints move between algorithms.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vnca.models import kernels
from vnca.models.kernels import resolve_algorithm  # noqa: F401 -- vae.py imports it here


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """Conv with symmetric zero padding by `kernels.conv` (matrix products unless the algorithm
    is "xla"). Same parameters, names and initial values as `nn.Conv` (hence the name)."""

    features: int
    kernel: int
    fan_in: int
    padding: int = 0
    zero_init: bool = False
    use_bias: bool = True
    algorithm: str = "winograd"
    stride: int = 1
    precision: str = "float32"

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else _uniform(1.0 / math.sqrt(self.fan_in))
        k, c = self.kernel, x_BxHxWxC.shape[-1]
        w_KxKxCxF = self.param("kernel", init, (k, k, c, self.features))
        y = kernels.conv(x_BxHxWxC, w_KxKxCxF, self.stride, self.padding, self.algorithm,
                         self.precision)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


def conv(features: int, kernel: int, fan_in: int, *, stride: int = 1, padding: int = 0,
         zero_init: bool = False, use_bias: bool = True, algorithm: str = "winograd",
         precision: str = "float32", name: str | None = None) -> nn.Module:
    return Conv(features, kernel, fan_in, padding, zero_init, use_bias, algorithm, stride,
                precision, name=name)


class ConvTranspose(nn.Module):
    """`torch.nn.ConvTranspose2d(k, stride, padding, output_padding)`'s output size, computed
    as flax's `nn.ConvTranspose` computes it, by `kernels.conv_transpose`. Same parameters,
    names and initial values as `nn.ConvTranspose`."""

    features: int
    kernel: int
    stride: int
    torch_padding: int
    output_padding: int = 0
    algorithm: str = "winograd"
    precision: str = "float32"

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        k, c = self.kernel, x_BxHxWxC.shape[-1]
        init = _uniform(1.0 / math.sqrt(self.features * k * k))  # PyTorch's fan_in for ConvT
        w_KxKxCxF = self.param("kernel", init, (k, k, c, self.features))
        y = kernels.conv_transpose(x_BxHxWxC, w_KxKxCxF, self.stride, self.torch_padding,
                                   self.output_padding, self.algorithm, self.precision)
        return y + self.param("bias", init, (self.features,))


def conv_transpose(features: int, kernel: int, *, stride: int, torch_padding: int,
                   output_padding: int = 0, algorithm: str = "winograd",
                   precision: str = "float32", name: str | None = None) -> ConvTranspose:
    """Same output size as torch.nn.ConvTranspose2d(k, stride, padding, output_padding)."""
    return ConvTranspose(features, kernel, stride, torch_padding, output_padding, algorithm,
                         precision, name=name)


class Dense(nn.Module):
    """`nn.Dense` with PyTorch's initialisation, by `kernels.matmul` (same parameter names,
    shapes and initial values as `nn.Dense` with those initialisers)."""

    features: int
    fan_in: int
    precision: str = "float32"

    @nn.compact
    def __call__(self, x_BxK: jax.Array) -> jax.Array:
        init = _uniform(1.0 / math.sqrt(self.fan_in))
        kernel = self.param("kernel", init, (x_BxK.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return kernels.matmul(x_BxK, kernel, self.precision) + bias


def dense(features: int, fan_in: int, precision: str = "float32",
          name: str | None = None) -> Dense:
    return Dense(features, fan_in, precision, name=name)
