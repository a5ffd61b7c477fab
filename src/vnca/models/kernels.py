"""The arithmetic under the layers: conv algorithms and the precision policy.

Dimension letters: B batch, H/W grid, C input and F output channels, K/L kernel sides (in a
matmul, K is the contraction length), N rows of a matmul, P Winograd transform positions.

Every matmul and conv of the models goes through the three entries `conv`, `conv_transpose`
and `matmul`. They take the conv algorithm (`CONV_ALGORITHMS`; "auto" is resolved per backend
by `resolve_algorithm`) and the precision policy (`PRECISIONS`, applied here and nowhere else).
All algorithms compute the same convolution up to float32 rounding. On the CPU they are matrix
products, because XLA:CPU runs a conv's gradients inside a `lax.scan` through a naive loop.
docs/performance.md describes the algorithms and their measurements; docs/precision.md the
policy, how each op implements it, and its drift.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np

from vnca.config import Precision

CONV_ALGORITHMS = ("winograd", "im2col", "xla")
PRECISIONS = typing.get_args(Precision)  # ("float32", "bf16_operands")
# What `model.conv_algorithm: auto` means on each JAX platform: the matmul paths on the CPU
# (where they were measured fastest), the backend's own convolutions everywhere else (Winograd's
# transforms have never been checked under a TPU's reduced default matmul precision).
AUTO_ALGORITHM = {"cpu": "winograd"}
AUTO_OTHER = "xla"

Padding = int | tuple[tuple[int, int], tuple[int, int]]


def resolve_algorithm(algorithm: str, platform: str) -> str:
    """The algorithm `algorithm` names on `platform` ("cpu", "gpu", "tpu", ...)."""
    if algorithm != "auto":
        return algorithm
    return AUTO_ALGORITHM.get(platform, AUTO_OTHER)


# -- the entries ---------------------------------------------------------------------------------
def conv(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, stride: int = 1, padding: int = 0,
         algorithm: str = "winograd", precision: str = "float32") -> jax.Array:
    """Conv with symmetric zero padding: stride 1 by `conv_stride1`, a larger stride by XLA
    (algorithm "xla") or by im2col."""
    if stride == 1:
        return conv_stride1(x_BxHxWxC, w_KxKxCxF, padding, algorithm, precision)
    if algorithm == "xla":
        return xla_conv(x_BxHxWxC, w_KxKxCxF, stride, _pairs(padding), precision=precision)
    return conv_im2col(x_BxHxWxC, w_KxKxCxF, padding, stride, precision)


def conv_transpose(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, stride: int, torch_padding: int,
                   output_padding: int = 0, algorithm: str = "winograd",
                   precision: str = "float32") -> jax.Array:
    """`torch.nn.ConvTranspose2d(k, stride, padding, output_padding)`'s output size, computed as
    flax's `nn.ConvTranspose` computes it: a conv of the input dilated by the stride, the kernel
    not flipped. By XLA (algorithm "xla"); else, at a stride above 1, as s^2 phase convs of the
    undilated input (`conv_transpose_phases`); else by im2col of the dilated input."""
    k = w_KxKxCxF.shape[0]
    lo = k - 1 - torch_padding
    pad = ((lo, lo + output_padding), (lo, lo + output_padding))
    out = (x_BxHxWxC.shape[1] - 1) * stride + 1 + 2 * lo + output_padding - k + 1
    y = None
    if algorithm == "xla":  # the same conv, the dilation done by XLA
        y = xla_conv(x_BxHxWxC, w_KxKxCxF, 1, pad, stride, precision)
    elif stride > 1:
        y = conv_transpose_phases(x_BxHxWxC, w_KxKxCxF, stride, lo, out, precision)
    if y is None:
        y = conv_im2col(dilate(x_BxHxWxC, stride), w_KxKxCxF, pad, precision=precision)
    return y


def matmul(x_NxK: jax.Array, w_KxF: jax.Array, precision: str = "float32") -> jax.Array:
    """x @ w under the precision policy (float32 result); leading axes of x are flattened."""
    if precision == "float32":
        return jnp.dot(x_NxK, w_KxF)
    *lead, k = x_NxK.shape
    return _matmul_bf16(x_NxK.reshape(-1, k), w_KxF).reshape(*lead, w_KxF.shape[-1])


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
    # The kernel gradient (a contraction over N) is a float32 dot of the rounded values: XLA:CPU
    # runs that layout slower in bfloat16, and a product of two bfloat16 values is exact in
    # float32, so it is the same computation (docs/precision.md).
    dw = _dot_f32(x16.astype(jnp.float32), dy16.astype(jnp.float32), ((0,), (0,)))
    return _dot_f32(dy16, w16, ((1,), (1,))), dw


_matmul_bf16.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


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


# -- Winograd ------------------------------------------------------------------------------------
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
    of tile (i, j) is padded pixel (m i + r, m j + s)), then one matmul by the P x P transform
    (faster on XLA:CPU than the transform's sparse sums; docs/performance.md)."""
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


# -- im2col, phase convs and the stride-1 dispatch -----------------------------------------------
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
    """A 1x1 conv as a 2-D matmul over the flattened cells: on XLA:CPU the kernel gradient of a
    dot over the 4-D input (a contraction over B, H and W) is far slower (docs/performance.md)."""
    *lead, c = x_BxHxWxC.shape
    return matmul(x_BxHxWxC.reshape(-1, c), w_CxF, precision).reshape(*lead, w_CxF.shape[-1])


def conv_stride1(x_BxHxWxC: jax.Array, w_KxKxCxF: jax.Array, padding: int,
                 algorithm: str = "winograd", precision: str = "float32") -> jax.Array:
    """Stride-1 conv with symmetric zero padding by `algorithm` under `precision`: a 1x1 conv is
    `pointwise`; a 3x3 conv with padding 1 under "winograd" is F(4x4, 3x3) (F(2x2, 3x3) on grids
    not divisible by 4, im2col on odd ones), with the conv's operands rounded by the policy and
    the transforms in float32; "xla" is `xla_conv`; anything else im2col."""
    k = w_KxKxCxF.shape[0]
    if k == 1 and padding == 0:
        return pointwise(x_BxHxWxC, w_KxKxCxF[0, 0], precision)
    if algorithm == "xla":
        return xla_conv(x_BxHxWxC, w_KxKxCxF, 1, _pairs(padding), precision=precision)
    if algorithm == "winograd" and k == 3 and padding == 1:
        m = winograd_tile(*x_BxHxWxC.shape[1:3])
        if m is not None:
            return under_policy(lambda x, w: conv3x3_winograd(x, w, m), precision)(
                x_BxHxWxC, w_KxKxCxF)
    return conv_im2col(x_BxHxWxC, w_KxKxCxF, padding, precision=precision)
