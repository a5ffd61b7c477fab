"""The compiled pipeline: the committed pipeline.yaml is current, each target carries the
machine spec of each variant's config, its retries, timeouts, cache settings and TensorBoard,
the one-variant shape, and `vnca submit` dry-runs / fails cleanly offline (the submission
itself, through the Vertex AI SDK to a fake Vertex AI, is tests/test_submit_vertex.py)."""

import json
from pathlib import Path

import pytest
import yaml

from vnca import config
from vnca.errors import ConfigError, UserError
from vnca_pipeline import cli
from vnca_pipeline.compile import compile_pipeline
from vnca_pipeline.components.images import default_image
from vnca_pipeline.variants import (
    CONFIG_DIR,
    DEFAULT_VARIANTS,
    check_variant_names,
    load_variants,
)

IMAGE = "europe-west4-docker.pkg.dev/p/r/vnca-python-tpu:abc123"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(path) -> dict:
    spec = yaml.safe_load(Path(path).read_text())
    spec.pop("sdkVersion")  # the kfp version string, as KFP's own golden tests normalise it
    return spec


def _variant_configs(overrides_by_name: dict) -> list:
    return [config.load([CONFIG_DIR / f"{n}.yaml"], overrides_by_name.get(n, []))
            for n in DEFAULT_VARIANTS]


def _worker_pool(spec: dict, comp: str) -> list:
    params = spec["components"][f"comp-{comp}"]["inputDefinitions"]["parameters"]
    return params["worker_pool_specs"]["defaultValue"]


def _differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{path}/{key}: only in {'fresh' if key in a else 'committed'}")
            else:
                out += _differences(a[key], b[key], f"{path}/{key}")
        return out
    return [] if a == b else [f"{path}: differs"]


def test_committed_pipeline_yaml_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")  # `vnca compile`'s defaults
    diffs = _differences(_load(fresh), _load(REPO_ROOT / "pipeline.yaml"))
    assert not diffs, (
        "pipeline.yaml is out of date with components/, pipeline/ or configs/; run "
        "`vnca compile` and commit it. First differences: " + "; ".join(diffs[:5]))


def test_committed_pipeline_yaml_has_the_outputs_the_console_shows():
    """Train and evaluate (custom jobs on Vertex AI) emit Metrics; the report an HTML and a
    Markdown artifact, which the console renders, and the bounds (Metrics)."""
    comps = _load(REPO_ROOT / "pipeline.yaml")["components"]

    def outputs(comp: str) -> dict:
        arts = comps[f"comp-{comp}"]["outputDefinitions"]["artifacts"]
        return {k: v["artifactType"]["schemaTitle"] for k, v in arts.items()}

    for name in DEFAULT_VARIANTS:
        assert outputs(f"train-{name}") == {"model": "system.Model",
                                            "metrics": "system.Metrics"}
        assert outputs(f"evaluate-{name}") == {"evaluation": "system.Artifact",
                                               "metrics": "system.Metrics"}
    assert outputs("report") == {"report_dir": "system.Artifact", "report_html": "system.HTML",
                                 "report_md": "system.Markdown", "bounds": "system.Metrics"}


def test_vertex_tpu_compile_carries_each_variants_tpu_slice(tmp_path):
    tpu = {"baseline": ("ct5lp-hightpu-4t", "2x2"), "doubling": ("ct5lp-hightpu-8t", "2x4"),
           "nondoubling": ("ct5lp-hightpu-1t", "1x1")}
    cfgs = _variant_configs({n: [f"hardware.tpu_machine_type={m}", f"hardware.tpu_topology={t}"]
                             for n, (m, t) in tpu.items()})
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="vertex-tpu", image=IMAGE,
                                  configs=cfgs))
    tasks = spec["root"]["dag"]["tasks"]
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    for name, (machine, topology) in tpu.items():
        for step in ("train", "evaluate"):
            pools = _worker_pool(spec, f"{step}-{name}")
            assert len(pools) == 1 and pools[0]["replica_count"] == 1  # single host
            assert pools[0]["machine_spec"] == {"machine_type": machine, "tpu_topology": topology}
            assert pools[0]["container_spec"]["image_uri"] == IMAGE
            assert f"def {step}(" in " ".join(pools[0]["container_spec"]["command"])
        # The train task of this variant reads this variant's config parameter...
        train_in = tasks[f"train-{name}"]["inputs"]["parameters"]["config"]
        assert train_in == {"componentInputParameter": f"config_{name}"}
        # ...whose default is the config the hardware came from.
        baked = config.loads(root_params[f"config_{name}"]["defaultValue"])
        assert (baked.hardware.tpu_machine_type, baked.hardware.tpu_topology) == (machine, topology)
        assert baked == cfgs[DEFAULT_VARIANTS.index(name)]


