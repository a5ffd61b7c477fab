"""Convolutional encoder shared by every variant (O and R agree).

Five 5x5 convs with ELU after each: 1->32 (stride 1), then 32->64->128->256->512 with stride 2,
so a 32x32 input ends at 2x2x512; then Linear 2048 -> 2Z (mean and scale parameter). `width`
(`model.conv_width`, 32 in the paper) is the first conv's channel count; each later conv doubles
it. Smaller widths are for the CPU tiers only.
A 28x28 input (O's non-doubling run) gets padding 4 on the first conv, so it is 32x32 inside.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from vnca.models.layers import conv, dense


def channels(width: int) -> tuple[int, ...]:
    """The five convs' output channels for a first-layer width (32: the paper's)."""
    return tuple(width * 2**i for i in range(5))


class Encoder(nn.Module):
    z_dim: int
    image_size: int = 32
    width: int = 32
    algorithm: str = "winograd"  # "xla": XLA's strided convs; otherwise im2col matmuls
    precision: str = "float32"   # kernels.PRECISIONS

    @nn.compact
    def __call__(self, x_BxHxWx1: jax.Array) -> jax.Array:
        h = x_BxHxWx1
        first_pad = 2 + (32 - self.image_size) // 2
        c_in = 1
        for i, c in enumerate(channels(self.width)):
            stride, pad = (1, first_pad) if i == 0 else (2, 2)
            h = nn.elu(conv(c, 5, 25 * c_in, stride=stride, padding=pad,
                             algorithm=self.algorithm, precision=self.precision)(h))
            c_in = c
        h = h.reshape(h.shape[0], -1)
        return dense(2 * self.z_dim, h.shape[-1], self.precision)(h)
