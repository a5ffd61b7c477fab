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
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from vnca import artifacts, config, contracts
from vnca.errors import ConfigError, DataError
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


# `_eval_metrics(reconstruction_accuracy=NO_SECTION)`: metrics.json without that section.
NO_SECTION = object()


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
        return types.SimpleNamespace(summary="stub")  # a contracts.MatchReport's summary

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


def _finished_run(out_dir: str, cfg, records, final_loss=12.5, wall_time_s=3.25):
    """What train_and_evaluate leaves in `out_dir`: config.yaml, metrics.jsonl (`records`,
    written through their contracts) and summary.json."""
    os.makedirs(out_dir)
    config.save(cfg, os.path.join(out_dir, artifacts.RESOLVED_CONFIG))
    for rec in records:
        contracts.append_train_record(os.path.join(out_dir, artifacts.TRAIN_METRICS), rec)
    summary = contracts.TrainSummary(
        variant=cfg.model.variant, name=cfg.name, steps=cfg.train.steps,
        wall_time_s=wall_time_s, hardware="1 x cpu", n_devices=1, n_processes=1, smoke=True,
        tier="smoke", param_count=10, final_loss=final_loss, batch_size=cfg.train.batch_size,
        train_split="train", resumed_from_step=0, precision="float32")
    summary.write(os.path.join(out_dir, artifacts.TRAIN_SUMMARY))
    return summary.to_dict()


def _train_record(step, **values):
    fields = {"loss": 1.0, "kl": 2.0, "recon": -3.0, "elbo": -4.0, "grad_norm": 5.0,
              "images_per_s": 6.0, "elapsed_s": 7.0}
    return contracts.TrainRecord(step=step, **{**fields, **values})


def _valid_record(step, val_elbo):
    return contracts.ValidRecord(step=step, split="valid", val_elbo=val_elbo, val_images=8,
                                 val_iw_samples=1)


def test_train_body_parses_the_config_text_and_writes_into_the_model(tmp_path, fake_module):
    calls = []

    def train_and_evaluate(cfg, data_dir, out_dir, steps=None):
        calls.append({"cfg": cfg, "data_dir": data_dir, "out_dir": out_dir, "steps": steps})
        records = [_train_record(5, kl=9.0, elbo=-99.0), _valid_record(5, -101.5),
                   _train_record(7, kl=8.5, elbo=-97.25, pool_rows=4.0)]
        return _finished_run(out_dir, cfg, records, final_loss=96.5, wall_time_s=42.0)

    fake_module("vnca.train", train_and_evaluate=train_and_evaluate)
    cfg = config.load([CONFIG_DIR / "nondoubling.yaml", CONFIG_DIR / "smoke.yaml"],
                      ["train.steps=7", "model.update_prob=0.75"])
    data = _artifact(Dataset, tmp_path / "prepare-data" / "dataset")
    model = _artifact(Model, tmp_path / "train" / "model")
    metrics = _artifact(Metrics, tmp_path / "train" / "metrics")

    train_op.python_func(config=config_text(cfg), data=data, model=model, metrics=metrics)

    assert len(calls) == 1
    assert calls[0]["cfg"] == cfg  # the one-line YAML parameter round-trips exactly
    assert calls[0]["data_dir"] == data.path and calls[0]["out_dir"] == model.path
    assert calls[0]["steps"] is None  # train.steps comes from the config
    assert config.load([Path(model.path) / artifacts.RESOLVED_CONFIG]) == cfg
    assert model.metadata == {"name": "nondoubling", "variant": "nondoubling", "steps": 7}
    assert type(model.metadata["steps"]) is int
    json.dumps(model.metadata)
    # The last training record's means, the last validation, the summary's figures.
    assert metrics.metadata == {"final_loss": 96.5, "final_kl": 8.5, "final_elbo": -97.25,
                                "val_elbo": -101.5, "steps": 7.0, "wall_time_s": 42.0}
    assert all(type(v) is float for v in metrics.metadata.values())


