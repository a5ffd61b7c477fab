"""Named random keys: one root key per run, split once by purpose.

Every random draw of a run descends from `jax.random.key(seed)` through exactly one of these
purposes, so no key is used for two things, and a step's randomness is `fold_in(key, step)`
(the same on any number of devices and after a resume).
"""

from __future__ import annotations

import jax

# The order is part of the reproducibility contract: appending a purpose keeps the others.
PURPOSES = ("init", "data", "train", "valid", "eval")


def named_keys(seed: int) -> dict[str, jax.Array]:
    """{'init', 'data', 'train', 'valid', 'eval'} -> distinct keys split from key(seed)."""
    keys = jax.random.split(jax.random.key(seed), len(PURPOSES))
    return {name: keys[i] for i, name in enumerate(PURPOSES)}
