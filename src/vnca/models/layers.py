"""Layer constructors with PyTorch's default initialisation (both O and R use it).

PyTorch initialises conv and linear weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
For a transposed conv, PyTorch's fan_in is out_channels * kh * kw (from its weight layout).
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


def conv(features: int, kernel: int, fan_in: int, *, stride: int = 1, padding: int = 0,
         zero_init: bool = False, use_bias: bool = True, name: str | None = None) -> nn.Conv:
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
