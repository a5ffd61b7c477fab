"""Fixtures shared by the test modules: no test module imports another.

Inputs a test builds (session-scoped factories, so module fixtures can use them too):
  smoke_cfg(variant, *overrides)      configs/VARIANT.yaml + configs/smoke.yaml (+ overrides)
  make_dataset(path, n_train=48, ...) a tiny dataset.npz of 28x28 rectangles (training tests)
  make_eval_dataset(path)             a 40-image dataset grouped by digit (evaluation tests)
  random_params(model, seed=0)        parameters drawn in numpy in milliseconds
  make_model_dir(path, variant, ...)  a model directory (config.yaml + random parameters)
  report_inputs                       known `vnca report` inputs (`ReportInputs`)
  gzip_bomb(path, n_bytes)            a gzip of zeros far larger than itself
  direct_conv(x, w, padding)          a conv by its definition in float64 (the conv reference)
Checks: refuses_edited_copies, check_smoke_run.
"""

import dataclasses
import gzip
import json
import math
import os
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnca import artifacts, config, configs, contracts, reference
from vnca.errors import DataError

CONFIGS = configs.directory()  # the installed configs: the checkout's configs/ when editable


# -- configs, datasets, models -------------------------------------------------------------------


def _smoke_cfg(variant: str, *overrides: str) -> config.Config:
    return config.load([CONFIGS / f"{variant}.yaml", CONFIGS / "smoke.yaml"], list(overrides))


@pytest.fixture(scope="session")
def smoke_cfg():
    """`smoke_cfg(variant, *overrides) -> Config`: the variant's config with the smoke overlay
    and `key=value` overrides."""
    return _smoke_cfg


def _make_dataset(path: Path, n_train=48, n_valid=16, n_test=8, seed=0) -> Path:
    rs = np.random.default_rng(seed)
    d = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        x = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            r, c = rs.integers(4, 18, 2)
            x[i, r:r + 8, c:c + 6] = 1
        d[f"{split}_x"] = x
        d[f"{split}_y"] = rs.integers(0, 10, n).astype(np.int64)
        d[f"{split}_mnist_index"] = np.arange(n, dtype=np.int64)
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / artifacts.DATASET, **d)
    return path


@pytest.fixture(scope="session")
def make_dataset():
    """`make_dataset(path, n_train=48, n_valid=16, n_test=8, seed=0) -> path`: a tiny
    dataset.npz with the artifact's keys, 28x28 uint8 rectangles."""
    return _make_dataset


EVAL_TEST_IMAGES = 40


def _make_eval_dataset(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), EVAL_TEST_IMAGES // 10).astype(np.int64)  # grouped (T9)
    x = np.zeros((EVAL_TEST_IMAGES, 28, 28), np.uint8)
    for i, label in enumerate(y):
        x[i, 5 + label:15 + label, 8:20] = rng.random((10, 12)) < 0.6
    arrays = {}
    for split in artifacts.SPLITS:
        arrays.update({f"{split}_x": x, f"{split}_y": y,
                       f"{split}_mnist_index": np.arange(EVAL_TEST_IMAGES, dtype=np.int64)})
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / artifacts.DATASET, **arrays)
    return x, y


@pytest.fixture(scope="session")
def make_eval_dataset():
    """`make_eval_dataset(path) -> (x, y)`: a dataset.npz whose every split holds the same 40
    images, 4 per digit and grouped by digit like the real test split; its images and labels."""
    return _make_eval_dataset


def _random_params(model, seed: int = 0) -> dict:
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else s.shape[0]
        b = 1.0 / math.sqrt(fan_in)
        return jnp.asarray(rng.uniform(-b, b, s.shape).astype(np.float32))

    return jax.tree_util.tree_map(fill, shapes)


@pytest.fixture(scope="session")
def random_params():
    """`random_params(model, seed=0) -> params`: drawn in numpy, PyTorch-style
    U(+-1/sqrt(fan_in)) for every layer including the NCA's last one (zero at init, so a fresh
    NCA would do nothing). Compiling `model.init` takes seconds; this takes milliseconds."""
    return _random_params


def _make_model_dir(path: Path, variant: str, *overrides: str) -> Path:
    from vnca.models import build_model
    from vnca.models.model_io import save_params

    cfg = _smoke_cfg(variant, *overrides)
    path.mkdir(parents=True, exist_ok=True)
    config.save(cfg, path / artifacts.RESOLVED_CONFIG)
    save_params(path / artifacts.PARAMS, _random_params(build_model(cfg)))
    return path


