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

Subsets come from one shuffled order of the test split (it is grouped by digit, trap T9); each
image's random numbers come from `fold_in(purpose key, index in the test split)`. The model is
evaluated with remat off (it only saves memory for gradients). Outputs: `metrics.json` (written
last, so its presence means the run finished), `arrays.npz` and the PNGs of
`vnca.artifacts.EVAL_FIGURES` that apply to the variant, each written under a temporary name
and renamed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np

from vnca import artifacts, config, contracts, reference, rng
from vnca.errors import ConfigError, DataError
from vnca.evaluation import classifier
from vnca.fileio import atomic_path

# Keys an evaluation may override besides the eval section: how many steps the non-doubling
# model takes at test time (R: 36; O: drawn as in training) and how convolutions are computed
# (the same math, e.g. `auto` again for a model trained on another backend). Anything else
# would change the model.
OVERRIDABLE_MODEL_KEYS = ("model.eval_steps", "model.conv_algorithm")
GROWTH_EXAMPLES = 8
DECODE_BATCH = 64  # latents decoded together for samples and reconstructions
DAMAGE_FIGURE_IMAGES = 8
PROBE_FIGURE_IMAGES = 6
PROBE_TEST_FRACTION = 0.2
KNN_NEIGHBOURS = 10


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
    from threadpoolctl import threadpool_limits

    k = min(k, len(points_NxD) - 1)
    with threadpool_limits(1):  # see latent.tsne
        nn = NearestNeighbors(n_neighbors=k + 1).fit(points_NxD)
        _, idx = nn.kneighbors(points_NxD)
    neigh = labels_N[idx[:, 1:]]
    votes = np.stack([np.bincount(r, minlength=10) for r in neigh])
    return float(np.mean(votes.argmax(-1) == labels_N))


