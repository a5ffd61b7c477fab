"""Atomic file writes: the one way this project writes a file that another step reads.

A file is written under a temporary sibling name (hidden, same suffix, so writers that pick a
format by suffix, such as `np.savez` and `savefig`, still work) and renamed onto its name only
when the write finished; a failed or interrupted write leaves the old file, or none, and no
temporary behind. Files get the umask's modes like any other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes `path` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