def test_vertex_gpu_compile_sets_machine_and_accelerators(tmp_path):
    cfgs = _variant_configs({"doubling": ["hardware.gpu_type=NVIDIA_L4", "hardware.gpu_count=2",
                                          "hardware.gpu_machine_type=g2-standard-24"]})
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="vertex-gpu", image=IMAGE,
                                  configs=cfgs))
    assert _worker_pool(spec, "train-doubling")[0]["machine_spec"] == {
        "machine_type": "g2-standard-24", "accelerator_type": "NVIDIA_L4",
        "accelerator_count": 2}
    assert _worker_pool(spec, "evaluate-baseline")[0]["machine_spec"] == {
        "machine_type": "a2-highgpu-1g", "accelerator_type": "NVIDIA_TESLA_A100",
        "accelerator_count": 1}


def _tasks(spec: dict) -> dict:
    return spec["root"]["dag"]["tasks"]


def _param_default(spec: dict, comp: str, name: str):
    return spec["components"][f"comp-{comp}"]["inputDefinitions"]["parameters"][name].get(
        "defaultValue")


def test_vertex_compile_has_each_variants_retries_timeout_and_caching(tmp_path):
    cfgs = _variant_configs({"doubling": ["hardware.retries=3", "hardware.timeout_hours=2.5"],
                             "nondoubling": ["hardware.retries=0"]})
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="vertex-tpu", image=IMAGE,
                                  configs=cfgs))
    tasks = _tasks(spec)
    retries = {n: tasks[n].get("retryPolicy", {}).get("maxRetryCount") for n in tasks}
    assert retries == {"prepare-data": 2, "report": 2,
                       "train-baseline": 1, "evaluate-baseline": 1,  # the paper configs' 1
                       "train-doubling": 3, "evaluate-doubling": 3,
                       "train-nondoubling": None, "evaluate-nondoubling": None}
    assert tasks["train-doubling"]["retryPolicy"] == {
        "maxRetryCount": 3, "backoffDuration": "300s", "backoffFactor": 2.0,
        "backoffMaxDuration": "3600s"}
    for name, hours in (("baseline", 24), ("doubling", 2.5), ("nondoubling", 24)):
        for step in ("train", "evaluate"):
            assert _param_default(spec, f"{step}-{name}", "timeout") == f"{round(hours * 3600)}s"
            assert _param_default(spec, f"{step}-{name}", "tensorboard") == ""
    # Only prepare-data may reuse an earlier run's outputs.
    assert {n: t["cachingOptions"].get("enableCache", False) for n, t in tasks.items()} == {
        n: n == "prepare-data" for n in tasks}


def test_local_compile_has_no_retries_that_kfp_local_would_sleep_through(tmp_path):
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="local", image=IMAGE))
    assert all("retryPolicy" not in t for t in _tasks(spec).values())


def test_tensorboard_goes_to_each_train_custom_job_only(tmp_path):
    tensorboard = "projects/p/locations/europe-west4/tensorboards/7"
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="vertex-gpu", image=IMAGE,
                                  tensorboard=tensorboard, tensorboard_dir="gs://b/r/job/tb/"))
    for name in DEFAULT_VARIANTS:
        assert _param_default(spec, f"train-{name}", "tensorboard") == tensorboard
        assert _param_default(spec, f"train-{name}", "base_output_directory") == (
            f"gs://b/r/job/tb/train-{name}")
        assert _param_default(spec, f"evaluate-{name}", "tensorboard") == ""
        assert _param_default(spec, f"evaluate-{name}", "base_output_directory") == ""
    with pytest.raises(UserError, match="vertex target and a gs:// folder"):
        compile_pipeline(tmp_path / "q.yaml", target="local", tensorboard=tensorboard,
                         tensorboard_dir="gs://b/r")
    with pytest.raises(UserError, match="vertex target and a gs:// folder"):
        compile_pipeline(tmp_path / "q.yaml", tensorboard=tensorboard, tensorboard_dir="/tmp/x")


