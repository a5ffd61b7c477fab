"""The tree is ruff clean: `python -m ruff check .` from the repository root, with the settings
of pyproject.toml ([tool.ruff]; ruff's version is pinned in the dev extra). A failure prints
ruff's findings; `python -m ruff check --fix .` fixes the ones marked [*]."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"
