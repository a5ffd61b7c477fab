"""Speed of the importance-weighted bound (K = 128) of the doubling VNCA at full size.

    .venv/bin/python bench/bench_iwelbo.py [--images 8] [--batch-sizes 1,2,8] [--k 128]

Scores `--images` test-like images with the library's batched bound (`vnca.evaluation.bound`,
remat off, as `vnca evaluate` runs it) after a warm-up batch that pays for compilation, once per
batch size, and prints images/s, seconds per 8 images and the ratio to the reproduction's code,
which took 376 s for 8 images of the doubling VNCA on the project's 2-core CPU in issue 17's run,
with the float32 matmul at 145-166 GFLOP/s (an earlier session: 276 s at 274-299); target >= 4x,
i.e. <= 94 s at that rate. Random parameters (PyTorch-style scale, the NCA's last layer included) cost the
same as trained ones. The load average is printed before and after: other processes on the
machine slow every figure down.

Measured on the 2-core dev CPU (load 1.7-1.9, matmul 274-299 GFLOP/s), 8 images in one batch,
chunks of 8 samples: 134.4 s per 8 images with `model.conv_algorithm=im2col` (2.05x the
reproduction), 101.0 s with the default Winograd conv (2.73x); the target 69 s is not met.
On 2026-12-01 the machine was slower. With the update net's 1x1 convs over the flattened cells,
the default took 122.3 s (matmul 151-165 GFLOP/s). That is 2.26x the 276 s measured at 274-299
GFLOP/s, and about 4.1x when that figure is scaled by the matmul rate; the scaling is an
estimate, since R's code was not rerun. An earlier run that day took 143.5 s (matmul 147-170
GFLOP/s) with the 1x1 tower split into groups of 2048 cells, an idea since dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vnca import config, configs
from vnca.evaluation import bound
from vnca.models import build_model, count_params

# R's time for 8 images in issue 17's run (float32 matmul at 145-166 GFLOP/s); an earlier
# session measured 276 s at 274-299. Compare at the matmul rate printed beside each figure.
REPRODUCTION_S_PER_8 = 376.0


def random_params(model, seed: int = 0, decoder_scale: float = 0.1) -> dict:
    """U(+-1/sqrt(fan_in)) for every layer, the NCA's ten times smaller (at full scale the
    40-step NCA's logits run away; the work is the same either way)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else s.shape[0]
        b = 1.0 / math.sqrt(fan_in) * (decoder_scale if path[0].key == "decoder" else 1.0)
        return jnp.asarray(rng.uniform(-b, b, s.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def conv_1x1_as_dot(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for flax's nn.Conv that computes a 1x1, stride-1, unpadded
    NHWC convolution as a dot over the channel axis (XLA's CPU dot is about twice as fast as its
    1x1 convolution); any other convolution is passed through."""
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if (rhs.shape[:-2] == (1, 1) and tuple(window_strides) == (1, 1)
            and all(tuple(p) == (0, 0) for p in padding) and feature_group_count == 1
            and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
            and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
            and dimension_numbers == nhwc):
        return jax.lax.dot_general(lhs, rhs[0, 0], (((lhs.ndim - 1,), (0,)), ((), ())),
                                   precision=precision)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)


def use_dot_for_1x1() -> None:
    """Make the NCA update nets' convolutions use `conv_1x1_as_dot` (the change proposed for
    `vnca.models.layers.conv`: pass it as nn.Conv's `conv_general_dilated`; parameter names,
    shapes and initialisation are unchanged, so are checkpoints)."""
    from vnca.models import layers, nca

    def conv(features, kernel, fan_in, *, stride=1, padding=0, zero_init=False, use_bias=True,
             name=None):
        bound = 1.0 / math.sqrt(fan_in)
        return layers.nn.Conv(
            features, (kernel, kernel), strides=(stride, stride),
            padding=((padding, padding), (padding, padding)), use_bias=use_bias,
            kernel_init=layers.nn.initializers.zeros if zero_init else layers._uniform(bound),
            bias_init=layers.nn.initializers.zeros if zero_init else layers._uniform(bound),
            name=name, conv_general_dilated=conv_1x1_as_dot,
        )

    nca.conv = conv


def matmul_gflops(n: int = 4096) -> float:
    """Throughput of one large float32 matmul now: the machine's ceiling, less other load."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    f(a).block_until_ready()
    return 2 * n**3 / (time.perf_counter() - t0) / 1e9


def decoder_flops(cfg) -> float:
    """FLOPs (2 x multiply-adds) of one doubling-VNCA decode."""
    m = cfg.model
    c, h = m.z_dim, m.nca_hidden
    per_cell = 9 * c * h + m.n_residual_blocks * 2 * h * h + h * c
    cells = sum((2 ** (i + 1)) ** 2 for i in range(m.n_doublings)) * m.steps_per_stage
    return 2.0 * per_cell * cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-sizes", default="1",
                    help="images per batch, comma-separated (each is timed separately)")
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=-1,
                    help="decode each image's K samples this many at a time (0: all at once; "
                    "default: the library's choice, bound.sample_chunk(K))")
    ap.add_argument("--dot-1x1", action="store_true",
                    help="measure the proposed 1x1-convolution-as-dot change (see use_dot_for_1x1)")
    ap.add_argument("--precision", default="float32", choices=["float32", "bf16_operands"],
                    help="model.precision (the precision policy of every matmul and conv)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="split the host CPU into this many JAX devices (each batch of images "
                    "is split across them); 0: JAX's default")
    args = ap.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.dot_1x1:
        use_dot_for_1x1()
    chunk = bound.sample_chunk(args.k) if args.chunk < 0 else (args.chunk or None)

    cfg = config.load([configs.path("doubling.yaml")])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=False,
                                                              precision=args.precision))
    model = build_model(cfg)
    params = random_params(model)
    rng = np.random.default_rng(0)
    x = np.zeros((args.images, 32, 32, 1), np.float32)
    x[:, 8:24, 11:21] = rng.random((args.images, 16, 10, 1)) < 0.5
    index = np.arange(args.images)
    key = jax.random.key(0)
    flops = decoder_flops(cfg) * args.k
    print(f"doubling VNCA, precision {args.precision}, z={cfg.model.z_dim}, "
          f"{count_params(params):,} parameters, "
          f"K={args.k}, {args.images} images; {jax.devices()[0].device_kind} x "
          f"{jax.device_count()}, {os.cpu_count()} CPUs")
    print(f"decoder work: {flops / 1e12:.2f} TFLOP per image, counted as a direct conv (the "
          "Winograd 3x3 conv, model.conv_algorithm, does fewer multiplications: GFLOP/s below "
          "are direct-conv equivalents)")
    print(f"load average before: {os.getloadavg()[0]:.2f}; 4096^2 float32 matmul now: "
          f"{matmul_gflops():.0f} GFLOP/s")
    for b in (int(s) for s in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        bound.iw_bound(model, params, x[:b], index[:b], key, args.k, b, progress=False,
                       chunk=chunk)
        warm = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        res = bound.iw_bound(model, params, x, index, key, args.k, b, progress=False,
                             chunk=chunk)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        per8 = dt / args.images * 8
        print(f"batch {b:2d} images ({b * args.k} decodes, chunk {chunk or args.k}): "
              f"warm-up {warm:6.1f} s; "
              f"{args.images / dt:.4f} images/s, {per8:6.1f} s per 8 images, "
              f"{flops * args.images / dt / 1e9:6.1f} GFLOP/s, CPU time {cpu / args.images:.1f} s "
              f"per image; "
              f"{REPRODUCTION_S_PER_8 / per8:.2f}x the reproduction (target 4x); "
              f"mean bound {np.mean(res['iw']):.2f} nats")
        print(f"load average now: {os.getloadavg()[0]:.2f}; matmul now: "
              f"{matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