@pytest.mark.parametrize(("override", "key"), [
    ("hardware.retries=-1", "hardware.retries"), ("hardware.retries=6", "hardware.retries"),
    ("hardware.timeout_hours=0", "hardware.timeout_hours"),
    ("hardware.timeout_hours=169", "hardware.timeout_hours")])
def test_retries_and_timeout_out_of_bounds_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        config.load([CONFIG_DIR / "doubling.yaml"], [override])


def test_local_compile_runs_every_step_in_the_image_without_installing(tmp_path):
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="local", image=IMAGE))
    execs = spec["deploymentSpec"]["executors"]
    assert len(execs) == 1 + 2 * len(DEFAULT_VARIANTS) + 1
    for ex in execs.values():
        c = ex["container"]
        assert c["image"] == IMAGE
        assert "pip install" not in " ".join(c["command"] + c.get("args", []))
    assert "worker_pool_specs" not in json.dumps(spec)
    defaults = {k: v.get("defaultValue")
                for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["data_source"] == "bundled"
    assert sorted(defaults) == sorted(
        ["data_source", "raw_dir", "download", "tfds_dir"]
        + [f"config_{n}" for n in DEFAULT_VARIANTS])
    # A report step that takes every variant's evaluation and model.
    report_inputs = spec["root"]["dag"]["tasks"]["report"]["inputs"]["artifacts"]
    assert sorted(report_inputs) == sorted(
        ["data"] + [f"{k}_{n}" for n in DEFAULT_VARIANTS for k in ("eval", "model")])


def test_the_variants_order_is_the_pipelines_not_the_command_lines(tmp_path):
    reordered = [CONFIG_DIR / f"{n}.yaml" for n in reversed(DEFAULT_VARIANTS)]
    spec = _load(compile_pipeline(tmp_path / "p.yaml", configs=reordered))
    assert not _differences(spec, _load(REPO_ROOT / "pipeline.yaml"))


def test_compile_cli_writes_the_default_tpu_image(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out), "--config",
                     str(CONFIG_DIR / "doubling.yaml")]) == 0
    assert str(out) in capsys.readouterr().out
    spec = _load(out)
    assert _worker_pool(spec, "train-doubling")[0]["container_spec"]["image_uri"] == (
        default_image("vertex-tpu"))
    # The one-variant shape: its config is the parameter `config`.
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert sorted(params) == ["config", "data_source", "download", "raw_dir", "tfds_dir"]
    assert config.loads(params["config"]["defaultValue"]) == config.load(
        [CONFIG_DIR / "doubling.yaml"])


def test_one_variant_pipeline_of_any_name(tmp_path):
    cfg = config.load([CONFIG_DIR / "doubling.yaml"], ["name=wide_doubling"])
    spec = _load(compile_pipeline(tmp_path / "p.yaml", target="local", image=IMAGE,
                                  configs=[cfg]))
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == ["evaluate-wide-doubling", "prepare-data", "report",
                             "train-wide-doubling"]
    assert tasks["train-wide-doubling"]["inputs"]["parameters"]["config"] == {
        "componentInputParameter": "config"}
    report = tasks["report"]["inputs"]["artifacts"]
    assert report["evaluation"]["taskOutputArtifact"]["producerTask"] == "evaluate-wide-doubling"
    assert report["model"]["taskOutputArtifact"]["producerTask"] == "train-wide-doubling"
    assert sorted(report) == ["data", "evaluation", "model"]


@pytest.mark.parametrize("names", [["baseline", "doubling"],
                                   ["baseline", "doubling", "wide_doubling"]])
