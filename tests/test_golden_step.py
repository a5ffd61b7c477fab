"""Golden one-step values per variant (as nanodo pins its first steps): the loss, the gradient
norm and a checksum (sum of |p|) of the parameters after one training step from a fixed seed
on a fixed batch, at smoke size. A change to initialisation, key splitting, the model's maths or
the optimizer moves these; if the change is intended, update the numbers in the same commit
and say why."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnca import config, train
from vnca.models import build_model
from vnca.models.vae import resolve_backend

# variant: (loss, gradient norm, sum of |params| after the step); measured with jax 0.10.2 on
# XLA:CPU (conv_algorithm auto -> winograd).
GOLDEN = {
    "baseline": (477.2769775390625, 944.607666015625, 67608.28125),
    "doubling": (500.03143310546875, 2406.3232421875, 32165.859375),
    "nondoubling": (389.3350524902344, 535.0336303710938, 32095.1328125),
}


def _batch(pad_to: int) -> jnp.ndarray:
    rs = np.random.default_rng(0)
    x = np.zeros((4, 28, 28), np.float32)
    for i in range(4):
        r, c = rs.integers(4, 18, 2)
        x[i, r:r + 8, c:c + 6] = 1
    p = (pad_to - 28) // 2
    return jnp.pad(jnp.asarray(x), ((0, 0), (p, p), (p, p)))[..., None]


@pytest.mark.parametrize("variant", sorted(GOLDEN))
def test_one_step_matches_its_golden_values(variant):
    cfg = resolve_backend(config.load([f"configs/{variant}.yaml", "configs/smoke.yaml"],
                                      ["train.batch_size=4", "train.pool.size=8"]), "cpu")
    model = build_model(cfg)
    state = train.init_state(model, cfg, jax.random.key(0))
    new, m = jax.jit(train.make_train_step(model, cfg))(state, _batch(cfg.data.pad_to),
                                                        jax.random.key(1))
    checksum = float(sum(jnp.sum(jnp.abs(p)) for p in jax.tree_util.tree_leaves(new["params"])))
    loss, grad_norm, want_checksum = GOLDEN[variant]
    assert float(m["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)
    assert checksum == pytest.approx(want_checksum, rel=1e-5)
    assert int(new["step"]) == 1 and float(m["state_finite"]) == 1.0
