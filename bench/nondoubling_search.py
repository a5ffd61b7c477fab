"""Screen of training recipes for the non-doubling VNCA's plateau (issue 23).

    python bench/nondoubling_search.py --list                       # the recipes, in order
    python bench/nondoubling_search.py --data DATA --out OUT        # every recipe, 8 at a time
    python bench/nondoubling_search.py --data DATA --out OUT --recipes base,z32_h64 --workers 2
    python bench/nondoubling_search.py --data DATA --out OUT --tiny # a few minutes' check (CPU)
    python bench/nondoubling_search.py --time-cpu nopool,b64 --chunk 5  # step time vs base
    python bench/nondoubling_search.py --check-equivalence          # step == vnca.train's

DATA is a `vnca prepare-data` directory (dataset.npz and digit_classifier.npz). Each recipe is
the CPU tier's non-doubling run (configs/nondoubling.yaml + configs/cpu/nondoubling.yaml, with
the CPU tier's model and optimizer settings restated below so that an edit of those files does
not move this screen) plus `--set`-style config overrides and, for the departures from the paper,
knobs that the project's config does not have (prototyped in this script only):

  beta_warmup  N   beta rises linearly from 0 to train.beta over the first N steps
  free_bits    L   KL term sum_z max(L, batch-mean KL_z) (Kingma et al. 2016), L nats per dim
  pool_start   N   pool rows are used only from step N (the pool is filled from step 0)
  lr_schedule  S   "const" (the project's), "cosine" (cosine decay to 5 % over the run)
  kl_pool_rows B   false: no KL for the batch rows that start from a pool state (their z is not
                   decoded; O and the project charge it, O's code calls that "wrong")

Each recipe trains from scratch in its own process on the full training split (train, 50,000
images; batches from per-epoch permutations) and is measured at its milestones on a fixed
random subset of the test split (`--eval-images`, 1000 by default):

  recognised    share of test reconstructions (z ~ q(z|x), decoded at evaluation settings, as
                Bernoulli means) to which the dataset's digit classifier gives the image's label,
                as `vnca evaluate` measures it (its `reconstruction.accuracy`)
  pixvar        per-pixel variance across the test images of the decoded means, averaged over
                pixels (the issue's 0.002 for the original code on the plateau; the data's own
                value is printed as `data_pixvar`)
  elbo          one-sample ELBO (beta = 1) of those images at evaluation settings, nats
  kl, active    mean KL of q(z|x) and the number of latent dims whose mean KL exceeds 0.01 nats
  damage        at the last milestone, `vnca.evaluation.damage` on 256 test images (grow 20,
                damage the centred square, 20 more): recovered fraction as the evaluate step
  position      the growth of 32 test encodings: per NCA step t and distance d to the border,
                how far the cell state is from the borderless ("bulk") state of the same z (the
                same NCA on an 80x80 grid, whose centre the border never reaches), and how much
                the state and the logit vary across digits

and every `--chunk` steps the training curve: loss, KL, reconstruction term, gradient norm
(global and per layer) and KL per latent dim, means over the chunk.

Training steps run `--chunk` at a time inside one jitted `lax.scan` (one dispatch per chunk).
The loss and step are the project's (`vnca.train.pool_loss` and `make_train_step`: the same
key splits, pool, damage, clipping before Adam); `--check-equivalence` verifies that, without
the departures, one step here gives the project's parameters.

Several recipes run at once, each in its own process (`--workers`; on one GPU each process
allocates on demand). Results are gathered under OUT every few seconds, so a run cut short
still leaves what it measured: `results.jsonl` (one line per milestone, final or error),
`curves.jsonl`, `arrays.npz` (position diagnostics, damage curves), `images.npz`
(reconstructions, growth and damage frames as uint8) and `env.json` (versions, arguments). `--deadline-s` stops every recipe in time for its last
measurement. `bench/nondoubling_figures.py` draws the figures and the table from OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The CPU tier's non-doubling recipe (configs/cpu/nondoubling.yaml at commit of 2026-12-04),
# restated so that a later edit of the tier does not change what "base" means here.
BASE_SETS = [
    "model.z_dim=16", "model.nca_hidden=32", "model.conv_width=8", "model.min_steps=16",
    "model.max_steps=24", "model.update_prob=1.0", "model.damage_size=14", "model.remat=false",
    "train.batch_size=16", "train.learning_rate=0.002", "train.pool.enabled=true",
    "train.pool.size=256", "train.pool.batch_share=0.5", "train.pool.damage_share=0.5",
    "train.beta=1.0", "train.clip_norm=1.0", "train.clip_order=before_adam",
    "data.pad_to=28", "model.steps_inclusive=true", "model.eval_steps=null",
    "model.last_layer_bias=false", "model.variance_head=log_std",
]

EXT_DEFAULTS = {"beta_warmup": 0, "free_bits": 0.0, "pool_start": 0, "lr_schedule": "const",
                "kl_pool_rows": True}
DEPARTURES = ("beta_warmup", "free_bits", "kl_pool_rows")


@dataclasses.dataclass
class Recipe:
    name: str
    sets: list[str] = dataclasses.field(default_factory=list)
    ext: dict = dataclasses.field(default_factory=dict)
    steps: int = 4000
    diag: bool = False
    note: str = ""

    def departures(self) -> list[str]:
        """The knobs of this recipe that depart from the paper's recipe (not size changes)."""
        out = [f"{k}={v}" for k, v in self.ext.items() if k in DEPARTURES
               and v != EXT_DEFAULTS[k]]
        out += [s for s in self.sets if s.startswith("train.beta=") and s != "train.beta=1.0"]
        return out


