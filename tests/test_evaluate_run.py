"""`vnca evaluate` end to end on smoke models: metrics.json and arrays.npz agree with each other
and with independent recomputation, the right figures exist, and user mistakes (missing or
corrupt checkpoint, a model of another config, a bad override) give one line, not a traceback."""

import json
import math

import jax
import numpy as np
import pytest

from vnca import artifacts, config, contracts, reference
from vnca.cli import main
from vnca.data import pad_images
from vnca.evaluate import eval_keys, evaluate
from vnca.evaluation import bound, latent
from vnca.models import build_model
from vnca.models.model_io import save_params

# Every test here shares a module fixture that trains and evaluates real models (~40 s).
pytestmark = pytest.mark.slow

SMALL = ["eval.n_images=6", "eval.iw_samples=3", "eval.batch_size=4", "eval.n_samples=4",
         "eval.n_reconstructions=2", "eval.tsne_images=12", "eval.probe_images=10",
         "eval.probe_steps=20", "eval.damage_images=4", "eval.damage_at=2",
         "eval.recovery_steps=2", "eval.n_interpolations=2", "eval.interpolation_points=3"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def nondoubling_run(tmp_path_factory, make_eval_dataset, make_model_dir):
    root = tmp_path_factory.mktemp("eval")
    x, y = make_eval_dataset(root / "data")
    model_dir = make_model_dir(root / "model", "nondoubling")
    out = root / "out"
    metrics = evaluate(model_dir, root / "data", out, SMALL, progress=False)
    with np.load(out / artifacts.EVAL_ARRAYS, allow_pickle=False) as npz:
        arrays = dict(npz)
    return {"root": root, "x": x, "y": y, "model_dir": model_dir, "out": out,
            "metrics": metrics, "arrays": arrays}


def test_metrics_file_and_bound_numbers(nondoubling_run):
    r = nondoubling_run
    m, a = r["metrics"], r["arrays"]
    assert contracts.EvalMetrics.read(r["out"] / artifacts.EVAL_METRICS).to_dict() == m
    assert (m["variant"], m["name"], m["smoke"]) == ("nondoubling", "nondoubling", True)
    iw = m["iwelbo"]
    assert (iw["k"], iw["n_images"], iw["n_pixels"]) == (3, 6, reference.MNIST_PIXELS)
    nats = a["iw_nats"].astype(np.float64)
    assert nats.shape == (6,)
    assert iw["mean_nats"] == pytest.approx(nats.mean(), abs=1e-3)
    assert iw["stderr_nats"] == pytest.approx(nats.std(ddof=1) / math.sqrt(6), rel=1e-4)
    assert iw["bits_per_dim"] == pytest.approx(-iw["mean_nats"] / (math.log(2) * 784))
    # A shuffled subset of the grouped test split, not its first images.
    idx = a["iw_index"]
    assert len(set(idx)) == 6 and idx.max() < len(r["x"])
    assert len(set(r["y"][idx])) > 1
    # The stored per-image numbers are the bound of those images under the documented keys.
    cfg, _, params = _load(r["model_dir"])
    model = build_model(cfg)
    x = pad_images(r["x"][idx], cfg.data.pad_to)
    again = bound.iw_bound(model, params, x, idx, eval_keys(0)["iwelbo"], 3, 5, progress=False,
                           chunk=bound.sample_chunk(3))
    np.testing.assert_allclose(a["iw_nats"], again["iw"], rtol=1e-5)


def test_classifier_numbers_untrained_bound_and_sample_labels(nondoubling_run):
    """The dataset has no classifier file, so evaluate fits one on its train split; the numbers
    are recomputed here from an independent fit, the documented shuffle and the training
    run's init key."""
    import jax

    from vnca import rng
    from vnca.evaluation import classifier

    r = nondoubling_run
    m, a, x, y = r["metrics"], r["arrays"], r["x"], r["y"]
    w = classifier.fit(x, y, seed=0, x_test_NxHxW=x, y_test_N=y)
    assert m["classifier"]["test_accuracy"] == pytest.approx(w.test_accuracy)
    assert m["classifier"]["n_train"] == len(x)
    order = np.asarray(jax.random.permutation(eval_keys(0)["shuffle"], len(x)))
    rec = m["reconstruction"]
    assert rec["n_images"] == 32                      # smoke.yaml's eval.classify_images
    first = order[:32]
    assert rec["classifier_accuracy_originals"] == pytest.approx(
        classifier.label_accuracy(classifier.predict_proba(w, x[first]), y[first]))
    assert 0.0 <= rec["accuracy"] <= 1.0
    s = m["prior_samples"]
    assert s["n_images"] == 32 and sum(s["label_histogram"]) == 32
    assert 0.1 <= s["mean_top_probability"] <= 1.0
    # The untrained bound: the training run's initial parameters on the bound's images.
    u = m["untrained"]
    assert (u["n_images"], u["k"]) == (6, 3)          # min(eval.untrained_images, 6 images)
    cfg, _, _ = _load(r["model_dir"])
    model = build_model(cfg)
    initial = jax.device_get(jax.jit(model.init)(rng.named_keys(cfg.train.seed)["init"]))
    idx = np.sort(order[:6])
    again = bound.iw_bound(model, initial, pad_images(x[idx], cfg.data.pad_to), idx,
                           eval_keys(0)["iwelbo"], 3, 4, progress=False,
                           chunk=bound.sample_chunk(3))
    assert u["mean_nats"] == pytest.approx(float(np.mean(again["iw"])), rel=1e-5)
    assert u["trained_same_images_nats"] == pytest.approx(float(a["iw_nats"].mean()), rel=1e-5)


def _load(model_dir):
    from vnca.models.model_io import load_model

    return load_model(model_dir)


def test_damage_probe_tsne_interpolation_arrays(nondoubling_run):
    r = nondoubling_run
    m, a, y = r["metrics"], r["arrays"], r["y"]
    # Damage: the undamaged run over steps 0..4, the damaged one over 2..4.
    assert list(a["damage_steps_undamaged"]) == [0, 1, 2, 3, 4]
    assert list(a["damage_steps_damaged"]) == [2, 3, 4]
    kept = a["damage_ll_undamaged"].astype(np.float64)
    hit = a["damage_ll_damaged"].astype(np.float64)
    assert kept.shape == (4, 5) and hit.shape == (4, 3)
    d = m["damage"]
    assert (d["n_images"], d["damage_at"], d["recovery_steps"]) == (4, 2, 2)
    assert d["before"] == pytest.approx(kept[:, 2].mean(), rel=1e-5)
    assert d["undamaged_final"] == pytest.approx(kept[:, -1].mean(), rel=1e-5)
    assert d["after_damage"] == pytest.approx(hit[:, 0].mean(), rel=1e-5)
    assert d["after_recovery"] == pytest.approx(hit[:, -1].mean(), rel=1e-5)
    if d["meaningful"]:
        assert d["recovered_fraction"] == pytest.approx(
            (hit[:, -1].mean() - hit[:, 0].mean()) / (kept[:, -1].mean() - hit[:, 0].mean()),
            rel=1e-4)
    else:
        assert d["recovered_fraction"] is None
        assert hit[:, 0].mean() >= kept[:, -1].mean() - 1e-3
    # Probe: split by image, nothing on both sides.
    p = m["probe"]
    tr, te = set(a["probe_train_index"]), set(a["probe_test_index"])
    assert not tr & te and len(tr | te) == 10
    assert (p["n_train_images"], p["n_test_images"]) == (len(tr), len(te))
    assert p["n_test_cells"] == len(te) * 28 * 28
    assert 0.0 <= p["accuracy"] <= 1.0 and 0.0 <= p["chance"] <= 1.0
    # t-SNE: a shuffled subset coloured by the matched labels of the same images.
    assert a["tsne_xy"].shape == (12, 2) and m["tsne"]["n_images"] == 12
    np.testing.assert_array_equal(a["tsne_labels"], y[a["tsne_index"]])
    assert len(set(a["tsne_index"])) == 12
    # Interpolations: pairs of different digits; the rows start and end at the two images.
    pairs = a["interp_index"]
    assert pairs.shape == (2, 2) and np.all(y[pairs[:, 0]] != y[pairs[:, 1]])
    assert a["interp_probs"].shape == (2, 3 + 2, 28, 28)
    np.testing.assert_array_equal(a["interp_probs"][:, 0], r["x"][pairs[:, 0]])
    np.testing.assert_array_equal(a["interp_probs"][:, -1], r["x"][pairs[:, 1]])
    assert a["samples_probs"].shape == (4, 28, 28)
    assert set(np.unique(a["samples_binary"])) <= {0, 1}


def test_metrics_json_is_read_through_its_contract(nondoubling_run, refuses_edited_copies):
    """The file the step wrote reads back as what it returned, with every section of the
    non-doubling model; the same file with one thing wrong is refused in one line."""
    path = nondoubling_run["out"] / artifacts.EVAL_METRICS
    m = contracts.EvalMetrics.read(path)
    assert m.to_dict() == nondoubling_run["metrics"]
    assert None not in (m.untrained, m.prior_samples, m.reconstruction, m.growth, m.damage,
                        m.probe, m.tsne, m.interpolation)
    assert json.loads(path.read_text())["version"] == contracts.EvalMetrics.VERSION
    good = json.loads(path.read_text())
    cases = [
        (lambda d: d.pop("version"), "no 'version'"),
        (lambda d: d.pop("version"), "rerun `vnca evaluate`"),
        (lambda d: d["iwelbo"].pop("k"), "missing 'iwelbo.k'"),
        (lambda d: d["damage"].update(meaningful="yes"), "'damage.meaningful' must be true"),
        (lambda d: d["probe"].update(n_test_cells=-1), "'probe.n_test_cells' must be a non-"),
        (lambda d: d.update(figures="tsne.png"), "'figures' must be a list"),
        (lambda d: d["tsne"].update(knn5_accuracy=0.5), "unknown key 'tsne.knn5_accuracy'"),
    ]
    refuses_edited_copies(contracts.EvalMetrics.read, artifacts.EVAL_METRICS, good, cases)


def test_every_figure_of_the_variant_is_a_png(nondoubling_run):
    out = nondoubling_run["out"]
    for name in artifacts.EVAL_FIGURES:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert nondoubling_run["metrics"]["figures"] == sorted(artifacts.EVAL_FIGURES)
    assert not list(out.glob("*.tmp*"))


@pytest.mark.slow
def test_baseline_writes_only_its_figures(tmp_path, make_eval_dataset, make_model_dir):
    make_eval_dataset(tmp_path / "data")
    model_dir = make_model_dir(tmp_path / "model", "baseline")
    small = SMALL + ["eval.tsne_images=0", "eval.n_interpolations=0"]
    m = evaluate(model_dir, tmp_path / "data", tmp_path / "out", small, progress=False)
    assert m["variant"] == "baseline" and math.isfinite(m["iwelbo"]["mean_nats"])
    assert not {"damage", "probe", "growth", "tsne"} & set(m)
    assert m["figures"] == ["reconstructions.png", "samples.png", "samples_binary.png"]


def test_doubling_growth_ends_at_the_decoded_image(smoke_cfg, random_params):
    cfg = smoke_cfg("doubling")
    model = build_model(cfg)
    params = random_params(model)
    z = np.random.default_rng(0).normal(size=(2, cfg.model.z_dim)).astype(np.float32)
    key = jax.random.key(5)
    frames = latent.growth(model, params, z, key)
    assert frames.shape == (1 + cfg.model.n_doublings * cfg.model.steps_per_stage, 2, 32, 32)
    _, k_grow = jax.random.split(key)
    np.testing.assert_allclose(frames[-1], model.decode(params, z, k_grow), rtol=1e-5,
                               atol=1e-5)


def _cli(capsys, *args):
    rc = main(["evaluate", *args])
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vnca evaluate: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_user_mistakes_give_one_line(tmp_path, capsys, make_eval_dataset, make_model_dir,
                                     smoke_cfg):
    make_eval_dataset(tmp_path / "data")
    data = str(tmp_path / "data")
    out = tmp_path / "out"
    rc, err = _cli(capsys, "--model", str(tmp_path / "nope"), "--data", data, "--out", str(out))
    _one_line_error(rc, err, "nope", "not found")

    good = make_model_dir(tmp_path / "good", "nondoubling")
    corrupt = make_model_dir(tmp_path / "corrupt", "nondoubling")
    (corrupt / artifacts.PARAMS).write_bytes(b"\x00garbage")
    rc, err = _cli(capsys, "--model", str(corrupt), "--data", data, "--out", str(out))
    _one_line_error(rc, err, artifacts.PARAMS, "corrupt")

    other = make_model_dir(tmp_path / "other", "nondoubling")
    cfg = smoke_cfg("nondoubling", "model.z_dim=8")
    config.save(cfg, other / artifacts.RESOLVED_CONFIG)   # params are for z_dim = 16
    rc, err = _cli(capsys, "--model", str(other), "--data", data, "--out", str(out))
    _one_line_error(rc, err, "different config")

    (good / artifacts.PARAMS).unlink()
    rc, err = _cli(capsys, "--model", str(good), "--data", data, "--out", str(out))
    _one_line_error(rc, err, artifacts.PARAMS, "missing")

    model = make_model_dir(tmp_path / "model", "nondoubling")
    rc, err = _cli(capsys, "--model", str(model), "--data", data, "--out", str(out),
                   "--set", "model.z_dim=8")
    _one_line_error(rc, err, "model.z_dim")
    rc, err = _cli(capsys, "--model", str(model), "--data", data, "--out", str(out),
                   "--set", "eval.iw_samples=many")
    _one_line_error(rc, err, "eval.iw_samples")
    rc, err = _cli(capsys, "--model", str(model), "--data", str(tmp_path / "nodata"),
                   "--out", str(out))
    _one_line_error(rc, err, "nodata")
    assert not (out / artifacts.EVAL_METRICS).exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_parameters_are_refused_before_anything_is_computed(
        tmp_path, capsys, bad, make_eval_dataset, make_model_dir, smoke_cfg, random_params):
    """A diverged run's parameters (e.g. train.learning_rate=1e39) made a metrics.json with a
    null bound and then a TypeError in the CLI."""
    make_eval_dataset(tmp_path / "data")
    model_dir = make_model_dir(tmp_path / "model", "baseline")
    cfg = smoke_cfg("baseline")
    params = random_params(build_model(cfg))
    leaves, tree = jax.tree_util.tree_flatten(params)
    leaves[0] = np.full(leaves[0].shape, bad, np.float32)  # one tensor is enough
    save_params(model_dir / artifacts.PARAMS, jax.tree_util.tree_unflatten(tree, leaves))
    out = tmp_path / "out"
    rc, err = _cli(capsys, "--model", str(model_dir), "--data", str(tmp_path / "data"),
                   "--out", str(out))
    _one_line_error(rc, err, str(model_dir / artifacts.PARAMS), "NaN or infinite")
    assert not out.exists()  # refused before anything was computed or written


def test_summary_line_without_a_finite_bound(monkeypatch, capsys):
    import vnca.evaluate

    for metrics in ({"iwelbo": {"k": 4, "mean_nats": None}, "reconstruction": None}, {}):
        monkeypatch.setattr(vnca.evaluate, "evaluate", lambda m=metrics, **kw: m)
        rc = main(["evaluate", "--model", "m", "--data", "d", "--out", "o"])
        out = capsys.readouterr().out
        assert rc == 0 and "not finite" in out and "recognised" not in out


def test_out_that_is_a_file_is_one_line(tmp_path, capsys, make_eval_dataset, make_model_dir):
    make_eval_dataset(tmp_path / "data")
    model_dir = make_model_dir(tmp_path / "model", "baseline")
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory\n")
    for out, needle in ((a_file, "not a directory"), (a_file / "sub", "not a directory")):
        rc, err = _cli(capsys, "--model", str(model_dir), "--data", str(tmp_path / "data"),
                       "--out", str(out))
        _one_line_error(rc, err, str(out), needle)
    assert a_file.read_text() == "not a directory\n"