def test_other_shapes_are_refused_in_one_line(names, tmp_path):
    configs = [config.load([CONFIG_DIR / f"{n.removeprefix('wide_')}.yaml"], [f"name={n}"])
               for n in names]
    with pytest.raises(ConfigError) as e:
        compile_pipeline(tmp_path / "p.yaml", configs=configs)
    assert "\n" not in str(e.value) and "baseline, doubling, nondoubling or any one" in str(
        e.value)


@pytest.mark.parametrize("names", [["Doubling"], ["a-b"], ["class"], ["x", "x"], []])
def test_variant_names_must_be_distinct_identifiers(names):
    with pytest.raises(ConfigError):
        check_variant_names(names)


@pytest.mark.slow
def test_submit_dry_run_prints_parameters_and_machine_specs(capsys, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("a dry run must not contact Google Cloud")

    monkeypatch.setattr("google.auth.default", no_network)
    rc = cli.main(["submit", "--project", "p", "--region", "europe-west4", "--pipeline-root",
                   "gs://bkt/vnca", "--image", IMAGE, "--set", "train.seed=7", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "nothing was sent to Google Cloud" in out
    lines = out.splitlines()
    for v in load_variants():
        hw = v.config.hardware
        train_line = next(ln for ln in lines if ln.strip().startswith(f"train-{v.name} "))
        assert f"machine_type={hw.tpu_machine_type}" in train_line
        assert f"tpu_topology={hw.tpu_topology}" in train_line
        assert f"image={IMAGE}" in train_line
        param_line = next(ln for ln in lines if ln.strip().startswith(f"config_{v.name}:"))
        baked = config.loads(param_line.split(":", 1)[1].strip())
        assert baked.train.seed == 7  # --set applies to every variant
        assert baked == config.load([CONFIG_DIR / f"{v.name}.yaml"], ["train.seed=7"])
    assert "  data_source: raw" in lines and "  download: true" in lines
    assert "region: europe-west4" in lines and "pipeline root: gs://bkt/vnca" in lines
    assert "tensorboard: (none)" in lines and "experiment: (none)" in lines
    assert "cache: steps that may reuse an earlier run's outputs: prepare-data" in lines
    plan = lines[lines.index("plan (estimated before the run, `vnca plan` for options):") + 1:]
    assert plan[0].split()[:3] == ["variant", "params", "GFLOP/step"]
    assert [row.split()[0] for row in plan[1:4]] == ["baseline", "doubling", "nondoubling"]
    assert all("8 x TPU v5e" in row for row in plan[1:4]) and "chip-hours" in plan[4]


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """An environment with no Application Default Credentials and no metadata server, and a
    Vertex AI SDK that was given none (its global configuration is restored afterwards)."""
    from google.cloud.aiplatform import initializer

    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT",
                "CLOUDSDK_CORE_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no ADC file there
    monkeypatch.setattr("google.auth.compute_engine._metadata.is_on_gce",
                        lambda *a, **k: False)
    sdk = vars(initializer.global_config)
    saved = dict(sdk)
    sdk.update(vars(initializer._Config()))  # as in a fresh process
    yield
    sdk.clear()
    sdk.update(saved)


def _submit_error(capsys, extra):
    rc = cli.main(["submit", "--pipeline-root", "gs://bkt/vnca", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("vnca submit: error: ")
    return err


def test_submit_without_credentials_says_so_in_one_line(no_credentials, capsys):
    err = _submit_error(capsys, ["--project", "p"])
    assert "no Google Cloud credentials" in err and "gcloud auth application-default" in err


def test_submit_without_project_says_so_in_one_line(no_credentials, capsys, monkeypatch,
                                                    tmp_path):
    key = tmp_path / "adc.json"
    key.write_text(json.dumps({"type": "authorized_user", "client_id": "x.apps",
                               "client_secret": "s", "refresh_token": "r"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    err = _submit_error(capsys, [])
    assert "no Google Cloud project" in err and "--project" in err


def test_submit_refuses_a_local_pipeline_root(capsys):
    rc = cli.main(["submit", "--pipeline-root", "runs/x", "--dry-run"])
    assert rc == 2 and "gs://BUCKET/PATH" in capsys.readouterr().err