@pytest.fixture(scope="session")
def make_model_dir():
    """`make_model_dir(path, variant, *overrides) -> path`: a model directory as `vnca train`
    leaves one (resolved smoke config, params.msgpack), with `random_params`."""
    return _make_model_dir


def _gzip_bomb(path: Path, n_bytes: int) -> Path:
    block = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        for _ in range(n_bytes // len(block)):
            f.write(block)
    return path


@pytest.fixture(scope="session")
def gzip_bomb():
    """`gzip_bomb(path, n_bytes) -> path`: a gzip of `n_bytes` zeros, written in a streaming
    way (200 MB -> about 200 KB)."""
    return _gzip_bomb


# -- checks ------------------------------------------------------------------------------------


@pytest.fixture
def refuses_edited_copies(tmp_path):
    """`check(read, name, good, cases)`: for each `(edit, needle)` in `cases`, a copy of the
    JSON object `good` changed by `edit(copy)` and written to `tmp_path / name` is refused by
    `read(path)` with one `DataError` line that names the copy and contains `needle`."""

    def check(read, name: str, good: dict, cases) -> None:
        for edit, needle in cases:
            bad = json.loads(json.dumps(good))
            edit(bad)
            copy = tmp_path / name
            copy.write_text(json.dumps(bad))
            with pytest.raises(DataError) as e:
                read(copy)
            assert "\n" not in str(e.value) and str(e.value).startswith(f"{copy}: "), needle
            assert needle in str(e.value)

    return check


@pytest.fixture
def check_smoke_run():
    """`check(root, train_steps=None)`: see `_check_smoke_run`."""
    return _check_smoke_run


def _check_smoke_run(root: Path, train_steps: int | None = None) -> Path:
    """Every step of the one smoke run under `root` (a `vnca run-local` root, either runner)
    left its artifacts with sane values (and, if given, trained `train_steps` steps); returns
    the run's folder."""
    from vnca_pipeline import local as run_local
    from vnca_pipeline.variants import DEFAULT_VARIANTS

    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("vnca-")]
    assert len(runs) == 1, runs
    run = runs[0]
    log = (run / "run.log").read_text(errors="replace")
    assert run_local.failed_step(run, list(DEFAULT_VARIANTS), log) is None
    for step in run_local.expected_outputs(list(DEFAULT_VARIANTS)):
        assert f"Task '{step}' finished with status SUCCESS" in run_local.ANSI.sub("", log)
        # The steps ran as the calling user, so the outputs belong to it.
        assert (run / step / run_local.EXECUTOR_OUTPUT).stat().st_uid == os.getuid()

    # prepare-data: the dataset.
    with np.load(run / "prepare-data" / "dataset" / artifacts.DATASET) as npz:
        for split in artifacts.SPLITS:
            assert npz[f"{split}_x"].shape[1:] == (28, 28) and len(npz[f"{split}_x"]) > 0
    for name in DEFAULT_VARIANTS:
        # train: a finished model (final parameters, a checkpoint, its resolved smoke config).
        model = run / f"train-{name}" / "model"
        assert (model / artifacts.PARAMS).stat().st_size > 0
        assert any((model / artifacts.CHECKPOINTS).iterdir())
        resolved = config.load([model / artifacts.RESOLVED_CONFIG])
        assert (resolved.name, resolved.smoke) == (name, True)
        if train_steps is not None:
            assert resolved.train.steps == train_steps  # --set reached every variant
        # evaluate: a finite bound (a log-likelihood bound in nats is negative), and the
        # step's Metrics artifact carries the same bound (executor output).
        metrics = json.loads(
            (run / f"evaluate-{name}" / "evaluation" / artifacts.EVAL_METRICS).read_text())
        bound = metrics["iwelbo"]["mean_nats"]
        assert math.isfinite(bound) and bound < 0
        assert math.isfinite(metrics["iwelbo"]["stderr_nats"])
        logged = json.loads((run / f"evaluate-{name}" / run_local.EXECUTOR_OUTPUT).read_text())
        assert logged["artifacts"]["metrics"]["artifacts"][0]["metadata"]["iwelbo_nats"] == (
            pytest.approx(bound))

    # report: one HTML report naming every variant, and the Metrics with every bound.
    html = (run / "report" / "report_dir" / artifacts.REPORT_HTML).read_text()
    for name in DEFAULT_VARIANTS:
        assert name in html
    assert (run / "report" / "report_html").read_text() == html
    bounds = json.loads((run / "report" / run_local.EXECUTOR_OUTPUT).read_text())
    assert sorted(bounds["artifacts"]["bounds"]["artifacts"][0]["metadata"]) == sorted(
        f"{n}_iwelbo_nats" for n in DEFAULT_VARIANTS)
    return run


