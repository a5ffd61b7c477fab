"""Each KFP component's body, run in-process through `component.python_func` on artifacts made
here.

prepare-data runs the real library on the bundled sample. train, evaluate and report bodies are
run against recording stand-ins for `vnca.train`, `vnca.evaluate` and `vnca.report` (put in
`sys.modules`): these tests check what a body hands the library and what it makes of the
result (artifact paths, parsed config, Metrics and metadata). The real library behind them runs
end to end in tests/test_run_local.py.
"""

import dataclasses
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from vnca import artifacts, config, contracts
from vnca.errors import ConfigError
from vnca_pipeline.components.evaluate import evaluate as evaluate_op
from vnca_pipeline.components.prepare_data import prepare_data as prepare_data_op
from vnca_pipeline.components.report import report as report_op
from vnca_pipeline.components.report import report_one_variant as report_one_variant_op
from vnca_pipeline.components.train import train as train_op
from vnca_pipeline.variants import CONFIG_DIR, config_text


@pytest.fixture
def fake_module(monkeypatch):
    """Install a stand-in module (e.g. 'vnca.train') that a component body will import."""

    def install(name: str, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        monkeypatch.setattr(sys.modules[parent], child, module, raising=False)
        return module

    return install


def _artifact(cls, path: Path):
    """An artifact as KFP hands it to a body: its path's parent exists, the path does not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return cls(uri=str(path))


def test_prepare_data_body_writes_the_bundled_dataset(tmp_path):
    dataset = _artifact(Dataset, tmp_path / "prepare-data" / "dataset")
    prepare_data_op.python_func(dataset=dataset, source="bundled")
    with np.load(Path(dataset.path) / artifacts.DATASET, allow_pickle=False) as npz:
        for split in artifacts.SPLITS:
            x, y = npz[f"{split}_x"], npz[f"{split}_y"]
            assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28)
            assert len(x) > 0 and y.shape == (len(x),)
            assert set(np.unique(x)) <= {0, 1}
            assert y.min() >= 0 and y.max() <= 9
    assert dataset.metadata["source"] == "bundled"
    json.dumps(dataset.metadata)  # metadata must be JSON for KFP's executor output


def test_prepare_data_body_maps_gcs_paths_and_gives_downloads_a_scratch_dir(
    tmp_path, fake_module
):
    calls = []

    def prepare_data(source, out_dir, raw_dir, download, tfds_dir):
        calls.append({"source": source, "out_dir": out_dir, "raw_dir": raw_dir, "download": download,
                          "tfds_dir": tfds_dir})
        return {"summary": "stub"}

    fake_module("vnca.data.prepare", prepare_data=prepare_data)
    dataset = _artifact(Dataset, tmp_path / "dataset")
    prepare_data_op.python_func(dataset=dataset, source="raw", raw_dir="gs://bkt/mnist/raw")
    prepare_data_op.python_func(dataset=dataset, source="tfds", tfds_dir="gs://bkt/tfds")
    prepare_data_op.python_func(dataset=dataset, source="raw", download=True)
    assert calls[0] == {"source": "raw", "out_dir": dataset.path, "raw_dir": "/gcs/bkt/mnist/raw",
                            "download": False, "tfds_dir": None}
    assert calls[1]["raw_dir"] is None and calls[1]["tfds_dir"] == "/gcs/bkt/tfds"
    scratch = Path(calls[2]["raw_dir"])  # a fresh, empty, writable folder
    assert calls[2]["download"] and scratch.is_dir() and not any(scratch.iterdir())
    scratch.rmdir()
    assert dataset.metadata == {"source": "raw", "summary": "stub"}


def test_train_body_parses_the_config_text_and_writes_into_the_model(tmp_path, fake_module):
    calls = []

    def train_and_evaluate(cfg, data_dir, out_dir, steps=None):
        calls.append({"cfg": cfg, "data_dir": data_dir, "out_dir": out_dir, "steps": steps})
        os.makedirs(out_dir)
        config.save(cfg, os.path.join(out_dir, artifacts.RESOLVED_CONFIG))
        return {"variant": cfg.model.variant, "steps": np.int64(cfg.train.steps)}

    fake_module("vnca.train", train_and_evaluate=train_and_evaluate)
    cfg = config.load([CONFIG_DIR / "nondoubling.yaml", CONFIG_DIR / "smoke.yaml"],
                      ["train.steps=7", "model.update_prob=0.75"])
    data = _artifact(Dataset, tmp_path / "prepare-data" / "dataset")
    model = _artifact(Model, tmp_path / "train" / "model")

    train_op.python_func(config=config_text(cfg), data=data, model=model)

    assert len(calls) == 1
    assert calls[0]["cfg"] == cfg  # the one-line YAML parameter round-trips exactly
    assert calls[0]["data_dir"] == data.path and calls[0]["out_dir"] == model.path
    assert calls[0]["steps"] is None  # train.steps comes from the config
    assert config.load([Path(model.path) / artifacts.RESOLVED_CONFIG]) == cfg
    assert model.metadata == {"name": "nondoubling", "variant": "nondoubling", "steps": 7}
    assert type(model.metadata["steps"]) is int
    json.dumps(model.metadata)


def test_train_body_reports_a_bad_config_parameter_in_one_line(tmp_path, fake_module):
    fake_module("vnca.train", train_and_evaluate=lambda *a, **k: pytest.fail("must not train"))
    data = _artifact(Dataset, tmp_path / "d")
    model = _artifact(Model, tmp_path / "m")
    with pytest.raises(ConfigError) as err:
        train_op.python_func(config="{name: x, train: {stepz: 3}}", data=data, model=model)
    assert "train.stepz" in str(err.value) and "\n" not in str(err.value)


def test_evaluate_body_logs_the_bound_as_metrics(tmp_path, fake_module):
    calls = []

    def evaluate(model_dir, data_dir, out_dir, overrides):
        calls.append({"model_dir": model_dir, "data_dir": data_dir, "out_dir": out_dir,
                          "overrides": overrides})
        return {"variant": "doubling",
                "iwelbo": {"k": 4, "mean_nats": np.float32(-95.25), "stderr_nats": 0.125,
                           "bits_per_dim": 0.17525}}

    fake_module("vnca.evaluate", evaluate=evaluate)
    data = _artifact(Dataset, tmp_path / "prepare-data" / "dataset")
    model = _artifact(Model, tmp_path / "train" / "model")
    evaluation = _artifact(Artifact, tmp_path / "evaluate" / "evaluation")
    metrics = _artifact(Metrics, tmp_path / "evaluate" / "metrics")

    evaluate_op.python_func(data=data, model=model, evaluation=evaluation, metrics=metrics)

    assert calls == [{"model_dir": model.path, "data_dir": data.path, "out_dir": evaluation.path,
                          "overrides": []}]
    assert metrics.metadata == {"iwelbo_nats": -95.25, "iwelbo_stderr_nats": 0.125,
                                "bits_per_dim": 0.17525}
    assert all(type(v) is float for v in metrics.metadata.values())


def _eval_metrics(variant: str, bound: float) -> contracts.EvalMetrics:
    """The smallest metrics.json `vnca evaluate` writes (no optional section)."""
    return contracts.EvalMetrics(
        variant=variant, name=variant, smoke=True, tier="smoke", model_dir="model",
        n_test_images=8, device="1 x cpu", eval_config={}, eval_steps=None,
        iwelbo=contracts.IwBound(
            k=4, n_images=8, mean_nats=bound, stderr_nats=None, bits_per_dim=0.2,
            stderr_bits_per_dim=None, n_pixels=784, elbo_mean_nats=None, log_px_mean_nats=None,
            batch_size=8, sample_chunk=4, images_per_second=10.0, paper_nats=None,
            reproduction_nats=None),
        classifier=contracts.ClassifierInfo(kind="mlp", n_train=8, test_accuracy=None),
        seconds={}, figures=[])


@pytest.fixture
def fake_build_report(fake_module):
    """A stand-in vnca.report.build_report that records its calls and writes a report."""
    calls = []

    def build_report(eval_dirs, train_dirs, data_dir, out_dir):
        calls.append({"eval_dirs": eval_dirs, "train_dirs": train_dirs, "data_dir": data_dir,
                      "out_dir": out_dir})
        os.makedirs(out_dir)
        html = Path(out_dir) / artifacts.REPORT_HTML
        html.write_text("<html>report</html>")
        (Path(out_dir) / artifacts.REPORT_MD).write_text("# report\n")
        return str(html)

    fake_module("vnca.report", build_report=build_report)
    return calls


def _evaluated(tmp_path, name: str, bound: float, variant: str | None = None):
    """A variant's evaluation (with its metrics.json) and model artifacts."""
    ev = tmp_path / f"evaluate-{name}" / "evaluation"
    ev.mkdir(parents=True)
    metrics = dataclasses.replace(_eval_metrics(variant or name, bound), name=name)
    metrics.write(ev / artifacts.EVAL_METRICS)
    return Artifact(uri=str(ev)), _artifact(Model, tmp_path / f"train-{name}" / "model")


def _report_outputs(tmp_path) -> dict:
    return {"report_dir": _artifact(Artifact, tmp_path / "report" / "report_dir"),
            "report_html": _artifact(HTML, tmp_path / "report" / "report_html"),
            "bounds": _artifact(Metrics, tmp_path / "report" / "bounds")}


def test_report_body_builds_one_report_and_logs_every_variants_bound(tmp_path,
                                                                     fake_build_report):
    bounds_in = {"baseline": -86.5, "doubling": -84.25, "nondoubling": -90.0}
    inputs = {}
    for name, bound in bounds_in.items():
        inputs[f"eval_{name}"], inputs[f"model_{name}"] = _evaluated(tmp_path, name, bound)
    data = _artifact(Dataset, tmp_path / "prepare-data" / "dataset")
    out = _report_outputs(tmp_path)

    assert list(report_op.component_spec.inputs) == [
        "data", "eval_baseline", "model_baseline", "eval_doubling", "model_doubling",
        "eval_nondoubling", "model_nondoubling"]
    report_op.python_func(data=data, **out, **inputs)

    assert fake_build_report == [{
        "eval_dirs": [inputs[f"eval_{n}"].path for n in bounds_in],
        "train_dirs": [inputs[f"model_{n}"].path for n in bounds_in],
        "data_dir": data.path, "out_dir": out["report_dir"].path}]
    assert Path(out["report_html"].path).read_text() == "<html>report</html>"
    assert out["bounds"].metadata == {f"{n}_iwelbo_nats": b for n, b in bounds_in.items()}
    assert all(math.isfinite(v) for v in out["bounds"].metadata.values())


def test_one_variant_report_body_logs_the_bound_under_the_variants_name(tmp_path,
                                                                        fake_build_report):
    evaluation, model = _evaluated(tmp_path, "wide_doubling", -84.25, variant="doubling")
    data = _artifact(Dataset, tmp_path / "prepare-data" / "dataset")
    out = _report_outputs(tmp_path)

    assert list(report_one_variant_op.component_spec.inputs) == ["data", "evaluation", "model"]
    report_one_variant_op.python_func(data=data, evaluation=evaluation, model=model, **out)

    assert fake_build_report == [{"eval_dirs": [evaluation.path], "train_dirs": [model.path],
                                  "data_dir": data.path, "out_dir": out["report_dir"].path}]
    assert Path(out["report_html"].path).read_text() == "<html>report</html>"
    assert out["bounds"].metadata == {"wide_doubling_iwelbo_nats": -84.25}
