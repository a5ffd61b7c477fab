#!/usr/bin/env bash
# The four speed rows of issue 17 in one run, each precision policy, with the original's
# PyTorch step (bench_reference_torch.py, needs torch==2.13.0) as the same-run reference and
# the float32 matmul rate beside every figure (not a test; minutes to tens of minutes).
#
#   bench/speed_all.sh [OUT.jsonl]          # default: runs/bench/speed-<date>.jsonl
#
# Rows: doubling train step (batch 32), non-doubling train step (T = 36, 28x28, batch 32),
# baseline train step (batch 32), IW bound (K = 128, 8 images, doubling). The reproduction's
# code (R) cannot run here; its figures (baseline step 2.96 s, bound 376 s per 8 images, at a
# float32 matmul of 145-166 GFLOP/s) are compared after scaling by the matmul rate measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench/speed-$(date +%Y%m%d-%H%M).jsonl}
mkdir -p "$(dirname "$out")"
echo "writing $out; load average $(cut -d' ' -f1-3 /proc/loadavg)"
python bench/bench_reference_torch.py --variants doubling nondoubling --batch 32 --steps 2 \
    --warmup 1 --nd-steps 36 --nd-grid 28 --json "$out"
for precision in float32 bf16_operands; do
  python bench/bench_train_step.py --variants doubling nondoubling baseline --batch 32 \
      --steps 2 --warmup 1 --nd-steps 36 --set "model.precision=$precision" --json "$out"
done
for precision in float32 bf16_operands; do   # the demo tier's steps (vnca run-local's models)
  python bench/bench_train_step.py --variants doubling nondoubling baseline --tier demo \
      --batch 16 --steps 5 --warmup 2 --nd-steps 0 --set "model.precision=$precision" --json "$out"
done
for precision in float32 bf16_operands; do
  python bench/bench_iwelbo.py --images 8 --batch-sizes 8 --precision "$precision" \
      | tee -a "${out%.jsonl}-iwelbo.txt"
done
python bench/bench_reference_torch.py --variants doubling nondoubling --batch 32 --steps 2 \
    --warmup 1 --nd-steps 36 --nd-grid 28 --json "$out"
echo "done; load average $(cut -d' ' -f1-3 /proc/loadavg)"
