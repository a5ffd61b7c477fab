"""Training library: keys, optimizer order, data order, pool loss, the loop's files, resume,
no-op rerun, config mismatch and divergence (in-process, 1 CPU device, tiny configs)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vnca import artifacts, checkpoint, config, contracts, losses, pool, rng, train
from vnca.errors import ConfigError, DataError
from vnca.models import build_model
from vnca.models.model_io import load_model

# -- keys --------------------------------------------------------------------------------------

def test_named_keys_are_distinct_and_seeded():
    k0, k1 = rng.named_keys(0), rng.named_keys(1)
    assert set(k0) == {"init", "data", "train", "valid", "eval"}
    raw0 = [tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in k0.values()]
    raw1 = [tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in k1.values()]
    assert len(set(raw0)) == len(raw0)
    assert not set(raw0) & set(raw1)
    assert raw0 == [tuple(np.asarray(jax.random.key_data(k)).tolist())
                    for k in rng.named_keys(0).values()]


# -- optimizer: clip before Adam (O) vs after (R), trap T1 --------------------------------------

def _adam_numpy(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


def test_clip_before_adam_clips_gradients():
    tc = config.TrainConfig(learning_rate=1e-2, clip_norm=1.0, clip_order="before_adam")
    tx = train.make_optimizer(tc)
    g1, g2 = np.array([30.0, 40.0]), np.array([0.3, -0.1])  # |g1| = 50 -> clipped to 1
    params = jnp.zeros(2)
    st = tx.init(params)
    u1, st = tx.update(jnp.asarray(g1), st, params)
    u2, st = tx.update(jnp.asarray(g2), st, params)
    want = _adam_numpy([g1 / 50.0, g2], 1e-2)
    np.testing.assert_allclose(u1, want[0], rtol=1e-4)
    np.testing.assert_allclose(u2, want[1], rtol=1e-4)
    # unclipped Adam gives a different second step: the clip matters
    assert not np.allclose(_adam_numpy([g1, g2], 1e-2)[1], want[1], rtol=1e-3)


def test_clip_after_adam_clips_updates():
    tc = config.TrainConfig(learning_rate=1e-2, clip_norm=1e-3, clip_order="after_adam")
    tx = train.make_optimizer(tc)
    params = jnp.zeros(2)
    u, _ = tx.update(jnp.asarray([30.0, 40.0]), tx.init(params), params)
    # Adam's first update is -lr * sign(g) (norm 1.4e-2), clipped to norm 1e-3
    np.testing.assert_allclose(np.linalg.norm(u), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(u / np.linalg.norm(u), -np.ones(2) / np.sqrt(2), rtol=1e-5)


# -- data order ---------------------------------------------------------------------------------

def test_data_order_is_a_function_of_the_step_and_covers_each_epoch():
    key = rng.named_keys(0)["data"]
    order = train.DataOrder(key, n=10, batch_size=4)
    stream = np.concatenate([order.indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:].tolist()  # a new permutation each epoch
    # a fresh instance (a resumed run) gives the same batch for a step
    np.testing.assert_array_equal(train.DataOrder(key, 10, 4).indices(3), stream[12:16])


# -- pool loss ----------------------------------------------------------------------------------

def test_pool_loss_uses_pool_images_and_states_and_damages_the_first_pool_rows(smoke_cfg):
    cfg = smoke_cfg("nondoubling", "model.damage_size=4")
    model = build_model(cfg)
    params = model.init(jax.random.key(0))  # zero-init last conv: growth leaves states as is
    b, n = cfg.train.batch_size, cfg.data.pad_to
    n_pool, n_damage = pool.pool_rows(cfg)
    assert (n_pool, n_damage) == (4, 2)
    p = pool.init_pool(cfg.train.pool.size, n, cfg.model.z_dim)
    rs = np.random.default_rng(0)
    p["states"] = jnp.asarray(rs.normal(size=p["states"].shape).astype(np.float32))
    p["images"] = jnp.asarray((rs.random(p["images"].shape) > 0.5).astype(np.float32))
    p["filled"] = p["filled"].at[:3].set(True)  # slot 3 is empty: row 7 stays fresh
    x = jnp.zeros((b, n, n, 1))
    loss, aux = jax.jit(lambda *a: train.pool_loss(model, cfg, *a))(params, x, p,
                                                                    jax.random.key(1))
    s = np.asarray(aux["states"])
    # rows 4, 5 (damaged) and 6 come from slots 0, 1, 2; rows 0-3 and 7 are fresh seeds
    np.testing.assert_array_equal(aux["images"][4:7], p["images"][:3])
    np.testing.assert_array_equal(aux["images"][7], x[7])
    np.testing.assert_array_equal(s[6], p["states"][2])
    for row, slot in ((4, 0), (5, 1)):
        zero = np.all(s[row] == 0, axis=-1)
        assert zero.sum() == 16  # one 4x4 square of cells
        np.testing.assert_array_equal(s[row][~zero], np.asarray(p["states"][slot])[~zero])
    for row in (0, 7):  # seeds: z in every cell
        np.testing.assert_allclose(s[row], np.broadcast_to(s[row][0, 0], s[row].shape))
    log_px = losses.bernoulli_loglik(jnp.asarray(s[..., 0]), aux["images"][..., 0])
    np.testing.assert_allclose(aux["metrics"]["recon"], log_px.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, aux["metrics"]["kl"] - aux["metrics"]["recon"], rtol=1e-5)
    assert float(aux["metrics"]["pool_rows"]) == 3



def test_pool_start_step_trains_as_without_pool_rows_until_it_then_feeds_the_pool(smoke_cfg):
    """Before train.pool.start_step no row comes from the pool, so the pool's shares and the KL
    flag cannot change the parameters; the pool still fills, and feeds rows from that step."""
    base = ("model.damage_size=4", "train.batch_size=4", "train.pool.size=8",
            "train.pool.start_step=3")
    cfgs = [smoke_cfg("nondoubling", *base),
            smoke_cfg("nondoubling", *base, "train.pool.batch_share=1.0",
                      "train.pool.kl_on_pool_rows=false")]
    x = jnp.asarray((np.random.default_rng(0).random((4, 28, 28, 1)) > 0.5).astype(np.float32))
    runs = []
    for cfg in cfgs:
        model = build_model(cfg)
        step = jax.jit(train.make_train_step(model, cfg))
        state = train.init_state(model, cfg, jax.random.key(0))
        rows = []
        for i in range(4):
            state, m = step(state, x, jax.random.key(1))
            rows.append(float(m["pool_rows"]))
            if i == 2:
                params3, filled3 = state["params"], int(state["pool"]["filled"].sum())
        runs.append((params3, rows, filled3))
    for a, b in zip(jax.tree_util.tree_leaves(runs[0][0]), jax.tree_util.tree_leaves(runs[1][0])):
        np.testing.assert_array_equal(a, b)
    # steps 0-2 take no pool row although the pool has filled; step 3 takes n_pool rows
    assert runs[0][1] == [0.0, 0.0, 0.0, 2.0] and runs[1][1] == [0.0, 0.0, 0.0, 4.0]
    # each step drops the n_pool slots it took (used or not) and adds B states: 8 of 8 slots
    # filled after 3 steps with n_pool 2, 4 with n_pool 4
    assert runs[0][2] == 8 and runs[1][2] == 4


def test_kl_on_pool_rows_false_charges_only_the_fresh_rows(smoke_cfg):
    cfgs = {flag: smoke_cfg("nondoubling", "model.damage_size=4", "train.batch_size=8",
                            f"train.pool.kl_on_pool_rows={flag}") for flag in ("true", "false")}
    model = build_model(cfgs["true"])
    params = model.init(jax.random.key(0))
    p = pool.init_pool(8, 28, cfgs["true"].model.z_dim)
    p["images"] = jnp.ones_like(p["images"])
    p["filled"] = p["filled"].at[:2].set(True)  # pool rows 4, 5 are fed; 6, 7 stay fresh
    x = jnp.asarray((np.random.default_rng(1).random((8, 28, 28, 1)) > 0.5).astype(np.float32))
    kl = {}
    for flag, cfg in cfgs.items():
        _, aux = train.pool_loss(model, cfg, params, x, p, jax.random.key(2))
        kl[flag] = float(aux["metrics"]["kl"])
        images = aux["images"]
    mean, std = model.encode(params, images)
    kl_B = np.asarray(losses.gaussian_kl(mean, std))
    np.testing.assert_allclose(kl["true"], kl_B.mean(), rtol=1e-5)
    np.testing.assert_allclose(kl["false"], kl_B[[0, 1, 2, 3, 6, 7]].sum() / 8, rtol=1e-5)
    assert kl["false"] < kl["true"]


def test_step_key_holds_what_the_compiled_step_reads_and_nothing_else(smoke_cfg):
    """Configs that differ only in loop settings share one compilation (`train.programs`)."""
    from vnca import distributed

    mesh = distributed.make_mesh()
    base = smoke_cfg("nondoubling")
    model = build_model(base)
    key = train.StepKey.of(model, base, mesh)
    loop_only = smoke_cfg("nondoubling", "train.steps=7", "train.log_every=3", "train.seed=5",
                          "train.val_every=0", "train.checkpoint_every=9", "name=other")
    assert train.StepKey.of(build_model(loop_only), loop_only, mesh) == key
    for override in ("train.beta=0.5", "train.pool.kl_on_pool_rows=false",
                     "train.pool.start_step=3", "train.clip_norm=2.0"):
        cfg = smoke_cfg("nondoubling", override)
        assert train.StepKey.of(build_model(cfg), cfg, mesh) != key, override


# -- the loop: files, resume, no-op, errors ------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, make_dataset):
    return make_dataset(tmp_path_factory.mktemp("data"))


FAST = ("train.checkpoint_every=2", "train.log_every=2", "train.val_every=3",
        "train.val_images=8", "train.batch_size=4", "train.pool.size=8")


@pytest.mark.slow
def test_train_writes_contract_files_and_resumes_to_the_same_params(data_dir, tmp_path,
                                                                    smoke_cfg):
    cfg = smoke_cfg("nondoubling", *FAST)
    full = train.train_and_evaluate(cfg, data_dir=data_dir, out_dir=tmp_path / "a", steps=4)
    assert full["variant"] == "nondoubling" and full["steps"] == 4
    for key in ("name", "wall_time_s", "hardware", "n_devices", "smoke", "param_count",
                "final_loss"):
        assert key in full
    from vnca.provenance import source_commit
    assert full["commit"] == source_commit() and full["commit"]  # this checkout's commit
    a = tmp_path / "a"
    assert contracts.TrainSummary.read(a / artifacts.TRAIN_SUMMARY).to_dict() == full
    log = contracts.read_train_log(a / artifacts.TRAIN_METRICS)
    assert [(type(r).__name__, r.step) for r in log] == [
        ("TrainRecord", 2), ("ValidRecord", 3), ("TrainRecord", 4), ("ValidRecord", 4)]
    _malformed_copies_are_refused(a, tmp_path / "bad")
    saved_cfg = config.loads((a / artifacts.RESOLVED_CONFIG).read_text())
    assert saved_cfg.train.steps == 4 and saved_cfg.model.conv_algorithm == "winograd"  # auto
    assert saved_cfg.model == dataclasses.replace(cfg.model, conv_algorithm="winograd")
    recs = [json.loads(line) for line in (a / artifacts.TRAIN_METRICS).read_text().splitlines()]
    train_recs = [r for r in recs if "split" not in r]
    val_recs = [r for r in recs if r.get("split") == "valid"]
    assert [r["step"] for r in train_recs] == [2, 4]
    assert [r["step"] for r in val_recs] == [3, 4]
    for r in train_recs:
        assert set(r) >= {"loss", "kl", "recon", "elbo", "grad_norm", "images_per_s",
                          "elapsed_s"}
        np.testing.assert_allclose(r["loss"], r["kl"] - r["recon"], rtol=1e-5)  # beta = 1
    assert all(np.isfinite(r["val_elbo"]) and r["val_images"] == 8 for r in val_recs)
    assert sorted(int(p.name) for p in (a / artifacts.CHECKPOINTS).iterdir()
                  if p.name.isdigit()) == [2, 4]
    _, model, params = load_model(a)
    assert model.variant == "nondoubling"

    # Train 2 steps into b, then resume to 4: the same parameters as the run straight to 4.
    b = tmp_path / "b"
    train.train_and_evaluate(cfg, data_dir=data_dir, out_dir=b, steps=2)
    resumed = train.train_and_evaluate(cfg, data_dir=data_dir, out_dir=b, steps=4)
    assert resumed["steps"] == 4
    _, _, params_b = load_model(b)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_b)):
        np.testing.assert_array_equal(x, y)
    steps_b = [json.loads(line)["step"] for line in (b / artifacts.TRAIN_METRICS).read_text()
               .splitlines() if "split" not in json.loads(line)]
    assert steps_b == [2, 4]

    # A finished run is a no-op: same summary, files untouched.
    mtime = (a / artifacts.PARAMS).stat().st_mtime_ns
    assert train.train_and_evaluate(cfg, data_dir=data_dir, out_dir=a, steps=4) == full
    assert (a / artifacts.PARAMS).stat().st_mtime_ns == mtime

    # Resuming with a different model is refused with one line naming the file and the key.
    with pytest.raises(ConfigError, match=r"config.yaml.*model.z_dim"):
        train.train_and_evaluate(smoke_cfg("nondoubling", *FAST, "model.z_dim=8"),
                                 data_dir=data_dir, out_dir=a, steps=6)


def _malformed_copies_are_refused(run: Path, tmp: Path) -> None:
    """summary.json and metrics.jsonl as the step wrote them, with one thing wrong: one
    `DataError` line naming the copy (and the line)."""
    tmp.mkdir()
    summary = json.loads((run / artifacts.TRAIN_SUMMARY).read_text())
    lines = (run / artifacts.TRAIN_METRICS).read_text().splitlines()
    cases = [
        (artifacts.TRAIN_SUMMARY, dict(summary, version=0), "rerun `vnca train`"),
        (artifacts.TRAIN_SUMMARY, dict(summary, n_devices=0), "'n_devices' must be an integer"),
        (artifacts.TRAIN_SUMMARY, dict(summary, tier="huge"), "'tier' must be one of"),
        (artifacts.TRAIN_METRICS, [lines[0], json.dumps(dict(json.loads(lines[1]), step=-3)),
                                   lines[2]], "line 2: 'step' must be a non-negative integer"),
        (artifacts.TRAIN_METRICS, [json.dumps({k: v for k, v in json.loads(lines[0]).items()
                                               if k != "version"}), lines[1]],
         "line 1: no 'version'"),
    ]
    read = {artifacts.TRAIN_SUMMARY: contracts.TrainSummary.read,
            artifacts.TRAIN_METRICS: contracts.read_train_log}
    for name, content, needle in cases:
        path = tmp / name
        path.write_text(json.dumps(content) if isinstance(content, dict)
                        else "\n".join(content) + "\n")
        with pytest.raises(DataError) as e:
            read[name](path)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: "), needle
        assert needle in str(e.value)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path,
                                                                   smoke_cfg):
    cfg = smoke_cfg("baseline", "train.checkpoint_every=1", "train.log_every=1",
                    "train.val_every=0", "train.batch_size=4", "train.learning_rate=1e30")
    # Step 1's update is finite, so checkpoint 1 is written, but its parameters give step 2 a
    # non-finite loss: it is not good, and it is set aside.
    with pytest.raises(train.TrainingDivergedError,
                       match=r"at step 2; no good checkpoint is left \(checkpoint 1, .*start over"):
        train.train_and_evaluate(cfg, data_dir=data_dir, out_dir=tmp_path, steps=10)
    assert not any(p.name.isdigit() for p in (tmp_path / artifacts.CHECKPOINTS).iterdir())
    assert (tmp_path / checkpoint.DIVERGED_DIR / "1").is_dir()
    assert not (tmp_path / artifacts.PARAMS).exists()
    recs = [json.loads(line) for line in (tmp_path / artifacts.TRAIN_METRICS).read_text()
            .splitlines()]
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert max(r["step"] for r in recs) == 1


@pytest.mark.slow
def test_validation_is_the_evaluation_bound_on_the_validation_subset(data_dir, smoke_cfg,
                                                                     random_params):
    """One importance-weighted bound: the validator's value is `vnca.evaluation.bound`'s on its
    subset of the validation split, image i's key `fold_in(key, i)`; the subset is fixed."""
    from vnca import distributed
    from vnca.data import pad_images
    from vnca.evaluation import bound

    cfg = smoke_cfg("nondoubling", "train.batch_size=4", "train.pool.size=8",
                    "train.val_images=8", "train.val_iw_samples=2")
    model = build_model(cfg)
    params = random_params(model)
    _, x_valid = train.training_images(cfg, data_dir)
    mesh = distributed.make_mesh()
    feeder = train.Feeder(mesh, cfg.train.batch_size, cfg.data.pad_to)
    val = train.Validator(model, cfg, x_valid, jax.random.key(5), mesh, feeder)
    got = val(params)
    idx = val.index_N
    assert len(set(idx.tolist())) == 8 and idx.max() < len(x_valid)
    want = bound.iw_bound(model, params, pad_images(x_valid[idx], cfg.data.pad_to), idx, val.key,
                          2, 4, progress=False)["iw"]
    assert got == {"val_elbo": pytest.approx(want.mean(), rel=1e-5), "val_images": 8,
                   "val_iw_samples": 2}
    again = train.Validator(model, cfg, x_valid, jax.random.key(5), mesh, feeder)
    np.testing.assert_array_equal(again.index_N, idx)
    assert train.Validator.maybe(model, smoke_cfg("nondoubling", "train.val_every=0"), x_valid,
                                 jax.random.key(5), mesh, feeder) is None


