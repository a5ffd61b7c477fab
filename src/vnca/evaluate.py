"""`vnca evaluate`: everything measured on the test split, which only this step opens.

    evaluate(model_dir, data_dir, out_dir, overrides) -> metrics (also OUT/metrics.json)

The model directory's resolved config decides the evaluation settings (its `eval` section);
`overrides` change `eval.*` keys (and `model.eval_steps`, the non-doubling model's step count at
test time, which changes no parameter). Computed, per variant:

- all: the importance-weighted bound (K = eval.iw_samples, on eval.n_images test images or all),
  prior samples (probabilities and Bernoulli draws), test reconstructions, t-SNE of encoder
  means (with a k-nearest-neighbour label accuracy of the means and of the embedding, a number
  for the VNCA-versus-baseline comparison), and latent interpolations between test digits;
- NCA variants: growth stages from the seed to the final image;
- non-doubling: damage recovery as a log-likelihood curve (see `vnca.evaluation.damage`) and a
  linear probe on final cell states, split by image (see `vnca.evaluation.probe`).

`evaluate` reads every input into an `EvalRun` (`_open`), runs the measurements of
`MEASUREMENTS` in order (one function each, returning its sections of metrics.json or None when
it does not apply) and writes the files (`_write`). Subsets come from one shuffled order of the
test split (it is grouped by digit, trap T9); each image's random numbers come from
`fold_in(purpose key, index in the test split)`. The model is evaluated with remat off (it only
saves memory for gradients). Outputs: `metrics.json` (written last, so its presence means the
run finished), `arrays.npz` and the PNGs of `vnca.artifacts.EVAL_FIGURES` that apply to the
variant, each written under a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path

import jax
import numpy as np

from vnca import artifacts, config, contracts, distributed, reference, rng
from vnca.errors import ConfigError, DataError
from vnca.evaluation import bound, classifier, damage, figures, latent, probe
from vnca.fileio import atomic_path
from vnca.models import build_model
from vnca.models.vae import VAE

# Keys an evaluation may override besides the eval section: how many steps the non-doubling
# model takes at test time (R: 36; O: drawn as in training), how convolutions are computed
# (the same math, e.g. `auto` again for a model trained on another backend) and the precision
# policy of the arithmetic (metrics.json records the one used). Anything else would change the
# model.
OVERRIDABLE_MODEL_KEYS = ("model.eval_steps", "model.conv_algorithm", "model.precision")
GROWTH_EXAMPLES = 8
DECODE_BATCH = 64  # latents decoded together for samples and reconstructions
DAMAGE_FIGURE_IMAGES = 8
PROBE_FIGURE_IMAGES = 6
PROBE_TEST_FRACTION = 0.2
KNN_NEIGHBOURS = 10


def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike,
             out_dir: str | os.PathLike, overrides: list[str] = (),
             progress: bool = True) -> dict:
    """Evaluate a trained model on the test split; write OUT_DIR and return the metrics."""
    run = _open(model_dir, data_dir, out_dir, overrides, progress)
    metrics, seconds = _description(run, model_dir), {}
    for name, measure in MEASUREMENTS:
        t0 = time.perf_counter()
        sections = measure(run)
        if sections is not None:  # it applies to the variant and the eval config
            metrics.update(sections)
            seconds[name] = time.perf_counter() - t0
    return _write(run, metrics, seconds)


@dataclasses.dataclass
class EvalRun:
    """What every measurement reads: the model at evaluation settings, the test split (padded
    images, labels, one shuffled order), the keys by purpose and the output directory; each
    measurement adds its arrays to `arrays` (written to arrays.npz at the end)."""

    cfg: config.Config
    model: VAE
    params: dict
    x_N: np.ndarray  # padded test images, N x H x W x 1 float
    y_N: np.ndarray
    order_N: np.ndarray  # a shuffled order of the test split (it is grouped by digit)
    keys: dict
    digits: classifier.ClassifierWeights
    out: Path
    progress: bool
    arrays: dict = dataclasses.field(default_factory=dict)

    @property
    def e(self) -> config.EvalConfig:
        return self.cfg.eval

    @property
    def n_test(self) -> int:
        return len(self.x_N)

    def first(self, n: int) -> np.ndarray:
        """The test indices of the first `n` images of the shuffled order."""
        return self.order_N[: min(n, self.n_test)]

    @functools.cached_property
    def bound_index(self) -> np.ndarray:
        """The images the bound is measured on (sorted): all, or eval.n_images of the order."""
        n = self.n_test if self.e.n_images is None else min(self.e.n_images, self.n_test)
        return np.arange(self.n_test) if n == self.n_test else np.sort(self.order_N[:n])

    def bound(self, params: dict, index_N: np.ndarray) -> dict:
        """The bound's per-image terms (`vnca.evaluation.bound.iw_bound`) of `params`."""
        e = self.e
        return bound.iw_bound(self.model, params, self.x_N[index_N], index_N,
                              self.keys["iwelbo"], e.iw_samples, e.batch_size, self.progress,
                              chunk=bound.sample_chunk(e.iw_samples))

    @functools.cached_property
    def trained_bound(self) -> dict:
        """The trained model's bound on `bound_index`, computed once."""
        return self.bound(self.params, self.bound_index)

    @functools.cached_property
    def prior_z(self) -> np.ndarray:
        """Latents drawn from the prior for the samples and the growth figure."""
        e = self.e
        n = max(e.n_samples, e.classify_images, GROWTH_EXAMPLES)
        k_z = jax.random.split(self.keys["samples"], 3)[0]
        return np.asarray(jax.random.normal(k_z, (n, self.cfg.model.z_dim)))