# -- `vnca report` inputs ----------------------------------------------------------------------


class ReportInputs:
    """Known inputs of `vnca report`: evaluation, training and dataset directories of the three
    variants, written through `vnca.contracts` with the numbers below, so that a test can check
    the report against them (the `report_inputs` fixture)."""

    # variant -> (mean nats, stderr, K, n images, steps, wall time s, hardware, devices)
    RUNS: ClassVar[dict] = {
        "doubling": (-85.0, 0.25, 128, 10000, 100000, 3725.0, "TPU v5e-8", 8),
        "nondoubling": (-91.5, 0.30, 128, 10000, 80000, 1234.0, "NVIDIA A100", 1),
        "baseline": (-84.0, 0.20, 128, 10000, 50000, 42.5, "cpu", 1),
    }
    ALL_FIGURES: ClassVar[set] = set(artifacts.EVAL_FIGURES)
    FIGURES: ClassVar[dict] = {
        "doubling": ALL_FIGURES,
        "nondoubling": ALL_FIGURES - {"interpolations.png"},  # probe.png is written empty
        "baseline": {"samples.png", "samples_binary.png", "reconstructions.png", "tsne.png",
                     "interpolations.png"},
    }
    CLASSIFIER = contracts.ClassifierInfo(kind="MLP, 256 ReLU units (scikit-learn)",
                                          n_train=60000, test_accuracy=0.9781)
    DAMAGE = contracts.Damage(
        n_images=16, before=-90.0, before_stderr=1.5, undamaged_final=-88.0,
        undamaged_final_stderr=1.25, after_damage=-150.0, after_damage_stderr=3.0,
        after_recovery=-100.0, after_recovery_stderr=2.0, damage_drop=62.0, meaningful=True,
        recovered_fraction=50.0 / 62.0, share_images_lower_after_damage=0.9375, damage_at=4,
        recovery_steps=4,
        square=contracts.DamageSquare(top=7, left=7, size=14, position="centred"))
    # Digit-classifier numbers per variant: (reconstruction accuracy, classifier on the
    # originals, prior samples' mean top-class probability, prior samples' label histogram)
    QUALITY: ClassVar[dict] = {
        "doubling": (0.912, 0.93, 0.8765, [3, 4, 3, 3, 3, 3, 3, 4, 3, 3]),
        "nondoubling": (0.5, 0.93, 0.4, [0, 0, 22, 10, 0, 0, 0, 0, 0, 0]),
        "baseline": (0.875, 0.93, 0.9, [4, 3, 3, 3, 3, 3, 3, 3, 3, 4]),
    }
    UNTRAINED = contracts.Untrained(n_images=8, k=4, mean_nats=-543.25, stderr_nats=3.5,
                                    bits_per_dim=1.0, stderr_bits_per_dim=0.01, n_pixels=784,
                                    trained_same_images_nats=-87.5)
    # Damage curves (arrays.npz): 3 images, undamaged over steps 0..8, damaged from step 4.
    LL_UNDAMAGED = np.array([[-200, -150, -120, -100, -95, -92, -90, -89, -88],
                             [-210, -160, -125, -105, -96, -93, -91, -90, -89],
                             [-190, -140, -115, -95, -94, -91, -89, -88, -87]], float)
    LL_DAMAGED = np.array([[-150, -130, -110, -104, -100],
                           [-152, -131, -112, -103, -101],
                           [-148, -129, -108, -105, -99]], float)
    # The code commit of each run; the baseline's summary has none (an older run).
    COMMITS: ClassVar[dict] = {"doubling": "0123456789abcdef0123456789abcdef01234567",
               "nondoubling": "fedcba9876543210fedcba9876543210fedcba98+dirty",
               "baseline": None}
    LABELS: ClassVar[list] = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    COUNTS: ClassVar[dict] = {"train": 2000, "valid": 500, "test": 10000}

    def make(self, root: Path, smoke: bool = True) -> dict:
        """Evaluation, training and dataset directories for the three variants under `root`:
        {'evals': [...], 'trains': [...], 'data': ..., 'out': root/report}."""
        dirs = {"evals": [], "trains": [], "data": root / "data", "out": root / "report"}
        for i, variant in enumerate(self.RUNS):  # directory names deliberately say nothing
            self._write_eval(root / f"e{i}", variant, smoke)
            self._write_train(root / f"t{(i + 1) % 3}", variant, smoke)
            dirs["evals"].append(root / f"e{i}")
        dirs["trains"] = [root / f"t{i}" for i in range(3)]
        self._write_data(dirs["data"])
        return dirs

    @staticmethod
    def train_record(step: int, **changes) -> contracts.TrainRecord:
        loss, kl = 200.0 / (1 + step), 10.0 + step / 1e3
        base = contracts.TrainRecord(step=step, loss=loss, kl=kl, recon=kl - loss, elbo=-loss,
                                     grad_norm=1.0, images_per_s=500.0, elapsed_s=step / 10)
        return dataclasses.replace(base, **changes)

    def eval_metrics(self, variant: str, smoke: bool = True, **changes) -> contracts.EvalMetrics:
        """An evaluation's metrics.json as `vnca evaluate` writes it, with the numbers of RUNS
        and QUALITY; `changes` replace fields."""
        mean, se, k, n, *_ = self.RUNS[variant]
        recon, originals, top, hist = self.QUALITY[variant]
        nca = variant != "baseline"
        ln2 = math.log(2.0)
        base = contracts.EvalMetrics(
            variant=variant, name=variant, smoke=smoke, tier="smoke" if smoke else "paper",
            model_dir=f"models/{variant}", n_test_images=10000, device="1 x cpu",
            eval_config={}, eval_steps=None, precision="float32",
            iwelbo=contracts.IwBound(
                k=k, n_images=n, mean_nats=mean, stderr_nats=se,
                bits_per_dim=-mean / (ln2 * 784), stderr_bits_per_dim=se / (ln2 * 784),
                n_pixels=784, elbo_mean_nats=mean - 5.0, log_px_mean_nats=mean + 20.0,
                batch_size=64, sample_chunk=k, images_per_second=50.0,
                paper_nats=reference.PAPER_NATS[variant],
                reproduction_nats=reference.REPRODUCTION_NATS[variant]),
            untrained=self.UNTRAINED, classifier=self.CLASSIFIER,
            prior_samples=contracts.PriorSamples(n_images=sum(hist), mean_top_probability=top,
                                                 label_histogram=hist),
            reconstruction=contracts.Reconstruction(n_images=32, accuracy=recon,
                                                    classifier_accuracy_originals=originals),
            growth=contracts.Growth(n_examples=8, n_frames=41) if nca else None,
            damage=self.DAMAGE if nca else None,
            probe=contracts.Probe(accuracy=0.9123, image_accuracy=0.95, chance=0.11,
                                  n_train_images=1500, n_test_images=500,
                                  n_train_cells=1536000, n_test_cells=512000,
                                  final_train_loss=0.3, steps=100) if nca else None,
            tsne=contracts.Tsne(n_images=64, knn10_accuracy_latent=None if nca else 0.8125,
                                knn10_accuracy_tsne=None),
            seconds={"iwelbo": 1.5}, figures=sorted(self.FIGURES[variant]))
        return dataclasses.replace(base, **changes)

    @staticmethod
    def _distribution(scale: float) -> contracts.Distribution:
        """A percentile summary as the data step writes one (vnca.data.matching.distribution)."""
        return contracts.Distribution(
            n=10000, min=0.05 * scale, mean=130.0 * scale, p0_1=0.8 * scale, p1=4.99 * scale,
            p5=15.65 * scale, p25=88.1 * scale, p50=140.5 * scale, p75=203.7 * scale,
            p95=321.0 * scale, max=632.0 * scale, count_below_1=14, count_below_10=286,
            count_below_50=1243)

    def match_summary(self, **changes) -> contracts.MatchSummary:
        """One split's summary as `vnca.data.matching.summarize` writes it."""
        base = contracts.MatchSummary(
            n=10000,
            collisions_before_assignment=contracts.Collisions(distinct=9992, references=8,
                                                              rows=16),
            collisions_after_assignment=contracts.Collisions(distinct=10000, references=0,
                                                             rows=0),
            rows_changed_by_assignment=8, labels_changed_by_assignment=0, unresolved_rows=0,
            assigned_rank_histogram=[9992, 8], margin_top1_top2_nats=self._distribution(1.0),
            label_margin_nats=self._distribution(1.6),
            assigned_loglik_nats=self._distribution(-2.0),
            impossible_pixels=contracts.ImpossiblePixels(total=0, pairs_with_any=0),
            label_histogram=self.LABELS)
        return dataclasses.replace(base, **changes)

    def match_report(self, **changes) -> contracts.MatchReport:
        """match_report.json as `vnca prepare-data` writes it (numbers made up)."""
        group = dict(self.match_summary().to_dict(), queries="binarized test",
                     reference="MNIST test", n_queries=10000, n_references=10000, top_k=16,
                     seconds=1.5)
        splits = {"train": self.match_summary(rows_changed_by_assignment=5),
                  "valid": self.match_summary(rows_changed_by_assignment=313),
                  "test": self.match_summary()}
        base = contracts.MatchReport(
            source="bundled", summary="3 splits matched", counts=self.COUNTS,
            provenance={"source": "bundled"}, method={"eps": 1e-6},
            groups={"test": contracts.MatchGroup.from_dict(group, "group")}, splits=splits,
            classifier=self.CLASSIFIER, timing_s={"read": 0.5},
            figure=contracts.PairsFigure(file=artifacts.MATCHED_PAIRS_PNG, seed=0, rows={}))
        return dataclasses.replace(base, **changes)

    @staticmethod
    def _png(path: Path, seed: int, shape=(12, 20)) -> None:
        from matplotlib import image as mpimage

        img = np.random.default_rng(seed).random(shape)
        mpimage.imsave(path, img, cmap="gray")

    def _write_train(self, d: Path, variant: str, smoke: bool) -> None:
        d.mkdir(parents=True)
        paths = [CONFIGS / f"{variant}.yaml"] + ([CONFIGS / "smoke.yaml"] if smoke else [])
        (d / artifacts.RESOLVED_CONFIG).write_text(config.dump(config.load(paths)))
        _, _, _, _, steps, wall, hw, ndev = self.RUNS[variant]
        contracts.TrainSummary(
            variant=variant, name=variant, steps=steps, wall_time_s=wall, hardware=hw,
            n_devices=ndev, n_processes=1, smoke=smoke, tier="smoke" if smoke else "paper",
            param_count=1234567, final_loss=2.5, batch_size=8, train_split="train",
            resumed_from_step=0, commit=self.COMMITS[variant], precision="float32").write(d / artifacts.TRAIN_SUMMARY)
        for step in (0, 10, 100, 1000):
            contracts.append_train_record(d / artifacts.TRAIN_METRICS, self.train_record(step))
            if step == 1000 and variant != "baseline":  # baseline: no validation records
                contracts.append_train_record(d / artifacts.TRAIN_METRICS, contracts.ValidRecord(
                    step=step, split="valid", val_elbo=-95.0, val_images=8, val_iw_samples=1))

    def _write_eval(self, d: Path, variant: str, smoke: bool) -> None:
        d.mkdir(parents=True)
        self.eval_metrics(variant, smoke).write(d / artifacts.EVAL_METRICS)
        for i, fname in enumerate(sorted(self.FIGURES[variant])):
            self._png(d / fname, seed=i)
        if variant == "nondoubling":
            (d / "probe.png").write_bytes(b"")
        if variant != "baseline":
            rng = np.random.default_rng(0)
            arrays = {"tsne_xy": rng.normal(size=(64, 2)),
                      "tsne_labels": rng.integers(0, 10, 64)}
            if variant == "nondoubling":
                arrays.update(damage_steps_undamaged=np.arange(9),
                              damage_ll_undamaged=self.LL_UNDAMAGED,
                              damage_steps_damaged=np.arange(4, 9),
                              damage_ll_damaged=self.LL_DAMAGED)
            np.savez(d / artifacts.EVAL_ARRAYS, **arrays)

    def _write_data(self, d: Path) -> None:
        d.mkdir(parents=True)
        self.match_report().write(d / artifacts.MATCH_REPORT)
        self._png(d / artifacts.MATCHED_PAIRS_PNG, seed=99)


@pytest.fixture(scope="session")
def report_inputs() -> ReportInputs:
    """Known `vnca report` inputs: `report_inputs.make(root, smoke=True)` writes them; the
    numbers are its attributes (RUNS, QUALITY, ...), `eval_metrics`, `train_record`,
    `match_report` build single artifacts."""
    return ReportInputs()


def _direct_conv(x, w, padding):
    """Cross-correlation by its definition, in float64: y = sum over (i, j) of the shifted
    input times the kernel tap (i, j)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    k = w.shape[0]
    b, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = h + 2 * padding - k + 1, wd + 2 * padding - k + 1
    y = np.zeros((b, ho, wo, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            y += xp[:, i:i + ho, j:j + wo, :] @ w[i, j]
    return y


@pytest.fixture(scope="session")
def direct_conv():
    """`direct_conv(x, w, padding)`: a conv (cross-correlation, zero padding) by its
    definition in float64, the reference for every conv algorithm and precision."""
    return _direct_conv
