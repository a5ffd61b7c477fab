"""Compile the pipeline and submit it to Vertex AI Pipelines: `vnca submit`.

`--dry-run` compiles, then prints the job's parameters and each step's machine (read back from
the compiled spec, so it shows what Vertex AI would get) and contacts nothing.

Without `--dry-run` it needs Application Default Credentials (`gcloud auth
application-default login`, or a service-account key in GOOGLE_APPLICATION_CREDENTIALS) and a
project (`--project`, or the credentials' own). The job runs as `--service-account` (which
needs read/write access to the pipeline root's bucket and permission to run Vertex AI custom
jobs), or the Compute Engine default service account without it.

`submit()` talks to Google Cloud only through the Vertex AI SDK and keeps what the SDK was
already given: a program that called `aiplatform.init(credentials=..., api_endpoint=...,
api_transport=...)` first submits with those credentials to that endpoint, and no Application
Default Credentials are looked up (tests/test_submit_vertex.py does so against a fake Vertex AI
on 127.0.0.1). The `vnca` command sets none of them.

`--tensorboard` and `--experiment` hand the run to Vertex AI TensorBoard (each train custom job
streams the event files it writes under `AIP_TENSORBOARD_LOG_DIR`) and Vertex AI Experiments
(the run is added to the experiment, which is created if missing). `--no-cache` makes every
step run even where Vertex AI could reuse an earlier run's outputs (only prepare-data can).
"""

from __future__ import annotations

import datetime
import re
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
# A Vertex AI TensorBoard's resource name, and an experiment's name (a Vertex ML Metadata
# context id: 4 to 128 characters of a-z, 0-9 and "-").
TENSORBOARD_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/tensorboards/([^/]+)$")
EXPERIMENT_NAME = re.compile(r"^[a-z0-9-]{4,128}$")


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


def step_caching(spec: dict) -> dict[str, bool]:
    """Task name -> whether Vertex AI may reuse an earlier run's outputs for it."""
    tasks = spec["root"]["dag"]["tasks"]
    return {name: bool(task.get("cachingOptions", {}).get("enableCache", False))
            for name, task in _in_run_order(tasks)}


def _in_run_order(tasks: dict) -> list[tuple[str, dict]]:
    """Tasks sorted by their depth in the DAG, then by name (prepare, train, evaluate, report)."""
    depth: dict[str, int] = {}

    def depth_of(name: str) -> int:
        if name not in depth:
            deps = tasks[name].get("dependentTasks", [])
            depth[name] = 1 + max((depth_of(d) for d in deps), default=-1)
        return depth[name]

    return sorted(tasks.items(), key=lambda item: (depth_of(item[0]), item[0]))


def check_tensorboard(tensorboard: str, region: str) -> None:
    """UserError unless `tensorboard` names a Vertex AI TensorBoard in `region`."""
    match = TENSORBOARD_NAME.match(tensorboard)
    if not match:
        raise UserError(f"--tensorboard {tensorboard}: expected a resource name "
                        "projects/PROJECT/locations/REGION/tensorboards/ID")
    if match.group(2) != region:
        raise UserError(f"--tensorboard {tensorboard}: the TensorBoard is in {match.group(2)}, "
                        f"the job in --region {region}; Vertex AI needs both in one region")


def check_experiment(experiment: str) -> None:
    """UserError unless `experiment` can name a Vertex AI experiment."""
    if not EXPERIMENT_NAME.match(experiment):
        raise UserError(f"--experiment {experiment}: an experiment name is 4 to 128 characters "
                        "of a-z, 0-9 and '-'")


def new_job_id(now: datetime.datetime | None = None) -> str:
    """A pipeline job id for a run submitted now: vnca-YYYYMMDD-HHMMSS-micros."""
    now = now or datetime.datetime.now(datetime.UTC)
    return f"{PIPELINE_NAME}-{now:%Y%m%d-%H%M%S-%f}"