def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike,
             out_dir: str | os.PathLike, overrides: list[str] = (),
             progress: bool = True) -> dict:
    """Evaluate a trained model on the test split; write OUT_DIR and return the metrics."""
    import jax

    from vnca.data import load_split, pad_images
    from vnca.evaluation import bound, damage, figures, latent, probe
    from vnca.models import build_model
    from vnca.models.model_io import load_model

    artifacts.check_out_dir(out_dir)
    cfg, _, params = load_model(model_dir)
    cfg = eval_config(cfg, overrides)
    e = cfg.eval
    # remat only trades compute for memory in a backward pass; evaluation has none.
    cfg_run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=False))
    model = build_model(cfg_run)
    x_u8, y_N = load_split(data_dir, "test")
    n_test = len(x_u8)
    if n_test == 0:
        raise DataError(f"{Path(data_dir) / artifacts.DATASET}: the test split is empty")
    x_N = pad_images(x_u8, cfg.data.pad_to)
    digits = _digit_classifier(data_dir)  # every input is read and checked before any work
    out = artifacts.make_out_dir(out_dir)
    (out / artifacts.EVAL_METRICS).unlink(missing_ok=True)  # a finished run writes it last

    keys = eval_keys(e.seed)
    order = np.asarray(jax.random.permutation(keys["shuffle"], n_test))
    is_nca = model.variant in ("doubling", "nondoubling")
    seconds: dict = {}
    arrays: dict = {}
    devices = jax.devices()
    metrics: dict = {
        "variant": model.variant,
        "name": cfg.name,
        "smoke": cfg.smoke,
        "tier": cfg.tier,
        "model_dir": str(model_dir),
        "n_test_images": int(n_test),
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "eval_config": dataclasses.asdict(e),
        "eval_steps": cfg.model.eval_steps,
    }

    # -- the importance-weighted bound ---------------------------------------------------------
    t0 = time.perf_counter()
    n_bound = n_test if e.n_images is None else min(e.n_images, n_test)
    iw_index = np.arange(n_test) if n_bound == n_test else np.sort(order[:n_bound])
    chunk = bound.sample_chunk(e.iw_samples)
    res = bound.iw_bound(model, params, x_N[iw_index], iw_index, keys["iwelbo"],
                         e.iw_samples, e.batch_size, progress, chunk=chunk)
    seconds["iwelbo"] = time.perf_counter() - t0
    metrics["iwelbo"] = {
        "k": e.iw_samples,
        "n_images": int(n_bound),
        **bound.summarize(res["iw"], reference.MNIST_PIXELS),
        "elbo_mean_nats": float(np.mean(res["elbo"])),
        "log_px_mean_nats": float(np.mean(res["log_px"])),
        "batch_size": e.batch_size,
        "sample_chunk": chunk or e.iw_samples,
        "images_per_second": n_bound / seconds["iwelbo"],
        "paper_nats": reference.PAPER_NATS.get(model.variant),
        "reproduction_nats": reference.REPRODUCTION_NATS.get(model.variant),
    }
    arrays.update(iw_nats=res["iw"].astype(np.float32), iw_index=iw_index,
                  iw_elbo_nats=res["elbo"].astype(np.float32))

    # -- the same bound for the untrained model (the training run's initial parameters) -------
    n_u = min(e.untrained_images, n_bound)
    if n_u:
        t0 = time.perf_counter()
        u_index = np.sort(order[:n_u])  # a subset of iw_index, which holds order[:n_bound]
        # The training run's initial parameters (its init key), as host arrays like the
        # trained ones, so the bound's compiled program is reused.
        initial = jax.device_get(jax.jit(model.init)(rng.named_keys(cfg.train.seed)["init"]))
        res_u = bound.iw_bound(model, initial, x_N[u_index], u_index, keys["iwelbo"],
                               e.iw_samples, e.batch_size, progress, chunk=chunk)
        trained_same = res["iw"][np.searchsorted(iw_index, u_index)]
        metrics["untrained"] = {
            "n_images": int(n_u), "k": e.iw_samples,
            **bound.summarize(res_u["iw"], reference.MNIST_PIXELS),
            "trained_same_images_nats": float(np.mean(trained_same)),
        }
        seconds["iwelbo_untrained"] = time.perf_counter() - t0

    # -- prior samples and reconstructions, judged by an independent digit classifier --------
    t0 = time.perf_counter()
    metrics["classifier"] = {"kind": classifier.KIND,
                             "n_train": digits.n_train, "test_accuracy": digits.test_accuracy}
    k_z, k_dec, k_bin = jax.random.split(keys["samples"], 3)
    n_prior = max(e.n_samples, e.classify_images, GROWTH_EXAMPLES)
    z_prior = np.asarray(jax.random.normal(k_z, (n_prior, cfg.model.z_dim)))
    n_decode = max(e.n_samples, e.classify_images)
    if n_decode:
        probs = figures.sigmoid(latent.decode_batches(model, params, z_prior[:n_decode], k_dec,
                                                      DECODE_BATCH, progress))
        if e.classify_images:
            proba = classifier.predict_proba(digits, probs[: e.classify_images])
            metrics["prior_samples"] = classifier.sample_summary(proba)
        if e.n_samples:
            shown = probs[: e.n_samples]
            binary = np.asarray(jax.random.bernoulli(k_bin, shown)).astype(np.uint8)
            arrays.update(samples_probs=shown.astype(np.float32), samples_binary=binary)
            figures.image_grid(shown, out / "samples.png", "Prior samples (probabilities)")
            figures.image_grid(binary.astype(np.float32), out / "samples_binary.png",
                               "Prior samples (Bernoulli draws)")
    n_rec = min(max(e.n_reconstructions, e.classify_images), n_test)
    if n_rec:
        rec_index = order[:n_rec]
        rec = figures.sigmoid(latent.reconstructions(model, params, x_N[rec_index],
                                                     keys["reconstructions"], DECODE_BATCH,
                                                     progress))
        n_cls = min(e.classify_images, n_test)
        if n_cls:
            labels = y_N[rec_index[:n_cls]]
            metrics["reconstruction"] = {
                "n_images": int(n_cls),
                "accuracy": classifier.label_accuracy(
                    classifier.predict_proba(digits, rec[:n_cls]), labels),
                "classifier_accuracy_originals": classifier.label_accuracy(
                    classifier.predict_proba(digits, x_N[rec_index[:n_cls], ..., 0]), labels),
            }
        shown = rec_index[: e.n_reconstructions]
        if len(shown):
            arrays.update(recon_x=x_N[shown, ..., 0].astype(np.uint8),
                          recon_probs=rec[: len(shown)].astype(np.float32), recon_index=shown)
            figures.reconstructions(x_N[shown, ..., 0], rec[: len(shown)],
                                    out / "reconstructions.png")
    seconds["samples_reconstructions"] = time.perf_counter() - t0

    # -- growth stages -------------------------------------------------------------------------
    t0 = time.perf_counter()
    if is_nca:
        frames_SxBxHxW = latent.growth(model, params, z_prior[:GROWTH_EXAMPLES], keys["growth"])
        growth_BxSxHxW = figures.sigmoid(frames_SxBxHxW).transpose(1, 0, 2, 3)
        arrays["growth_probs"] = growth_BxSxHxW.astype(np.float32)
        n_frames = growth_BxSxHxW.shape[1]
        figures.strips(growth_BxSxHxW, out / "growth.png",
                       f"Growth of prior samples: seed and the state after each of the "
                       f"{n_frames - 1} NCA steps",
                       col_titles=["seed"] + [str(i) for i in range(1, n_frames)])
        metrics["growth"] = {"n_examples": int(growth_BxSxHxW.shape[0]),
                             "n_frames": int(n_frames)}
        seconds["growth"] = time.perf_counter() - t0

    # -- damage recovery and linear probe (non-doubling) ---------------------------------------
    if model.variant == "nondoubling" and e.damage_images:
        t0 = time.perf_counter()
        d_index = order[: min(e.damage_images, n_test)]
        d = damage.damage_recovery(model, params, x_N[d_index], d_index, keys["damage"],
                                   e.damage_at, e.recovery_steps, e.batch_size,
                                   DAMAGE_FIGURE_IMAGES, progress)
        top, left = damage.centred_square(model.image_size, cfg.model.damage_size)
        metrics["damage"] = {
            **damage.summarize(d["ll_undamaged_NxS"], d["ll_damaged_NxR1"], e.damage_at),
            "damage_at": e.damage_at,
            "recovery_steps": e.recovery_steps,
            "square": {"top": top, "left": left, "size": cfg.model.damage_size,
                       "position": "centred"},
        }
        arrays.update(damage_steps_undamaged=d["steps_undamaged_S"],
                      damage_steps_damaged=d["steps_damaged_R1"],
                      damage_ll_undamaged=d["ll_undamaged_NxS"].astype(np.float32),
                      damage_ll_damaged=d["ll_damaged_NxR1"].astype(np.float32),
                      damage_index=d_index)
        dd, rr = e.damage_at, e.recovery_steps
        hit = figures.sigmoid(d["logits_damaged_FxR1xHxW"])
        kept = figures.sigmoid(d["logits_undamaged_FxSxHxW"])
        cols = list(dict.fromkeys([0] + [max(1, round(rr * q)) for q in (0.125, 0.25, 0.5,
                                                                          1.0)]))
        titles = (["test image", f"step {dd}", "damaged"]
                  + [f"+{c} steps" for c in cols[1:]] + [f"undamaged, +{rr}"])
        shown = np.concatenate([x_N[d_index[: len(hit)], None, ..., 0], kept[:, dd, None],
                                hit[:, cols], kept[:, -1, None]], 1)
        arrays["damage_frames_probs"] = shown.astype(np.float32)
        figures.strips(shown, out / "damage_recovery.png",
                       "Damage recovery: before, just after damage, regrowth, and the same "
                       "run without damage", titles)
        figures.damage_curve(d["steps_undamaged_S"], d["ll_undamaged_NxS"],
                             d["steps_damaged_R1"], d["ll_damaged_NxR1"],
                             out / "damage_curve.png")
        seconds["damage"] = time.perf_counter() - t0

    if model.variant == "nondoubling" and e.probe_images:
        t0 = time.perf_counter()
        p_index = order[: min(e.probe_images, n_test)]
        k_states, k_probe = jax.random.split(keys["probe"])
        states = probe.final_states(model, params, x_N[p_index], p_index, k_states,
                                    e.batch_size, progress)
        pr = probe.linear_probe(states, y_N[p_index], k_probe, e.probe_steps,
                                PROBE_TEST_FRACTION)
        metrics["probe"] = {k: pr[k] for k in (
            "accuracy", "image_accuracy", "chance", "n_train_images", "n_test_images",
            "n_train_cells", "n_test_cells", "final_train_loss")}
        metrics["probe"]["steps"] = e.probe_steps
        show = pr["test_images"][:PROBE_FIGURE_IMAGES]
        recon = figures.sigmoid(states[show, ..., 0])
        proba = pr["test_proba_IxHxWxL"][:PROBE_FIGURE_IMAGES]
        arrays.update(probe_train_index=p_index[pr["train_images"]],
                      probe_test_index=p_index[pr["test_images"]],
                      probe_figure_probs=recon.astype(np.float32),
                      probe_figure_proba=proba.astype(np.float32),
                      probe_figure_labels=y_N[p_index[show]])
        figures.probe_panels(recon, proba, y_N[p_index[show]], out / "probe.png")
        seconds["probe"] = time.perf_counter() - t0

    # -- latent space: t-SNE and interpolations ------------------------------------------------
    n_tsne = min(e.tsne_images, n_test)
    if n_tsne >= 4:
        t0 = time.perf_counter()
        t_index = order[:n_tsne]
        means = latent.encoder_means(model, params, x_N[t_index], progress=progress)
        xy = latent.tsne(means, e.seed)
        labels = y_N[t_index]
        metrics["tsne"] = {
            "n_images": int(n_tsne),
            f"knn{KNN_NEIGHBOURS}_accuracy_latent": _knn_accuracy(means, labels,
                                                                  KNN_NEIGHBOURS),
            f"knn{KNN_NEIGHBOURS}_accuracy_tsne": _knn_accuracy(xy, labels, KNN_NEIGHBOURS),
        }
        arrays.update(tsne_xy=xy, tsne_labels=labels, tsne_index=t_index)
        figures.tsne_scatter(xy, labels, out / "tsne.png",
                             f"t-SNE of encoder means, {cfg.name} ({n_tsne:,} test images)")
        seconds["tsne"] = time.perf_counter() - t0

    pairs = latent.interpolation_pairs(y_N, order, e.n_interpolations)
    if len(pairs):
        t0 = time.perf_counter()
        means = latent.encoder_means(model, params, x_N[pairs.reshape(-1)], progress=False)
        logits = latent.interpolations(model, params, means.reshape(len(pairs), 2, -1),
                                       e.interpolation_points, keys["interpolation"],
                                       DECODE_BATCH)
        rows = np.concatenate([x_N[pairs[:, 0], None, ..., 0],
                               figures.sigmoid(logits),
                               x_N[pairs[:, 1], None, ..., 0]], axis=1)
        arrays.update(interp_probs=rows.astype(np.float32), interp_index=pairs)
        p = e.interpolation_points
        titles = ["x_a"] + [f"{i}/{p - 1}" for i in range(p)] + ["x_b"]
        figures.strips(rows, out / "interpolations.png",
                       "Latent interpolation between encoder means of test digits", titles)
        metrics["interpolation"] = {"n_pairs": len(pairs), "points": p,
                                    "labels": y_N[pairs].tolist()}
        seconds["interpolation"] = time.perf_counter() - t0

    metrics["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    metrics["figures"] = sorted(f for f in artifacts.EVAL_FIGURES if (out / f).is_file())
    _write_npz(arrays, out / artifacts.EVAL_ARRAYS)
    path = out / artifacts.EVAL_METRICS
    result = contracts.EvalMetrics.from_dict(_jsonable(metrics), str(path))
    result.write(path)
    return result.to_dict()


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
