"""The VNCA pipeline: prepare-data -> train each variant -> evaluate each -> one report.

`build_pipeline(target, image, configs)` returns the `@dsl.pipeline` for one target:

- `local`: the plain lightweight components (kfp.local runs them, with or without Docker).
- `vertex-tpu`: train and evaluate run as Vertex AI custom jobs on the TPU slice named in each
  variant's `hardware` section (`tpu_machine_type`, `tpu_topology`), through GCPC's
  `create_custom_training_job_from_component`. GCPC has no topology argument, so the topology
  is written into the wrapper's default `worker_pool_specs`.
- `vertex-gpu`: the same, on `gpu_machine_type` with `gpu_count` x `gpu_type`.

prepare-data and report need no accelerator and run as plain steps (e2-standard-4 on Vertex).
Evaluation runs on the variant's accelerator too: the 128-sample bound over 10,000 test images
is far too slow on a CPU machine.

The variants are the configs the pipeline is built from (default: configs/baseline.yaml,
doubling.yaml, nondoubling.yaml); each config's resolved YAML text is a pipeline parameter
`config_<name>`, so a submission can override any value of any variant. The hardware a variant
trains on is fixed at compile time (it is the custom job's spec), read from its config here and
nowhere else.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path

import yaml
from kfp import dsl
from kfp.dsl import Artifact

from components.evaluate import evaluate
from components.images import component, default_image
from components.prepare_data import prepare_data
from components.report import check_variant_names, report_component
from components.train import train
from vnca import config as vnca_config
from vnca.errors import UserError

PIPELINE_NAME = "vnca"
TARGETS = ("local", "vertex-tpu", "vertex-gpu")
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_VARIANTS = ("baseline", "doubling", "nondoubling")
SMOKE_CONFIG = CONFIG_DIR / "smoke.yaml"
# Run sizes (vnca.config.Config.tier): "paper" uses a variant file alone; "smoke" layers
# configs/smoke.yaml on any variant; "demo" and "cpu" layer configs/<tier>/<variant>.yaml.
TIERS = ("paper", "cpu", "demo", "smoke")
# Boot disk of each custom job (the image with jax[tpu] or CUDA is several GB).
BOOT_DISK_GB = 100
# Custom jobs run as the pipeline's service account (so they can read and write its root).
PIPELINE_SERVICE_ACCOUNT = "{{$.pipeline_service_account}}"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    config: vnca_config.Config

    @property
    def param(self) -> str:
        """Name of the pipeline parameter that holds this variant's config YAML text."""
        return f"config_{self.name}"

    @property
    def text(self) -> str:
        return config_text(self.config)


def config_text(cfg: vnca_config.Config) -> str:
    """The config as one line of YAML (flow style), the form a `config_<name>` parameter takes.

    One line, because kfp 2.17.3 copies parameter defaults unescaped into the comment header
    of the compiled YAML, and a multi-line default there makes the file invalid YAML.
    `vnca.config.loads` reads it like any other YAML.
    """
    text = yaml.safe_dump(
        vnca_config.to_dict(cfg), default_flow_style=True, sort_keys=False, width=1 << 30
    )
    return text.strip()


def default_config_paths() -> list[Path]:
    return [CONFIG_DIR / f"{name}.yaml" for name in DEFAULT_VARIANTS]


def tier_overlay(tier: str, variant: str) -> Path | None:
    """The overlay file that sizes a `variant` config for `tier` (None for "paper")."""
    if tier not in TIERS:
        raise UserError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    if tier == "paper":
        return None
    path = SMOKE_CONFIG if tier == "smoke" else CONFIG_DIR / tier / f"{variant}.yaml"
    if not path.is_file():
        raise UserError(f"{path}: the {tier} tier's overlay for the {variant} model is missing")
    return path


def load_variants(
    configs: Sequence[str | Path | vnca_config.Config] | None = None,
    tier: str = "paper",
    overrides: Sequence[str] = (),
) -> list[Variant]:
    """One Variant per config file (or Config): the `tier`'s overlay for the file's model goes
    on top of each file, then the `key=value` overrides apply to every variant."""
    variants = []
    for item in configs or default_config_paths():
        if isinstance(item, vnca_config.Config):
            if tier != "paper" or overrides:
                raise UserError("tiers and overrides apply to config files, not Config objects")
            cfg = item
        else:
            overlay = tier_overlay(tier, vnca_config.load([item]).model.variant)
            cfg = vnca_config.load([item] + ([overlay] if overlay else []), list(overrides))
        variants.append(Variant(cfg.name, cfg))
    check_variant_names([v.name for v in variants])
    return variants


