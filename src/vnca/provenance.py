"""Which code made a result: the git commit, recorded in every training summary."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def source_commit() -> str | None:
    """`$VNCA_GIT_COMMIT` (the images set it), else the commit of the git checkout this package
    runs from, with "+dirty" when tracked files differ from it; None when neither is known."""
    env = os.environ.get("VNCA_GIT_COMMIT")
    if env and env != "unknown":
        return env
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                               timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}+dirty" if dirty else commit