def _open(model_dir, data_dir, out_dir, overrides: list[str], progress: bool) -> EvalRun:
    """Read and check every input, then make the output directory (no metrics.json yet)."""
    from vnca.data import load_split, pad_images
    from vnca.models.model_io import load_model

    artifacts.check_out_dir(out_dir)
    cfg, _, params = load_model(model_dir)
    cfg = eval_config(cfg, overrides)
    distributed.warn_if_slow_precision(cfg.model.precision, jax.default_backend())
    # remat only trades compute for memory in a backward pass; evaluation has none.
    model = build_model(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, remat=False)))
    x_u8, y_N = load_split(data_dir, "test")
    if len(x_u8) == 0:
        raise DataError(f"{Path(data_dir) / artifacts.DATASET}: the test split is empty")
    digits = _digit_classifier(data_dir)  # every input is read and checked before any work
    out = artifacts.make_out_dir(out_dir)
    (out / artifacts.EVAL_METRICS).unlink(missing_ok=True)  # a finished run writes it last
    keys = eval_keys(cfg.eval.seed)
    order = np.asarray(jax.random.permutation(keys["shuffle"], len(x_u8)))
    return EvalRun(cfg, model, params, pad_images(x_u8, cfg.data.pad_to), y_N, order, keys,
                   digits, out, progress)


def _description(run: EvalRun, model_dir) -> dict:
    """What was evaluated, where and how."""
    devices = jax.devices()
    return {
        "variant": run.model.variant,
        "name": run.cfg.name,
        "smoke": run.cfg.smoke,
        "tier": run.cfg.tier,
        "model_dir": str(model_dir),
        "n_test_images": int(run.n_test),
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "eval_config": dataclasses.asdict(run.e),
        "eval_steps": run.cfg.model.eval_steps,
        "precision": run.cfg.model.precision,
    }


