"""Drift of each precision policy and conv algorithm from a float64 reference (prints a table).

    python bench/precision_drift.py --models runs/precision --data runs/precision/data
    python bench/precision_drift.py --paper-size          # random full-size weights instead

For each variant it loads a model trained by `vnca train` (`--models DIR/VARIANT-float32`) and
the first `--images` test images, then computes, in one float64-enabled process, a float64
reference (im2col convs: Winograd's tile transforms are float32 constants) and the same
quantities under every conv algorithm (`kernels.CONV_ALGORITHMS`) and precision policy
(`kernels.PRECISIONS`), with the same random draws (latent noise drawn in float32 and shared;
update masks and step counts drawn from the same keys):

  rollout        the decoder's growth from the images' posterior means: every state of a
                 40-step doubling rollout (5 doublings x 8 steps) or a 64-step non-doubling
                 rollout (not the config's T: the issue's lengths; the baseline has none).
                 `state` is the largest relative error ||s - s_ref|| / ||s_ref|| over the
                 frames, `logits` that of the final logits.
  elbo           the one-sample ELBO (nats per image, mean over the images; the noise is fixed)
                 minus the reference's.
  grad           ||g - g_ref|| / ||g_ref|| of the ELBO's gradient over every parameter, and
                 the cosine between them.
  iw             the K-sample importance-weighted bound (nats per image, mean over the images)
                 minus the reference's, and the largest difference for one image.

`--paper-size` uses the paper configs (configs/VARIANT.yaml) with random weights instead, the
NCA's layers at a tenth of PyTorch's initial scale so that the 40 and 64 steps stay bounded
(`bench_iwelbo.random_params`): the full contraction lengths, but not a trained model's
dynamics. The results are in docs/precision.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

from vnca import config, configs, losses
from vnca.data import pad_images
from vnca.models import build_model
from vnca.models.kernels import CONV_ALGORITHMS, PRECISIONS
from vnca.models.model_io import load_model

ROLLOUT = {"doubling": 40, "nondoubling": 64}


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _with(cfg: config.Config, **model) -> config.Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def rollout(model, params, z_BxZ, key):
    """Every state of the rollout (a list of stages, `TxBx...` each: the doubling model's grid
    grows from stage to stage) and the final logits."""
    if model.variant == "doubling":
        _, stages = model._grow_doubling(params, z_BxZ, key, record=True)
    else:
        n = model.cfg.max_steps
        _, frames_T = model.grow(params, model.seed(z_BxZ), key, n, record=True, max_steps=n)
        stages = [frames_T]
    return stages, stages[-1][-1][..., 0]


def elbo(model, params, x_BxHxWx1, eps_BxZ, key):
    """Mean one-sample ELBO with fixed noise `eps` (nats per image)."""
    mean, std = model.encode(params, x_BxHxWx1)
    z = mean + std * eps_BxZ
    logits = model.decode(params, z, key, eval_mode=True)
    log_px = losses.bernoulli_loglik(logits, x_BxHxWx1[..., 0])
    return jnp.mean(log_px - losses.gaussian_kl(mean, std))


def iw_bound(model, params, x_BxHxWx1, eps_BxKxZ, key):
    """Per-image L_K with fixed noise (the sampled densities, as vnca.evaluation.bound)."""
    mean, std = model.encode(params, x_BxHxWx1)

    def one(x_HxWx1, m_Z, s_Z, eps_KxZ, k):
        z = m_Z + s_Z * eps_KxZ
        logits = model.decode(params, z, k, eval_mode=True)
        log_px = losses.bernoulli_loglik(logits, jnp.broadcast_to(x_HxWx1[..., 0], logits.shape))
        return losses.iw_bound(log_px[None], losses.std_normal_logpdf(z)[None],
                               losses.diag_gaussian_logpdf(z, m_Z, s_Z)[None])[0]

    keys = jax.random.split(key, x_BxHxWx1.shape[0])
    return jnp.stack([one(x_BxHxWx1[i], mean[i], std[i], eps_BxKxZ[i], keys[i])
                      for i in range(x_BxHxWx1.shape[0])])


def measure(cfg, params, x, eps, eps_k, key, dtype) -> dict:
    model = build_model(cfg)
    params, x = _cast(params, dtype), jnp.asarray(x, dtype)
    eps, eps_k = jnp.asarray(eps, dtype), jnp.asarray(eps_k, dtype)
    out = {}
    if model.is_nca:
        rcfg = _with(cfg, steps_per_stage=8) if model.variant == "doubling" else \
            _with(cfg, min_steps=64, max_steps=64, eval_steps=None)
        mean, _ = model.encode(params, x)
        states, logits = jax.jit(lambda p, z: rollout(build_model(rcfg), p, z, key))(params, mean)
        out["states"], out["logits"] = [np.asarray(a) for a in states], np.asarray(logits)
    value, grad = jax.jit(jax.value_and_grad(
        lambda p: elbo(model, p, x, eps, key)))(params)
    out["elbo"], out["grad"] = float(value), grad
    out["iw"] = np.asarray(jax.jit(lambda p: iw_bound(model, p, x, eps_k, key))(params))
    return out


def compare(got: dict, ref: dict) -> dict:
    g = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(got["grad"])]).astype(np.float64)
    r = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(ref["grad"])]).astype(np.float64)
    row = {
        "elbo_nats": got["elbo"] - ref["elbo"],
        "grad_rel": _rel(g, r),
        "grad_cos": float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r))),
        "iw_nats": float(np.mean(got["iw"] - ref["iw"])),
        "iw_max_nats": float(np.max(np.abs(got["iw"] - ref["iw"]))),
    }
    if "states" in ref:
        row["state_rel"] = max(_rel(a, b) for sa, sb in zip(got["states"], ref["states"])
                               for a, b in zip(sa, sb))
        row["logits_rel"] = _rel(got["logits"], ref["logits"])
    return row


def _inputs(args, variant):
    if args.paper_size:
        from bench_iwelbo import random_params

        cfg = config.load([configs.path(f"{variant}.yaml")], ["model.remat=false"])
        params = random_params(build_model(cfg))
        rng = np.random.default_rng(0)
        x28 = (rng.random((args.images, 28, 28)) > 0.8).astype(np.uint8)
    else:
        cfg, _, params = load_model(Path(args.models) / f"{variant}-float32")
        with np.load(Path(args.data) / "dataset.npz") as d:
            x28 = d["test_x"][: args.images]
    x = pad_images(x28, cfg.data.pad_to).astype(np.float32)
    return cfg, params, x


def run_variant(args, variant: str) -> list[dict]:
    cfg, params, x = _inputs(args, variant)
    rng = np.random.default_rng(1)
    z = cfg.model.z_dim
    eps = rng.standard_normal((len(x), z)).astype(np.float32)
    eps_k = rng.standard_normal((len(x), args.k, z)).astype(np.float32)
    key = jax.random.key(2)
    ref = measure(_with(cfg, conv_algorithm="im2col", precision="float32"), params, x, eps,
                  eps_k, key, jnp.float64)
    rows = []
    for algorithm in args.algorithms:
        for precision in PRECISIONS:
            t0 = time.perf_counter()
            got = measure(_with(cfg, conv_algorithm=algorithm, precision=precision), params, x,
                          eps, eps_k, key, jnp.float32)
            row = {"variant": variant, "weights": "random" if args.paper_size else "trained",
                   "algorithm": algorithm, "precision": precision, "images": len(x), "k": args.k,
                   "elbo_ref": ref["elbo"], "iw_ref": float(np.mean(ref["iw"])),
                   **compare(got, ref), "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| variant | conv | precision | states (max rel.) | logits (rel.) | ELBO (nats) | "
            "gradient (rel.) | gradient cos | IW bound (nats, mean / max) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        st = f"{r['state_rel']:.1e}" if "state_rel" in r else "-"
        lg = f"{r['logits_rel']:.1e}" if "logits_rel" in r else "-"
        lines.append(f"| {r['variant']} | {r['algorithm']} | {r['precision']} | {st} | {lg} | "
                     f"{r['elbo_nats']:+.2e} | {r['grad_rel']:.1e} | {r['grad_cos']:.6f} | "
                     f"{r['iw_nats']:+.2e} / {r['iw_max_nats']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="runs/precision",
                   help="folder with VARIANT-float32 model folders written by vnca train")
    p.add_argument("--data", default="runs/precision/data", help="folder with dataset.npz")
    p.add_argument("--paper-size", action="store_true",
                   help="paper configs with random weights instead of trained models")
    p.add_argument("--variants", nargs="+", default=["doubling", "nondoubling", "baseline"])
    p.add_argument("--algorithms", nargs="+", default=list(CONV_ALGORITHMS))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--k", type=int, default=128, help="importance samples of the bound")
    p.add_argument("--json", help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    rows = [r for v in args.variants for r in run_variant(args, v)]
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
