"""What a run will cost, before it starts: `vnca plan` and `vnca submit --dry-run`.

Per variant: parameters, FLOPs of one training step, total PFLOPs for `train.steps`, the
evaluation's FLOPs (the IW bound at K = eval.iw_samples over the test set), memory per device,
and wall time and accelerator-hours on the config's machine at a stated utilisation.

FLOPs are counted on the step's jaxpr, abstract shapes only (nothing runs): 2 per multiply-add
of every `dot_general` and `conv_general_dilated`, elementwise work left out (it is a few per
cent here, and not what the matrix units do). XLA's own cost analysis counts a loop's body once
whatever its trip count; here a `scan` counts `length` times its body, and the backward pass's
rematerialised forward steps are counted (they are in the jaxpr). The non-doubling NCA skips
the steps past its drawn T with a `lax.cond`: the step is counted with every such step taken
and with none, and the plan interpolates linearly to the mean of T, which is exact in
expectation because FLOPs are linear in the number of steps taken.

Memory per device is XLA:CPU's buffer assignment for the step at the global batch, with the
temporary buffers (activations) divided over the devices: an estimate; a TPU's layouts pad
small channel counts to 128 lanes.

`MACHINES` holds the peak dense matrix throughput per chip that each machine type's maker
publishes, for the precision a float32 run gets there by default (TPU: bfloat16 passes, JAX's
default matmul precision; NVIDIA Ampere and Hopper: TF32, XLA's default for float32 dots).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vnca.config import Config, max_nca_steps
from vnca.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    peak_tflops: float   # per chip, dense, at the precision noted in the module docstring
    memory_gib: float    # per chip
    precision: str


# Machine-type prefix (Vertex AI / Compute Engine) -> chip. Makers' published figures.
MACHINES = {
    "ct5lp-hightpu": Machine("TPU v5e", 197.0, 16, "bf16 passes"),
    "ct5p-hightpu": Machine("TPU v5p", 459.0, 95, "bf16 passes"),
    "ct6e-standard": Machine("TPU v6e", 918.0, 32, "bf16 passes"),
    "a2-highgpu": Machine("NVIDIA A100 40GB", 156.0, 40, "TF32"),
    "a2-ultragpu": Machine("NVIDIA A100 80GB", 156.0, 80, "TF32"),
    "a3-highgpu": Machine("NVIDIA H100 80GB", 495.0, 80, "TF32"),
}
# R's published budget, for comparison: about 4 TPU-hours on a v3-8 for its three runs.
REPRODUCTION_BUDGET = "about 4 h of a TPU v3-8 (4 chips) for R's three runs together"
DEFAULT_UTILISATION = 0.3


def machine_for(machine_type: str) -> Machine:
    for prefix, machine in MACHINES.items():
        if machine_type.startswith(prefix):
            return machine
    known = ", ".join(sorted(MACHINES))
    raise ConfigError(f"hardware: no peak figures for machine type {machine_type!r} "
                      f"(known prefixes: {known}; add it to vnca.plan.MACHINES)")


def tpu_chips(machine_type: str) -> int:
    """Chips of a TPU machine type: 'ct5lp-hightpu-8t' -> 8."""
    suffix = machine_type.rsplit("-", 1)[-1]
    return int(suffix.rstrip("t")) if suffix.rstrip("t").isdigit() else 1


# ---------------------------------------------------------------------------------------------
# FLOPs from a jaxpr.


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature, in feature, *spatial)
    in_features = rhs[rhs_spec[1]]
    spatial = math.prod(rhs[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(out) * spatial * in_features


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(eqn) -> list:
    subs = []
    for v in eqn.params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                subs.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                subs.append(item)
    return subs


def count_flops(jaxpr, cond: str = "max") -> float:
    """Matrix FLOPs of `jaxpr` (a Jaxpr or ClosedJaxpr); a `scan` counts `length` times, a
    `cond` counts its costliest branch (`cond="max"`) or its cheapest ("min")."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * count_flops(eqn.params["jaxpr"], cond)
        elif name == "cond":
            branches = [count_flops(b, cond) for b in eqn.params["branches"]]
            total += max(branches) if cond == "max" else min(branches)
        elif name == "while":
            raise ValueError("a while loop's trip count is unknown to the FLOP count")
        else:
            total += sum(count_flops(sub, cond) for sub in _sub_jaxprs(eqn))
    return total


