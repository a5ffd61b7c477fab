"""Named random keys: one root key per run, split once by purpose.

Every random draw of a run descends from `jax.random.key(seed)` through exactly one of these
purposes, so no key is used for two things, and a step's randomness is `fold_in(key, step)`
(the same on any number of devices and after a resume).
"""

from __future__ import annotations

import jax

# The order is part of the reproducibility contract: appending a purpose keeps the others.
# Training splits `key(train.seed)` into these ("eval" is unused; kept for the order).
PURPOSES = ("init", "data", "train", "valid", "eval")
# Evaluation splits `key(eval.seed)` into these (`vnca.evaluate`), so that changing how a model
# is evaluated never touches its training and one measurement's draws never shift another's.
EVAL_PURPOSES = ("shuffle", "iwelbo", "samples", "reconstructions", "growth", "damage", "probe",
                 "interpolation")


def named_keys(seed: int, purposes: tuple[str, ...] = PURPOSES) -> dict[str, jax.Array]:
    """{purpose: key}: distinct keys split from key(seed), one per purpose, in order."""
    keys = jax.random.split(jax.random.key(seed), len(purposes))
    return {name: keys[i] for i, name in enumerate(purposes)}