def test_batch_must_divide_over_devices(smoke_cfg):
    cfg = smoke_cfg("doubling", "train.batch_size=6")
    with pytest.raises(ConfigError, match="train.batch_size=6.*4"):
        train.check_batch(cfg, 4)


# -- multi-host detection (pure) -----------------------------------------------------------------

def test_cluster_from_env():
    from vnca.distributed import COORDINATOR_PORT, cluster_from_env

    assert cluster_from_env({}) is None
    assert cluster_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # single-host TPU
    assert cluster_from_env({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == {}  # JAX auto-detects
    assert cluster_from_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
                             "JAX_PROCESS_ID": "3"}) == {
        "coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}
    spec = {"cluster": {"workerpool0": ["chief:2222"], "workerpool1": ["w0:2222", "w1:2222"]},
            "task": {"type": "workerpool1", "index": 1}}
    assert cluster_from_env({"CLUSTER_SPEC": json.dumps(spec)}) == {
        "coordinator_address": f"chief:{COORDINATOR_PORT}", "num_processes": 3, "process_id": 2}
    one = {"cluster": {"workerpool0": ["chief:2222"]}, "task": {"type": "workerpool0"}}
    assert cluster_from_env({"CLUSTER_SPEC": json.dumps(one)}) is None


def test_train_plus_valid_and_process_rows(data_dir, smoke_cfg):
    from vnca import distributed

    mesh = distributed.make_mesh()
    rows = distributed.process_rows(distributed.batch_sharded(mesh), 8)
    assert (rows.start, rows.stop) == (0, 8)  # one process feeds the whole batch
    x_tr, x_va = train.training_images(smoke_cfg("doubling"), data_dir)
    assert (len(x_tr), len(x_va)) == (48, 16)
    cfg = smoke_cfg("doubling", "train.train_split=train+valid")
    x_all, _ = train.training_images(cfg, data_dir)
    assert len(x_all) == 64
    np.testing.assert_array_equal(x_all[48:], x_va)
    with pytest.raises(ConfigError, match="train.train_split"):
        smoke_cfg("doubling", "train.train_split=test")