def _connect(project: str | None, region: str) -> str:
    """Point the Vertex AI SDK at `project` (or the credentials' own) and `region` and make sure
    it has credentials: those aiplatform.init() was given, else Application Default
    Credentials. Return the project; UserError if it or the credentials are missing."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
    from google.cloud import aiplatform
    from google.cloud.aiplatform import initializer

    no_credentials = UserError(
        "no Google Cloud credentials found: run `gcloud auth application-default login` "
        "or set GOOGLE_APPLICATION_CREDENTIALS (or use --dry-run)")
    if not project:
        try:
            _, project = google.auth.default(
                scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except DefaultCredentialsError:
            raise no_credentials from None
        if not project:
            raise UserError(
                "no Google Cloud project: pass --project PROJECT (or set GOOGLE_CLOUD_PROJECT)")
    try:
        aiplatform.init(project=project, location=region)
    except ValueError as e:  # the SDK's list of regions does not have it
        raise UserError(f"--region {region}: {str(e).splitlines()[0]}") from None
    try:
        initializer.global_config.credentials  # noqa: B018 - ADC unless init() was given some
    except GoogleAuthError:
        raise no_credentials from None
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
    tensorboard: str | None = None,
    experiment: str | None = None,
    cache: bool = True,
) -> str | None:
    """Compile for `target` and submit; return the job's resource name (None for a dry run).

    `tensorboard`: a Vertex AI TensorBoard (projects/P/locations/REGION/tensorboards/ID) that
    each train step streams its event files to; they are written under
    `PIPELINE_ROOT/JOB_ID/tensorboard/train-<variant>/logs/`. `experiment`: the Vertex AI
    experiment the run joins. `cache=False`: no step reuses an earlier run's outputs."""
    if target not in ("vertex-tpu", "vertex-gpu"):
        raise UserError(f"--target {target}: submit takes vertex-tpu or vertex-gpu")
    if not storage.is_gcs_url(pipeline_root):
        raise UserError(f"--pipeline-root {pipeline_root}: must be a gs://BUCKET/PATH URL")
    storage.split_url(pipeline_root)
    if not region:
        raise UserError("--region is empty; pass a Vertex AI region such as us-central1")
    if tensorboard:
        check_tensorboard(tensorboard, region)
    if experiment:
        check_experiment(experiment)
    job_id = new_job_id()
    tensorboard_dir = f"{pipeline_root.rstrip('/')}/{job_id}/tensorboard" if tensorboard else ""

    with tempfile.TemporaryDirectory(prefix="vnca-submit-") as tmp:
        template = compile_pipeline(
            Path(tmp) / "pipeline.yaml", target=target, image=image, configs=configs,
            tier=tier, overrides=overrides, tensorboard=tensorboard or "",
            tensorboard_dir=tensorboard_dir,
        )
        spec = yaml.safe_load(template.read_text())
        params = parameter_values(spec)
        if dry_run:
            _print_dry_run(spec, params, project, region, pipeline_root, service_account, target,
                           job_id, tensorboard, experiment, cache)
            return None

        project = _connect(project, region)
        from google.api_core import exceptions as api_exceptions
        from google.cloud import aiplatform

        job = aiplatform.PipelineJob(
            display_name=PIPELINE_NAME, template_path=str(template), job_id=job_id,
            pipeline_root=pipeline_root, parameter_values=params,
            project=project, location=region,
            labels={"app": "vnca", "target": target},
            enable_caching=None if cache else False,  # None: each step's compiled setting
        )
        try:
            job.submit(service_account=service_account, experiment=experiment or None)
        except api_exceptions.GoogleAPICallError as e:
            raise UserError(f"Vertex AI refused the job: {_one_line(e)}") from None
        except RuntimeError as e:  # the SDK wraps the experiment's errors in RuntimeError
            if not experiment:
                raise
            cause = _one_line(e.__cause__ or e)
            try:
                created = job.resource_name  # set once Vertex AI has created the job
            except RuntimeError:
                created = ""
            if created:
                raise UserError(f"submitted {created}, but it could not be added to experiment "
                                f"{experiment}: {cause}") from None
            raise UserError(f"--experiment {experiment}: {cause}") from None
    print(f"submitted {job.resource_name}")
    print(f"console: https://console.cloud.google.com/vertex-ai/locations/{region}/pipelines/"
          f"runs/{job.name}?project={project}")
    if experiment:
        print(f"experiment: {experiment}")
    if tensorboard:
        print(f"tensorboard: {tensorboard} (event files under {tensorboard_dir}/)")
    return job.resource_name


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _print_dry_run(spec, params, project, region, pipeline_root, service_account, target,
                   job_id, tensorboard, experiment, cache):
    print("dry run: compiled the pipeline; nothing was sent to Google Cloud")
    print(f"pipeline: {spec['pipelineInfo']['name']}, target {target}, compiled by "
          f"{spec['sdkVersion']}")
    print(f"job id: {job_id}")
    print(f"project: {project or '(from the credentials at submit time)'}")
    print(f"region: {region}")
    print(f"pipeline root: {pipeline_root}")
    print(f"service account: {service_account or '(Compute Engine default)'}")
    print(f"tensorboard: {tensorboard or '(none)'}")
    print(f"experiment: {experiment or '(none)'}")
    cached = [name for name, cached in step_caching(spec).items() if cached]
    print("cache: " + ("off for every step (--no-cache)" if not cache else
                       f"steps that may reuse an earlier run's outputs: {', '.join(cached)}"
                       if cached else "no step reuses an earlier run's outputs"))
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
