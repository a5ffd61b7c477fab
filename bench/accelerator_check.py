"""The first accelerator hour, prepared: one command for a machine with a GPU or TPU.

    python bench/accelerator_check.py [--out check.json]        # paper size, <= 8 minutes
    python bench/accelerator_check.py --tiny                     # smoke size, any CPU (tests)

On every device JAX sees (the data-parallel mesh `vnca train` uses) and with `model.conv_algorithm:
auto` resolved for that backend, it prints per variant (paper configs, paper batch sizes):
compile time, seconds per training step, images/s, wall time per 100,000 steps, peak device
memory, and the importance-weighted bound's images/s at K = eval.iw_samples (128); then a short
doubling training curve on the bundled sample (loss every few steps), until the time budget is
spent. Steps run on random binary images (the step's cost does not depend on the pixels); the
curve runs on real digits. Results: one JSON object (`--out`) and a readable table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

VARIANTS = ("baseline", "doubling", "nondoubling")


def _config(variant: str, tiny: bool):
    from vnca import config, configs
    from vnca.models.vae import resolve_backend

    files = [configs.path(f"{variant}.yaml")] + ([configs.path("smoke.yaml")] if tiny else [])
    cfg = resolve_backend(config.load(files), jax.devices()[0].platform)
    n_dev = len(jax.devices())  # the batch must divide over the devices
    b = max(cfg.train.batch_size - cfg.train.batch_size % n_dev, n_dev)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=b))


def _peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _block(tree) -> None:
    jax.block_until_ready(tree)


def measure_variant(variant: str, tiny: bool, steps: int, iw_batches: int) -> dict:
    """Step time, images/s, memory and the bound's images/s of one variant at its config size."""
    from vnca import distributed, train
    from vnca.data import pad_images
    from vnca.models import build_model

    cfg = _config(variant, tiny)
    devices = jax.devices()
    b = cfg.train.batch_size
    mesh = distributed.make_mesh(devices)
    model = build_model(cfg)
    _, _, init_fn, step_fn = train.programs(model, cfg, mesh)
    rows = distributed.batch_sharded(mesh)
    rs = np.random.default_rng(0)
    n = cfg.data.pad_to

    def batch(size: int):  # 28x28 digits-like noise, zero-padded as the data is
        x = (rs.random((size, 28, 28)) < 0.15).astype(np.uint8)
        return jax.device_put(pad_images(x, n), rows)

    keys = jax.random.split(jax.random.key(0), 2)
    state = init_fn(keys[0])
    t0 = time.perf_counter()
    state, m = step_fn(state, batch(b), keys[1])
    _block(m)
    compile_s = time.perf_counter() - t0
    state, m = step_fn(state, batch(b), keys[1])  # a second warm-up step
    _block(m)
    xs = [batch(b) for _ in range(steps)]
    t0 = time.perf_counter()
    for x in xs:
        state, m = step_fn(state, x, keys[1])
    _block(m)
    step_s = (time.perf_counter() - t0) / steps

    k = cfg.eval.iw_samples
    eval_fn = train.eval_program(model, k, mesh)
    per_call = len(devices)
    x = batch(per_call)
    index = jax.device_put(np.arange(per_call, dtype=np.int32), rows)  # the images' indices
    _block(eval_fn(state["params"], x, index, keys[1]))  # compile
    t0 = time.perf_counter()
    for i in range(iw_batches):
        out = eval_fn(state["params"], x, index, jax.random.fold_in(keys[1], i))
    _block(out)
    iw_s = (time.perf_counter() - t0) / iw_batches
    return {
        "variant": variant, "conv_algorithm": cfg.model.conv_algorithm, "batch_size": b,
        "compile_s": compile_s, "step_s": step_s, "images_per_s": b / step_s,
        "hours_per_100k_steps": step_s * 100_000 / 3600, "peak_memory_gib": _peak_memory_gib(),
        "iw_k": k, "iw_images_per_s": per_call / iw_s,
        "loss_finite": bool(np.isfinite(float(m["loss"]))),
    }


def doubling_curve(tiny: bool, budget_s: float, max_steps: int, every: int) -> list[dict]:
    """Train the doubling VNCA on the bundled sample until `budget_s` or `max_steps`."""
    from vnca import distributed, train
    from vnca.data import pad_images
    from vnca.data.bundled_source import read_bundled

    cfg = _config("doubling", tiny)
    devices = jax.devices()
    b = cfg.train.batch_size
    images = read_bundled().binarized["train"].reshape(-1, 28, 28)
    mesh = distributed.make_mesh(devices)
    from vnca.models import build_model

    model = build_model(cfg)
    _, _, init_fn, step_fn = train.programs(model, cfg, mesh)
    rows = distributed.batch_sharded(mesh)
    keys = jax.random.split(jax.random.key(1), 2)
    state = init_fn(keys[0])
    order = np.random.default_rng(0).permutation(len(images))
    curve, losses, t0 = [], [], time.perf_counter()
    for s in range(max_steps):
        idx = order[(np.arange(b) + s * b) % len(images)]
        x = jax.device_put(pad_images(images[idx], cfg.data.pad_to), rows)
        state, m = step_fn(state, x, keys[1])
        losses.append(m["loss"])
        if (s + 1) % every == 0:
            curve.append({"step": s + 1, "loss": float(np.mean(jax.device_get(losses))),
                          "elapsed_s": time.perf_counter() - t0})
            losses = []
            print(f"  doubling step {s + 1}: loss {curve[-1]['loss']:.1f} "
                  f"({curve[-1]['elapsed_s']:.0f} s)", flush=True)
            if time.perf_counter() - t0 > budget_s:
                break
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke-size configs (CPU, tests)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--iw-batches", type=int, default=3, help="timed IW-bound calls per variant")
    p.add_argument("--curve-budget-s", type=float, default=150.0,
                   help="seconds for the doubling training curve")
    p.add_argument("--curve-steps", type=int, default=2000, help="at most this many curve steps")
    p.add_argument("--curve-every", type=int, default=50, help="a curve point every N steps")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    devices = jax.devices()
    result = {"backend": devices[0].platform, "device_kind": devices[0].device_kind,
              "n_devices": len(devices), "jax": jax.__version__, "tiny": args.tiny,
              "variants": []}
    print(f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), jax "
          f"{jax.__version__}", flush=True)
    for variant in VARIANTS:
        r = measure_variant(variant, args.tiny, args.steps, args.iw_batches)
        result["variants"].append(r)
        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
        print(f"{variant:12s} {r['conv_algorithm']:8s} batch {r['batch_size']:4d}: "
              f"compile {r['compile_s']:.1f} s, {r['step_s'] * 1e3:.1f} ms/step, "
              f"{r['images_per_s']:.0f} img/s, {r['hours_per_100k_steps']:.2f} h per 100k "
              f"steps, peak {mem}; IW bound K={r['iw_k']}: {r['iw_images_per_s']:.1f} img/s",
              flush=True)
    print("doubling training curve (bundled sample):", flush=True)
    result["doubling_curve"] = doubling_curve(args.tiny, args.curve_budget_s, args.curve_steps,
                                              args.curve_every)
    result["total_s"] = time.perf_counter() - t_start
    print(f"total {result['total_s']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
