"""Layer constructors with PyTorch's default initialisation (both O and R use it).

PyTorch initialises conv and linear weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
For a transposed conv, PyTorch's fan_in is out_channels * kh * kw (from its weight layout).

Stride-1 convs (every conv of the NCA update networks) are computed as matrix products
(`Conv`): XLA:CPU compiles the gradient convolutions of a conv inside a `lax.scan` (the backward
loop of the NCA) to a layout that falls back to a naive loop, 25-60x slower than a matmul of the
same size; a dot in a loop is fast on every backend. A 3x3 conv with padding 1 is computed by
one of three algorithms (`CONV_ALGORITHMS`, config `model.conv_algorithm`), all the same
convolution up to float32 rounding:
- "winograd": Winograd's minimal filtering F(4x4, 3x3) (F(2x2, 3x3) on grids not divisible by
  4, im2col on odd ones): 36 channel matmuls per 6x6 input tile give its 4x4 output tile, 2.25
  multiplications per output and channel pair against the direct conv's 9; the backward pass
  (a custom VJP) is Winograd too.
- "im2col": one matmul over the 9 shifted copies of the input.
- "xla": `lax.conv_general_dilated` (for accelerators; slow inside a scan on XLA:CPU); with it,
  the encoder's strided and the baseline's transposed convs are XLA convolutions too.
- "auto" (the default): "winograd" on the CPU, "xla" on GPU and TPU (`resolve_algorithm`),
  resolved once when a run starts and recorded in its resolved config.
The parameter tree (`Conv_i/kernel` of shape (k, k, in, out), `Conv_i/bias`) is that of
`nn.Conv` whatever the algorithm, so checkpoints move between them. The encoder's strided convs
and the baseline's transposed convs are im2col matmuls under the other algorithms (`Conv`,
`ConvTranspose`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_ALGORITHMS = ("winograd", "im2col", "xla")
# What `model.conv_algorithm: auto` means on each JAX platform: today's matmul paths where
# they were measured fastest (the CPU), the backend's own convolutions everywhere else (TPU
# and GPU compilers tile convs for their matrix units; Winograd's transforms with factors up to
# 8 and 1/24 have never been checked under a TPU's reduced default matmul precision).
AUTO_ALGORITHM = {"cpu": "winograd"}
AUTO_OTHER = "xla"


def resolve_algorithm(algorithm: str, platform: str) -> str:
    """The algorithm `algorithm` names on `platform` ("cpu", "gpu", "tpu", ...)."""
    if algorithm != "auto":
        return algorithm
    return AUTO_ALGORITHM.get(platform, AUTO_OTHER)

# Winograd F(m x m, 3 x 3) (Lavin & Gray 2016): Y = A^T [(G w G^T) * (B^T d B)] A over
# (m + 2) x (m + 2) input tiles d that overlap by 2, interpolation points 0, +-1, (+-2,) inf.
_WINOGRAD = {
    2: {"BT": [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        "G": [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        "AT": [[1, 1, 1, 0], [0, 1, -1, -1]]},
    4: {"BT": [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        "G": [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        "AT": [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]]},
}


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def winograd_tile(h: int, w: int) -> int | None:
    """Output tile m of the Winograd algorithm used on an h x w grid (None: im2col instead)."""
    return next((m for m in (4, 2) if h % m == 0 and w % m == 0), None)


def _kron(m: int, name: str) -> np.ndarray:
    """The 2-D transform X -> M X M^T of a tile, as one matrix on the flattened tile."""
    mat = np.asarray(_WINOGRAD[m][name], np.float32)
    return np.kron(mat, mat)


def _input_tiles(x_BxHxWxC: jax.Array, m: int) -> jax.Array:
    """B^T d B of every (m + 2)-square tile d of the zero-padded input, `PxNxC` with P = (m + 2)^2
    transform positions and N = B * (H / m) * (W / m) tiles: the P strided views (offset (r, s)
    of tile (i, j) is padded pixel (m i + r, m j + s)), then one matmul by the P x P transform.
    On XLA:CPU this beats the transform's sparse sums, which XLA fuses into each of the P
    outputs (a non-doubling training step at batch 32: 5.1 s against 6.7 s)."""
    b, h, w, c = x_BxHxWxC.shape
    a, nh, nw = m + 2, h // m, w // m
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = jnp.stack([xp[:, r:r + m * (nh - 1) + 1:m, q:q + m * (nw - 1) + 1:m]
                       for r in range(a) for q in range(a)])
    v = jnp.dot(jnp.asarray(_kron(m, "BT")), views.reshape(a * a, -1))
    return v.reshape(a * a, b * nh * nw, c)


def _kernel_tiles(w_3x3xCxF: jax.Array, m: int) -> jax.Array:
    """G w G^T, `PxCxF`."""
    g = jnp.asarray(_WINOGRAD[m]["G"], w_3x3xCxF.dtype)
    a, (_, _, c, f) = m + 2, w_3x3xCxF.shape
    return jnp.einsum("pi,ijcf,qj->pqcf", g, w_3x3xCxF, g).reshape(a * a, c, f)


def _output_tiles(prod_PxNxF: jax.Array, b: int, h: int, w: int, m: int) -> jax.Array:
    """A^T M A of every tile, assembled into the `BxHxWxF` output."""
    a, f = m + 2, prod_PxNxF.shape[-1]
    y = jnp.dot(jnp.asarray(_kron(m, "AT")), prod_PxNxF.reshape(a * a, -1))
    y = y.reshape(m, m, b, h // m, w // m, f)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, f)   # (m, m, B, nh, nw, F) -> BxHxWxF


def _output_tiles_transposed(dy_BxHxWxF: jax.Array, m: int) -> jax.Array:
    """The transpose of `_output_tiles`: A dY A^T of every m-square output tile, `PxNxF`."""
    b, h, w, f = dy_BxHxWxF.shape
    tiles = dy_BxHxWxF.reshape(b, h // m, m, w // m, m, f).transpose(2, 4, 0, 1, 3, 5)
    dm = jnp.dot(jnp.asarray(_kron(m, "AT")).T, tiles.reshape(m * m, -1))
    return dm.reshape((m + 2) ** 2, -1, f)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_winograd(x_BxHxWxC: jax.Array, w_3x3xCxF: jax.Array, m: int) -> jax.Array:
    """3x3 conv, zero padding 1, stride 1, by Winograd F(m x m, 3 x 3); H and W divisible by m.

    The backward pass is Winograd too (a custom VJP; autodiff of the tile slicing would build
    dozens of zero-padded copies of the input): the input gradient is the same conv of the
    output gradient with the flipped kernel, and the kernel gradient is G^T (V^T dM) G with V the
    input tiles and dM the transposed output transform of the output gradient.
    """
    b, h, w, _ = x_BxHxWxC.shape
    prod = jnp.einsum("pnc,pcf->pnf", _input_tiles(x_BxHxWxC, m), _kernel_tiles(w_3x3xCxF, m))
    return _output_tiles(prod, b, h, w, m)


def _winograd_fwd(x_BxHxWxC, w_3x3xCxF, m):
    return conv3x3_winograd(x_BxHxWxC, w_3x3xCxF, m), (x_BxHxWxC, w_3x3xCxF)


def _winograd_bwd(m, residuals, dy_BxHxWxF):
    x_BxHxWxC, w_3x3xCxF = residuals
    dx = conv3x3_winograd(dy_BxHxWxF, jnp.flip(w_3x3xCxF, (0, 1)).transpose(0, 1, 3, 2), m)
    du_PxCxF = jnp.einsum("pnc,pnf->pcf", _input_tiles(x_BxHxWxC, m),
                          _output_tiles_transposed(dy_BxHxWxF, m))
    a, (_, _, c, f) = m + 2, w_3x3xCxF.shape
    g = jnp.asarray(_WINOGRAD[m]["G"], w_3x3xCxF.dtype)
    dw = jnp.einsum("pi,pqcf,qj->ijcf", g, du_PxCxF.reshape(a, a, c, f), g)
    return dx, dw


conv3x3_winograd.defvjp(_winograd_fwd, _winograd_bwd)


Padding = int | tuple[tuple[int, int], tuple[int, int]]


def _pairs(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding


def conv_im2col(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, padding: Padding,
                stride: int = 1) -> jax.Array:
    """Conv with zero padding (one int, or (lo, hi) per spatial axis) as one matmul over the
    k*k shifted (and, with a stride, subsampled) copies of the input."""
    k, _, c, f = w_KxKxCxF.shape
    _, h, w, _ = x_BxHxWxC.shape
    (top, bottom), (left, right) = _pairs(padding)
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1
    cols = jnp.concatenate([xp[:, i:i + stride * (ho - 1) + 1:stride,
                               j:j + stride * (wo - 1) + 1:stride, :]
                            for i in range(k) for j in range(k)], axis=-1)   # B x Ho x Wo x k*k*C
    return jnp.dot(cols, w_KxKxCxF.reshape(k * k * c, f))


def dilate(x_BxHxWxC: jax.Array, stride: int) -> jax.Array:
    """stride - 1 zeros between neighbouring cells (a transposed conv's input dilation)."""
    no = (0, 0, 0)
    return jax.lax.pad(x_BxHxWxC, jnp.zeros((), x_BxHxWxC.dtype),
                       (no, (0, 0, stride - 1), (0, 0, stride - 1), no))


def pointwise(x_BxHxWxC: jax.Array, w_CxF: jax.Array) -> jax.Array:
    """A 1x1 conv as a 2-D matmul over the flattened cells. On XLA:CPU the kernel gradient of a
    dot over a 4-D input (a contraction over B, H and W) is far slower than over its 2-D
    reshape: a doubling NCA step at 32x32, batch 32, forward and backward took 2.06 s against
    1.41 s; whole training steps at batch 32, in the same run, 19.4 s against 15.5 s
    (doubling) and 6.3 s against 5.0 s (non-doubling)."""
    *lead, c = x_BxHxWxC.shape
    return jnp.dot(x_BxHxWxC.reshape(-1, c), w_CxF).reshape(*lead, w_CxF.shape[-1])


def conv_stride1(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, padding: int,
                 algorithm: str = "winograd") -> jax.Array:
    """Stride-1 conv with symmetric zero padding by `algorithm` (see the module docstring)."""
    k = w_KxKxCxF.shape[0]
    if k == 1 and padding == 0:  # a matmul over the flattened cells (see `pointwise`)
        return pointwise(x_BxHxWxC, w_KxKxCxF[0, 0])
    if algorithm == "xla":
        return jax.lax.conv_general_dilated(
            x_BxHxWxC, w_KxKxCxF, (1, 1), ((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if algorithm == "winograd" and k == 3 and padding == 1:
        m = winograd_tile(*x_BxHxWxC.shape[1:3])
        if m is not None:
            return conv3x3_winograd(x_BxHxWxC, w_KxKxCxF, m)
    return conv_im2col(x_BxHxWxC, w_KxKxCxF, padding)


class Conv(nn.Module):
    """Conv with symmetric zero padding as matrix products: stride 1 by `conv_stride1` (a 1x1
    conv is a plain matmul), a larger stride by im2col (with XLA:CPU's own strided convs the
    encoder's forward and backward pass at batch 32 took 0.70 s, as matmuls 0.076 s). Same
    parameters, names and initial values as `nn.Conv` (the class is named Conv for that)."""

    features: int
    kernel: int
    fan_in: int
    padding: int = 0
    zero_init: bool = False
    use_bias: bool = True
    algorithm: str = "winograd"
    stride: int = 1

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else _uniform(1.0 / math.sqrt(self.fan_in))
        k, c = self.kernel, x_BxHxWxC.shape[-1]
        w_KxKxCxF = self.param("kernel", init, (k, k, c, self.features))
        if self.stride == 1:
            y = conv_stride1(x_BxHxWxC, w_KxKxCxF, self.padding, self.algorithm)
        elif self.algorithm == "xla":
            y = jax.lax.conv_general_dilated(
                x_BxHxWxC, w_KxKxCxF, (self.stride, self.stride), _pairs(self.padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            y = conv_im2col(x_BxHxWxC, w_KxKxCxF, self.padding, self.stride)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


def conv(features: int, kernel: int, fan_in: int, *, stride: int = 1, padding: int = 0,
         zero_init: bool = False, use_bias: bool = True, algorithm: str = "winograd",
         name: str | None = None) -> nn.Module:
    return Conv(features, kernel, fan_in, padding, zero_init, use_bias, algorithm, stride,
                name=name)


class ConvTranspose(nn.Module):
    """`torch.nn.ConvTranspose2d(k, stride, padding, output_padding)`'s output size, computed
    as flax's `nn.ConvTranspose` computes it (a conv of the input dilated by the stride, the
    kernel not flipped) but by im2col over the dilated input: 4x the multiplications at stride 2
    (the inserted zeros), and still 10x faster than XLA:CPU's transposed conv and its gradients.
    Same parameters, names and initial values as `nn.ConvTranspose`."""

    features: int
    kernel: int
    stride: int
    torch_padding: int
    output_padding: int = 0
    algorithm: str = "winograd"

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        k, c = self.kernel, x_BxHxWxC.shape[-1]
        init = _uniform(1.0 / math.sqrt(self.features * k * k))  # PyTorch's fan_in for ConvT
        w_KxKxCxF = self.param("kernel", init, (k, k, c, self.features))
        lo = k - 1 - self.torch_padding
        pad = ((lo, lo + self.output_padding), (lo, lo + self.output_padding))
        if self.algorithm == "xla":  # the same conv, the dilation done by XLA
            y = jax.lax.conv_general_dilated(
                x_BxHxWxC, w_KxKxCxF, (1, 1), pad, lhs_dilation=(self.stride, self.stride),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            y = conv_im2col(dilate(x_BxHxWxC, self.stride), w_KxKxCxF, pad)
        return y + self.param("bias", init, (self.features,))


def conv_transpose(features: int, kernel: int, *, stride: int, torch_padding: int,
                   output_padding: int = 0, algorithm: str = "winograd",
                   name: str | None = None) -> ConvTranspose:
    """Same output size as torch.nn.ConvTranspose2d(k, stride, padding, output_padding)."""
    return ConvTranspose(features, kernel, stride, torch_padding, output_padding, algorithm,
                         name=name)


def dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Dense(features, kernel_init=_uniform(bound), bias_init=_uniform(bound), name=name)