def test_train_body_leaves_out_null_and_non_finite_figures(tmp_path, fake_module):
    """No validation (train.val_every: 0), no final loss, a NaN in the training log (`Real`
    fields may hold one): only numbers reach the Metrics artifact."""

    def train_and_evaluate(cfg, data_dir, out_dir, steps=None):
        return _finished_run(out_dir, cfg, [_train_record(3, kl=float("nan"), elbo=-50.0)],
                             final_loss=None)

    fake_module("vnca.train", train_and_evaluate=train_and_evaluate)
    cfg = config.load([CONFIG_DIR / "baseline.yaml", CONFIG_DIR / "smoke.yaml"],
                      ["train.steps=3", "train.val_every=0"])
    model = _artifact(Model, tmp_path / "m")
    metrics = _artifact(Metrics, tmp_path / "metrics")
    train_op.python_func(config=config_text(cfg), data=_artifact(Dataset, tmp_path / "d"),
                         model=model, metrics=metrics)
    assert metrics.metadata == {"final_elbo": -50.0, "steps": 3.0, "wall_time_s": 3.25}
    json.dumps(metrics.metadata, allow_nan=False)


def test_train_body_refuses_a_summary_that_breaks_its_contract(tmp_path, fake_module):
    def train_and_evaluate(cfg, data_dir, out_dir, steps=None):
        _finished_run(out_dir, cfg, [_train_record(3)])
        path = os.path.join(out_dir, artifacts.TRAIN_SUMMARY)
        d = json.loads(Path(path).read_text())
        del d["wall_time_s"]
        Path(path).write_text(json.dumps(d))

    fake_module("vnca.train", train_and_evaluate=train_and_evaluate)
    cfg = config.load([CONFIG_DIR / "baseline.yaml", CONFIG_DIR / "smoke.yaml"])
    with pytest.raises(DataError) as err:
        train_op.python_func(config=config_text(cfg), data=_artifact(Dataset, tmp_path / "d"),
                             model=_artifact(Model, tmp_path / "m"),
                             metrics=_artifact(Metrics, tmp_path / "metrics"))
    assert "'wall_time_s'" in str(err.value) and "\n" not in str(err.value)


def test_train_body_reports_a_bad_config_parameter_in_one_line(tmp_path, fake_module):
    fake_module("vnca.train", train_and_evaluate=lambda *a, **k: pytest.fail("must not train"))
    data = _artifact(Dataset, tmp_path / "d")
    model = _artifact(Model, tmp_path / "m")
    with pytest.raises(ConfigError) as err:
        train_op.python_func(config="{name: x, train: {stepz: 3}}", data=data, model=model,
                             metrics=_artifact(Metrics, tmp_path / "metrics"))
    assert "train.stepz" in str(err.value) and "\n" not in str(err.value)


def _evaluate_outputs(tmp_path) -> dict:
    return {"data": _artifact(Dataset, tmp_path / "prepare-data" / "dataset"),
            "model": _artifact(Model, tmp_path / "train" / "model"),
            "evaluation": _artifact(Artifact, tmp_path / "evaluate" / "evaluation"),
            "metrics": _artifact(Metrics, tmp_path / "evaluate" / "metrics")}


def _fake_evaluate(fake_module, written: contracts.EvalMetrics, calls: list | None = None):
    """A stand-in vnca.evaluate.evaluate that writes `written` as metrics.json (through its
    contract) and returns a dict the body must not rely on."""

    def evaluate(model_dir, data_dir, out_dir, overrides):
        if calls is not None:
            calls.append({"model_dir": model_dir, "data_dir": data_dir, "out_dir": out_dir,
                          "overrides": overrides})
        os.makedirs(out_dir)
        written.write(os.path.join(out_dir, artifacts.EVAL_METRICS))
        return {"iwelbo": {"stderr_nats": "not read from here"}}

    fake_module("vnca.evaluate", evaluate=evaluate)


