"""The bundled sample: a small real subset shipped inside the package (no download needed).

`bundled/sample.npz` (next to this module) holds randomly chosen binarized images (bit-packed) from each of
Larochelle's splits, the MNIST originals that full-data label matching assigned to them, and
some unrelated MNIST "distractor" images, so that `--source bundled` runs the same matching code
as the full data and still has something to find. `bundled/provenance.json` records how it was
made (seed, source checksums, the sample's own sha256); `PROVENANCE.md` says the same in words.
Regenerate with `python -m vnca.data.make_bundled` (see there).
"""

from __future__ import annotations

import hashlib
import io
import json
from importlib import resources

import numpy as np

from vnca.data.raw import N_PIXELS, RawData
from vnca.errors import DataError

SAMPLE = "sample.npz"
MANIFEST = "provenance.json"
SPLITS = ("train", "valid", "test")
MNIST_SPLITS = ("train", "test")


def _bundle_file(name: str):
    return resources.files("vnca.data").joinpath("bundled", name)


def read_manifest() -> dict:
    f = _bundle_file(MANIFEST)
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: bundled sample manifest unreadable ({e})") from None


def read_sample_arrays() -> dict[str, np.ndarray]:
    """All arrays of the bundled sample, after checking its sha256 against the manifest."""
    manifest = read_manifest()
    f = _bundle_file(SAMPLE)
    try:
        data = f.read_bytes()
    except OSError as e:
        raise DataError(f"{f}: bundled sample unreadable ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sample_sha256"]:
        raise DataError(f"{f}: sha256 {digest[:16]}... differs from {MANIFEST} "
                        f"({manifest['sample_sha256'][:16]}...); reinstall the package")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def read_bundled() -> RawData:
    arrays = read_sample_arrays()
    manifest = read_manifest()
    binarized = {s: np.unpackbits(arrays[f"bin_{s}"], axis=1)[:, :N_PIXELS] for s in SPLITS}
    mnist_x = {s: arrays[f"mnist_{s}_x"] for s in MNIST_SPLITS}
    mnist_y = {s: arrays[f"mnist_{s}_y"] for s in MNIST_SPLITS}
    mnist_index = {s: arrays[f"mnist_{s}_index"].astype(np.int64) for s in MNIST_SPLITS}
    provenance = {
        "source": "bundled",
        "sample": str(_bundle_file(SAMPLE)),
        "sample_sha256": manifest["sample_sha256"],
        "seed": manifest["seed"],
        "counts": manifest["counts"],
        "made_from": manifest["source_files"],
        "note": "mnist_index refers to the full MNIST files (train / t10k), not to the sample",
    }
    return RawData(binarized, mnist_x, mnist_y, mnist_index, provenance)


def expected() -> dict[str, np.ndarray]:
    """Labels and MNIST indices that full-data matching gave the sampled images, per split."""
    arrays = read_sample_arrays()
    out = {}
    for s in SPLITS:
        out[f"{s}_y"] = arrays[f"expected_{s}_y"].astype(np.int64)
        out[f"{s}_mnist_index"] = arrays[f"expected_{s}_mnist_index"].astype(np.int64)
        out[f"{s}_row"] = arrays[f"bin_{s}_row"].astype(np.int64)
    return out