def expected_flops(fn: Callable, *args, cfg: Config) -> float:
    """FLOPs of `fn(*args)` at the mean NCA step count of `cfg` (see the module docstring)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    high, low = count_flops(jaxpr, "max"), count_flops(jaxpr, "min")
    m = cfg.model
    if m.variant != "nondoubling" or high == low:
        return high
    top = max_nca_steps(m)
    mean_t = (m.min_steps + top) / 2
    return low + (high - low) * (mean_t - m.min_steps) / max(top - m.min_steps, 1)


# ---------------------------------------------------------------------------------------------
# The plan of one variant.


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    variant: str
    params: int
    step_flops: float
    steps: int
    eval_flops: float
    memory_gib: float
    machine: str
    machine_type: str
    chips: int
    peak_tflops: float
    utilisation: float

    @property
    def train_pflops(self) -> float:
        return self.step_flops * self.steps / 1e15

    def hours(self, flops: float) -> float:
        return flops / (self.chips * self.peak_tflops * 1e12 * self.utilisation) / 3600

    @property
    def train_hours(self) -> float:
        return self.hours(self.step_flops * self.steps)

    @property
    def eval_hours(self) -> float:
        return self.hours(self.eval_flops)


def make_plan(cfg: Config, target: str = "vertex-tpu",
              utilisation: float = DEFAULT_UTILISATION, test_images: int = 10_000) -> Plan:
    """The plan of `cfg` on its `hardware` for `target` (abstract shapes only)."""
    from vnca import train
    from vnca.models import build_model, count_params
    from vnca.models.vae import resolve_backend

    hw = cfg.hardware
    if target == "vertex-gpu":
        machine_type, chips = hw.gpu_machine_type, hw.gpu_count
    else:
        machine_type, chips = hw.tpu_machine_type, tpu_chips(hw.tpu_machine_type)
    machine = machine_for(machine_type)
    cfg = resolve_backend(cfg, "gpu" if target == "vertex-gpu" else "tpu")
    model = build_model(cfg)
    key = jax.random.key(0)
    state = jax.eval_shape(lambda k: train.init_state(model, cfg, k), key)
    n = cfg.data.pad_to
    b = cfg.train.batch_size
    x = jax.ShapeDtypeStruct((b, n, n, 1), jnp.float32)
    step = train.make_train_step(model, cfg)
    step_flops = expected_flops(step, state, x, key, cfg=cfg)

    k_iw = cfg.eval.iw_samples
    xe = jax.ShapeDtypeStruct((1, n, n, 1), jnp.float32)
    eval_step = train.make_eval_step(model, k_iw)
    index = jax.ShapeDtypeStruct((1,), jnp.int32)
    per_image = expected_flops(eval_step, state["params"], xe, index, key, cfg=cfg)
    n_eval = cfg.eval.n_images or test_images

    compiled = jax.jit(step).lower(state, x, key).compile()
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes / chips)
    return Plan(cfg.name, cfg.model.variant, count_params(state["params"]), step_flops,
                cfg.train.steps, per_image * n_eval, per_device / 2**30, machine.name,
                machine_type, chips, machine.peak_tflops, utilisation)


def _hours(h: float) -> str:
    if h * 60 < 1:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _flop(flops: float, unit: float) -> str:
    return f"{flops / unit:.3g}" if flops / unit < 100 else f"{flops / unit:,.0f}"


def format_plans(plans: list[Plan]) -> str:
    """A table of the plans, with the assumptions and R's budget under it."""
    head = ("variant", "params", "GFLOP/step", "train PFLOP", "eval PFLOP", "GiB/device",
            "machine", "train wall", "eval wall", "chip-hours")
    rows = []
    for p in plans:
        chip_h = (p.train_hours + p.eval_hours) * p.chips
        rows.append((p.name, f"{p.params / 1e6:.2f} M", _flop(p.step_flops, 1e9),
                     _flop(p.step_flops * p.steps, 1e15), _flop(p.eval_flops, 1e15),
                     f"{p.memory_gib:.2f}", f"{p.chips} x {p.machine}", _hours(p.train_hours),
                     _hours(p.eval_hours), f"{chip_h:.3g}"))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [head, *rows]]
    total = sum((p.train_hours + p.eval_hours) * p.chips for p in plans)
    utils = ", ".join(f"{u:.0%}" for u in sorted({p.utilisation for p in plans}))
    peaks = "; ".join(sorted({f"{p.machine}: {p.peak_tflops:g} TFLOP/s per chip"
                              for p in plans}))
    lines.append(f"total: {total:.3g} chip-hours at {utils} of peak ({peaks})")
    lines.append(f"beside: {REPRODUCTION_BUDGET}")
    lines.append("FLOPs: matrix multiply-adds x 2 from the jaxpr (scans per iteration, remat "
                 "included); wall times are FLOP-bound (small steps are bound by latency, so "
                 "read them as lower bounds); memory: XLA:CPU estimate, activations split over "
                 "the chips")
    return "\n".join(lines)
