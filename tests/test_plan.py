"""The plan's FLOP count (against hand-computed values, scans per iteration, the expected NCA
step count), its machine table and its printout."""

import jax
import jax.numpy as jnp
import pytest

from vnca import config, plan, train
from vnca.errors import ConfigError
from vnca.models import build_model
from vnca.models.vae import resolve_backend


def test_dense_and_conv_flops_are_two_per_multiply_add():
    a = jax.ShapeDtypeStruct((8, 300), jnp.float32)
    w = jax.ShapeDtypeStruct((300, 70), jnp.float32)
    assert plan.count_flops(jax.make_jaxpr(jnp.dot)(a, w)) == 2 * 8 * 300 * 70
    x = jax.ShapeDtypeStruct((2, 16, 16, 5), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 5, 7), jnp.float32)

    def conv(x, k, stride=1):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert plan.count_flops(jax.make_jaxpr(conv)(x, k)) == 2 * (2 * 16 * 16 * 7) * (3 * 3 * 5)
    strided = jax.make_jaxpr(lambda x, k: conv(x, k, 2))(x, k)
    assert plan.count_flops(strided) == 2 * (2 * 8 * 8 * 7) * (3 * 3 * 5)
    # the gradient of a conv: input and kernel gradients cost what the forward conv costs
    grad = jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1)))(x, k)
    assert plan.count_flops(grad) == 3 * 2 * (2 * 16 * 16 * 7) * (3 * 3 * 5)


def test_a_scan_counts_every_iteration_unlike_xla_cost_analysis():
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)

    def f(n):
        return lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None,
                                         length=n)[0]

    one, ten = (plan.count_flops(jax.make_jaxpr(f(n))(x, w)) for n in (1, 10))
    assert one == 2 * 16 * 64 * 64 and ten == 10 * one
    xla = [jax.jit(f(n)).lower(x, w).compile().cost_analysis()["flops"] for n in (2, 10)]
    assert xla[0] == xla[1]  # why the plan counts the jaxpr itself


def test_cond_counts_its_costliest_or_cheapest_branch():
    x = jax.ShapeDtypeStruct((4, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    j = jax.make_jaxpr(lambda p, x, w: jax.lax.cond(p, lambda x: x @ w, lambda x: x, x))(
        True, x, w)
    assert plan.count_flops(j, "max") == 2 * 4 * 32 * 32 and plan.count_flops(j, "min") == 0


def _step_flops(variant: str, *overrides: str) -> float:
    cfg = resolve_backend(config.load([f"configs/{variant}.yaml", "configs/smoke.yaml"],
                                      list(overrides)), "tpu")
    model = build_model(cfg)
    key = jax.random.key(0)
    state = jax.eval_shape(lambda k: train.init_state(model, cfg, k), key)
    x = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.pad_to, cfg.data.pad_to, 1),
                             jnp.float32)
    return plan.expected_flops(train.make_train_step(model, cfg), state, x, key, cfg=cfg)


def test_nca_steps_add_linearly_to_the_doubling_step():
    f1, f2, f3 = (_step_flops("doubling", f"model.steps_per_stage={n}") for n in (1, 2, 3))
    assert f2 > f1 > 0
    assert f3 - f2 == pytest.approx(f2 - f1, rel=1e-9)


def test_nondoubling_step_is_counted_at_the_mean_step_count():
    base = ("nondoubling", "train.pool.enabled=false")
    fixed = _step_flops(*base, "model.min_steps=5", "model.max_steps=5")
    drawn = _step_flops(*base, "model.min_steps=3", "model.max_steps=7")  # mean 5
    assert drawn == pytest.approx(fixed, rel=1e-9)
    half_open = _step_flops(*base, "model.min_steps=3", "model.max_steps=8",
                            "model.steps_inclusive=false")  # T in [3, 8): mean 5
    assert half_open == pytest.approx(fixed, rel=1e-9)


def test_machine_table_and_chip_counts():
    assert plan.machine_for("ct5lp-hightpu-8t").name == "TPU v5e"
    assert plan.machine_for("a3-highgpu-8g").name.startswith("NVIDIA H100")
    assert plan.tpu_chips("ct5lp-hightpu-8t") == 8 and plan.tpu_chips("ct5p-hightpu-4t") == 4
    with pytest.raises(ConfigError, match="no peak figures for machine type 'n1-standard-4'"):
        plan.machine_for("n1-standard-4")


@pytest.mark.slow
def test_plan_of_the_smoke_configs_prints_every_variant():
    plans = [plan.make_plan(config.load([f"configs/{v}.yaml", "configs/smoke.yaml"]))
             for v in ("baseline", "doubling", "nondoubling")]
    for p in plans:
        assert p.step_flops > 0 and p.eval_flops > 0 and 0 < p.memory_gib < 4
        assert p.chips == 8 and p.machine == "TPU v5e"
        want_h = p.step_flops * p.steps / (8 * 197e12 * 0.3) / 3600
        assert p.train_hours == pytest.approx(want_h)
    text = plan.format_plans(plans)
    assert all(name in text for name in ("baseline", "doubling", "nondoubling"))
    assert "chip-hours" in text and "v3-8" in text
