"""The VNCA pipeline: prepare-data -> train each variant -> evaluate each -> one report.

```
prepare-data ─┬─ train-baseline ──── evaluate-baseline ────┐
              ├─ train-doubling ──── evaluate-doubling ────┼─ report
              └─ train-nondoubling ─ evaluate-nondoubling ─┘
```

`build_pipeline(target, image, configs)` returns the `@dsl.pipeline` for one target. It first
sizes the steps, then writes out the graph:

- Sizing. `local`: the plain lightweight components (kfp.local runs them, with or without
  Docker). `vertex-tpu`: train and evaluate run as Vertex AI custom jobs on the TPU slice named
  in each variant's `hardware` section (`tpu_machine_type`, `tpu_topology`), through GCPC's
  `create_custom_training_job_from_component`; GCPC has no topology argument, so the topology
  is written into the wrapper's default `worker_pool_specs`. `vertex-gpu`: the same, on
  `gpu_machine_type` with `gpu_count` x `gpu_type`. prepare-data and report need no
  accelerator and run as plain steps (e2-standard-4 on Vertex). Evaluation runs on the
  variant's accelerator too: the 128-sample bound over 10,000 test images is far too slow on a
  CPU machine.
- The graph, in one of two shapes: `vnca` with the three variants (the default, and the
  committed pipeline.yaml), or `vnca_one_variant` when the pipeline is built from one config
  (`vnca run-local --config configs/doubling.yaml`). A new variant is a new parameter and line
  in `vnca`, a new pair of inputs of the report component and a new default config in
  pipeline/variants.py; tests/test_pipeline_compile.py's golden test shows the change.

Each variant's resolved config (YAML text) is a pipeline parameter, `config_<name>` (`config`
in the one-variant shape), so a submission can override any value of any variant. The hardware
a variant trains on is fixed at compile time (it is the custom job's spec), read from its
config here and nowhere else; so are its retries and its custom jobs' timeout
(`hardware.retries`, `hardware.timeout_hours`).

Caching, retries, TensorBoard (docs/running.md says why):

- Only prepare-data may reuse an earlier run's outputs (Vertex AI's cache: same component, same
  inputs); train, evaluate and report always run. `vnca submit --no-cache` turns the cache off
  for every step of one run.
- On Vertex AI (not locally: kfp.local would sleep through the backoff of a step that failed
  for good) train and evaluate are retried `hardware.retries` times and each of their custom
  jobs stops after `hardware.timeout_hours`; prepare-data and report, cheap CPU steps, are
  retried `PLAIN_STEP_RETRIES` times.
- With `tensorboard` (a Vertex AI TensorBoard resource) each train custom job streams the
  event files under `<tensorboard_dir>/train-<variant>/logs/` (the container's
  `AIP_TENSORBOARD_LOG_DIR`) to that TensorBoard.
"""

# No `from __future__ import annotations`: KFP reads the pipeline functions' annotations as types.
from collections.abc import Sequence
from pathlib import Path

from kfp import dsl
from kfp.dsl import Artifact

from vnca import config as vnca_config
from vnca.errors import ConfigError, UserError
from vnca_pipeline.components.evaluate import evaluate
from vnca_pipeline.components.images import default_image, with_image
from vnca_pipeline.components.prepare_data import prepare_data
from vnca_pipeline.components.report import report, report_one_variant
from vnca_pipeline.components.train import train
from vnca_pipeline.variants import DEFAULT_VARIANTS, Variant, load_variants

PIPELINE_NAME = "vnca"
TARGETS = ("local", "vertex-tpu", "vertex-gpu")
# Boot disk of each custom job (the image with jax[tpu] or CUDA is several GB).
BOOT_DISK_GB = 100
# Custom jobs run as the pipeline's service account (so they can read and write its root).
PIPELINE_SERVICE_ACCOUNT = "{{$.pipeline_service_account}}"
# Retries of the plain CPU steps on Vertex AI (prepare-data downloads; a network error is the
# likely failure) and the wait before a retry of any step: 5 minutes, then 10, at most 1 hour
# (a network error, or a TPU slice not free when the job started, may be gone by then).
PLAIN_STEP_RETRIES = 2
RETRY_BACKOFF = {"backoff_duration": "300s", "backoff_factor": 2.0,
                 "backoff_max_duration": "3600s"}


