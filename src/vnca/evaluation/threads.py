"""How many threads scikit-learn's native code may use: one setting, read here only.

`$VNCA_SKLEARN_THREADS` (a positive integer), when set, is the limit of every scikit-learn call
of the evaluation (t-SNE, the k-nearest-neighbour vote, the digit classifier's fit). When it is
unset each call keeps its own default: 1 for the OpenMP code whose threads spin on a machine
shared with other work (t-SNE, nearest neighbours), 2 for the classifier's BLAS.
docs/performance.md has the measurements behind the defaults.
"""

from __future__ import annotations

import os

from vnca.errors import ConfigError

ENV_VAR = "VNCA_SKLEARN_THREADS"


def sklearn_threads(default: int) -> int:
    """`$VNCA_SKLEARN_THREADS` as a positive integer, or `default` when it is unset or empty."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"${ENV_VAR}={raw!r}: expected a positive number of threads")
    return n


def limit(default: int):
    """A context manager limiting native thread pools (OpenMP, BLAS) to `sklearn_threads`."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(sklearn_threads(default))
