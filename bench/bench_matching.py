"""Benchmark: label matching of all 70,000 binarized images (target: <= 60 s on 2 cores).

    .venv/bin/python bench/bench_matching.py [--raw-dir ../shared/data] [--chunk 512] [--k 16]

Prints the time to read + verify the raw files, the time of each matching group (top-k scoring
and the one-to-one assignment separately), the total, and the load average before and after
and the CPU time (the machine is shared: a busy machine inflates the wall time; CPU time over
both cores is the less load-sensitive figure).

Measured on the 2-core dev CPU at load 1.6 (nothing else running): read + verify 1.35 s;
train+valid 26.9 s scoring + 0.9 s assignment, test 1.7 s; total 29.5 s wall, 56.2 s CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from vnca.data import matching, raw
from vnca.data.prepare import GROUPS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data"))
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    a = p.parse_args()
    print(f"cores: {os.cpu_count()}  load average before: {os.getloadavg()}")
    t0 = time.perf_counter()
    data = raw.read_raw(a.raw_dir)
    print(f"read + sha256 of 7 files: {time.perf_counter() - t0:.2f} s")
    total, cpu0 = 0.0, time.process_time()
    for group, (splits, ref_split) in GROUPS.items():
        x = np.concatenate([data.binarized[s] for s in splits])
        t1 = time.perf_counter()
        ref = matching.prepare_reference(data.mnist_x[ref_split], data.mnist_y[ref_split])
        idx, ll, _ = matching.topk_candidates(x, ref, k=a.k, chunk=a.chunk,
                                              desc=f"{group} vs MNIST {ref_split}")
        t2 = time.perf_counter()
        assigned, _, unresolved = matching.assign_one_to_one(idx, ll, len(ref.labels_N))
        t3 = time.perf_counter()
        total += t3 - t1
        print(f"{group:12s} {len(x):6d} x {len(ref.labels_N):6d}: top-{a.k} scoring "
              f"{t2 - t1:6.2f} s, assignment {t3 - t2:5.2f} s "
              f"({int((assigned != idx[:, 0]).sum())} rows changed, "
              f"{int(unresolved.sum())} unresolved)")
    cpu = time.process_time() - cpu0
    print(f"total matching of {sum(len(v) for v in data.binarized.values())} images: "
          f"{total:.2f} s wall (target <= 60 s); {cpu:.2f} s CPU over all threads")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
