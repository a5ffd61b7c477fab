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

Every matmul and conv of the models goes through this module, so the precision policy
(`PRECISIONS`, config `model.precision`) is applied here and nowhere else:
- "float32": float32 operands at the backend's default matmul precision (on a TPU that is
  itself one bfloat16 pass; on NVIDIA Ampere and later, TF32).
- "bf16_operands": the operands of every matmul and conv are rounded to bfloat16 and the
  products accumulate in float32 (`preferred_element_type`), forward and backward (custom VJPs:
  autodiff of a cast dot would promote the backward dots to float32). Parameters, optimizer
  state, the NCA state, activations and losses stay float32. This is what a TPU computes for a
  float32 matmul at JAX's default precision, stated explicitly so that every backend computes
  the same thing. XLA:CPU ignores the dot algorithm preset `BF16_BF16_F32` (a float32 dot with
  it gave float32's rate and float32's error here), so the operands are cast; with AVX-512 BF16
  a 4096^2 bfloat16 dot with float32 accumulation ran at 3-4x the float32 rate.
  How each op gets there is chosen per op for speed, always the same numbers: the products of
  bfloat16 values are exact in float32, so a float32 dot of the rounded values computes the
  policy too. Winograd rounds the conv's operands and runs its transforms and channel products
  in float32: rounding the transformed tiles instead put a 2.7 % RMS relative error on a 3x3
  conv (F(4x4, 3x3)'s factors up to 8 amplify it; F(2x2, 3x3): 0.4 %, im2col: 0.24 %), and
  XLA:CPU's batched bfloat16 channel products were no faster (docs/precision.md).
"""

from __future__ import annotations

import functools
import math
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vnca.config import Precision

CONV_ALGORITHMS = ("winograd", "im2col", "xla")
PRECISIONS = typing.get_args(Precision)  # ("float32", "bf16_operands")
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


# -- the precision policy ------------------------------------------------------------------------
def _bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16)


def _dot_f32(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """`lax.dot_general` accumulating (and returning) float32 whatever the operand types."""
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul_bf16(x_NxK: jax.Array, w_KxF: jax.Array) -> jax.Array:
    return _dot_f32(_bf16(x_NxK), _bf16(w_KxF), ((1,), (0,)))


def _matmul_bf16_fwd(x_NxK, w_KxF):
    x16, w16 = _bf16(x_NxK), _bf16(w_KxF)   # the residuals are half the size, too
    return _dot_f32(x16, w16, ((1,), (0,))), (x16, w16)


def _matmul_bf16_bwd(residuals, dy_NxF):
    x16, w16 = residuals
    dy16 = _bf16(dy_NxF)
    # The kernel gradient contracts over N, a layout XLA:CPU's bfloat16 dot runs at 0.6x the
    # float32 rate (a 32768 x 256 x 256 dot: 107 against 180 GFLOP/s, while the forward and input
    # gradient dots ran 2.2-2.6x faster in bfloat16); a product of two bfloat16 values is exact
    # in float32, so the float32 dot of the rounded values is the same computation.
    dw = _dot_f32(x16.astype(jnp.float32), dy16.astype(jnp.float32), ((0,), (0,)))
    return _dot_f32(dy16, w16, ((1,), (1,))), dw


_matmul_bf16.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


def matmul(x_NxK: jax.Array, w_KxF: jax.Array, precision: str = "float32") -> jax.Array:
    """x @ w under the precision policy (float32 result); leading axes of x are flattened."""
    if precision == "float32":
        return jnp.dot(x_NxK, w_KxF)
    *lead, k = x_NxK.shape
    return _matmul_bf16(x_NxK.reshape(-1, k), w_KxF).reshape(*lead, w_KxF.shape[-1])


def xla_conv(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, stride: int, padding,
             lhs_dilation: int = 1, precision: str = "float32") -> jax.Array:
    """XLA's convolution under the policy. With bfloat16 operands the gradients are autodiff's
    of the same conv on the rounded operands with a rounded output gradient, so every
    product is of bfloat16 values and the policy's numbers are the same as the matmul paths';
    on GPU and TPU (the only backends "xla" is meant for) XLA runs those passes at the
    backend's reduced precision anyway."""
    def conv_f32(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, lhs_dilation=(lhs_dilation, lhs_dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return under_policy(conv_f32, precision)(x_BxHxWxC, w_KxKxCxF)


def _round(x: jax.Array) -> jax.Array:
    return _bf16(x).astype(x.dtype)


def under_policy(f, precision: str):
    """A conv f(x, w) under the policy: unchanged in float32; under bf16_operands with x, w and
    the output gradient rounded to bfloat16 (values in float32 arrays, where a product of two
    of them is exact, so float32 arithmetic computes the policy's numbers)."""
    if precision == "float32":
        return f

    @jax.custom_vjp
    def g(x, w):
        return f(_round(x), _round(w))

    def fwd(x, w):
        xr, wr = _round(x), _round(w)
        y, vjp = jax.vjp(f, xr, wr)
        return y, vjp

    def bwd(vjp, dy):
        return vjp(_round(dy))

    g.defvjp(fwd, bwd)
    return g

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


def conv_im2col(x_BxHxWxC: jax.Array, w_KxLxCxF: jax.Array, padding: Padding,
                stride: int = 1, precision: str = "float32") -> jax.Array:
    """Conv with zero padding (one int, or (lo, hi) per spatial axis) as one matmul over the
    k*l shifted (and, with a stride, subsampled) copies of the input (a k x l kernel)."""
    k, l, c, f = w_KxLxCxF.shape
    _, h, w, _ = x_BxHxWxC.shape
    (top, bottom), (left, right) = _pairs(padding)
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = (h + top + bottom - k) // stride + 1, (w + left + right - l) // stride + 1
    cols = jnp.concatenate([xp[:, i:i + stride * (ho - 1) + 1:stride,
                               j:j + stride * (wo - 1) + 1:stride, :]
                            for i in range(k) for j in range(l)], axis=-1)   # B x Ho x Wo x k*l*C
    return matmul(cols, w_KxLxCxF.reshape(k * l * c, f), precision)


def conv_transpose_phases(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, stride: int, lo: int,
                          out_size: int, precision: str = "float32") -> jax.Array | None:
    """The conv of the input dilated by `stride` and padded by `lo` before (a transposed conv,
    the kernel not flipped), `out_size` square, without multiplying the dilation's zeros: output
    row o = s m + r (phase r) only meets the kernel taps t = t0, t0 + s, ... with
    t0 = (lo - r) mod s, at input rows m + d, d = (r + t - lo) / s. So each of the s^2 phases is
    a stride-1 conv of the undilated input with a sub-kernel (3x3, 3x2, 2x3, 2x2 for a 5x5
    kernel at stride 2), 1/s^2 of the multiplications, and the phases interleave into the
    output. None when the phases have unequal sizes (`out_size` not a multiple of s)."""
    s, k = stride, w_KxKxCxF.shape[0]
    n, n_out = x_BxHxWxC.shape[1], out_size // stride
    if out_size % s or x_BxHxWxC.shape[2] != n:
        return None
    phases = []
    for r in range(s):
        t0 = (lo - r) % s
        taps = len(range(t0, k, s))
        d0 = (r + t0 - lo) // s                       # input offset of the first tap
        before, after = -d0, n_out - 1 + d0 + taps - 1 - (n - 1)
        if before < 0 or after < 0:
            return None
        phases.append((t0, (before, after)))
    rows = []
    for t0r, padr in phases:
        cols = [conv_im2col(x_BxHxWxC, w_KxKxCxF[t0r::s, t0c::s], (padr, padc),
                            precision=precision) for t0c, padc in phases]
        rows.append(jnp.stack(cols, axis=3))        # B x n x n x s(col phase) x F
    y = jnp.stack(rows, axis=2)                       # B x n x s(row phase) x n x s x F
    b, f = x_BxHxWxC.shape[0], w_KxKxCxF.shape[-1]
    return y.reshape(b, n_out * s, n_out * s, f)


def dilate(x_BxHxWxC: jax.Array, stride: int) -> jax.Array:
    """stride - 1 zeros between neighbouring cells (a transposed conv's input dilation)."""
    no = (0, 0, 0)
    return jax.lax.pad(x_BxHxWxC, jnp.zeros((), x_BxHxWxC.dtype),
                       (no, (0, 0, stride - 1), (0, 0, stride - 1), no))


def pointwise(x_BxHxWxC: jax.Array, w_CxF: jax.Array, precision: str = "float32") -> jax.Array:
    """A 1x1 conv as a 2-D matmul over the flattened cells. On XLA:CPU the kernel gradient of a
    dot over a 4-D input (a contraction over B, H and W) is far slower than over its 2-D
    reshape: a doubling NCA step at 32x32, batch 32, forward and backward took 2.06 s against
    1.41 s; whole training steps at batch 32, in the same run, 19.4 s against 15.5 s
    (doubling) and 6.3 s against 5.0 s (non-doubling)."""
    *lead, c = x_BxHxWxC.shape
    return matmul(x_BxHxWxC.reshape(-1, c), w_CxF, precision).reshape(*lead, w_CxF.shape[-1])


def conv_stride1(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, padding: int,
                 algorithm: str = "winograd", precision: str = "float32") -> jax.Array:
    """Stride-1 conv with symmetric zero padding by `algorithm` under `precision` (see the
    module docstring)."""
    k = w_KxKxCxF.shape[0]
    if k == 1 and padding == 0:  # a matmul over the flattened cells (see `pointwise`)
        return pointwise(x_BxHxWxC, w_KxKxCxF[0, 0], precision)
    if algorithm == "xla":
        return xla_conv(x_BxHxWxC, w_KxKxCxF, 1, _pairs(padding), precision=precision)
    if algorithm == "winograd" and k == 3 and padding == 1:
        m = winograd_tile(*x_BxHxWxC.shape[1:3])
        if m is not None:
            return under_policy(lambda x, w: conv3x3_winograd(x, w, m), precision)(
                x_BxHxWxC, w_KxKxCxF)
    return conv_im2col(x_BxHxWxC, w_KxKxCxF, padding, precision=precision)


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
    precision: str = "float32"

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else _uniform(1.0 / math.sqrt(self.fan_in))
        k, c = self.kernel, x_BxHxWxC.shape[-1]
        w_KxKxCxF = self.param("kernel", init, (k, k, c, self.features))
        if self.stride == 1:
            y = conv_stride1(x_BxHxWxC, w_KxKxCxF, self.padding, self.algorithm, self.precision)
        elif self.algorithm == "xla":
            y = xla_conv(x_BxHxWxC, w_KxKxCxF, self.stride, _pairs(self.padding),
                         precision=self.precision)
        else:
            y = conv_im2col(x_BxHxWxC, w_KxKxCxF, self.padding, self.stride, self.precision)
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
    as flax's `nn.ConvTranspose` computes it (a conv of the input dilated by the stride, the
    kernel not flipped), by matmuls: at a stride above 1 as s^2 phase convs of the undilated
    input (`conv_transpose_phases`; the dilated input's im2col multiplied its zeros too, 4x the
    work at stride 2), else by im2col; 10x faster than XLA:CPU's transposed conv and its
    gradients. Same parameters, names and initial values as `nn.ConvTranspose`."""

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
        lo = k - 1 - self.torch_padding
        pad = ((lo, lo + self.output_padding), (lo, lo + self.output_padding))
        out = (x_BxHxWxC.shape[1] - 1) * self.stride + 1 + 2 * lo + self.output_padding - k + 1
        y = None
        if self.algorithm == "xla":  # the same conv, the dilation done by XLA
            y = xla_conv(x_BxHxWxC, w_KxKxCxF, 1, pad, self.stride, self.precision)
        elif self.stride > 1:
            y = conv_transpose_phases(x_BxHxWxC, w_KxKxCxF, self.stride, lo, out,
                                      self.precision)
        if y is None:
            y = conv_im2col(dilate(x_BxHxWxC, self.stride), w_KxKxCxF, pad,
                            precision=self.precision)
        return y + self.param("bias", init, (self.features,))


def conv_transpose(features: int, kernel: int, *, stride: int, torch_padding: int,
                   output_padding: int = 0, algorithm: str = "winograd",
                   precision: str = "float32", name: str | None = None) -> ConvTranspose:
    """Same output size as torch.nn.ConvTranspose2d(k, stride, padding, output_padding)."""
    return ConvTranspose(features, kernel, stride, torch_padding, output_padding, algorithm,
                         precision, name=name)


class Dense(nn.Module):
    """`nn.Dense` with PyTorch's initialisation, under the precision policy (same parameter
    names, shapes and initial values as `nn.Dense` with those initialisers)."""

    features: int
    fan_in: int
    precision: str = "float32"

    @nn.compact
    def __call__(self, x_BxK: jax.Array) -> jax.Array:
        init = _uniform(1.0 / math.sqrt(self.fan_in))
        kernel = self.param("kernel", init, (x_BxK.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return matmul(x_BxK, kernel, self.precision) + bias


def dense(features: int, fan_in: int, precision: str = "float32",
          name: str | None = None) -> Dense:
    return Dense(features, fan_in, precision, name=name)
