"""bench/accelerator_check.py at tiny size on the CPU: every variant measured, a curve, JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerator_check_runs_at_tiny_size(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, "bench/accelerator_check.py", "--tiny", "--steps", "1",
                        "--iw-batches", "1", "--curve-steps", "4", "--curve-every", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["backend"] == "cpu" and res["tiny"] is True
    assert [v["variant"] for v in res["variants"]] == ["baseline", "doubling", "nondoubling"]
    for v in res["variants"]:
        assert v["conv_algorithm"] == "winograd"  # auto, resolved on the CPU
        assert v["step_s"] > 0 and v["iw_images_per_s"] > 0 and v["loss_finite"]
        assert abs(v["hours_per_100k_steps"] - v["step_s"] * 100_000 / 3600) < 1e-9
        assert f"{v['variant']:12s}" in r.stdout
    assert [p["step"] for p in res["doubling_curve"]] == [2, 4]
    assert all(p["loss"] > 0 for p in res["doubling_curve"])
