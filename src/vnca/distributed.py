"""Devices, the data-parallel mesh and multi-host start-up.

One mesh axis, `data`, over every device JAX sees (all hosts): the batch is sharded along it
and parameters, optimizer state and keys are replicated. `jax.distributed.initialize()` is
called only when the environment describes a multi-process job:

- Cloud TPU pod slices / GKE (`TPU_WORKER_HOSTNAMES` lists more than one host, or
  `MEGASCALE_*`): JAX auto-detects everything;
- an explicit coordinator (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`);
- Vertex AI multi-replica jobs (`CLUSTER_SPEC`, JSON with `cluster.workerpool0` = coordinator).

The processes of such a job stop after one agreed step (`reached_stop_point`, JAX's preemption
sync point; `vnca.train.StopSignals` uses it), since a checkpoint save is collective.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
COORDINATOR_PORT = 8476


def cluster_from_env(env: Mapping[str, str]) -> dict | None:
    """Arguments for `jax.distributed.initialize` read from `env`; None for a single process.

    An empty dict means "multi-process, let JAX auto-detect" (Cloud TPU).
    """
    if "JAX_COORDINATOR_ADDRESS" in env:
        return {
            "coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env.get("JAX_NUM_PROCESSES", "1")),
            "process_id": int(env.get("JAX_PROCESS_ID", "0")),
        }
    if "CLUSTER_SPEC" in env:
        spec = json.loads(env["CLUSTER_SPEC"])
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
        pools = [k for k in sorted(cluster) if k.startswith("workerpool")]
        hosts = [h for k in pools for h in cluster[k]]
        if len(hosts) <= 1:
            return None
        coordinator = cluster["workerpool0"][0].split(":")[0]
        pool, index = task.get("type", "workerpool0"), int(task.get("index", 0))
        pid = sum(len(cluster[k]) for k in pools if k < pool) + index
        return {
            "coordinator_address": f"{coordinator}:{COORDINATOR_PORT}",
            "num_processes": len(hosts),
            "process_id": pid,
        }
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return {}
    return None


_initialized = False


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
    """Start the multi-process runtime when the environment asks for it (once per process)."""
    global _initialized
    if _initialized:
        return True
    args = cluster_from_env(os.environ if env is None else env)
    if args is None:
        return False
    # CPU processes reduce over the network with gloo (XLA:CPU has no collectives across
    # processes otherwise); TPU and GPU clients ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    _initialized = True
    return True


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def process_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """Rows of a global batch that this process feeds: the block its devices hold under
    `sharding` (contiguous for a 1-D `data` mesh; the mesh may order devices by topology)."""
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map((global_rows,)).values():
        rows = idx[0]
        starts.append(rows.start or 0)
        stops.append(global_rows if rows.stop is None else rows.stop)
    return slice(min(starts), max(stops))


def global_batch(local_x: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
    """Assemble a batch sharded along `data` from this process's block of rows."""
    shape = (global_rows,) + tuple(local_x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local_x, shape)


def hardware_string(devices: list | None = None) -> str:
    """For example '8 x TPU v5 lite' or '1 x cpu'."""
    devices = jax.devices() if devices is None else devices
    kinds = Counter(getattr(d, "device_kind", d.platform) for d in devices)
    return ", ".join(f"{n} x {k}" for k, n in kinds.items())


def is_main_process() -> bool:
    return jax.process_index() == 0


def stop_sync_available() -> bool:
    """Whether the processes of this job can agree on a step to stop at: JAX's preemption sync
    manager runs, which `jax.distributed.initialize` starts (with `jax_enable_preemption_service`
    on, the default) together with a C++ SIGTERM handler that is its preemption notice."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def reached_stop_point(n: int) -> bool:
    """JAX's preemption sync point: every process calls this once per step with n = 0, 1, 2, ...;
    after a preemption notice (SIGTERM) reached any process it is true on all of them at the
    same n, one past the largest n any of them had passed when the notice arrived."""
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(n)


# CPU flags (from /proc/cpuinfo) of instructions that multiply bfloat16 pairs natively.
BF16_DOT_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16_dots(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether this machine's CPU multiplies bfloat16 natively (one of `BF16_DOT_CPU_FLAGS`
    among its flags); None where the flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return bool(set(flags.split(":", 1)[-1].split()) & set(BF16_DOT_CPU_FLAGS))


def precision_warning(precision: str, platform: str,
                      cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """One line when `model.precision` will make this run slower rather than faster: bfloat16
    operands on a CPU without bfloat16 dot instructions, where XLA converts every operand
    back to float32 (the doubling step measured 1.4x slower: docs/precision.md); else None."""
    if precision != "bf16_operands" or platform != "cpu" or cpu_has_bf16_dots(cpuinfo) is not False:
        return None
    return ("warning: model.precision=bf16_operands on a CPU without bfloat16 dot instructions "
            f"(none of {', '.join(BF16_DOT_CPU_FLAGS)} in {cpuinfo}): expect it to be slower "
            "than float32 here, not faster (docs/precision.md)")


def warn_if_slow_precision(precision: str, platform: str) -> None:
    """Print `precision_warning`'s line on stderr (main process only), if there is one."""
    line = precision_warning(precision, platform)
    if line and is_main_process():
        print(line, file=sys.stderr, flush=True)