def R(name, *sets, steps=4000, diag=False, note="", **ext) -> Recipe:
    return Recipe(name, list(sets), ext, steps, diag, note)


# In priority order: the first ones start first. Names say what differs from "base" (the CPU
# tier). Sizes: z = state channels (= latent size), h = update-net width.
RECIPES = [
    R("base", steps=8000, diag=True, note="the CPU tier's recipe"),
    R("z32_h64", "model.z_dim=32", "model.nca_hidden=64", steps=8000, diag=True),
    R("z64_h64", "model.z_dim=64", "model.nca_hidden=64"),
    R("z128_h128", "model.z_dim=128", "model.nca_hidden=128", note="the paper's widths"),
    R("T24-32", "model.min_steps=24", "model.max_steps=32"),
    R("lr5e-4", "train.learning_rate=0.0005"),
    R("b64", "train.batch_size=64"),
    R("nopool", "train.pool.enabled=false"),
    R("warmup2000", beta_warmup=2000),
    R("freebits0.5", free_bits=0.5),
    R("z32", "model.z_dim=32"),
    R("h64", "model.nca_hidden=64"),
    R("h128", "model.nca_hidden=128"),
    R("z64", "model.z_dim=64"),
    R("z64_h128", "model.z_dim=64", "model.nca_hidden=128"),
    R("T32-64_p0.5", "model.min_steps=32", "model.max_steps=64", "model.update_prob=0.5",
      note="the paper's T and update probability"),
    R("lr1e-3", "train.learning_rate=0.001"),
    R("lr2e-3_cosine", lr_schedule="cosine"),
    R("b32", "train.batch_size=32"),
    R("pool_from_2000", pool_start=2000),
    R("kl_fresh_rows", kl_pool_rows=False),
    R("beta0.3", "train.beta=0.3"),
    R("T32-48", "model.min_steps=32", "model.max_steps=48"),
    R("faithful_mix", "model.z_dim=64", "model.nca_hidden=64", "model.min_steps=24",
      "model.max_steps=32", "train.batch_size=32", "train.learning_rate=0.001", pool_start=2000,
      note="paper-faithful knobs together"),
    R("departure_mix", "model.z_dim=32", "model.nca_hidden=64", "model.min_steps=24",
      "model.max_steps=32", free_bits=0.25, pool_start=2000),
    R("z32_h64_T24-32", "model.z_dim=32", "model.nca_hidden=64", "model.min_steps=24",
      "model.max_steps=32"),
    R("z32_h64_b32_lr1e-3", "model.z_dim=32", "model.nca_hidden=64", "train.batch_size=32",
      "train.learning_rate=0.001"),
    R("z32_h64_pool2000", "model.z_dim=32", "model.nca_hidden=64", pool_start=2000),
    R("z32_h64_freebits0.25", "model.z_dim=32", "model.nca_hidden=64", free_bits=0.25),
    R("z32_h64_warmup2000_pool2000", "model.z_dim=32", "model.nca_hidden=64",
      beta_warmup=2000, pool_start=2000),
    R("z32_h128", "model.z_dim=32", "model.nca_hidden=128"),
    R("freebits0.5_pool2000", free_bits=0.5, pool_start=2000),
    R("h64_long", "model.nca_hidden=64", steps=16000),
    R("z32_h64_long", "model.z_dim=32", "model.nca_hidden=64", steps=16000),
    R("base_long", steps=16000),
    # Second GPU call (after the first showed the pool holding the plateau): no pool, longer,
    # and the pool switched on once the model has left the plateau.
    R("nopool_long", "train.pool.enabled=false", steps=16000),
    R("pool_from_1000", pool_start=1000, steps=16000),
    R("nopool_b32", "train.pool.enabled=false", "train.batch_size=32", steps=16000),
    R("nopool_lr1e-3", "train.pool.enabled=false", "train.learning_rate=0.001", steps=16000),
]

# Eval-time constants (the evaluate step's damage settings in the CPU tier).
DAMAGE_AT, RECOVERY_STEPS, DAMAGE_IMAGES = 20, 20, 256
POSITION_IMAGES, BULK_SIDE = 32, 80
RECON_SHOWN = 16
# Frames kept of the damage runs for figures: damaged run at D + these; undamaged at these.
DAMAGE_HIT_FRAMES = [0, 1, 2, 5, 10, 20]
DAMAGE_KEPT_FRAMES = [0, 5, 10, 15, 20, 30, 40]


def sigmoid(x):
    import numpy as np

    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def to_u8(p):
    """Probabilities in [0, 1] as uint8 (0..255), for figures."""
    import numpy as np

    return np.round(np.clip(np.asarray(p, np.float32), 0, 1) * 255).astype(np.uint8)


