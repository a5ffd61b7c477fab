"""Regenerate the bundled sample (`vnca/data/bundled/`) from the real raw files.

    python -m vnca.data.make_bundled --raw-dir ../shared/data --full /tmp/vnca-data-full

`--full` is the output of `vnca prepare-data --source raw` on the same files (made here if it
is missing). The sample holds, chosen with a fixed seed: SIZES binarized images per split
(bit-packed, with their row in Larochelle's files), the MNIST originals that full-data matching
assigned to them, and DISTRACTORS further MNIST images that no sampled image came from. The
script then runs the package's own label matching on the sample and requires it to give every
sampled image the same MNIST original and label as the full run; distractors that steal a match
(near-identical thin "1"s) are replaced and the check repeated.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np

SEED = 20220125
SIZES = {"train": 2000, "valid": 500, "test": 1000}
DISTRACTORS = {"train": 500, "test": 250}
REF_OF = {"train": "train", "valid": "train", "test": "test"}
OUT_DIR = Path(__file__).parent / "bundled"


def build(raw_dir: str, full_dir: str) -> tuple[dict, dict]:
    from vnca.data import matching, raw
    from vnca.data.prepare import prepare_data

    data = raw.read_raw(raw_dir)
    if not (Path(full_dir) / "dataset.npz").is_file():
        prepare_data("raw", full_dir, raw_dir)
    with np.load(Path(full_dir) / "dataset.npz") as npz:
        full = {k: npz[k] for k in npz.files}
    rng = np.random.default_rng(SEED)
    rows = {s: np.sort(rng.choice(len(data.binarized[s]), n, replace=False))
            for s, n in SIZES.items()}
    matched = {r: np.sort(np.concatenate([full[f"{s}_mnist_index"][rows[s]]
                                          for s in SIZES if REF_OF[s] == r]))
               for r in DISTRACTORS}
    excluded = {r: set(matched[r].tolist()) for r in DISTRACTORS}
    for attempt in range(20):
        mnist_idx = {}
        for r, n in DISTRACTORS.items():
            pool = np.setdiff1d(np.arange(len(data.mnist_x[r])), np.fromiter(excluded[r], int))
            extra = rng.choice(pool, n, replace=False)
            mnist_idx[r] = np.sort(np.concatenate([matched[r], extra]))
        # The package's own matching on the sample must reproduce the full run.
        stolen = {r: set() for r in DISTRACTORS}
        for r in DISTRACTORS:
            splits = [s for s in SIZES if REF_OF[s] == r]
            x = np.concatenate([data.binarized[s][rows[s]] for s in splits])
            want = np.concatenate([full[f"{s}_mnist_index"][rows[s]] for s in splits])
            mt = matching.match(x, data.mnist_x[r][mnist_idx[r]], data.mnist_y[r][mnist_idx[r]],
                                progress=False)
            got = mnist_idx[r][mt.assigned_M]
            stolen[r] = set(got[got != want].tolist()) - set(matched[r].tolist())
            bad = got != want
            if bad.any() and not stolen[r]:
                raise SystemExit(f"sample matching differs from the full run without a "
                                 f"distractor involved ({int(bad.sum())} rows); inspect by hand")
        if not any(stolen.values()):
            break
        for r in DISTRACTORS:
            excluded[r] |= stolen[r]
    else:
        raise SystemExit("could not find distractors that leave the matching unchanged")
    arrays = {}
    for s in SIZES:
        arrays[f"bin_{s}"] = np.packbits(data.binarized[s][rows[s]], axis=1)
        arrays[f"bin_{s}_row"] = rows[s].astype(np.int32)
        arrays[f"expected_{s}_y"] = full[f"{s}_y"][rows[s]].astype(np.uint8)
        arrays[f"expected_{s}_mnist_index"] = full[f"{s}_mnist_index"][rows[s]].astype(np.int32)
    for r in DISTRACTORS:
        arrays[f"mnist_{r}_x"] = data.mnist_x[r][mnist_idx[r]]
        arrays[f"mnist_{r}_y"] = data.mnist_y[r][mnist_idx[r]]
        arrays[f"mnist_{r}_index"] = mnist_idx[r].astype(np.int32)
    manifest = {
        "seed": SEED,
        "counts": {**{f"binarized_{s}": n for s, n in SIZES.items()},
                   **{f"mnist_{r}": len(mnist_idx[r]) for r in DISTRACTORS},
                   **{f"mnist_{r}_distractors": n for r, n in DISTRACTORS.items()}},
        "distractor_redraws": attempt,
        "source_files": {name: f["sha256"] for name, f in data.provenance["files"].items()},
    }
    return arrays, manifest


PROVENANCE_MD = """# Bundled sample: provenance

