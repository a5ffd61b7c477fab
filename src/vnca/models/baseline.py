"""Convolutional baseline decoder (the paper's Fig. 5 comparison).

Linear Z -> 2048 (no activation), reshape to 2x2x512, then four [ConvT 5x5 stride 2, ELU]
512->256->128->64->32 up to 32x32, then ConvT 32->1, 5x5, stride 1. With torch padding 2 (O) the
output is 32x32 and the model scores the zero padding; with padding 4 (R) it is 28x28 and is
padded with -inf logits, so the pad costs exactly 0 nats.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vnca.models.layers import conv_transpose, dense


class BaselineDecoder(nn.Module):
    z_dim: int
    output: str = "neg_inf_padding"  # or "model_padding"

    @nn.compact
    def __call__(self, z_BxZ: jax.Array) -> jax.Array:
        h = dense(2048, self.z_dim)(z_BxZ).reshape(-1, 2, 2, 512)
        for c in (256, 128, 64, 32):
            h = nn.elu(conv_transpose(c, 5, stride=2, torch_padding=2, output_padding=1)(h))
        pad = 2 if self.output == "model_padding" else 4
        logits_BxHxW = conv_transpose(1, 5, stride=1, torch_padding=pad)(h)[..., 0]
        if self.output == "neg_inf_padding":
            logits_BxHxW = jnp.pad(logits_BxHxW, ((0, 0), (2, 2), (2, 2)),
                                   constant_values=-jnp.inf)
        return logits_BxHxW
