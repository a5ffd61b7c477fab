"""Time one training step per variant on the devices JAX sees (not a test; prints figures).

    python bench/bench_train_step.py                      # doubling, nondoubling, baseline
    python bench/bench_train_step.py --variants doubling --remat off --steps 3
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/bench_train_step.py

For each variant (its paper config at batch 32 unless --batch) it builds the real jitted train
step of `vnca.train` (same shardings, donation, optimizer, pool), then reports:

  compile_s      lowering + XLA compilation of the step
  s_per_step     mean wall time of --steps steps after --warmup steps (blocking on each)
  images_per_s   batch / s_per_step
  peak_mem_gb    device peak_bytes_in_use (GPU/TPU) or the process's peak RSS (CPU)
  tflop          FLOPs of one step from XLA's cost analysis of the step with every lax.scan
                 unrolled (the cost analysis counts a loop body once otherwise); with remat on
                 this includes the recomputed forward
  model_tflop    the same with remat off (forward + backward only)
  matmul_gflops  float32 NxN matmul throughput measured in the same process (before and after)
  floor_s        tflop / matmul rate: the step time at matmul speed
  pct_of_matmul  floor_s / s_per_step (100 % = every FLOP at matmul speed)

Non-doubling: `--nd-steps 36` (default) fixes the NCA step count T (min = max = 36, so the scan
has 36 slots), the setting quoted for the original code; `--nd-steps 0` uses the config's drawn
T in [32, 64] with its fixed-length 64-slot scan; then `tflop` counts all 64 slots (the cost
analysis counts a `lax.cond` branch as run although slots past T skip it), so floor_s and
pct_of_matmul are overstated. Each variant runs in a fresh subprocess so peak memory and compile
caches are its own; the load average is printed because the CPU may be shared.

Measured on the 2-core dev CPU (shared, load 1.3-1.9; float32 matmul 275-304 GFLOP/s in the
same runs; batch 32; seconds per step):
                     im2col NCA convs,     Winograd NCA convs    + encoder / baseline
                     XLA strided convs     (model.conv_algorithm)  convs as matmuls (now)
  doubling     remat on    18.8                 14.6                 14.2  (2.12 TFLOP, 2.5 GB)
               remat off   19.9                 15.8                       (7.5 GB)
  nondoubling  T = 36, on   8.9                  5.4                  4.5  (0.48 TFLOP, 2.3 GB)
               T = 36, off 10.1                  5.7
  baseline                  2.5                  2.6                  0.59 (0.05 TFLOP, 1.7 GB)
The TFLOP figures are XLA's count of the program it runs (Winograd: fewer multiplications; the
baseline's transposed convs multiply the zeros of the dilated input). Before the NCA convs became
matmuls (conv gradients inside lax.scan run through a naive loop on XLA:CPU): non-doubling
254 s/step at batch 8, doubling more than 290 s/step at batch 8.

The machine got slower: on 2026-12-01 the same matmul ran at 147-197 GFLOP/s, so compare runs
only as ratios to references measured alongside. `--vs-original` then times the original's
PyTorch step (`bench_reference_torch.py`) of the NCA variants and prints original / ours.
Measured on 2026-12-01 (load 1.6-2.0, matmul 172-197 GFLOP/s, batch 32, s/step, one run each):
                     the original    before the 1x1 convs ran    now
                     (PyTorch)       on flattened cells (6b97b29)
  doubling             30.2              19.4 (63 %)              15.5-15.7 (73-75 %): 1.94x O
  nondoubling T = 36    6.17              6.3 (42 %)               5.0-5.2 (50-51 %):   1.20x O
  baseline                                                          0.67 (39 %)
Issue 4's targets as speed-ups over the original: 2.1x for both (not met). Issue 17's, with
`--set model.precision=bf16_operands` too: 2.5x (doubling) and 2x (non-doubling); the run of
bench/speed_all.sh on 2026-12-02 (docs/precision.md) measured 1.59x / 2.08x (float32 / bf16)
and 1.12x / 1.24x, not met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import emit

ROOT = Path(__file__).resolve().parents[1]
# Issue 17's targets as speed-ups over the original PyTorch step on the same CPU.
ORIGINAL_SPEEDUP_TARGET = {"doubling": 2.5, "nondoubling": 2.0}


def _matmul_gflops(n: int = 4096, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _step_flops(model, cfg, state, x, key) -> float:
    """FLOPs of one train step from the unoptimised HLO with every scan unrolled."""
    import jax

    from vnca import train

    real_scan = jax.lax.scan

    def unrolled_scan(f, init, xs=None, length=None, **kw):
        kw["unroll"] = True
        return real_scan(f, init, xs, length, **kw)

    jax.lax.scan = unrolled_scan
    try:
        lowered = jax.jit(train.make_train_step(model, cfg)).lower(state, x, key)
    finally:
        jax.lax.scan = real_scan
    return float(lowered.cost_analysis()["flops"])


def _peak_mem_gb() -> float:
    import resource

    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return max(d.memory_stats()["peak_bytes_in_use"] for d in jax.local_devices()) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def run_one(variant: str, batch: int, steps: int, warmup: int, remat: str, nd_steps: int,
            extra: list[str], tier: str = "paper") -> dict:
    import dataclasses

    import jax
    import numpy as np

    from vnca import config, configs, distributed, train
    from vnca.models import build_model

    overrides = [f"train.batch_size={batch}"] + extra
    if remat != "config":
        overrides.append(f"model.remat={'true' if remat == 'on' else 'false'}")
    if variant == "nondoubling" and nd_steps > 0:
        overrides += [f"model.min_steps={nd_steps}", f"model.max_steps={nd_steps}",
                      "model.steps_inclusive=true"]
    files = [configs.path(f"{variant}.yaml")]
    if tier != "paper":  # the tier's overlay (its widths and step counts; batch from --batch)
        files.append(configs.path(f"{tier}/{variant}.yaml"))
    cfg = config.load(files, overrides)
    model = build_model(cfg)
    mesh = distributed.make_mesh()
    train.check_batch(cfg, mesh.devices.size)
    mm_before = _matmul_gflops()
    _, _, init_fn, step_fn = train.programs(model, cfg, mesh)
    state = init_fn(jax.random.key(0))
    from vnca.data import pad_images

    rs = np.random.default_rng(0)
    x_host = pad_images((rs.random((batch, 28, 28)) > 0.8).astype(np.uint8), cfg.data.pad_to)
    x = jax.device_put(x_host, distributed.batch_sharded(mesh))
    key = jax.random.key(1)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, x, key).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = compiled(state, x, key)
        jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, x, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    peak = _peak_mem_gb()
    mm_after = _matmul_gflops()

    abstract_state = jax.eval_shape(lambda k: train.init_state(model, cfg, k), key)
    flops = _step_flops(model, cfg, abstract_state, x, key)
    cfg_off = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=False))
    model_flops = _step_flops(build_model(cfg_off), cfg_off, abstract_state, x, key)
    s_per_step = float(np.mean(times))
    mm = max(mm_before, mm_after)
    floor = flops / (mm * 1e9)
    return {
        "variant": variant, "tier": tier, "precision": cfg.model.precision, "batch": batch,
        "remat": cfg.model.remat,
        "nca_steps": (f"{cfg.model.min_steps}-{cfg.model.max_steps}"
                      if variant == "nondoubling" else None),
        "devices": distributed.hardware_string(), "compile_s": round(compile_s, 2),
        "s_per_step": round(s_per_step, 3), "step_times": [round(t, 3) for t in times],
        "images_per_s": round(batch / s_per_step, 2), "peak_mem_gb": round(peak, 2),
        "tflop": round(flops / 1e12, 4), "model_tflop": round(model_flops / 1e12, 4),
        "matmul_gflops": [round(mm_before, 1), round(mm_after, 1)],
        "floor_s": round(floor, 3), "pct_of_matmul": round(100 * floor / s_per_step, 1),
        "loss_finite": bool(np.isfinite(float(m["loss"]))),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["doubling", "nondoubling", "baseline"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--remat", choices=["config", "on", "off"], default="config")
    p.add_argument("--nd-steps", type=int, default=36,
                   help="non-doubling NCA steps T (0: the config's drawn T)")
    p.add_argument("--tier", choices=["paper", "cpu", "demo"], default="paper",
                   help="layer configs/TIER/VARIANT.yaml on the paper config (default: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--json", help="append one JSON line per variant to this file")
    p.add_argument("--inline", action="store_true",
                   help="run in this process (default: one subprocess per variant)")
    p.add_argument("--vs-original", action="store_true",
                   help="then time the original PyTorch step (bench_reference_torch.py; needs "
                        "torch==2.13.0) of the NCA variants and print the speed-up")
    args = p.parse_args(argv)
    if args.vs_original and args.nd_steps == 0:
        p.error("--vs-original needs a fixed --nd-steps (the original's step count is fixed)")
    if args.vs_original and not args.json:
        fd, args.json = tempfile.mkstemp(suffix=".jsonl")
        os.close(fd)
    if not args.inline:
        print(f"load average at start: {os.getloadavg()}", flush=True)
    for v in args.variants:
        if args.inline:
            res = run_one(v, args.batch, args.steps, args.warmup, args.remat, args.nd_steps,
                          args.overrides, args.tier)
        else:
            cmd = [sys.executable, __file__, "--inline", "--variants", v, "--batch",
                   str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--remat", args.remat, "--nd-steps", str(args.nd_steps), "--tier", args.tier]
            for o in args.overrides:
                cmd += ["--set", o]
            if args.json:
                cmd += ["--json", args.json]
            subprocess.run(cmd, check=True)
            continue
        emit(res, args.json, lambda r: (
            f"{r['variant']:12s} {r['tier']} {r['precision']} batch {r['batch']}, remat "
            f"{r['remat']}: compile "
            f"{r['compile_s']} s, {r['s_per_step']} s/step, {r['images_per_s']} img/s, peak "
            f"{r['peak_mem_gb']} GB, {r['tflop']} TFLOP/step (model {r['model_tflop']}), matmul "
            f"{max(r['matmul_gflops'])} GFLOP/s -> floor {r['floor_s']} s "
            f"({r['pct_of_matmul']} % of matmul peak)"))
    if not args.inline:
        print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.vs_original and not args.inline:
        return _vs_original(args)
    return 0


def _vs_original(args) -> int:
    """Time the original's step for the NCA variants just timed (same process order, same
    machine, minutes apart) and print original / ours per variant."""
    nca = [v for v in args.variants if v in ORIGINAL_SPEEDUP_TARGET]
    if not nca:
        return 0
    grid = 32 if "data.pad_to=32" in args.overrides else 28  # the non-doubling grid we timed
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_reference_torch.py"),
                    "--variants", *nca, "--batch", str(args.batch), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--nd-steps", str(args.nd_steps),
                    "--nd-grid", str(grid), "--json", args.json], check=True)
    rows = [json.loads(line) for line in Path(args.json).read_text().splitlines() if line]
    for v in nca:
        ours = [r for r in rows if r["variant"] == v and "impl" not in r]
        orig = [r for r in rows if r["variant"] == v and r.get("impl") == "torch-reference"]
        if ours and orig:
            o, t = orig[-1]["s_per_step"], ours[-1]["s_per_step"]
            print(f"{v:12s} original (PyTorch) {o} s/step, ours {t} s/step: {o / t:.2f}x "
                  f"faster (target {ORIGINAL_SPEEDUP_TARGET[v]}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