def test_evaluate_body_logs_the_bound_as_metrics(tmp_path, fake_module):
    calls = []
    written = _eval_metrics("doubling", -95.25, stderr_nats=0.125, bits_per_dim=0.17525,
                            reconstruction_accuracy=0.75)
    _fake_evaluate(fake_module, written, calls)
    io = _evaluate_outputs(tmp_path)

    evaluate_op.python_func(**io)

    assert calls == [{"model_dir": io["model"].path, "data_dir": io["data"].path,
                      "out_dir": io["evaluation"].path, "overrides": []}]
    assert io["metrics"].metadata == {"iwelbo_nats": -95.25, "iwelbo_stderr_nats": 0.125,
                                      "bits_per_dim": 0.17525, "reconstruction_accuracy": 0.75}
    assert all(type(v) is float for v in io["metrics"].metadata.values())


@pytest.mark.parametrize("nulls, left_out", [
    # eval.n_images: 1 -> a bound over one image has no standard error (null).
    ({"stderr_nats": None}, {"iwelbo_stderr_nats"}),
    # eval.classify_images: 0 -> no reconstruction section.
    ({"reconstruction_accuracy": NO_SECTION}, {"reconstruction_accuracy"}),
    # A reconstruction section whose accuracy is null.
    ({"reconstruction_accuracy": None}, {"reconstruction_accuracy"}),
    ({"stderr_nats": None, "reconstruction_accuracy": NO_SECTION},
     {"iwelbo_stderr_nats", "reconstruction_accuracy"}),
], ids=["one-image", "no-reconstruction", "null-accuracy", "both"])
def test_evaluate_body_leaves_out_what_metrics_json_holds_as_null(tmp_path, fake_module, nulls,
                                                                   left_out):
    values = {"stderr_nats": 0.5, "bits_per_dim": 0.25, "reconstruction_accuracy": 0.5}
    written = _eval_metrics("baseline", -90.0, **{**values, **nulls})
    assert (written.reconstruction is None) == (nulls.get("reconstruction_accuracy", 0)
                                                is NO_SECTION)
    _fake_evaluate(fake_module, written)
    io = _evaluate_outputs(tmp_path)
    evaluate_op.python_func(**io)
    every = {"iwelbo_nats", "iwelbo_stderr_nats", "bits_per_dim", "reconstruction_accuracy"}
    assert set(io["metrics"].metadata) == every - left_out
    assert io["metrics"].metadata["iwelbo_nats"] == -90.0
    json.dumps(io["metrics"].metadata, allow_nan=False)


def test_evaluate_body_refuses_metrics_json_that_breaks_its_contract(tmp_path, fake_module):
    def evaluate(model_dir, data_dir, out_dir, overrides):
        os.makedirs(out_dir)
        d = _eval_metrics("baseline", -90.0).to_json()
        d["iwelbo"]["stderr_nats"] = "0.5"
        Path(out_dir, artifacts.EVAL_METRICS).write_text(json.dumps(d))

    fake_module("vnca.evaluate", evaluate=evaluate)
    io = _evaluate_outputs(tmp_path)
    with pytest.raises(DataError) as err:
        evaluate_op.python_func(**io)
    assert "'iwelbo.stderr_nats'" in str(err.value) and "\n" not in str(err.value)
    assert io["metrics"].metadata == {}


@pytest.mark.slow
def test_evaluate_body_with_one_test_image_runs_the_real_evaluation(tmp_path, make_eval_dataset,
                                                                    make_model_dir):
    """`eval.n_images: 1` (the config allows it): the real evaluation writes a null standard
    error, and the step logs the rest instead of dying on it."""
    small = ["eval.n_images=1", "eval.iw_samples=2", "eval.batch_size=1", "eval.n_samples=0",
             "eval.n_reconstructions=1", "eval.classify_images=1", "eval.untrained_images=0",
             "eval.tsne_images=0", "eval.n_interpolations=0"]
    make_eval_dataset(tmp_path / "prepare-data" / "dataset")
    make_model_dir(tmp_path / "train" / "model", "baseline", *small)
    io = _evaluate_outputs(tmp_path)
    evaluate_op.python_func(**io)
    written = contracts.EvalMetrics.read(Path(io["evaluation"].path) / artifacts.EVAL_METRICS)
    assert written.iwelbo.n_images == 1 and written.iwelbo.stderr_nats is None
    assert set(io["metrics"].metadata) == {"iwelbo_nats", "bits_per_dim",
                                           "reconstruction_accuracy"}
    assert io["metrics"].metadata["iwelbo_nats"] == written.iwelbo.mean_nats
    assert io["metrics"].metadata["reconstruction_accuracy"] in (0.0, 1.0)  # one image


