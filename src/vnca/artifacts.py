"""File names inside the artifacts that the pipeline's steps pass to one another.

One place for the layout of each artifact directory, so that writers and readers agree (the
shape of each JSON artifact is in `vnca.contracts`), with the output-directory checks and the
validating .npz reader.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from vnca.errors import DataError, UserError

# prepare-data -> DATA_DIR
DATASET = "dataset.npz"            # {split}_x uint8 (N, 28, 28) in {0, 1}; {split}_y; {split}_mnist_index
MATCH_REPORT = "match_report.json"
MATCHED_PAIRS_PNG = "matched_pairs.png"
DIGIT_CLASSIFIER = "digit_classifier.npz"  # vnca.evaluation.classifier weights (no pickle)
SPLITS = ("train", "valid", "test")

# train -> MODEL_DIR
RESOLVED_CONFIG = "config.yaml"    # written before step 0
PARAMS = "params.msgpack"          # final parameters (flax.serialization), written last
CHECKPOINTS = "ckpt"               # orbax CheckpointManager directory (resume state)
TRAIN_METRICS = "metrics.jsonl"    # one JSON object per logged step
TRAIN_SUMMARY = "summary.json"     # variant, steps, wall time, hardware, parameter count

# evaluate -> EVAL_DIR
EVAL_METRICS = "metrics.json"
EVAL_ARRAYS = "arrays.npz"         # arrays a report can re-plot
# figure file -> caption; the evaluate step writes those that apply to the variant
EVAL_FIGURES = {
    "samples.png": "Prior samples (Bernoulli probabilities)",
    "samples_binary.png": "Prior samples (Bernoulli draws)",
    "reconstructions.png": "Test images (odd columns) and reconstructions (even columns)",
    "growth.png": "Growth stages from the seed to the final image",
    "damage_recovery.png": "Damage recovery: before, just after damage, after regrowth",
    "damage_curve.png": "Log-likelihood of the test reconstruction over NCA steps around damage",
    "tsne.png": "t-SNE of encoder means, coloured by matched label",
    "probe.png": "Linear probe on cell states: image, per-cell class, per-cell confidence",
    "interpolations.png": "Latent interpolation between pairs of test digits",
}

# report -> REPORT_DIR
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

# ---------------------------------------------------------------------------------------------
# Output directories: checked before the work that fills them, created just before writing.


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, without creating anything, an output path that cannot become a writable
    directory: an existing non-directory, a file among its parents, or an unwritable parent."""
    if not os.fspath(path):
        raise UserError(f"{flag} is empty: name the output directory")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {flag} exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: cannot create {flag} ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write {flag} ({existing} is not writable)")
    return path


def make_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output directory `path` (and its parents) and check that a file can be
    written there; one-line `UserError` otherwise."""
    path = check_out_dir(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot write {flag} ({e.strerror or e})") from None
    return path


# ---------------------------------------------------------------------------------------------
# .npz artifacts (dataset.npz, digit_classifier.npz, arrays.npz): numpy archives, no pickle.


def read_npz(path: str | os.PathLike, keys=None, what: str = "archive") -> dict:
    """Arrays `keys` (all when None) of a numpy .npz, loaded without pickle. Each array's
    header is checked against the size of its zip member before numpy allocates what the
    header claims; a missing array or a corrupt file is one `DataError` line naming `path`."""
    import zipfile
    import zlib

    import numpy as np

    path = Path(path)
    out = {}
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # a plain .npy file
            raise DataError(f"{path}: unreadable or corrupt {what} (not a .npz archive)")
        with npz:
            for key in npz.files if keys is None else keys:
                if key not in npz.files:
                    raise DataError(f"{path}: missing array {key!r} (an incomplete {what})")
                _check_member_size(npz, key, path)
                out[key] = npz[key]
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: an array is too large to load (corrupt {what}?)") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: unreadable or corrupt {what} ({msg})") from None
    return out


def _check_member_size(npz, key: str, path: Path) -> None:
    from numpy.lib import format as npy_format

    info = npz.zip.getinfo(f"{key}.npy")
    with npz.zip.open(info) as f:
        version = npy_format.read_magic(f)
        read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                       else npy_format.read_array_header_2_0)
        shape, _, dtype = read_header(f, max_header_size=1 << 16)
        claimed = math.prod(shape) * dtype.itemsize
        held = info.file_size - f.tell()
    if claimed > held:
        raise DataError(f"{path}: {key} is corrupt (its header claims {claimed:,} bytes, the "
                        f"file holds {held:,})")