def milestones(steps: int, chunk: int) -> list[int]:
    ms = [m for m in (250, 500, 1000, 2000, 4000, 8000, 16000, 32000) if m < steps] + [steps]
    return sorted({max(chunk, (m // chunk) * chunk) for m in ms})


# ---------------------------------------------------------------------------------------------
# One recipe (child process).


def build_config(recipe: Recipe, extra_sets: list[str], config_dir: Path):
    from vnca import config

    files = [config_dir / "nondoubling.yaml", config_dir / "cpu" / "nondoubling.yaml"]
    return config.load(files, BASE_SETS + recipe.sets + list(extra_sets))


def make_optimizer(tc, ext: dict, total_steps: int):
    import optax

    lr = tc.learning_rate
    if ext["lr_schedule"] == "cosine":
        lr = optax.cosine_decay_schedule(tc.learning_rate, max(1, total_steps), alpha=0.05)
    elif ext["lr_schedule"] != "const":
        raise ValueError(f"unknown lr_schedule {ext['lr_schedule']!r}")
    clip, adam = optax.clip_by_global_norm(tc.clip_norm), optax.adam(lr)
    return optax.chain(clip, adam) if tc.clip_order == "before_adam" else optax.chain(adam, clip)


def layer_name(path) -> str:
    keys = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
    return "/".join(str(k) for k in keys[:-1])


def make_programs(model, cfg, ext: dict, total_steps: int, image_side: int = 28):
    """(init, chunk, train_step): `chunk(state, x_NxHxW uint8, idx_KxB, key) -> (state,
    metrics of K steps)`, jitted; `train_step(state, x_BxHxWx1, key)` as vnca.train's."""
    import jax
    import jax.numpy as jnp

    from vnca import losses, pool

    tx = make_optimizer(cfg.train, ext, total_steps)
    beta = float(cfg.train.beta)
    use_pool = cfg.train.pool.enabled
    n_pool, n_damage = pool.pool_rows(cfg)
    pad = (cfg.data.pad_to - image_side) // 2
    plain = (ext["beta_warmup"] == 0 and ext["free_bits"] == 0.0 and ext["kl_pool_rows"]
             and ext["pool_start"] == 0)

    def init(key):
        params = model.init(key)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params)}
        state["pool"] = pool.init_pool(cfg.train.pool.size if use_pool else max(n_pool, 1),
                                       model.image_size, cfg.model.z_dim)
        return state

    def loss_fn(params, x_BxHxWx1, pool_state, key, step):
        # vnca.train.pool_loss, with the departures; without them the same computation.
        b = x_BxHxWx1.shape[0]
        k_z, k_damage, k_t, k_grow = jax.random.split(key, 4)
        fed = pool.take(pool_state, b, n_pool)
        use_B = fed["use_B"]
        if not use_pool:
            use_B = jnp.zeros_like(use_B)
        elif ext["pool_start"]:
            use_B = use_B & (step >= ext["pool_start"])
        x_BxHxWx1 = jnp.where(use_B[:, None, None, None], fed["images"], x_BxHxWx1)
        mean_BxZ, std_BxZ = model.encode(params, x_BxHxWx1)
        z_BxZ = model.sample_z(mean_BxZ, std_BxZ, k_z)
        s = jnp.where(use_B[:, None, None, None], fed["states"], model.seed(z_BxZ))
        s = model.damage(s, k_damage, pool.damage_rows(b, n_pool, n_damage, use_B))
        s = model.grow(params, s, k_grow, model.sample_n_steps(k_t))
        log_px_B = losses.bernoulli_loglik(model.to_logits(s), x_BxHxWx1[..., 0])
        kl_B = losses.gaussian_kl(mean_BxZ, std_BxZ)
        var = jnp.square(std_BxZ)
        kl_BxZ = 0.5 * (var + jnp.square(mean_BxZ) - 1.0 - jnp.log(var))
        beta_t = jnp.asarray(beta, jnp.float32)
        if ext["beta_warmup"]:
            beta_t = beta * jnp.minimum(1.0, step.astype(jnp.float32) / ext["beta_warmup"])
        if plain:
            loss = -jnp.mean(losses.elbo(log_px_B, kl_B, beta))
        else:
            w_B = jnp.ones((b,), jnp.float32) if ext["kl_pool_rows"] else \
                (~use_B).astype(jnp.float32)
            if ext["free_bits"]:
                kl_Z = jnp.sum(w_B[:, None] * kl_BxZ, 0) / jnp.maximum(jnp.sum(w_B), 1.0)
                kl_term = jnp.sum(jnp.maximum(kl_Z, ext["free_bits"])) * jnp.mean(w_B)
            else:
                kl_term = jnp.sum(w_B * kl_B) / b
            loss = -jnp.mean(log_px_B) + beta_t * kl_term
        metrics = {"kl": jnp.mean(kl_B), "recon": jnp.mean(log_px_B),
                   "elbo": jnp.mean(log_px_B - kl_B), "beta": beta_t,
                   "kl_dim": jnp.mean(kl_BxZ, 0), "pool_rows": jnp.sum(use_B).astype(jnp.float32)}
        return loss, {"metrics": metrics, "images": x_BxHxWx1,
                      "states": jax.lax.stop_gradient(s)}

    def train_step(state, x_BxHxWx1, key):
        # vnca.train.make_train_step's body.
        k_loss, k_pool = jax.random.split(jax.random.fold_in(key, state["step"]))
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], x_BxHxWx1, state["pool"], k_loss, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        import optax
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "pool": state["pool"]}
        if use_pool:
            new["pool"] = pool.write_back(state["pool"], n_pool, aux["images"], aux["states"],
                                          k_pool)
        sq = jax.tree_util.tree_map(lambda g: jnp.sum(jnp.square(g)), grads)
        per_layer: dict = {}
        for path, v in jax.tree_util.tree_leaves_with_path(sq):
            name = layer_name(path)
            per_layer[name] = per_layer.get(name, 0.0) + v
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jax.tree_util.tree_leaves(sq))),
                   "layer_grad_norm": {k: jnp.sqrt(v) for k, v in per_layer.items()},
                   **aux["metrics"]}
        return new, metrics

    def chunk(state, x_NxHxW, idx_KxB, key):
        def body(st, idx_B):
            x = x_NxHxW[idx_B].astype(jnp.float32)[..., None]
            if pad:
                x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            return train_step(st, x, key)
        return jax.lax.scan(body, state, idx_KxB)

    return init, jax.jit(chunk, donate_argnums=0), train_step


