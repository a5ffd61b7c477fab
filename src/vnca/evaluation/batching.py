"""The host loop every batched measurement shares: rows in fixed-size batches, the last padded.

Dimension letters: N rows, B rows in a batch.

    map_padded(fn, arrays, batch_size) -> fn's outputs for all N rows

calls `fn(i, *batch_i)` on consecutive `batch_size` rows of `arrays` (numpy, the same N), with
the last batch padded to `batch_size` by copies of its last row, so one compiled program serves
every batch. Its outputs (an array or a pytree of arrays whose leading axis is the batch) come
back to the host as numpy, the padding rows are dropped, and the batches are concatenated.

`fn` gets the batch number `i` so that it can derive a key per batch (`fold_in(key, i)`); a
measurement with one key per image passes the images' indices as one of `arrays` instead, and
its numbers do not depend on the batch size. Batch i + 1 is dispatched before batch i is fetched,
so the device is not idle while the host converts a result; at most two batches' outputs are
alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm


def padded_rows(start: int, batch_size: int, n: int) -> np.ndarray:
    """Row numbers of the batch starting at `start`: `batch_size` of them, those past the end
    repeating the last row (N - 1)."""
    return np.arange(start, start + batch_size).clip(max=n - 1)


def map_padded(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int,
               progress: bool = False, desc: str = "batch"):
    """`fn(i, *batch_i)` over every `batch_size` rows of `arrays`, concatenated on the host
    with the padding dropped; None when there are no rows."""
    n = len(arrays[0])
    parts, pending = [], None
    for i, start in enumerate(tqdm(range(0, n, batch_size), desc=desc, unit="batch",
                                   disable=not progress, leave=False)):
        rows = padded_rows(start, batch_size, n)
        out = fn(i, *(a[rows] for a in arrays))  # dispatched; the fetch below overlaps it
        if pending is not None:
            parts.append(_fetch(*pending))
        pending = out, min(batch_size, n - start)
    if pending is not None:
        parts.append(_fetch(*pending))
    if not parts:
        return None
    return jax.tree_util.tree_map(lambda *p: np.concatenate(p), *parts)


def _fetch(out, n_real: int):
    """`out` on the host without its padding rows: every leaf cut to the batch's real rows
    (a leaf `fn` already cut shorter is kept whole)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n_real], jax.device_get(out))