`sample.npz` is a small *real* subset of Larochelle's binarized MNIST and of MNIST, shipped so
that `vnca prepare-data --source bundled` (the default, used by `vnca run-local` and the tests)
works on a fresh machine without any download. It goes through the same label-matching code
as the full data (reader: `src/vnca/data/bundled_source.py`).

* **Made by** `python -m vnca.data.make_bundled --raw-dir ../shared/data --full DIR` (source:
  `src/vnca/data/make_bundled.py`), seed `{seed}`, from the raw files listed below (sha256 of
  the decompressed content, verified when read; see ../shared/data/README.md for their origin).
* **Binarized images**: {bt} train, {bv} valid and {bte} test rows of
  `binarized_mnist_{{train,valid,test}}.amat`, drawn uniformly without replacement
  (`numpy.random.default_rng(seed).choice`), stored bit-packed (`np.packbits(x, axis=1)`, pixel 0
  = most significant bit) as `bin_{{split}}`; `bin_{{split}}_row` is the row in the `.amat` file.
  A random draw, because the binarized test split is grouped by digit.
* **MNIST originals**: for every sampled image, the MNIST image that full-data label matching
  (`vnca prepare-data --source raw`, one-to-one assignment) gave it; plus {dt} train and {dte}
  test MNIST images that no sampled image came from ("distractors", so that matching has to
  choose). Stored as `mnist_{{train,test}}_x` (N, 784) uint8, `_y` labels and `_index` (row in
  `train-images-idx3-ubyte` / `t10k-images-idx3-ubyte`): {mt} train-side, {mte} test-side images.
* **Expected results**: `expected_{{split}}_y` and `expected_{{split}}_mnist_index` are the full
  run's labels and MNIST indices for the sampled rows. The script checked that matching on the
  sample alone reproduces all of them (distractor redraws needed: {redraws}); the test
  `tests/test_data_bundled.py` checks it again through the CLI.
* **Integrity**: `provenance.json` records the sha256 of `sample.npz`
  (`{sha}`); the reader refuses a file that differs.
* **Licence**: MNIST by Y. LeCun, C. Cortes and C. J. C. Burges (commonly cited as CC BY-SA 3.0);
  binarized MNIST by H. Larochelle / I. Murray (Salakhutdinov & Murray 2008; Larochelle &
  Murray 2011). Cite the original datasets.

| source file (decompressed) | sha256 |
|---|---|
{files}
"""


def write(arrays: dict, manifest: dict, out_dir: Path = OUT_DIR) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    manifest = {**manifest, "sample_sha256": hashlib.sha256(data).hexdigest(),
                "sample_bytes": len(data)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sample.npz").write_bytes(data)
    (out_dir / "provenance.json").write_text(json.dumps(manifest, indent=1) + "\n")
    c = manifest["counts"]
    (out_dir / "PROVENANCE.md").write_text(PROVENANCE_MD.format(
        seed=manifest["seed"], bt=c["binarized_train"], bv=c["binarized_valid"],
        bte=c["binarized_test"], dt=c["mnist_train_distractors"],
        dte=c["mnist_test_distractors"], mt=c["mnist_train"], mte=c["mnist_test"],
        redraws=manifest["distractor_redraws"], sha=manifest["sample_sha256"],
        files="\n".join(f"| {n} | `{h}` |" for n, h in manifest["source_files"].items())))
    return out_dir / "sample.npz"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--full", required=True, help="prepare-data --source raw output directory")
    p.add_argument("--out-dir", default=str(OUT_DIR))
    a = p.parse_args(argv)
    arrays, manifest = build(a.raw_dir, a.full)
    path = write(arrays, manifest, Path(a.out_dir))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