def make_eval_programs(model, cfg):
    import jax
    import jax.numpy as jnp

    from vnca import losses
    from vnca.models import nca
    from vnca.models.vae import VAE

    @jax.jit
    def recon(params, x_BxHxWx1, key):
        k_z, k_dec = jax.random.split(key)
        mean, std = model.encode(params, x_BxHxWx1)
        z = model.sample_z(mean, std, k_z)
        logits = model.decode(params, z, k_dec, eval_mode=True)
        var = jnp.square(std)
        kl_BxZ = 0.5 * (var + jnp.square(mean) - 1.0 - jnp.log(var))
        log_px = losses.bernoulli_loglik(logits, x_BxHxWx1[..., 0])
        return {"probs": jax.nn.sigmoid(logits), "elbo": log_px - kl_BxZ.sum(-1),
                "kl_BxZ": kl_BxZ, "mean": mean}

    n_steps = model.max_steps
    side = model.image_size
    big = VAE(cfg.model, BULK_SIDE)
    d_HxW = jnp.minimum(jnp.minimum(jnp.arange(side)[:, None], jnp.arange(side)[None, :]),
                        jnp.minimum(side - 1 - jnp.arange(side)[:, None],
                                    side - 1 - jnp.arange(side)[None, :]))
    n_rings = side // 2 + side % 2
    ring_HxWxD = (d_HxW[..., None] == jnp.arange(n_rings)).astype(jnp.float32)
    ring_n_D = ring_HxWxD.sum((0, 1))
    c = BULK_SIDE // 2

    @jax.jit
    def position(params, z_BxZ, key):
        """Per NCA step t (0..T) and ring d: distance of the state from the bulk state (L2 over
        channels, mean over cells and images), variance across images of the state (mean over
        channels) and of the logit, and the mean state norm; logits of the first 4 images."""
        update = model._update(params)

        def stats(s_BxHxWxC, bulk_BxC):
            dev_BxHxW = jnp.sqrt(jnp.sum(jnp.square(s_BxHxWxC - bulk_BxC[:, None, None]), -1))
            ring = lambda a_HxW: jnp.einsum("hw,hwd->d", a_HxW, ring_HxWxD) / ring_n_D
            return {"dev_D": ring(dev_BxHxW.mean(0)),
                    "zvar_D": ring(jnp.var(s_BxHxWxC, 0).mean(-1)),
                    "logit_var_D": ring(jnp.var(s_BxHxWxC[..., 0], 0)),
                    "bulk_norm": jnp.mean(jnp.sqrt(jnp.sum(jnp.square(bulk_BxC), -1))),
                    "logits_4xHxW": s_BxHxWxC[:4, ..., 0]}

        def body(carry, k):
            s, sb = carry
            s = nca.nca_step(update, s, k, model.cfg.update_prob)
            sb = nca.nca_step(update, sb, k, model.cfg.update_prob)  # own masks; p = 1: none
            return (s, sb), stats(s, sb[:, c, c])

        s0, sb0 = model.seed(z_BxZ), big.seed(z_BxZ)
        first = stats(s0, sb0[:, c, c])
        _, rest = jax.lax.scan(body, (s0, sb0), jax.random.split(key, n_steps))
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)

    return recon, position


