"""Neural cellular automaton: update networks and the growth loop as pure functions.

Dimension letters: B batch, H/W grid, C cell channels (= Z, the latent size), T steps.

One NCA step is s <- s + m * f(s), where f is the update network (its last 1x1 conv is
zero-initialised, so a fresh network leaves the state unchanged) and m is a per-cell Bernoulli(p)
mask shared across channels and redrawn every step (p = 1: every cell updates). There is no
Sobel perception, alive mask or clipping: the update network sees the 3x3 neighbourhood through
its first conv (zero padding at the border).

The growth loop is a fixed-length `lax.scan` with `jax.checkpoint` on the step (trap T8), which
keeps the 1x1 convs' outputs (`REMAT_POLICY`). The non-doubling model draws a step count T per
batch; the scan always runs `max_steps` slots and slots t >= T leave the state unchanged (a
`lax.cond` that skips the update's compute), so T is a traced value and one compiled program
serves every T; the first `min_steps` slots, active for every T in the range, run without the
cond.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vnca.models.layers import conv

UpdateFn = Callable[[jax.Array], jax.Array]

# What the backward pass keeps of an NCA step instead of recomputing it: the outputs of its
# unbatched dots (the 1x1 convs on the flattened cells; Winograd's tile products are batched
# dots and are recomputed with the element-wise work). Same values as recomputing them; faster
# for the non-doubling step, a wash for the doubling one (docs/performance.md).
REMAT_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


class ResidualUpdate(nn.Module):
    """Doubling VNCA update: Conv3x3 C->h, 4 x Residual[Conv1x1, ELU, Conv1x1], Conv1x1 h->C.
    The 1x1 tower runs on the flattened cells (see `kernels.pointwise`)."""

    channels: int
    hidden: int
    n_blocks: int = 4
    conv_algorithm: str = "winograd"
    precision: str = "float32"

    @nn.compact
    def __call__(self, s_BxHxWxC: jax.Array) -> jax.Array:
        p = self.precision
        h = conv(self.hidden, 3, 9 * self.channels, padding=1, algorithm=self.conv_algorithm,
                 precision=p)(s_BxHxWxC)
        h_NxF = h.reshape(-1, self.hidden)
        for _ in range(self.n_blocks):
            r_NxF = nn.elu(conv(self.hidden, 1, self.hidden, precision=p)(h_NxF))
            h_NxF = h_NxF + conv(self.hidden, 1, self.hidden, precision=p)(r_NxF)
        out_NxC = conv(self.channels, 1, self.hidden, zero_init=True, precision=p)(h_NxF)
        return out_NxC.reshape(*s_BxHxWxC.shape[:-1], self.channels)


class SimpleUpdate(nn.Module):
    """Non-doubling VNCA update: Conv3x3 C->h, ELU, Conv1x1 h->C (zero-init, bias optional)."""

    channels: int
    hidden: int
    last_bias: bool = False
    conv_algorithm: str = "winograd"
    precision: str = "float32"

    @nn.compact
    def __call__(self, s_BxHxWxC: jax.Array) -> jax.Array:
        h = nn.elu(conv(self.hidden, 3, 9 * self.channels, padding=1,
                        algorithm=self.conv_algorithm, precision=self.precision)(s_BxHxWxC))
        out_NxC = conv(self.channels, 1, self.hidden, zero_init=True, use_bias=self.last_bias,
                       precision=self.precision)(h.reshape(-1, self.hidden))
        return out_NxC.reshape(*s_BxHxWxC.shape[:-1], self.channels)


def double(s_BxHxWxC: jax.Array) -> jax.Array:
    """Every cell becomes a 2x2 block of copies (nearest-neighbour upsampling)."""
    return jnp.repeat(jnp.repeat(s_BxHxWxC, 2, axis=1), 2, axis=2)


def nca_step(update: UpdateFn, s_BxHxWxC: jax.Array, key: jax.Array | None,
             update_prob: float) -> jax.Array:
    """One step s + m * f(s); with update_prob == 1 (static) no mask is drawn."""
    ds = update(s_BxHxWxC)
    if update_prob < 1.0:
        b, h, w, _ = s_BxHxWxC.shape
        m = jax.random.bernoulli(key, update_prob, (b, h, w, 1)).astype(ds.dtype)
        ds = ds * m
    return s_BxHxWxC + ds


def grow(update: UpdateFn, s_BxHxWxC: jax.Array, key: jax.Array, n_steps: jax.Array | int,
         max_steps: int, update_prob: float, remat: bool = True, record: bool = False,
         min_steps: int = 0):
    """Run `n_steps` (<= max_steps, may be traced) NCA steps in a fixed-length scan.

    `min_steps` is a static lower bound on a traced `n_steps` (the low end of its range): those
    first slots run without the `lax.cond` (whose operands XLA copies at every slot). Slot t
    uses the t-th of `max_steps` keys split from `key` whatever the bound.

    Returns the final state, and with `record` also every state after each slot, `TxBxHxWxC`
    (slots past n_steps repeat the final state).
    """
    static = isinstance(n_steps, int)
    n_sure = min(n_steps if static else min_steps, max_steps)

    def step(active_for_sure):
        def body(s, xs):
            t, k = xs
            if active_for_sure:
                s_next = nca_step(update, s, k, update_prob)
            else:  # an inactive slot skips the update's compute, forward and backward
                s_next = jax.lax.cond(t < n_steps, lambda s: nca_step(update, s, k, update_prob),
                                      lambda s: s, s)
            return s_next, (s_next if record else None)
        return jax.checkpoint(body, policy=REMAT_POLICY) if remat else body

    keys = jax.random.split(key, max_steps)
    slots = jnp.arange(max_steps)
    s, stages = s_BxHxWxC, []
    if n_sure > 0:
        s, st = jax.lax.scan(step(True), s, (slots[:n_sure], keys[:n_sure]))
        stages.append(st)
    if n_sure < max_steps:
        if static:  # slots past a static n_steps change nothing
            st = jnp.broadcast_to(s, (max_steps - n_sure, *s.shape)) if record else None
        else:
            s, st = jax.lax.scan(step(False), s, (slots[n_sure:], keys[n_sure:]))
        stages.append(st)
    if not record:
        return s
    return s, jnp.concatenate(stages, axis=0)


def random_square(key: jax.Array, b: int, h: int, w: int, size: int):
    """(top_B, left_B): a uniformly drawn position per row of a size x size square in h x w."""
    ky, kx = jax.random.split(key)
    return (jax.random.randint(ky, (b,), 0, h - size + 1),
            jax.random.randint(kx, (b,), 0, w - size + 1))


def damage_square(s_BxHxWxC: jax.Array, top_B: jax.Array, left_B: jax.Array, size: int,
                  rows_B: jax.Array | None = None) -> jax.Array:
    """Set a size x size square of cells (all channels) to zero at (top, left) per row (arrays
    [B], or scalars for every row); only rows where `rows_B` is true are damaged (all if
    None). Damage in training (`VAE.damage`: random positions) and in evaluation
    (`vnca.evaluation.damage`: the centred square) is this one function."""
    b, h, w, _ = s_BxHxWxC.shape
    top_B = jnp.broadcast_to(jnp.asarray(top_B), (b,))
    left_B = jnp.broadcast_to(jnp.asarray(left_B), (b,))
    ys, xs = jnp.arange(h), jnp.arange(w)
    in_y = (ys[None, :] >= top_B[:, None]) & (ys[None, :] < top_B[:, None] + size)
    in_x = (xs[None, :] >= left_B[:, None]) & (xs[None, :] < left_B[:, None] + size)
    hole_BxHxW = in_y[:, :, None] & in_x[:, None, :]
    if rows_B is not None:
        hole_BxHxW = hole_BxHxW & rows_B[:, None, None]
    return jnp.where(hole_BxHxW[..., None], 0.0, s_BxHxWxC)


def sample_n_steps(key: jax.Array, min_steps: int, max_steps: int, inclusive: bool) -> jax.Array:
    """T ~ uniform integer in [min, max] (inclusive, O's randint) or [min, max) (R, trap T6)."""
    return jax.random.randint(key, (), min_steps, max_steps + (1 if inclusive else 0))