def _named(op, name: str):
    """Give a component a task-friendly name (train-doubling, ...) in the compiled spec."""
    op.component_spec.name = name
    return op


def _custom_job_op(func, variant: Variant, target: str, image: str, step: str):
    """`func`'s component as a Vertex AI custom job on the variant's accelerator."""
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
    op = create_custom_training_job_from_component(
        component(func, image),
        display_name=f"vnca-{step}-{variant.name}",
        replica_count=1,
        boot_disk_size_gb=BOOT_DISK_GB,
        service_account=PIPELINE_SERVICE_ACCOUNT,
        **accel,
    )
    if target == "vertex-tpu":
        worker_pool_specs = op.component_spec.inputs["worker_pool_specs"].default
        worker_pool_specs[0]["machine_spec"]["tpu_topology"] = hw.tpu_topology
    return _named(op, f"{step}-{variant.name}")


def _step_op(func, variant: Variant, target: str, image: str, step: str):
    if target == "local":
        return _named(component(func, image), f"{step}-{variant.name}")
    return _custom_job_op(func, variant, target, image, step)


def default_data_params(target: str, tier: str = "paper") -> dict:
    """Data parameters' defaults: the bundled sample locally or for smoke runs, else full data."""
    if target == "local" or tier == "smoke":
        return {"data_source": "bundled", "raw_dir": "", "download": False, "tfds_dir": ""}
    return {"data_source": "raw", "raw_dir": "", "download": True, "tfds_dir": ""}


def build_pipeline(
    target: str = "vertex-tpu",
    image: str | None = None,
    configs: Sequence[str | Path | vnca_config.Config] | None = None,
    tier: str = "paper",
    overrides: Sequence[str] = (),
):
    """The @dsl.pipeline for `target`, every step in `image`, one variant per config sized
    for `tier`."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    image = image or default_image(target)
    variants = load_variants(configs, tier, overrides)

    prepare_op = component(prepare_data, image)
    train_ops = {v.name: _step_op(train, v, target, image, "train") for v in variants}
    evaluate_ops = {v.name: _step_op(evaluate, v, target, image, "evaluate") for v in variants}
    report_op = report_component([v.name for v in variants], image)

    data_defaults = default_data_params(target, tier)
    params = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=value,
                          annotation=type(value))
        for name, value in data_defaults.items()
    ] + [
        inspect.Parameter(v.param, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v.text,
                          annotation=str)
        for v in variants
    ]

    def vnca_pipeline(*args) -> Artifact:
        values = dict(zip([p.name for p in params], args))
        data = prepare_op(
            source=values["data_source"], raw_dir=values["raw_dir"],
            download=values["download"], tfds_dir=values["tfds_dir"],
        ).set_display_name("prepare-data")
        inputs = {}
        for v in variants:
            trained = train_ops[v.name](
                config=values[v.param], data=data.outputs["dataset"]
            ).set_display_name(f"train-{v.name}")
            evaluated = evaluate_ops[v.name](
                data=data.outputs["dataset"], model=trained.outputs["model"]
            ).set_display_name(f"evaluate-{v.name}")
            inputs[f"eval_{v.name}"] = evaluated.outputs["evaluation"]
            inputs[f"model_{v.name}"] = trained.outputs["model"]
        report = report_op(data=data.outputs["dataset"], **inputs).set_display_name("report")
        return report.outputs["report_dir"]

    vnca_pipeline.__signature__ = inspect.Signature(params, return_annotation=Artifact)
    vnca_pipeline.__annotations__ = {p.name: p.annotation for p in params} | {"return": Artifact}
    description = (
        f"VNCA (Palm et al., ICLR 2022), target {target}: prepare-data, then train and evaluate "
        f"{', '.join(v.name for v in variants)}, then one report."
    )
    return dsl.pipeline(name=PIPELINE_NAME, description=description)(vnca_pipeline)