class Child:
    """Trains one recipe, measuring it at its milestones; writes WORK/NAME.jsonl and .npz."""

    def __init__(self, recipe: Recipe, args):
        self.recipe, self.args = recipe, args
        work = Path(args.work)
        self.jsonl, self.npz = work / f"{recipe.name}.jsonl", work / f"{recipe.name}.npz"
        self.arrays: dict = {}
        self.t0 = time.time()

    def emit(self, rec: dict) -> None:
        rec = {"recipe": self.recipe.name, "t": round(time.time() - self.t0, 2), **rec}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def save_arrays(self) -> None:
        import numpy as np

        tmp = self.npz.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **self.arrays)
        os.replace(tmp, self.npz)

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.emit({"type": "error", "traceback": traceback.format_exc()[-4000:]})
            raise

    def _run(self) -> None:
        import jax
        import numpy as np

        from vnca import config, rng
        from vnca.data import load_split
        from vnca.evaluation import classifier
        from vnca.models import build_model, count_params
        from vnca.models.vae import resolve_backend

        a, r = self.args, self.recipe
        if a.require_gpu and jax.default_backend() != "gpu":
            raise RuntimeError(f"--require-gpu: JAX's backend is {jax.default_backend()}")
        ext = {**EXT_DEFAULTS, **r.ext}
        cfg = resolve_backend(build_config(r, a.set, Path(a.config_dir)))
        steps = a.steps or r.steps
        chunk_k = min(a.chunk, steps)
        steps = max(chunk_k, (steps // chunk_k) * chunk_k)
        ms = milestones(steps, chunk_k)
        data = Path(a.data)
        x_tr, _ = load_split(data, "train")
        x_te, y_te = load_split(data, "test")
        if a.train_images:
            x_tr = x_tr[: a.train_images]
        digits = classifier.ClassifierWeights.load(data / "digit_classifier.npz")
        ev_idx = np.sort(np.random.default_rng(0).permutation(len(x_te))[: a.eval_images])
        x_ev = x_te[ev_idx].astype(np.float32)
        pad = (cfg.data.pad_to - x_ev.shape[1]) // 2
        x_ev = np.pad(x_ev, ((0, 0), (pad, pad), (pad, pad)))[..., None]
        y_ev = y_te[ev_idx]

        model = build_model(cfg)
        keys = rng.named_keys(cfg.train.seed)
        x_dev = jax.device_put(x_tr)
        init, chunk_fn, _ = make_programs(model, cfg, ext, steps, x_tr.shape[1])
        state = jax.jit(init)(keys["init"])
        self.eval_fns = make_eval_programs(model, cfg)
        self.emit({"type": "start", "config": config.flatten(config.to_dict(cfg)), "ext": ext,
                   "departures": r.departures(), "steps": steps, "milestones": ms,
                   "params": count_params(state["params"]), "device": str(jax.devices()[0]),
                   "vnca_path": str(Path(sys.modules["vnca"].__file__).parent),
                   "note": r.note})
        ek = jax.random.key(a.eval_seed)
        rng_np = np.random.default_rng(cfg.train.seed)
        n, bsz = len(x_tr), cfg.train.batch_size
        perm, pos = rng_np.permutation(n), 0

        def indices(k):
            """The next k batches of the stream of per-epoch permutations."""
            nonlocal perm, pos
            parts, need = [], k * bsz
            while need:
                if pos == n:
                    perm, pos = rng_np.permutation(n), 0
                take = min(need, n - pos)
                parts.append(perm[pos:pos + take])
                pos, need = pos + take, need - take
            return np.concatenate(parts).astype(np.int32).reshape(k, bsz)

        done, train_s, last_eval_s, damage_reserve = 0, 0.0, 30.0, 40.0
        first_chunk_s = None
        while done < steps:
            t = time.time()
            state, m = chunk_fn(state, x_dev, indices(chunk_k), keys["train"])
            m = jax.device_get(m)
            dt = time.time() - t
            if first_chunk_s is None:
                first_chunk_s = dt  # includes the compile
            else:
                train_s += dt
            done += chunk_k
            rec = {"type": "curve", "step": done, "chunk_s": round(dt, 3)}
            for k, v in m.items():
                if k == "layer_grad_norm":
                    rec[k] = {n_: float(np.mean(x)) for n_, x in v.items()}
                elif k == "kl_dim":
                    rec[k] = [round(float(x), 4) for x in np.mean(v, 0)]
                else:
                    rec[k] = float(np.mean(v))
            rec["loss_last"] = float(m["loss"][-1])
            if not np.isfinite(rec["loss"]):
                self.emit({**rec, "type": "curve"})
                raise FloatingPointError(f"loss not finite at step {done}")
            self.emit(rec)
            late = time.time() + dt + 1.5 * last_eval_s + damage_reserve + 5 > a.deadline
            if done in ms or late or done >= steps:
                final = done >= steps or late
                t = time.time()
                self.measure(model, cfg, state["params"], x_ev, y_ev, digits, ek, done, final,
                             train_s, first_chunk_s, steps)
                last_eval_s = time.time() - t
                if final:
                    break

    def measure(self, model, cfg, params, x_ev, y_ev, digits, ek, step, final, train_s,
                first_chunk_s, steps):
        import jax
        import numpy as np

        from vnca.evaluation import classifier, damage

        t = time.time()
        outs = []
        bs = min(250, len(x_ev))
        for i in range(0, len(x_ev), bs):
            xb = x_ev[i:i + bs]
            if len(xb) < bs:
                xb = np.concatenate([xb, np.repeat(xb[-1:], bs - len(xb), 0)])
            o = jax.device_get(self.eval_fns[0](
                params, xb, jax.random.fold_in(ek, i // bs)))
            outs.append({k: v[: min(bs, len(x_ev) - i)] for k, v in o.items()})
        o = {k: np.concatenate([p[k] for p in outs]) for k in outs[0]}
        probs = o["probs"]
        acc = classifier.label_accuracy(classifier.predict_proba(digits, probs), y_ev)
        kl_Z = o["kl_BxZ"].mean(0)
        rec = {"type": "final" if final else "milestone", "step": step,
               "recognised": acc, "pixvar": float(np.var(probs, 0).mean()),
               "elbo": float(o["elbo"].mean()), "kl": float(kl_Z.sum()),
               "active": int(np.sum(kl_Z > 0.01)), "kl_dim": [round(float(v), 4) for v in kl_Z],
               "train_s": round(train_s, 2), "first_chunk_s": round(first_chunk_s or 0, 2),
               "s_per_step": round(train_s / max(1, step - self.args.chunk), 5),
               "n_eval": len(x_ev), "planned_steps": steps}
        if step == self.args.chunk or "data_recognised" not in self.arrays:
            rec["data_recognised"] = classifier.label_accuracy(
                classifier.predict_proba(digits, x_ev[..., 0]), y_ev)
            rec["data_pixvar"] = float(np.var(x_ev[..., 0], 0).mean())
            self.arrays["data_recognised"] = np.float32(rec["data_recognised"])
            self.arrays["img_recon_x"] = x_ev[:RECON_SHOWN, ..., 0].astype(np.uint8)
        self.arrays[f"img_recon_{step}"] = to_u8(probs[:RECON_SHOWN])
        # position signal
        z = o["mean"][:POSITION_IMAGES]
        pos = jax.device_get(self.eval_fns[1](
            params, z, jax.random.fold_in(ek, 10_000)))
        for k, v in pos.items():
            if k.startswith("logits"):  # growth of 4 digits: final and, for diag, every one
                if final or self.recipe.diag:
                    self.arrays[f"img_pos_{step}"] = to_u8(sigmoid(np.asarray(v, np.float32)))
            else:
                self.arrays[f"pos_{step}_{k}"] = np.asarray(v, np.float32)
        if final and model.variant == "nondoubling" and self.args.damage_images:
            nd = min(self.args.damage_images, len(x_ev))
            d = damage.damage_recovery(model, params, x_ev[:nd], np.arange(nd),
                                       jax.random.fold_in(ek, 20_000), DAMAGE_AT, RECOVERY_STEPS,
                                       batch_size=min(64, nd), keep_frames=4, progress=False)
            s = damage.summarize(d["ll_undamaged_NxS"], d["ll_damaged_NxR1"], DAMAGE_AT)
            rec["damage"] = {k: s[k] for k in ("recovered_fraction", "meaningful", "damage_drop",
                                               "after_damage", "after_recovery",
                                               "undamaged_final", "before")}
            hit, kept = d["logits_damaged_FxR1xHxW"], d["logits_undamaged_FxSxHxW"]
            self.arrays["img_damage_hit"] = to_u8(sigmoid(hit[:, DAMAGE_HIT_FRAMES]))
            self.arrays["img_damage_kept"] = to_u8(sigmoid(kept[:, DAMAGE_KEPT_FRAMES]))
            self.arrays["damage_ll_undamaged"] = d["ll_undamaged_NxS"].mean(0).astype(np.float32)
            self.arrays["damage_ll_damaged"] = d["ll_damaged_NxR1"].mean(0).astype(np.float32)
        rec["eval_s"] = round(time.time() - t, 2)
        self.save_arrays()
        self.emit(rec)


# ---------------------------------------------------------------------------------------------
# The scheduler.


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
              "numpy", "scikit-learn", "orbax-checkpoint"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def gather(work: Path, out: Path, max_bytes: int = 14 << 20) -> None:
    """Bundle every child's lines and arrays under OUT: results.jsonl, curves.jsonl,
    arrays.npz (numbers) and images.npz (uint8 images; only the last milestone's of each
    recipe when all would pass `max_bytes`). Each is written to a temporary name first, one at
    a time, so OUT never holds more than one partial file."""
    import numpy as np

    res, curves, arrays, images = [], [], {}, {}
    for f in sorted(work.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            (curves if rec.get("type") == "curve" else res).append(line)
    for f in sorted(work.glob("*.npz")):
        if f.name.endswith(".tmp.npz"):
            continue
        try:
            with np.load(f) as z:
                for k in z.files:
                    (images if k.startswith("img_") else arrays)[f"{f.stem}__{k}"] = z[k]
        except Exception:  # noqa: BLE001, S110 - a file being replaced: read it next time
            pass
    for name, text in (("results.jsonl", res), ("curves.jsonl", curves)):
        tmp = out / f"{name}.tmp"
        tmp.write_text("\n".join(text) + ("\n" if text else ""))
        os.replace(tmp, out / name)
    if sum(v.nbytes for v in images.values()) > max_bytes:
        images = _last_milestone_images(images)
    for name, arrs in (("arrays.npz", arrays), ("images.npz", images)):
        tmp = out / f"{name[:-4]}.tmp.npz"
        np.savez_compressed(tmp, **arrs)
        os.replace(tmp, out / name)


def _last_milestone_images(images: dict) -> dict:
    """Only the last step's `img_recon_STEP` / `img_pos_STEP` of each recipe (and the rest)."""
    def parts(k):  # "recipe__img_recon_500" -> ("recipe", "img_recon", 500), else None
        stem, key = k.split("__", 1)
        kind, _, step = key.rpartition("_")
        ok = kind in ("img_recon", "img_pos") and step.isdigit()
        return (stem, kind, int(step)) if ok else None

    last: dict = {}
    for k in images:
        p = parts(k)
        if p:
            last[p[:2]] = max(p[2], last.get(p[:2], 0))
    return {k: v for k, v in images.items() if parts(k) is None or parts(k)[2] == last[parts(k)[:2]]}


def schedule(args, recipes: list[Recipe]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="nondoubling_search_"))
    if work.exists():
        for f in work.iterdir():
            f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.deadline_s
    env_info = {"versions": versions(), "argv": sys.argv, "start": time.strftime("%F %T"),
                "recipes": [dataclasses.asdict(r) for r in recipes]}
    (out / "env.json").write_text(json.dumps(env_info, indent=1))
    print(json.dumps({k: env_info[k] for k in env_info if k != "recipes"}), flush=True)

    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(args.config_dir).parents[0] / "src"),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([args.src, env["PYTHONPATH"]])
    queue = list(recipes)
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    last_gather, failed, succeeded = 0.0, 0, 0
    try:
        while queue or running:
            now = time.time()
            while queue and len(running) < args.workers and deadline - now > args.min_start_s:
                r = queue.pop(0)
                cmd = [sys.executable, __file__, "--child-spec", json.dumps(dataclasses.asdict(r)),
                       "--work", str(work), "--data", args.data, "--config-dir", args.config_dir,
                       "--chunk", str(args.chunk), "--eval-images", str(args.eval_images),
                       "--damage-images", str(args.damage_images),
                       "--train-images", str(args.train_images), "--steps", str(args.steps),
                       "--deadline", str(deadline - args.margin_s)]
                if args.require_gpu:
                    cmd.append("--require-gpu")
                for s in args.set:
                    cmd += ["--set", s]
                log = open(work / f"{r.name}.log", "w")  # noqa: SIM115 - closed when it ends
                running[r.name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                    env=env), log, now)
                print(f"[{now - t0:6.1f}s] start {r.name}", flush=True)
            for name, (p, log, started) in list(running.items()):
                rc = p.poll()
                if rc is not None:
                    log.close()
                    del running[name]
                    failed += bool(rc)
                    succeeded += not rc
                    tail = (work / f"{name}.log").read_text()[-1500:] if rc else ""
                    print(f"[{time.time() - t0:6.1f}s] end {name} rc={rc} after "
                          f"{time.time() - started:.0f}s {tail}", flush=True)
            if failed >= 3 and not succeeded and queue:
                print(f"[{time.time() - t0:6.1f}s] {failed} recipes failed and none finished: "
                      f"not starting the other {len(queue)}", flush=True)
                queue.clear()
            if not queue and not running:
                break
            if time.time() > deadline:
                for name, (p, log, _) in running.items():
                    print(f"[{time.time() - t0:6.1f}s] deadline: killing {name}", flush=True)
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    log.close()
                running.clear()
                break
            if time.time() - last_gather > args.gather_every_s:
                gather(work, out)
                last_gather = time.time()
                _progress(work, t0)
            time.sleep(1.0)
    finally:
        gather(work, out)
    _progress(work, t0)
    print(f"[{time.time() - t0:6.1f}s] done; not started: {[r.name for r in queue]}", flush=True)
    return 0


def _progress(work: Path, t0: float) -> None:
    for f in sorted(work.glob("*.jsonl")):
        lines = f.read_text().splitlines()
        ms = [json.loads(x) for x in lines if '"milestone"' in x or '"final"' in x]
        cur = [json.loads(x) for x in lines[-1:] if '"curve"' in x]
        if ms:
            m = ms[-1]
            print(f"[{time.time() - t0:6.1f}s]   {f.stem:32s} step {m['step']:6d} "
                  f"rec {m['recognised']:.3f} pixvar {m['pixvar']:.4f} elbo {m['elbo']:8.1f} "
                  f"kl {m['kl']:6.2f} s/step {m['s_per_step']:.4f}", flush=True)
        elif cur:
            c = cur[0]
            print(f"[{time.time() - t0:6.1f}s]   {f.stem:32s} step {c['step']:6d} "
                  f"loss {c['loss']:8.1f} kl {c['kl']:6.2f}", flush=True)


# ---------------------------------------------------------------------------------------------


def check_equivalence(args) -> int:
    """One recipe without departures: two steps here against vnca.train's on the same batches."""
    import jax
    import numpy as np

    from vnca import rng, train
    from vnca.models import build_model
    from vnca.models.vae import resolve_backend

    recipe = Recipe("base")
    cfg = resolve_backend(build_config(recipe, args.set, Path(args.config_dir)))
    model = build_model(cfg)
    keys = rng.named_keys(0)
    ref_state = train.init_state(model, cfg, keys["init"])
    ref_step = jax.jit(train.make_train_step(model, cfg))
    init, _, my_step = make_programs(model, cfg, dict(EXT_DEFAULTS), 10)
    my_state = jax.jit(init)(keys["init"])
    my_step = jax.jit(my_step)
    x = np.random.default_rng(0).random((cfg.train.batch_size, 28, 28, 1)) < 0.3
    x = x.astype(np.float32)
    worst = 0.0
    for _ in range(3):  # the third step uses the pool
        ref_state, rm = ref_step(ref_state, x, keys["train"])
        my_state, mm = my_step(my_state, x, keys["train"])
        d = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                                   ref_state["params"], my_state["params"])
        worst = max(worst, max(jax.tree_util.tree_leaves(d)))
        print(f"loss ref {float(rm['loss']):.6f} here {float(mm['loss']):.6f}; "
              f"max |param diff| {worst:.3g}; pool rows {float(mm['pool_rows'])}")
    ok = worst < 1e-5
    print("equivalent" if ok else "NOT equivalent")
    return 0 if ok else 1


def time_steps(args, names: list[str]) -> int:
    """Seconds per train step of each recipe on this machine (`--chunk` steps per timed call,
    `--time-reps` calls after one warm-up call), "base" first and last so that the ratios are
    to the CPU tier's recipe measured in the same run; random binary images."""
    import jax
    import numpy as np

    from vnca import rng
    from vnca.models import build_model
    from vnca.models.vae import resolve_backend

    by_name = {r.name: r for r in RECIPES}
    order = ["base"] + [n for n in names if n != "base"] + ["base"]
    x = (np.random.default_rng(0).random((512, 28, 28)) < 0.15).astype(np.uint8)
    out = []
    for name in order:
        r = by_name[name]
        cfg = resolve_backend(build_config(r, args.set, Path(args.config_dir)))
        model = build_model(cfg)
        keys = rng.named_keys(cfg.train.seed)
        init, chunk_fn, _ = make_programs(model, cfg, {**EXT_DEFAULTS, **r.ext},
                                          r.steps, 28)
        state = jax.jit(init)(keys["init"])
        idx = np.random.default_rng(1).integers(0, len(x), (args.chunk, cfg.train.batch_size))
        t = time.time()
        state, m = chunk_fn(state, x, idx.astype(np.int32), keys["train"])
        jax.block_until_ready(m)
        first = time.time() - t
        times = []
        for _ in range(args.time_reps):
            t = time.time()
            state, m = chunk_fn(state, x, idx.astype(np.int32), keys["train"])
            jax.block_until_ready(m)
            times.append((time.time() - t) / args.chunk)
        rec = {"recipe": name, "s_per_step_median": float(np.median(times)),
               "s_per_step": [round(v, 4) for v in times], "first_call_s": round(first, 2),
               "batch": cfg.train.batch_size, "load_avg": [round(v, 2) for v in os.getloadavg()]}
        out.append(rec)
        print(json.dumps(rec), flush=True)
    base = np.mean([o["s_per_step_median"] for o in out if o["recipe"] == "base"])
    print(f"base (mean of first and last): {base:.3f} s/step")
    for o in out[1:-1]:
        print(f"{o['recipe']:24s} {o['s_per_step_median']:.3f} s/step  "
              f"{o['s_per_step_median'] / base:.2f} x base")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", help="a `vnca prepare-data` directory")
    p.add_argument("--out", help="output directory (results.jsonl, curves.jsonl, arrays.npz)")
    p.add_argument("--recipes", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--workers", type=int, default=8, help="recipes trained at once")
    p.add_argument("--deadline-s", type=float, default=1e9, help="stop everything after this")
    p.add_argument("--margin-s", type=float, default=15.0,
                   help="recipes finish their last measurement this long before the deadline")
    p.add_argument("--min-start-s", type=float, default=90.0,
                   help="start no recipe with less time than this left")
    p.add_argument("--steps", type=int, default=0, help="override every recipe's step count")
    p.add_argument("--chunk", type=int, default=50, help="train steps per jitted call")
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--damage-images", type=int, default=DAMAGE_IMAGES)
    p.add_argument("--train-images", type=int, default=0, help="first N train images (0: all)")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every recipe")
    p.add_argument("--config-dir", default=str(ROOT / "configs"))
    p.add_argument("--src", default="", help="put this source dir first on the children's path")
    p.add_argument("--require-gpu", action="store_true", help="fail a recipe not on a GPU")
    p.add_argument("--gather-every-s", type=float, default=15.0)
    p.add_argument("--tiny", action="store_true",
                   help="seconds-scale check: 20 steps, 64 eval images, 512 train images")
    p.add_argument("--check-equivalence", action="store_true",
                   help="check this script's step against vnca.train's and exit")
    p.add_argument("--time-cpu", default="", metavar="NAMES",
                   help="time the train step of these recipes here (ratios to base) and exit")
    p.add_argument("--time-reps", type=int, default=3)
    p.add_argument("--work", default="", help="(children) where each recipe writes")
    p.add_argument("--child-spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=1e18, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_spec:
        Child(Recipe(**json.loads(args.child_spec)), args).run()
        return 0
    if args.check_equivalence:
        return check_equivalence(args)
    if args.time_cpu:
        return time_steps(args, [n.strip() for n in args.time_cpu.split(",") if n.strip()])
    names = [r.name for r in RECIPES]
    if args.list:
        for r in RECIPES:
            print(f"{r.name:30s} {r.steps:6d}  {' '.join(r.sets)} "
                  f"{' '.join(f'{k}={v}' for k, v in r.ext.items())}"
                  f"{'  [departure]' if r.departures() else ''}{'  [diag]' if r.diag else ''}")
        return 0
    if args.tiny:
        args.steps = args.steps or 20
        args.chunk = min(args.chunk, 10)
        args.eval_images = min(args.eval_images, 64)
        args.damage_images = min(args.damage_images, 8)
        args.train_images = args.train_images or 512
    if not args.data or not args.out:
        p.error("--data and --out are needed (or --list / --check-equivalence)")
    if args.recipes == "all":
        recipes = list(RECIPES)
    else:
        want = [s.strip() for s in args.recipes.split(",") if s.strip()]
        unknown = [w for w in want if w not in names]
        if unknown:
            p.error(f"unknown recipes {unknown}; see --list")
        recipes = [r for r in RECIPES if r.name in want]
    return schedule(args, recipes)


if __name__ == "__main__":
    sys.exit(main())
