"""Validation curves of training runs under each precision policy, side by side (a figure and a
table; not a test).

    python bench/precision_curves.py --runs runs/precision --out docs/precision-curves.png

`--runs` holds one `vnca train` output folder per variant and policy, named VARIANT-POLICY
(e.g. doubling-float32, doubling-bf16_operands), as made by

    for v in doubling nondoubling baseline; do for p in float32 bf16_operands; do
      vnca train --config configs/$v.yaml --config configs/demo/$v.yaml --data D \\
        --out runs/precision/$v-$p --set model.precision=$p --set train.val_every=100
    done; done

Each panel plots one variant's validation ELBO (nats per image, from metrics.jsonl) against the
step for every policy found; the table gives the last validation ELBO, the mean of the last
three.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

VARIANTS = ("baseline", "doubling", "nondoubling")
POLICIES = ("float32", "bf16_operands")


def curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [(r["step"], r["val_elbo"]) for r in rows if "val_elbo" in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/precision")
    p.add_argument("--out", default="docs/precision-curves.png")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    fig = Figure(figsize=(12, 3.6), dpi=110)
    print("| variant | policy | last val. ELBO | mean of last 3 | steps |\n|---|---|---|---|---|")
    for i, v in enumerate(VARIANTS):
        ax = fig.add_subplot(1, len(VARIANTS), i + 1)
        for policy, style in zip(POLICIES, ("-", "--")):
            run = runs / f"{v}-{policy}"
            if not (run / "metrics.jsonl").is_file():
                continue
            pts = curve(run)
            if not pts:
                continue
            steps, vals = zip(*pts)
            ax.plot(steps, vals, style, marker="o", ms=3, label=policy)
            last3 = sum(vals[-3:]) / len(vals[-3:])
            print(f"| {v} | {policy} | {vals[-1]:.1f} | {last3:.1f} | {steps[-1]} |")
        ax.set_title(f"{v} (demo tier)")
        ax.set_xlabel("training step")
        if i == 0:
            ax.set_ylabel("validation ELBO (nats per image)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(args.out)
    print(f"figure written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