def default_data_params(target: str, tier: str = "paper") -> dict:
    """Data parameters' defaults: the bundled sample locally or for smoke runs, else full data."""
    if target == "local" or tier == "smoke":
        return {"data_source": "bundled", "raw_dir": "", "download": False, "tfds_dir": ""}
    return {"data_source": "raw", "raw_dir": "", "download": True, "tfds_dir": ""}


def _named(component, name: str):
    """Give a component a task-friendly name (train-doubling, ...) in the compiled spec."""
    component.component_spec.name = name
    return component


def custom_job_timeout(hw: vnca_config.HardwareConfig) -> str:
    """A custom job's timeout (`hardware.timeout_hours`) as a protobuf Duration string."""
    return f"{round(hw.timeout_hours * 3600)}s"


def _custom_job(component, variant: Variant, target: str, image: str, step: str,
                tensorboard: str = "", tensorboard_dir: str = ""):
    """`component` as a Vertex AI custom job on the variant's accelerator, stopped after the
    variant's `hardware.timeout_hours`; with `tensorboard`, train's event files go to it."""
    try:
        from google_cloud_pipeline_components.v1.custom_job import (
            create_custom_training_job_from_component,
        )
    except ImportError:
        raise UserError(
            f"target {target} needs google-cloud-pipeline-components: pip install -e '.[vertex]'"
        ) from None
    hw = variant.config.hardware
    if target == "vertex-tpu":
        accel = {"machine_type": hw.tpu_machine_type}
    else:
        accel = {
            "machine_type": hw.gpu_machine_type,
            "accelerator_type": hw.gpu_type,
            "accelerator_count": hw.gpu_count,
        }
    if tensorboard and step == "train":  # evaluate writes no event files
        accel["tensorboard"] = tensorboard
        accel["base_output_directory"] = f"{tensorboard_dir.rstrip('/')}/{step}-{variant.name}"
    op = create_custom_training_job_from_component(
        with_image(component, image),
        display_name=f"vnca-{step}-{variant.name}",
        replica_count=1,
        boot_disk_size_gb=BOOT_DISK_GB,
        service_account=PIPELINE_SERVICE_ACCOUNT,
        timeout=custom_job_timeout(hw),
        **accel,
    )
    if target == "vertex-tpu":
        worker_pool_specs = op.component_spec.inputs["worker_pool_specs"].default
        worker_pool_specs[0]["machine_spec"]["tpu_topology"] = hw.tpu_topology
    return _named(op, f"{step}-{variant.name}")


def _sized(component, variant: Variant, target: str, image: str, step: str,
           tensorboard: str = "", tensorboard_dir: str = ""):
    """The variant's train or evaluate step for `target`: a plain step or a custom job."""
    if target == "local":
        return _named(with_image(component, image), f"{step}-{variant.name}")
    return _custom_job(component, variant, target, image, step, tensorboard, tensorboard_dir)


def _retried(task, target: str, retries: int):
    """`task` retried `retries` times on Vertex AI (never locally)."""
    if target != "local" and retries > 0:
        task.set_retry(num_retries=retries, **RETRY_BACKOFF)
    return task


