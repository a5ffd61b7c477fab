"""Figures and the search table of `bench/nondoubling_search.py`'s output (issue 23).

    python bench/nondoubling_figures.py OUT [OUT2 ...] --figures docs/figures --table table.md

Reads results.jsonl, curves.jsonl, arrays.npz and images.npz of one or more search outputs
(later ones win for a recipe present in several) and writes, into --figures:

  nondoubling-recognised.png   recognised share of test reconstructions against training step
  nondoubling-kl-per-dim.png   KL per latent dim over training (recipes in --kl-recipes)
  nondoubling-grad-norms.png   gradient norm per layer over training (--kl-recipes)
  nondoubling-position.png     position signal of --position-recipe: distance of each ring of
                               cells from the borderless state, and variance across digits of
                               the logit, over NCA steps, at several training steps
  nondoubling-reconstructions.png  test images and reconstructions (--recon-recipes)
  nondoubling-damage.png       damage runs of --damage-recipes (grow 20, damage, 20 more)

and the table as Markdown (--table): recipe, steps, GPU wall time, loss, KL, active dims
(mean KL > 0.1 nats), recognised, per-pixel variance, ELBO, damage recovered fraction.
CPU-only (matplotlib and numpy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(dirs: list[Path]) -> dict:
    res, curves, arrays, images = {}, {}, {}, {}
    for d in dirs:
        recs = [json.loads(x) for x in (d / "results.jsonl").read_text().splitlines() if x]
        names = {r["recipe"] for r in recs}
        for n in names:
            res[n] = [r for r in recs if r["recipe"] == n]
        cur = [json.loads(x) for x in (d / "curves.jsonl").read_text().splitlines() if x]
        for n in {r["recipe"] for r in cur}:
            curves[n] = [r for r in cur if r["recipe"] == n]
        for f, tgt in (("arrays.npz", arrays), ("images.npz", images)):
            with np.load(d / f) as z:
                for k in z.files:
                    tgt[k] = z[k]
    return {"res": res, "curves": curves, "arrays": arrays, "images": images}


def measured(res: list[dict]) -> list[dict]:
    return [r for r in res if r["type"] in ("milestone", "final")]


def table(data: dict, order: list[str]) -> str:
    lines = [("| recipe | departure | steps | GPU wall (s) | loss | KL | active dims | "
              "recognised | pixvar | ELBO | damage recovered |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        rs = data["res"].get(name)
        if not rs:
            continue
        start = next((r for r in rs if r["type"] == "start"), {})
        err = next((r for r in rs if r["type"] == "error"), None)
        ms = measured(rs)
        cur = data["curves"].get(name, [])
        dep = ", ".join(start.get("departures", [])) or "no"
        for m in ms:
            if m["step"] not in (1000, 2000, 4000, 8000) and m["type"] != "final":
                continue
            c = [x for x in cur if m["step"] - 100 < x["step"] <= m["step"]]
            loss = np.mean([x["loss"] for x in c]) if c else float("nan")
            active = sum(v > 0.1 for v in m["kl_dim"])
            d = m.get("damage")
            dmg = ("-" if not d else f"{d['recovered_fraction']:.2f}" if d["meaningful"]
                   else f"n/a (drop {d['damage_drop']:.0f})")
            tag = " (last)" if m["type"] == "final" and m["step"] < m["planned_steps"] else ""
            lines.append(
                f"| {name} | {dep} | {m['step']}{tag} | {m['t']:.0f} | {loss:.1f} | {m['kl']:.1f} | "
                f"{active}/{len(m['kl_dim'])} | {100 * m['recognised']:.1f} % | {m['pixvar']:.4f} | "
                f"{m['elbo']:.1f} | {dmg} |")
        if err:
            lines.append(f"| {name} | {dep} | - | - | - | - | - | - | - | - | error: "
                         f"{err['traceback'].strip().splitlines()[-1][:60]} |")
    return "\n".join(lines)


def fig_recognised(plt, data, order, path):
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=90)
    for name in order:
        ms = measured(data["res"].get(name, []))
        if not ms:
            continue
        x = [m["step"] for m in ms]
        y = [100 * m["recognised"] for m in ms]
        bold = name.startswith(("nopool", "base"))
        ax.plot(x, y, "-o", ms=3, lw=2.2 if bold else 1.0, alpha=1 if bold else 0.6, label=name)
    ax.axhline(80, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("test reconstructions recognised (%)")
    ax.set_title("Non-doubling VNCA, CPU-tier size unless named (GPU screen, 1000 test images)",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_kl(plt, data, names, path):
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), dpi=90,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        cur = data["curves"][name]
        steps = [c["step"] for c in cur]
        kl = np.array([c["kl_dim"] for c in cur]).T
        im = ax.imshow(kl, aspect="auto", origin="lower", cmap="magma",
                       extent=(steps[0], steps[-1], -0.5, kl.shape[0] - 0.5), vmin=0,
                       vmax=max(1.0, np.percentile(kl, 99)))
        ax.set_title(f"{name}: KL per latent dim (nats)", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("latent dim (dim 0 seeds the logit channel)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_grads(plt, data, names, path):
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), dpi=90,
                             squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        cur = data["curves"][name]
        steps = [c["step"] for c in cur]
        for layer in cur[0]["layer_grad_norm"]:
            ax.plot(steps, [c["layer_grad_norm"][layer] for c in cur], lw=1,
                    ls="-" if layer.startswith("decoder") else "--", label=layer)
        ax.set_yscale("log")
        ax.set_title(f"{name}: gradient norm per layer (chunk mean)", fontsize=9)
        ax.set_xlabel("training step")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_position(plt, data, name, steps, path, other=None):
    a = data["arrays"]
    cols = [(name, s) for s in steps] + ([other] if other else [])
    fig, axes = plt.subplots(2, len(cols), figsize=(2.6 * len(cols), 5.0), dpi=90,
                             squeeze=False)
    for j, (rec, s) in enumerate(cols):
        dev = a[f"{rec}__pos_{s}_dev_D"] / a[f"{rec}__pos_{s}_bulk_norm"][:, None]
        lv = a[f"{rec}__pos_{s}_logit_var_D"]
        for i, (v, t) in enumerate(((dev, "|s - s_bulk| / |s_bulk|"),
                                    (lv, "logit variance across digits"))):
            ax = axes[i][j]
            im = ax.imshow(v.T, origin="lower", aspect="auto", cmap="viridis")
            ax.set_title(f"{rec} @ {s}\n{t}", fontsize=7)
            ax.set_xlabel("NCA step t", fontsize=7)
            ax.set_ylabel("distance to border d", fontsize=7)
            ax.plot(np.arange(v.shape[0]), np.arange(v.shape[0]) - 1, "w:", lw=0.8)
            ax.set_ylim(-0.5, v.shape[1] - 0.5)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_recons(plt, data, pairs, path, n=10):
    im = data["images"]
    first = pairs[0][0]
    x = im[f"{first}__img_recon_x"][:n].astype(np.float32)
    rows = [("test images", x * 255 if x.max() <= 1 else x)]
    rows += [(f"{r} @ {s}", im[f"{r}__img_recon_{s}"][:n]) for r, s in pairs]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.9), dpi=90)
    for i, (title, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_damage(plt, data, names, path, hit_frames, kept_frames, damage_at=20):
    im = data["images"]
    n_img = 3
    ncol = len(kept_frames) + len(hit_frames)
    fig, axes = plt.subplots(len(names) * n_img, ncol, figsize=(ncol * 0.75, len(names) * n_img
                                                                 * 0.8), dpi=90)
    titles = ([f"t={t}" for t in kept_frames]
              + [f"dmg +{t}" for t in hit_frames])
    for k, name in enumerate(names):
        kept, hit = im[f"{name}__img_damage_kept"], im[f"{name}__img_damage_hit"]
        for i in range(n_img):
            row = k * n_img + i
            frames = list(kept[i]) + list(hit[i])
            for j, f in enumerate(frames):
                ax = axes[row][j]
                ax.imshow(f, cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(titles[j], fontsize=6)
            axes[row][0].set_ylabel(name if i == 0 else "", fontsize=6, rotation=0, ha="right")
    fig.suptitle(f"left: undamaged growth; right: damaged at t={damage_at} (centred 14x14), "
                 "then regrowing", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outs", nargs="+", type=Path)
    p.add_argument("--figures", type=Path, default=Path("docs/figures"))
    p.add_argument("--table", type=Path)
    p.add_argument("--kl-recipes", default="base,nopool")
    p.add_argument("--position-recipe", default="base")
    p.add_argument("--position-steps", default="250,2000,8000")
    p.add_argument("--position-other", default="nopool:4000")
    p.add_argument("--recon-recipes", default="base:2000,base:8000,nopool:4000")
    p.add_argument("--damage-recipes", default="base,nopool")
    args = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nondoubling_search as ns

    data = load(args.outs)
    order = [r.name for r in ns.RECIPES if r.name in data["res"]]
    args.figures.mkdir(parents=True, exist_ok=True)
    f = args.figures
    fig_recognised(plt, data, order, f / "nondoubling-recognised.png")
    kl = [n for n in args.kl_recipes.split(",") if n in data["curves"]]
    fig_kl(plt, data, kl, f / "nondoubling-kl-per-dim.png")
    fig_grads(plt, data, kl, f / "nondoubling-grad-norms.png")
    other = args.position_other.split(":") if args.position_other else None
    fig_position(plt, data, args.position_recipe,
                 [int(s) for s in args.position_steps.split(",")],
                 f / "nondoubling-position.png", (other[0], int(other[1])) if other else None)
    pairs = [(x.split(":")[0], int(x.split(":")[1])) for x in args.recon_recipes.split(",")]
    fig_recons(plt, data, pairs, f / "nondoubling-reconstructions.png")
    fig_damage(plt, data, args.damage_recipes.split(","), f / "nondoubling-damage.png",
                ns.DAMAGE_HIT_FRAMES, ns.DAMAGE_KEPT_FRAMES, ns.DAMAGE_AT)
    if args.table:
        args.table.write_text(table(data, order) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
