"""Convolutional baseline decoder (the paper's Fig. 5 comparison).

Linear Z -> 2048 (no activation), reshape to 2x2x512, then four [ConvT 5x5 stride 2, ELU]
512->256->128->64->32 up to 32x32, then ConvT 32->1, 5x5, stride 1. With torch padding 2 (O) the
output is 32x32 and the model scores the zero padding; with padding 4 (R) it is 28x28 and is
padded with -inf logits, so the pad costs exactly 0 nats. `width` (`model.conv_width`, 32 in the
paper) scales every layer: 16w at 2x2, halving up to w before the last ConvT.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vnca.models.layers import conv_transpose, dense


class BaselineDecoder(nn.Module):
    z_dim: int
    output: str = "neg_inf_padding"  # or "model_padding"
    width: int = 32
    algorithm: str = "winograd"  # "xla": XLA's transposed convs; otherwise im2col matmuls
    precision: str = "float32"   # kernels.PRECISIONS

    @nn.compact
    def __call__(self, z_BxZ: jax.Array) -> jax.Array:
        w, a, p = self.width, self.algorithm, self.precision
        h = dense(4 * 16 * w, self.z_dim, p)(z_BxZ).reshape(-1, 2, 2, 16 * w)
        for c in (8 * w, 4 * w, 2 * w, w):
            h = nn.elu(conv_transpose(c, 5, stride=2, torch_padding=2, output_padding=1,
                                      algorithm=a, precision=p)(h))
        pad = 2 if self.output == "model_padding" else 4
        logits_BxHxW = conv_transpose(1, 5, stride=1, torch_padding=pad, algorithm=a,
                                      precision=p)(h)[..., 0]
        if self.output == "neg_inf_padding":
            logits_BxHxW = jnp.pad(logits_BxHxW, ((0, 0), (2, 2), (2, 2)),
                                   constant_values=-jnp.inf)
        return logits_BxHxW
