"""Compile the pipeline and submit it to Vertex AI Pipelines: `vnca submit`.

`--dry-run` compiles, then prints the job's parameters and each step's machine (read back from
the compiled spec, so it shows what Vertex AI would get) and contacts nothing.

Without `--dry-run` it needs Application Default Credentials (`gcloud auth
application-default login`, or a service-account key in GOOGLE_APPLICATION_CREDENTIALS) and a
project (`--project`, or the credentials' own). The job runs as `--service-account` (which
needs read/write access to the pipeline root's bucket and permission to run Vertex AI custom
jobs), or the Compute Engine default service account without it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from vnca import config as vnca_config
from vnca import storage
from vnca.errors import UserError
from vnca_pipeline.compile import compile_pipeline
from vnca_pipeline.pipeline import PIPELINE_NAME

# Vertex AI runs a step without a machine spec as a CustomJob on this machine.
VERTEX_DEFAULT_MACHINE = "e2-standard-4"


def parameter_values(spec: dict) -> dict:
    """The compiled pipeline's parameters with their default values, by name."""
    params = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    values = {}
    for name, p in sorted(params.items()):
        value = p.get("defaultValue")
        if p.get("parameterType") == "NUMBER_INTEGER" and isinstance(value, float):
            value = int(value)
        values[name] = value
    return values


def step_machines(spec: dict) -> dict[str, str]:
    """Task name -> a one-line description of the machine it runs on, from the spec."""
    out = {}
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    for task_name, task in _in_run_order(spec["root"]["dag"]["tasks"]):
        comp = spec["components"][task["componentRef"]["name"]]
        pools = comp.get("inputDefinitions", {}).get("parameters", {}).get("worker_pool_specs")
        if pools is not None:
            pool = pools["defaultValue"][0]
            m = dict(pool["machine_spec"])
            desc = f"custom job: machine_type={m.pop('machine_type')}"
            for key, value in sorted(m.items()):
                value = int(value) if isinstance(value, float) and value.is_integer() else value
                desc += f", {key}={value}"
            replicas = sum(int(p.get("replica_count", 1)) for p in pools["defaultValue"])
            desc += f", replicas={replicas}, image={pool['container_spec']['image_uri']}"
        else:
            container = executors[comp["executorLabel"]]["container"]
            res = container.get("resources", {})
            parts = [f"{k}={v}" for k, v in sorted(res.items()) if not isinstance(v, dict)]
            if "accelerator" in res:
                acc = res["accelerator"]
                parts.append(f"accelerator={acc.get('resourceCount', acc.get('count'))}x"
                             f"{acc.get('resourceType', acc.get('type'))}")
            machine = ", ".join(parts) if parts else f"Vertex default ({VERTEX_DEFAULT_MACHINE})"
            desc = f"step: {machine}, image={container['image']}"
        out[task_name] = desc
    return out


def _in_run_order(tasks: dict) -> list[tuple[str, dict]]:
    """Tasks sorted by their depth in the DAG, then by name (prepare, train, evaluate, report)."""
    depth: dict[str, int] = {}

    def depth_of(name: str) -> int:
        if name not in depth:
            deps = tasks[name].get("dependentTasks", [])
            depth[name] = 1 + max((depth_of(d) for d in deps), default=-1)
        return depth[name]

    return sorted(tasks.items(), key=lambda item: (depth_of(item[0]), item[0]))


def _credentials_project(project: str | None) -> str:
    """Find Application Default Credentials and the project to use; UserError if either lacks."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        _, found_project = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
    except DefaultCredentialsError:
        raise UserError(
            "no Google Cloud credentials found: run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS (or use --dry-run)"
        ) from None
    project = project or found_project
    if not project:
        raise UserError(
            "no Google Cloud project: pass --project PROJECT (or set GOOGLE_CLOUD_PROJECT)"
        )
    return project


def submit(
    project: str | None,
    region: str,
    pipeline_root: str,
    service_account: str | None = None,
    target: str = "vertex-tpu",
    image: str | None = None,
    configs: Sequence[str | Path | vnca_config.Config] | None = None,
    dry_run: bool = False,
    tier: str = "paper",
    overrides: Sequence[str] = (),
) -> str | None:
    """Compile for `target` and submit; return the job's resource name (None for a dry run)."""
    if target not in ("vertex-tpu", "vertex-gpu"):
        raise UserError(f"--target {target}: submit takes vertex-tpu or vertex-gpu")
    if not storage.is_gcs_url(pipeline_root):
        raise UserError(f"--pipeline-root {pipeline_root}: must be a gs://BUCKET/PATH URL")
    storage.split_url(pipeline_root)
    if not region:
        raise UserError("--region is empty; pass a Vertex AI region such as us-central1")

    with tempfile.TemporaryDirectory(prefix="vnca-submit-") as tmp:
        template = compile_pipeline(
            Path(tmp) / "pipeline.yaml", target=target, image=image, configs=configs,
            tier=tier, overrides=overrides,
        )
        spec = yaml.safe_load(template.read_text())
        params = parameter_values(spec)
        if dry_run:
            _print_dry_run(spec, params, project, region, pipeline_root, service_account, target)
            return None

        project = _credentials_project(project)
        from google.api_core import exceptions as api_exceptions
        from google.cloud import aiplatform

        try:
            aiplatform.init(project=project, location=region)
            job = aiplatform.PipelineJob(
                display_name=PIPELINE_NAME, template_path=str(template),
                pipeline_root=pipeline_root, parameter_values=params,
                project=project, location=region,
                labels={"app": "vnca", "target": target},
            )
            job.submit(service_account=service_account)
        except api_exceptions.GoogleAPICallError as e:
            message = " ".join(str(e).split())
            raise UserError(f"Vertex AI refused the job: {message}") from None
    print(f"submitted {job.resource_name}")
    print(f"console: https://console.cloud.google.com/vertex-ai/locations/{region}/pipelines/"
          f"runs/{job.name}?project={project}")
    return job.resource_name


def _print_dry_run(spec, params, project, region, pipeline_root, service_account, target):
    print("dry run: compiled the pipeline; nothing was sent to Google Cloud")
    print(f"pipeline: {spec['pipelineInfo']['name']}, target {target}, compiled by "
          f"{spec['sdkVersion']}")
    print(f"project: {project or '(from the credentials at submit time)'}")
    print(f"region: {region}")
    print(f"pipeline root: {pipeline_root}")
    print(f"service account: {service_account or '(Compute Engine default)'}")
    print("parameters:")
    for name, value in params.items():
        print(f"  {name}: {json_like(value)}")
    print("steps:")
    machines = step_machines(spec)
    width = max(len(n) for n in machines)
    for name, desc in machines.items():
        print(f"  {name:<{width}}  {desc}")
    from vnca import plan

    cfgs = [vnca_config.loads(v, name) for name, v in params.items()
            if name == "config" or name.startswith("config_")]
    print("plan (estimated before the run, `vnca plan` for options):")
    print(plan.format_plans([plan.make_plan(c, target) for c in cfgs]))


def json_like(value) -> str:
    """A parameter value as one line: strings as they are (configs are one-line YAML)."""
    if isinstance(value, str):
        return value if value else "''"
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix(
        "\n..."
    )