def build_pipeline(
    target: str = "vertex-tpu",
    image: str | None = None,
    configs: Sequence[str | Path | vnca_config.Config] | None = None,
    tier: str = "paper",
    overrides: Sequence[str] = (),
    tensorboard: str = "",
    tensorboard_dir: str = "",
):
    """The @dsl.pipeline for `target`, every step in `image`, one variant per config sized
    for `tier`: the three variants, or one. With `tensorboard` (a Vertex AI TensorBoard
    resource name; vertex targets only), each train custom job writes under
    `<tensorboard_dir>/train-<variant>` (a gs:// folder) and streams its event files there."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if tensorboard and (target == "local" or not tensorboard_dir.startswith("gs://")):
        raise UserError("a TensorBoard needs a vertex target and a gs:// folder for its logs")
    image = image or default_image(target)
    variants = {v.name: v for v in load_variants(configs, tier, overrides)}
    if len(variants) != 1 and sorted(variants) != sorted(DEFAULT_VARIANTS):
        raise ConfigError(
            f"the pipeline runs the variants {', '.join(DEFAULT_VARIANTS)} or any one config, "
            f"got configs named {', '.join(variants)}"
        )
    names = list(DEFAULT_VARIANTS) if len(variants) > 1 else list(variants)
    data = default_data_params(target, tier)
    prepare_data_op = with_image(prepare_data, image)
    train_ops = {n: _sized(train, v, target, image, "train", tensorboard, tensorboard_dir)
                 for n, v in variants.items()}
    evaluate_ops = {n: _sized(evaluate, v, target, image, "evaluate") for n, v in variants.items()}
    report_op = with_image(report, image)
    report_one_variant_op = _named(with_image(report_one_variant, image), "report")
    description = (
        f"VNCA (Palm et al., ICLR 2022), target {target}: prepare-data, then train and evaluate "
        f"{', '.join(names)}, then one report."
    )

    def prepare(data_source, raw_dir, download, tfds_dir):
        task = prepare_data_op(
            source=data_source, raw_dir=raw_dir, download=download, tfds_dir=tfds_dir
        ).set_display_name("prepare-data")
        return _retried(task, target, PLAIN_STEP_RETRIES).outputs["dataset"]

    def train_and_evaluate(name: str, config, dataset):
        """The variant's (model, evaluation) artifacts."""
        retries = variants[name].config.hardware.retries
        model = train_ops[name](config=config, data=dataset).set_display_name(f"train-{name}")
        evaluation = evaluate_ops[name](
            data=dataset, model=model.outputs["model"]
        ).set_display_name(f"evaluate-{name}")
        for task in (model, evaluation):
            _retried(task.set_caching_options(False), target, retries)
        return model.outputs["model"], evaluation.outputs["evaluation"]

    def finish(report_task):
        """The report step: never cached, retried like prepare-data."""
        task = report_task.set_display_name("report").set_caching_options(False)
        return _retried(task, target, PLAIN_STEP_RETRIES).outputs["report_dir"]

    if len(variants) > 1:  # the variants are DEFAULT_VARIANTS

        @dsl.pipeline(name=PIPELINE_NAME, description=description)
        def vnca(
            data_source: str = data["data_source"],
            raw_dir: str = data["raw_dir"],
            download: bool = data["download"],
            tfds_dir: str = data["tfds_dir"],
            config_baseline: str = variants["baseline"].text,
            config_doubling: str = variants["doubling"].text,
            config_nondoubling: str = variants["nondoubling"].text,
        ) -> Artifact:
            dataset = prepare(data_source, raw_dir, download, tfds_dir)
            model_baseline, eval_baseline = train_and_evaluate("baseline", config_baseline, dataset)
            model_doubling, eval_doubling = train_and_evaluate("doubling", config_doubling, dataset)
            model_nondoubling, eval_nondoubling = train_and_evaluate(
                "nondoubling", config_nondoubling, dataset)
            return finish(report_op(
                data=dataset,
                eval_baseline=eval_baseline, model_baseline=model_baseline,
                eval_doubling=eval_doubling, model_doubling=model_doubling,
                eval_nondoubling=eval_nondoubling, model_nondoubling=model_nondoubling,
            ))

        return vnca

    [(name, variant)] = variants.items()

    @dsl.pipeline(name=PIPELINE_NAME, description=description)
    def vnca_one_variant(
        data_source: str = data["data_source"],
        raw_dir: str = data["raw_dir"],
        download: bool = data["download"],
        tfds_dir: str = data["tfds_dir"],
        config: str = variant.text,
    ) -> Artifact:
        dataset = prepare(data_source, raw_dir, download, tfds_dir)
        model, evaluation = train_and_evaluate(name, config, dataset)
        return finish(report_one_variant_op(data=dataset, evaluation=evaluation, model=model))

    return vnca_one_variant