def _write(run: EvalRun, metrics: dict, seconds: dict) -> dict:
    """arrays.npz, then metrics.json (last: its presence means the run finished)."""
    metrics["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    metrics["figures"] = sorted(f for f in artifacts.EVAL_FIGURES if (run.out / f).is_file())
    _write_npz(run.arrays, run.out / artifacts.EVAL_ARRAYS)
    path = run.out / artifacts.EVAL_METRICS
    result = contracts.EvalMetrics.from_dict(_jsonable(metrics), str(path))
    result.write(path)
    return result.to_dict()


# ---------------------------------------------------------------------------------------------
# The measurements: each returns its metrics sections, or None when it does not apply.


def measure_bound(run: EvalRun) -> dict:
    """The importance-weighted bound L_K of the trained model."""
    e, index = run.e, run.bound_index
    t0 = time.perf_counter()
    res = run.trained_bound
    seconds = time.perf_counter() - t0
    variant = run.model.variant
    run.arrays.update(iw_nats=res["iw"].astype(np.float32), iw_index=index,
                      iw_elbo_nats=res["elbo"].astype(np.float32))
    return {"iwelbo": {
        "k": e.iw_samples,
        "n_images": len(index),
        **bound.summarize(res["iw"], reference.MNIST_PIXELS),
        "elbo_mean_nats": float(np.mean(res["elbo"])),
        "log_px_mean_nats": float(np.mean(res["log_px"])),
        "batch_size": e.batch_size,
        "sample_chunk": bound.sample_chunk(e.iw_samples) or e.iw_samples,
        "images_per_second": len(index) / seconds,
        "paper_nats": reference.PAPER_NATS.get(variant),
        "reproduction_nats": reference.REPRODUCTION_NATS.get(variant),
    }}


def measure_untrained(run: EvalRun) -> dict | None:
    """The same bound at the training run's initial parameters (its init key), on the first
    eval.untrained_images of the bound's images, beside the trained model's on those."""
    e = run.e
    n_u = min(e.untrained_images, len(run.bound_index))
    if not n_u:
        return None
    index = np.sort(run.order_N[:n_u])  # a subset of bound_index, which holds order[:n_bound]
    # Host arrays like the trained ones, so the bound's compiled program is reused.
    initial = jax.device_get(jax.jit(run.model.init)(rng.named_keys(run.cfg.train.seed)["init"]))
    res = run.bound(initial, index)
    trained_same = run.trained_bound["iw"][np.searchsorted(run.bound_index, index)]
    return {"untrained": {
        "n_images": int(n_u), "k": e.iw_samples,
        **bound.summarize(res["iw"], reference.MNIST_PIXELS),
        "trained_same_images_nats": float(np.mean(trained_same)),
    }}


def measure_samples(run: EvalRun) -> dict:
    """Prior samples and test reconstructions, judged by an independent digit classifier."""
    d = run.digits
    sections = {"classifier": {"kind": classifier.KIND, "n_train": d.n_train,
                               "test_accuracy": d.test_accuracy}}
    sections.update(_prior_samples(run))
    sections.update(_reconstructions(run))
    return sections


def _prior_samples(run: EvalRun) -> dict:
    e = run.e
    n_decode = max(e.n_samples, e.classify_images)
    if not n_decode:
        return {}
    _, k_dec, k_bin = jax.random.split(run.keys["samples"], 3)
    probs = figures.sigmoid(latent.decode_batches(run.model, run.params, run.prior_z[:n_decode],
                                                  k_dec, DECODE_BATCH, run.progress))
    sections = {}
    if e.classify_images:
        proba = classifier.predict_proba(run.digits, probs[: e.classify_images])
        sections["prior_samples"] = classifier.sample_summary(proba)
    if e.n_samples:
        shown = probs[: e.n_samples]
        binary = np.asarray(jax.random.bernoulli(k_bin, shown)).astype(np.uint8)
        run.arrays.update(samples_probs=shown.astype(np.float32), samples_binary=binary)
        figures.image_grid(shown, run.out / "samples.png", "Prior samples (probabilities)")
        figures.image_grid(binary.astype(np.float32), run.out / "samples_binary.png",
                           "Prior samples (Bernoulli draws)")
    return sections


def _reconstructions(run: EvalRun) -> dict:
    e, x_N = run.e, run.x_N
    index = run.first(max(e.n_reconstructions, e.classify_images))
    if not len(index):
        return {}
    rec = figures.sigmoid(latent.reconstructions(run.model, run.params, x_N[index],
                                                 run.keys["reconstructions"], DECODE_BATCH,
                                                 run.progress))
    sections = {}
    n_cls = min(e.classify_images, run.n_test)
    if n_cls:
        labels = run.y_N[index[:n_cls]]
        accuracy = classifier.label_accuracy(classifier.predict_proba(run.digits, rec[:n_cls]),
                                             labels)
        originals = classifier.label_accuracy(
            classifier.predict_proba(run.digits, x_N[index[:n_cls], ..., 0]), labels)
        sections["reconstruction"] = {"n_images": int(n_cls), "accuracy": accuracy,
                                      "classifier_accuracy_originals": originals}
    shown = index[: e.n_reconstructions]
    if len(shown):
        run.arrays.update(recon_x=x_N[shown, ..., 0].astype(np.uint8),
                          recon_probs=rec[: len(shown)].astype(np.float32), recon_index=shown)
        figures.reconstructions(x_N[shown, ..., 0], rec[: len(shown)],
                                run.out / "reconstructions.png")
    return sections


def measure_growth(run: EvalRun) -> dict | None:
    """Growth stages of the NCA variants, from the seed to the final image."""
    if not run.model.is_nca:
        return None
    frames_SxBxHxW = latent.growth(run.model, run.params, run.prior_z[:GROWTH_EXAMPLES],
                                   run.keys["growth"])
    growth_BxSxHxW = figures.sigmoid(frames_SxBxHxW).transpose(1, 0, 2, 3)
    run.arrays["growth_probs"] = growth_BxSxHxW.astype(np.float32)
    n_frames = growth_BxSxHxW.shape[1]
    figures.strips(growth_BxSxHxW, run.out / "growth.png",
                   f"Growth of prior samples: seed and the state after each of the "
                   f"{n_frames - 1} NCA steps",
                   col_titles=["seed"] + [str(i) for i in range(1, n_frames)])
    return {"growth": {"n_examples": int(growth_BxSxHxW.shape[0]), "n_frames": int(n_frames)}}


def measure_damage(run: EvalRun) -> dict | None:
    """Damage recovery of the non-doubling model (`vnca.evaluation.damage`)."""
    e, cfg = run.e, run.cfg
    if run.model.variant != "nondoubling" or not e.damage_images:
        return None
    index = run.first(e.damage_images)
    d = damage.damage_recovery(run.model, run.params, run.x_N[index], index, run.keys["damage"],
                               e.damage_at, e.recovery_steps, e.batch_size,
                               DAMAGE_FIGURE_IMAGES, run.progress)
    top, left = damage.centred_square(run.model.image_size, cfg.model.damage_size)
    run.arrays.update(damage_steps_undamaged=d["steps_undamaged_S"],
                      damage_steps_damaged=d["steps_damaged_R1"],
                      damage_ll_undamaged=d["ll_undamaged_NxS"].astype(np.float32),
                      damage_ll_damaged=d["ll_damaged_NxR1"].astype(np.float32),
                      damage_index=index)
    _damage_figures(run, d, index)
    return {"damage": {
        **damage.summarize(d["ll_undamaged_NxS"], d["ll_damaged_NxR1"], e.damage_at),
        "damage_at": e.damage_at,
        "recovery_steps": e.recovery_steps,
        "square": {"top": top, "left": left, "size": cfg.model.damage_size,
                   "position": "centred"},
    }}


def _damage_figures(run: EvalRun, d: dict, index: np.ndarray) -> None:
    """Strips of a few images (before, just damaged, regrowing, undamaged) and the curves."""
    dd, rr = run.e.damage_at, run.e.recovery_steps
    hit = figures.sigmoid(d["logits_damaged_FxR1xHxW"])
    kept = figures.sigmoid(d["logits_undamaged_FxSxHxW"])
    cols = list(dict.fromkeys([0] + [max(1, round(rr * q)) for q in (0.125, 0.25, 0.5, 1.0)]))
    titles = (["test image", f"step {dd}", "damaged"]
              + [f"+{c} steps" for c in cols[1:]] + [f"undamaged, +{rr}"])
    shown = np.concatenate([run.x_N[index[: len(hit)], None, ..., 0], kept[:, dd, None],
                            hit[:, cols], kept[:, -1, None]], 1)
    run.arrays["damage_frames_probs"] = shown.astype(np.float32)
    figures.strips(shown, run.out / "damage_recovery.png",
                   "Damage recovery: before, just after damage, regrowth, and the same "
                   "run without damage", titles)
    figures.damage_curve(d["steps_undamaged_S"], d["ll_undamaged_NxS"], d["steps_damaged_R1"],
                         d["ll_damaged_NxR1"], run.out / "damage_curve.png")


def measure_probe(run: EvalRun) -> dict | None:
    """Linear probe on the non-doubling model's final cell states (`vnca.evaluation.probe`)."""
    e = run.e
    if run.model.variant != "nondoubling" or not e.probe_images:
        return None
    index = run.first(e.probe_images)
    k_states, k_probe = jax.random.split(run.keys["probe"])
    states = probe.final_states(run.model, run.params, run.x_N[index], index, k_states,
                                e.batch_size, run.progress)
    pr = probe.linear_probe(states, run.y_N[index], k_probe, e.probe_steps,
                            PROBE_TEST_FRACTION)
    show = pr["test_images"][:PROBE_FIGURE_IMAGES]
    recon = figures.sigmoid(states[show, ..., 0])
    proba = pr["test_proba_IxHxWxL"][:PROBE_FIGURE_IMAGES]
    labels = run.y_N[index[show]]
    run.arrays.update(probe_train_index=index[pr["train_images"]],
                      probe_test_index=index[pr["test_images"]],
                      probe_figure_probs=recon.astype(np.float32),
                      probe_figure_proba=proba.astype(np.float32), probe_figure_labels=labels)
    figures.probe_panels(recon, proba, labels, run.out / "probe.png")
    keys = ("accuracy", "image_accuracy", "chance", "n_train_images", "n_test_images",
            "n_train_cells", "n_test_cells", "final_train_loss")
    return {"probe": {**{k: pr[k] for k in keys}, "steps": e.probe_steps}}


def measure_tsne(run: EvalRun) -> dict | None:
    """t-SNE of encoder means, with k-nearest-neighbour label accuracies of the means and of
    the embedding."""
    index = run.first(run.e.tsne_images)
    if len(index) < 4:
        return None
    means = latent.encoder_means(run.model, run.params, run.x_N[index], progress=run.progress)
    xy = latent.tsne(means, run.e.seed)
    labels = run.y_N[index]
    run.arrays.update(tsne_xy=xy, tsne_labels=labels, tsne_index=index)
    figures.tsne_scatter(xy, labels, run.out / "tsne.png",
                         f"t-SNE of encoder means, {run.cfg.name} ({len(index):,} test images)")
    k = KNN_NEIGHBOURS
    return {"tsne": {"n_images": len(index),
                     f"knn{k}_accuracy_latent": _knn_accuracy(means, labels, k),
                     f"knn{k}_accuracy_tsne": _knn_accuracy(xy, labels, k)}}


def measure_interpolations(run: EvalRun) -> dict | None:
    """Decoded points on lines between the encoder means of test digits of two labels."""
    e, x_N = run.e, run.x_N
    pairs = latent.interpolation_pairs(run.y_N, run.order_N, e.n_interpolations)
    if not len(pairs):
        return None
    means = latent.encoder_means(run.model, run.params, x_N[pairs.reshape(-1)], progress=False)
    logits = latent.interpolations(run.model, run.params, means.reshape(len(pairs), 2, -1),
                                   e.interpolation_points, run.keys["interpolation"],
                                   DECODE_BATCH)
    rows = np.concatenate([x_N[pairs[:, 0], None, ..., 0], figures.sigmoid(logits),
                           x_N[pairs[:, 1], None, ..., 0]], axis=1)
    run.arrays.update(interp_probs=rows.astype(np.float32), interp_index=pairs)
    p = e.interpolation_points
    titles = ["x_a"] + [f"{i}/{p - 1}" for i in range(p)] + ["x_b"]
    figures.strips(rows, run.out / "interpolations.png",
                   "Latent interpolation between encoder means of test digits", titles)
    return {"interpolation": {"n_pairs": len(pairs), "points": p,
                              "labels": run.y_N[pairs].tolist()}}


# (key in metrics.json's `seconds`, measurement), in the order they run; the bound first, so
# that computing the trained model's bound (which the untrained one reuses) counts as its time.
MEASUREMENTS = (
    ("iwelbo", measure_bound),
    ("iwelbo_untrained", measure_untrained),
    ("samples_reconstructions", measure_samples),
    ("growth", measure_growth),
    ("damage", measure_damage),
    ("probe", measure_probe),
    ("tsne", measure_tsne),
    ("interpolation", measure_interpolations),
)


# ---------------------------------------------------------------------------------------------
# Helpers.


def eval_config(cfg: config.Config, overrides: list[str] = ()) -> config.Config:
    """The model's config with evaluation overrides applied (and, like every config, checked
    by `config.validate`)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not (key.startswith("eval.") or key in OVERRIDABLE_MODEL_KEYS):
            raise ConfigError(f"--set {item}: evaluate only overrides eval.* keys, "
                              f"{' and '.join(OVERRIDABLE_MODEL_KEYS)} (the model is fixed by "
                              "its training config)")
    return config.apply_overrides(cfg, overrides)


def _digit_classifier(data_dir) -> classifier.ClassifierWeights:
    """The dataset's digit classifier (`vnca prepare-data` fits it); fit here for a dataset
    written before it had one."""
    from vnca.data import load_split

    path = Path(data_dir) / artifacts.DIGIT_CLASSIFIER
    if path.is_file():
        return classifier.ClassifierWeights.load(path)
    x, y = load_split(data_dir, "train")
    x_t, y_t = load_split(data_dir, "test")
    return classifier.fit(x, y, seed=0, x_test_NxHxW=x_t, y_test_N=y_t)


def eval_keys(seed: int) -> dict:
    """One independent key per measurement (`rng.EVAL_PURPOSES`), from `key(seed)`."""
    return rng.named_keys(seed, rng.EVAL_PURPOSES)


def _write_npz(arrays: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def _knn_accuracy(points_NxD: np.ndarray, labels_N: np.ndarray, k: int) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote (ties: smallest label)."""
    from sklearn.neighbors import NearestNeighbors

    from vnca.evaluation import threads

    k = min(k, len(points_NxD) - 1)
    with threads.limit(1):  # see vnca.evaluation.threads
        nn = NearestNeighbors(n_neighbors=k + 1).fit(points_NxD)
        _, idx = nn.kneighbors(points_NxD)
    neigh = labels_N[idx[:, 1:]]
    votes = np.stack([np.bincount(r, minlength=10) for r in neigh])
    return float(np.mean(votes.argmax(-1) == labels_N))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    return obj
