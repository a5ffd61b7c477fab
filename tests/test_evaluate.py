"""Evaluation pieces against independent computations: the batched IW bound against a slow
one-image-at-a-time float64 reference on the same keys, the damage metric on a model built so
that damage must cost exactly a known number of nats, and the probe's split by image."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from vnca.errors import ConfigError
from vnca.evaluate import eval_config, eval_keys
from vnca.evaluation import bound, damage, probe
from vnca.models import build_model


@pytest.fixture(scope="module")
def eval_cfg(smoke_cfg):
    """`eval_cfg(variant, *overrides)`: the smoke config with remat off, as `vnca evaluate`
    runs a model."""
    return lambda variant, *overrides: smoke_cfg(variant, *overrides, "model.remat=false")


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 1), np.float32)
    o = (size - 28) // 2
    x[:, o + 6:o + 22, o + 9:o + 19, 0] = rng.random((n, 16, 10)) < 0.5
    return x


def _reference_bound(model, params, x_HxWx1, index, key, k, chunk=None):
    """The bound of one image, unbatched and unjitted, its log-densities in float64 numpy.
    With `chunk`, the samples are decoded in a Python loop with the documented keys: the step
    count that `decode` would draw, chunk c's masks from split(split(k_dec)[1], K / chunk)[c]."""
    mean_1xZ, std_1xZ = model.encode(params, jnp.asarray(x_HxWx1)[None])
    k_z, k_dec = jax.random.split(jax.random.fold_in(key, index))
    eps_KxZ = jax.random.normal(k_z, (k, mean_1xZ.shape[-1]))
    z_KxZ = mean_1xZ + std_1xZ * eps_KxZ             # what the decoder sees (float32)
    if chunk is None:
        logits = np.asarray(model.decode(params, z_KxZ, k_dec, eval_mode=True), np.float64)
    else:
        k_t, k_grow = jax.random.split(k_dec)
        n_steps = int(model.sample_n_steps(k_t, eval_mode=True).n)
        keys = jax.random.split(k_grow, k // chunk)
        logits = np.concatenate([np.asarray(model.decode(
            params, z_KxZ[c * chunk:(c + 1) * chunk], keys[c], n_steps=n_steps, eval_mode=True))
            for c in range(k // chunk)]).astype(np.float64)
    x = np.broadcast_to(x_HxWx1[..., 0], logits.shape)
    with np.errstate(invalid="ignore"):
        ll = np.where(x > 0.5, -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits))
    log_px = ll.reshape(k, -1).sum(-1)
    z, mean, std = (np.asarray(a, np.float64) for a in (z_KxZ, mean_1xZ, std_1xZ))
    log_pz = norm.logpdf(z).sum(-1)
    log_qz = norm.logpdf(z, mean, std).sum(-1)
    return logsumexp(log_px + log_pz - log_qz) - math.log(k)


@pytest.mark.parametrize("variant, chunk", [
    ("doubling", None),
    ("nondoubling", None),                             # O: T drawn per image, p = 0.5 masks
    ("nondoubling", 4),                                # the K samples decoded 4 at a time
    ("baseline", None),                                # -inf logits on the pad
])
@pytest.mark.slow
def test_batched_bound_equals_one_image_reference(variant, chunk, eval_cfg, random_params):
    cfg = eval_cfg(variant)
    model = build_model(cfg)
    params = random_params(model)
    x = _images(3, cfg.data.pad_to)
    index = np.array([7, 3, 42])                       # indices in the test split -> keys
    key = jax.random.key(3)
    k = 8
    got = bound.iw_bound(model, params, x, index, key, k, batch_size=2, progress=False,
                         chunk=chunk)
    want = np.array([_reference_bound(model, params, x[i], index[i], key, k, chunk)
                     for i in range(3)])
    assert np.all(np.isfinite(want)) and np.all(want < 0)
    np.testing.assert_allclose(got["iw"], want, rtol=1e-5, atol=2e-3)
    # The bound sits above the K-sample mean ELBO (Jensen), per image.
    assert np.all(got["iw"] >= got["elbo"] - 1e-4)
    # Images in other batches, beside other images or padding, give the same numbers.
    again = bound.iw_bound(model, params, x[::-1], index[::-1], key, k, batch_size=2,
                           progress=False, chunk=chunk)
    np.testing.assert_allclose(again["iw"][::-1], got["iw"], rtol=1e-6, atol=1e-4)
    # The key belongs to the image index: another index gives other samples, another value.
    other = bound.iw_bound(model, params, x, index + 1, key, k, batch_size=2, progress=False,
                           chunk=chunk)
    assert np.all(np.abs(other["iw"] - got["iw"]) > 1e-3)


@pytest.mark.parametrize("variant, overrides", [
    ("doubling", []),
    ("nondoubling", ["model.update_prob=1.0"]),        # no masks: only T could differ
])
def test_decoding_samples_in_chunks_changes_nothing_deterministic(variant, overrides, eval_cfg,
                                                                  random_params):
    cfg = eval_cfg(variant, *overrides)
    model = build_model(cfg)
    params = random_params(model)
    z = np.random.default_rng(1).normal(size=(8, cfg.model.z_dim)).astype(np.float32)
    key = jax.random.key(4)
    whole = bound.decode_samples(model, params, z, key)
    chunked = jax.jit(lambda p, z, k: bound.decode_samples(model, p, z, k, chunk=2))(
        params, z, key)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_sample_chunk_divides_k():
    assert bound.sample_chunk(128) == bound.SAMPLE_CHUNK == 8
    assert bound.sample_chunk(100) == 5 and bound.sample_chunk(96) == 8
    assert bound.sample_chunk(8) is None and bound.sample_chunk(17) is None
    assert bound.sample_chunk(100, limit=16) == 10


def test_bound_summary_stderr_and_bits_per_dim():
    iw = np.array([-80.0, -90.0, -85.0, -95.0])
    s = bound.summarize(iw, 784)
    assert s["mean_nats"] == pytest.approx(-87.5)
    assert s["stderr_nats"] == pytest.approx(np.sqrt(np.var(iw) * 4 / 3) / 2)
    assert s["bits_per_dim"] == pytest.approx(87.5 / (math.log(2) * 784))


@pytest.fixture
def saturated_nondoubling(eval_cfg, random_params):
    """A non-doubling model whose NCA update is exactly zero (its last conv, which has no bias,
    set to zero) and whose encoder ignores the image: mean = (20, 0, ...), std = e^-12. The state
    stays the seed, so every logit is 20 (p = 1 - 2e-9) until damage sets the square's to 0."""
    cfg = eval_cfg("nondoubling")
    model = build_model(cfg)
    params = random_params(model)
    last = params["decoder"]["Conv_1"]["kernel"]
    params["decoder"]["Conv_1"] = {"kernel": jnp.zeros_like(last)}
    dense = params["encoder"]["Dense_0"]
    z = cfg.model.z_dim
    bias = jnp.zeros_like(dense["bias"]).at[0].set(20.0).at[z:].set(-12.0)
    params["encoder"]["Dense_0"] = {"kernel": jnp.zeros_like(dense["kernel"]), "bias": bias}
    return cfg, model, params


def test_damage_lowers_the_likelihood_by_the_square_of_grey_pixels(saturated_nondoubling):
    cfg, model, params = saturated_nondoubling
    n = cfg.data.pad_to
    x = np.ones((3, n, n, 1), np.float32)              # every pixel on
    x[2, :3] = 0.0                                     # third: top rows off (outside the square)
    d_at, rec = 3, 2
    res = damage.damage_recovery(model, params, x, np.arange(3), jax.random.key(0), d_at, rec,
                                 batch_size=2, progress=False)
    kept, hit = res["ll_undamaged_NxS"], res["ll_damaged_NxR1"]
    assert list(res["steps_undamaged_S"]) == [0, 1, 2, 3, 4, 5]
    assert list(res["steps_damaged_R1"]) == [3, 4, 5]
    size = cfg.model.damage_size
    top, left = damage.centred_square(n, size)
    assert (top, left) == ((n - size) // 2,) * 2
    # Independent numbers: logit 20 everywhere without damage; 0 (log 1/2 per pixel) in the
    # square after it, and the zero update never repairs it.
    on = x[..., 0].reshape(3, -1).sum(-1)
    before = -(on * np.logaddexp(0, -20.0) + (n * n - on) * np.logaddexp(0, 20.0))
    hole = np.zeros((n, n), bool)
    hole[top:top + size, left:left + size] = True
    on_hole = x[:, hole, 0].sum(-1)
    after = (before + on_hole * np.logaddexp(0, -20.0)
             + (size * size - on_hole) * np.logaddexp(0, 20.0) - size * size * math.log(2))
    np.testing.assert_allclose(kept, np.repeat(before[:, None], d_at + rec + 1, 1),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(hit, np.repeat(after[:, None], rec + 1, 1), rtol=1e-5, atol=1e-3)
    s = damage.summarize(kept, hit, d_at)
    assert s["meaningful"] and s["share_images_lower_after_damage"] == 1.0
    assert s["damage_drop"] == pytest.approx(np.mean(before - after), rel=1e-5)
    assert s["damage_drop"] > 100                      # all-on images lose 196 log 2 nats
    assert s["recovered_fraction"] == pytest.approx(0.0, abs=1e-6)  # nothing regrows


def test_damage_that_raises_the_score_is_not_called_recovery(saturated_nondoubling):
    """All-off images under logits of 20: every pixel costs 20 nats until damage greys the
    square (log 2 each), so damage raises the score and no fraction is given."""
    cfg, model, params = saturated_nondoubling
    n = cfg.data.pad_to
    x = np.zeros((2, n, n, 1), np.float32)
    res = damage.damage_recovery(model, params, x, np.arange(2), jax.random.key(0), 2, 2,
                                 batch_size=2, progress=False)
    s = damage.summarize(res["ll_undamaged_NxS"], res["ll_damaged_NxR1"], 2)
    size = cfg.model.damage_size
    gain = size * size * (np.logaddexp(0, 20.0) - math.log(2))
    assert s["after_damage"] - s["undamaged_final"] == pytest.approx(gain, rel=1e-5)
    assert not s["meaningful"] and s["recovered_fraction"] is None
    assert s["share_images_lower_after_damage"] == 0.0


def test_recovered_fraction_is_measured_against_the_undamaged_run():
    # Undamaged: -120 at the damage step, still improving to -100; damaged: -150 -> -110.
    kept = np.array([[-200.0, -120.0, -110.0, -100.0], [-200.0, -120.0, -110.0, -100.0]])
    hit = np.array([[-150.0, -130.0, -110.0], [-150.0, -130.0, -110.0]])
    s = damage.summarize(kept, hit, 1)
    assert (s["before"], s["undamaged_final"]) == (-120.0, -100.0)
    assert (s["after_damage"], s["after_recovery"]) == (-150.0, -110.0)
    # Against the state before the damage it would look like 40 / 30 > 100 % recovered.
    assert s["recovered_fraction"] == pytest.approx(40.0 / 50.0)
    assert s["meaningful"] and s["damage_drop"] == 50.0


def test_probe_split_keeps_every_image_on_one_side():
    train, test = probe.split_images(50, jax.random.key(0), 0.2)
    assert len(test) == 10 and len(train) == 40
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(50))
    # A shuffled split: the held-out images are not the first or last block.
    assert list(test) != list(range(10)) and list(test) != list(range(40, 50))


def test_linear_probe_learns_a_linearly_coded_label_and_splits_by_image():
    rng = np.random.default_rng(0)
    n, h, w, c = 60, 4, 4, 12
    labels = np.repeat(np.arange(10), 6)               # grouped by digit, as the test split
    states = rng.normal(0.0, 0.3, (n, h, w, c)).astype(np.float32)
    states[np.arange(n), :, :, labels] += 2.0           # channel = label carries the digit
    res = probe.linear_probe(states, labels, jax.random.key(1), steps=200)
    assert not set(res["train_cell_images"]) & set(res["test_cell_images"])
    assert set(res["test_cell_images"]) == set(res["test_images"])
    assert res["n_train_images"] + res["n_test_images"] == n
    assert res["n_test_cells"] == res["n_test_images"] * h * w
    assert res["accuracy"] > 0.97 and res["image_accuracy"] == 1.0
    # Chance is the most frequent training label's share of the held-out cells.
    major = np.bincount(labels[res["train_images"]], minlength=10).argmax()
    assert res["chance"] == pytest.approx(np.mean(labels[res["test_images"]] == major))
    # Noise states carry no label: accuracy near chance level, far below the coded case.
    noise = rng.normal(size=(n, h, w, c)).astype(np.float32)
    assert probe.linear_probe(noise, labels, jax.random.key(1), steps=200)["accuracy"] < 0.5


def test_eval_config_applies_eval_overrides_and_refuses_model_keys(eval_cfg):
    cfg = eval_cfg("nondoubling")
    got = eval_config(cfg, ["eval.n_images=5", "eval.iw_samples=3", "model.eval_steps=3"])
    assert (got.eval.n_images, got.eval.iw_samples, got.model.eval_steps) == (5, 3, 3)
    assert got.model.z_dim == cfg.model.z_dim
    with pytest.raises(ConfigError, match="model.z_dim"):
        eval_config(cfg, ["model.z_dim=8"])
    with pytest.raises(ConfigError, match="eval.iw_samples"):
        eval_config(cfg, ["eval.iw_samples=0"])
    with pytest.raises(ConfigError, match="eval.nope"):
        eval_config(cfg, ["eval.nope=1"])
    with pytest.raises(ConfigError, match="eval.damage_at"):
        eval_config(cfg, ["eval.damage_at=0"])


def test_eval_keys_are_distinct_per_purpose():
    keys = eval_keys(0)
    data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys.values()}
    assert len(data) == len(keys)


SHARDED_SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np
from vnca.evaluation import bound
from vnca.models.model_io import load_model

_, model, params = load_model(sys.argv[1])
x, index, key = np.load(sys.argv[2]), np.arange(6) * 5, jax.random.key(2)
one = bound.iw_bound(model, params, x, index, key, 3, 3, False, jax.devices()[:1])
four = bound.iw_bound(model, params, x, index, key, 3, 3, False, jax.devices())
print(json.dumps({"n": jax.device_count(), "one": one["iw"].tolist(),
                  "four": four["iw"].tolist()}))
"""


@pytest.mark.slow
def test_bound_split_over_four_devices_equals_one_device(tmp_path, make_model_dir):
    """JAX fixes its device count at start-up, so the 4 fake CPU devices live in a subprocess
    (given a model directory and the images)."""
    model_dir = make_model_dir(tmp_path / "model", "doubling", "model.remat=false")
    np.save(tmp_path / "x.npy", _images(6, 32))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(model_dir),
                           str(tmp_path / "x.npy")], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["n"] == 4 and len(res["four"]) == 6      # batch 3 rounded up to 4, padded
    np.testing.assert_allclose(res["four"], res["one"], rtol=1e-5)
