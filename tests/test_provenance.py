"""The code commit a training summary records."""

import subprocess
from pathlib import Path

from vnca.provenance import source_commit

ROOT = Path(__file__).resolve().parents[1]


def test_the_image_commit_wins(monkeypatch):
    monkeypatch.setenv("VNCA_GIT_COMMIT", "abc123")
    assert source_commit() == "abc123"


def test_a_checkout_gives_its_head_and_says_when_it_is_dirty(monkeypatch):
    monkeypatch.delenv("VNCA_GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True,
                           check=False).stdout.strip()
    assert len(head) == 40
    assert source_commit() == head + ("+dirty" if dirty else "")