def _eval_metrics(variant: str, bound: float, stderr_nats=None, bits_per_dim=0.2,
                  reconstruction_accuracy=NO_SECTION) -> contracts.EvalMetrics:
    """A metrics.json as `vnca evaluate` writes it; by default the smallest one (no optional
    section, a null standard error). A `reconstruction_accuracy` (a number or None) adds the
    reconstruction section."""
    recon = None
    if reconstruction_accuracy is not NO_SECTION:
        recon = contracts.Reconstruction(n_images=8, accuracy=reconstruction_accuracy,
                                         classifier_accuracy_originals=0.9)
    return contracts.EvalMetrics(
        variant=variant, name=variant, smoke=True, tier="smoke", model_dir="model",
        n_test_images=8, device="1 x cpu", eval_config={}, eval_steps=None,
        precision="float32",
        iwelbo=contracts.IwBound(
            k=4, n_images=8, mean_nats=bound, stderr_nats=stderr_nats,
            bits_per_dim=bits_per_dim, stderr_bits_per_dim=None, n_pixels=784,
            elbo_mean_nats=None, log_px_mean_nats=None, batch_size=8, sample_chunk=4,
            images_per_second=10.0, paper_nats=None, reproduction_nats=None),
        classifier=contracts.ClassifierInfo(kind="mlp", n_train=8, test_accuracy=None),
        reconstruction=recon, seconds={}, figures=[])


# A report.md as vnca.report writes it: text, a table, figures linked relative to report_dir.
REPORT_MD = ("# report\n\n| variant | bound |\n|---|---|\n| baseline | -86.5 |\n\n"
             "**Prior samples**\n\n![Prior samples](figures/baseline/samples.png)\n")


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
        (Path(out_dir) / artifacts.REPORT_MD).write_text(REPORT_MD)
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
            "report_md": _artifact(Markdown, tmp_path / "report" / "report_md"),
            "bounds": _artifact(Metrics, tmp_path / "report" / "bounds")}


def _check_markdown(path: str) -> None:
    """The Markdown artifact: report.md's text and tables; each figure, whose link the console
    could not follow, is a note pointing to report_html."""
    md = Path(path).read_text()
    assert md.startswith("# report\n") and "| baseline | -86.5 |" in md
    assert "**Prior samples**" in md and "](figures/" not in md and "![" not in md
    assert "*(in report_html; report_dir/figures/baseline/samples.png)*" in md


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
    _check_markdown(out["report_md"].path)
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
    _check_markdown(out["report_md"].path)
    assert out["bounds"].metadata == {"wide_doubling_iwelbo_nats": -84.25}


def test_outputs_the_vertex_console_shows():
    """Train and evaluate emit Metrics, the report an HTML and a Markdown artifact (the types
    the console renders) besides its Metrics."""

    def outputs(op):
        return {k: v.type for k, v in op.component_spec.outputs.items()}

    assert outputs(train_op) == {"model": "system.Model@0.0.1", "metrics": "system.Metrics@0.0.1"}
    assert outputs(evaluate_op)["metrics"] == "system.Metrics@0.0.1"
    for op in (report_op, report_one_variant_op):
        assert outputs(op) == {"report_dir": "system.Artifact@0.0.1",
                               "report_html": "system.HTML@0.0.1",
                               "report_md": "system.Markdown@0.0.1",
                               "bounds": "system.Metrics@0.0.1"}
