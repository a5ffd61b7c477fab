"""Time one training step of the original PyTorch VNCA models on CPU (not a test; prints figures).

    python -m pip install torch==2.13.0 && python bench/bench_reference_torch.py
    python bench/bench_reference_torch.py --variants nondoubling --nd-steps 36 --nd-grid 32

This is the same-run reference for bench/bench_train_step.py: run both on the same machine in
the same session and quote the ratio of their s_per_step, not either number alone (the dev CPU
is shared, so absolute times move with the load). torch is deliberately not a dependency of
the project (pyproject.toml); install exactly torch==2.13.0 (the CPU wheel) by hand as above.

The models re-implement the architecture of the original code (github.com/rasmusbergpalm/vnca,
"O") from its description, written here from scratch:

  encoder (both)  5x5 convs, padding 2, ELU after each: 1->32 (stride 1), 32->64, 64->128,
                  128->256, 256->512 (stride 2 each: 32x32 -> 2x2), flatten (2048), Linear
                  2048 -> 2z (mean, log-std; q's scale = exp(log-std))
  doubling        z = 256; update net Conv3x3 z->256, 4 x [x + Conv1x1(ELU(Conv1x1(x)))],
                  Conv1x1 256->z zero-initialised; s <- s + f(s); seed z on a 2x2 grid, 8 steps,
                  then 4 x [nearest-neighbour doubling, 8 steps] (2->32, 40 steps);
                  6,585,088 parameters
  non-doubling    z = 128; update net Conv3x3 128->128, ELU, Conv1x1 128->128 (no bias,
                  zero-initialised); seed z in every cell of the grid (--nd-grid: 28, O's
                  unpadded grid and configs/nondoubling.yaml's, which bench_train_step.py
                  uses; the encoder's first conv then pads by 4, as O's); fixed T = --nd-steps (36)
                  steps of s <- s + m * f(s), m ~ Bernoulli(0.5) per cell and step;
                  5,042,304 parameters. O's sample pool is left out: it only swaps rows of the
                  batch between steps and adds no compute to a step.

Every NCA step runs under torch.utils.checkpoint (as O does; use_reentrant=False). One step =
forward (one reparameterised latent sample), loss = -mean_batch[sum_pixels Bernoulli
log-lik(logits = channel 0 of the final state) - KL(q || N(0, I))], backward,
clip_grad_norm_ (10.0 doubling, 1.0 non-doubling), Adam(lr 1e-4) step. Input: the same random
binary 28x28 images as bench/bench_train_step.py (numpy default_rng(0), p = 0.2 ones),
zero-padded to the grid. Threads: torch.set_num_threads(os.cpu_count()) (on the 2-core dev CPU
that equals torch's default). Per variant it prints one JSON line and one readable line:

  s_per_step     mean wall time of --steps steps after --warmup steps
  images_per_s   batch / s_per_step
  matmul_gflops  float32 4096x4096 torch matmul, best of 5, before and after the steps

Measured on 2026-12-01 on the 2-core dev CPU (load 1.6-2.0, nothing else running; torch
2.13.0+cpu, 2 threads; batch 32, 1 warm-up + 2 timed steps), just before bench_train_step.py in
the same run:
  doubling      30.2 s/step (1.06 img/s; steps 30.6, 29.9 s), torch matmul 162-183 GFLOP/s
  nondoubling    6.17 s/step (5.19 img/s; steps 6.15, 6.18 s), 28x28 grid, T = 36, matmul
                184-188 GFLOP/s
  (16.7 s/step on a 32x32 grid, and 85.5 s for doubling, in an earlier run that shared the two
  cores with another benchmark: two processes on two cores slow torch's threads down far more
  than the load suggests.)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchlib import emit
from torch import nn
from torch.utils.checkpoint import checkpoint

EXPECTED_PARAMS = {"doubling": 6_585_088, "nondoubling": 5_042_304}


def _matmul_gflops(n: int = 4096, reps: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32)
    with torch.no_grad():
        a @ a
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class Encoder(nn.Module):
    def __init__(self, z: int, grid: int = 32):
        super().__init__()
        chans = [1, 32, 64, 128, 256, 512]
        first_pad = 2 + (32 - grid) // 2  # O: padding 4 on a 28x28 input, so 32x32 inside
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 5, stride=1 if i == 0 else 2, padding=first_pad if i == 0 else 2)
            for i, (cin, cout) in enumerate(itertools.pairwise(chans))
        )
        self.head = nn.Linear(512 * 2 * 2, 2 * z)

    def forward(self, x):
        for conv in self.convs:
            x = F.elu(conv(x))
        mean, log_std = self.head(x.flatten(1)).chunk(2, dim=1)
        return mean, log_std


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(F.elu(self.a(x)))


def _zero_init(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class VNCA(nn.Module):
    """Encoder + NCA decoder; `doubling` picks the variant."""

    def __init__(self, doubling: bool, grid: int = 32, nd_steps: int = 36):
        super().__init__()
        self.doubling = doubling
        self.grid = grid
        self.nd_steps = nd_steps
        self.z = z = 256 if doubling else 128
        self.encoder = Encoder(z, grid)
        if doubling:
            self.update = nn.Sequential(
                nn.Conv2d(z, 256, 3, padding=1),
                *[Residual(256) for _ in range(4)],
                _zero_init(nn.Conv2d(256, z, 1)),
            )
        else:
            self.update = nn.Sequential(
                nn.Conv2d(z, 128, 3, padding=1),
                nn.ELU(),
                _zero_init(nn.Conv2d(128, z, 1, bias=False)),
            )

    def _step(self, s):
        return s + self.update(s)

    def _stochastic_step(self, s):
        # drawn inside the checkpointed function; the checkpoint restores the RNG state so the
        # recomputation sees the same mask
        mask = (torch.rand(s.shape[0], 1, s.shape[2], s.shape[3]) < 0.5).to(s.dtype)
        return s + mask * self.update(s)

    def decode(self, zs):
        b = zs.shape[0]
        if self.doubling:
            s = zs.view(b, self.z, 1, 1).expand(b, self.z, 2, 2).contiguous()
            for stage in range(5):
                if stage > 0:
                    s = s.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
                for _ in range(8):
                    s = checkpoint(self._step, s, use_reentrant=False)
        else:
            g = self.grid
            s = zs.view(b, self.z, 1, 1).expand(b, self.z, g, g).contiguous()
            for _ in range(self.nd_steps):
                s = checkpoint(self._stochastic_step, s, use_reentrant=False)
        return s

    def loss(self, x):
        mean, log_std = self.encoder(x)
        std = log_std.exp()
        zs = mean + std * torch.randn_like(std)
        logits = self.decode(zs)[:, :1]
        log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
        kl = (0.5 * (mean**2 + std**2 - 1.0) - log_std).sum(1)
        return -(log_lik - kl).mean()


def _images(batch: int, grid: int) -> torch.Tensor:
    rs = np.random.default_rng(0)
    x = (rs.random((batch, 28, 28)) > 0.8).astype(np.float32)
    lo = (grid - 28) // 2
    out = np.zeros((batch, 1, grid, grid), np.float32)
    out[:, 0, lo:lo + 28, lo:lo + 28] = x
    return torch.from_numpy(out)


def run_one(variant: str, batch: int, steps: int, warmup: int, nd_steps: int,
            nd_grid: int) -> dict:
    doubling = variant == "doubling"
    grid = 32 if doubling else nd_grid
    torch.manual_seed(0)
    model = VNCA(doubling, grid=grid, nd_steps=nd_steps)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == EXPECTED_PARAMS[variant], (variant, n_params)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    clip = 10.0 if doubling else 1.0
    x = _images(batch, grid)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return float(loss.detach())

    mm_before = _matmul_gflops()
    warm_times, times = [], []
    for _ in range(warmup):
        t0 = time.perf_counter()
        loss = step()
        warm_times.append(time.perf_counter() - t0)
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    mm_after = _matmul_gflops()
    s_per_step = float(np.mean(times))
    return {
        "variant": variant, "impl": "torch-reference", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "batch": batch, "grid": grid,
        "nca_steps": 40 if doubling else nd_steps, "n_params": n_params,
        "s_per_step": round(s_per_step, 3), "step_times": [round(t, 3) for t in times],
        "warmup_times": [round(t, 3) for t in warm_times],
        "images_per_s": round(batch / s_per_step, 2),
        "matmul_gflops": [round(mm_before, 1), round(mm_after, 1)],
        "loss_finite": bool(np.isfinite(loss)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["doubling", "nondoubling"],
                   choices=["doubling", "nondoubling"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--nd-steps", type=int, default=36, help="non-doubling NCA steps T")
    p.add_argument("--nd-grid", type=int, default=28,
                   help="non-doubling grid side: 28 (O, unpadded, as configs/nondoubling.yaml) "
                        "or 32 (R)")
    p.add_argument("--json", help="append one JSON line per variant to this file")
    args = p.parse_args(argv)
    if args.nd_grid not in (28, 32):
        p.error("--nd-grid must be 28 (O) or 32 (R)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for v in args.variants:
        res = run_one(v, args.batch, args.steps, args.warmup, args.nd_steps, args.nd_grid)
        emit(res, args.json, lambda r: (
            f"{r['variant']:12s} torch {r['torch']} ({r['threads']} threads), batch "
            f"{r['batch']}, {r['grid']}x{r['grid']} grid, {r['nca_steps']} NCA steps: "
            f"{r['s_per_step']} s/step, {r['images_per_s']} img/s, matmul "
            f"{max(r['matmul_gflops'])} GFLOP/s, load {r['load_avg']}"))
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
