"""File names inside the artifacts that the pipeline's steps pass to one another.

One place for the layout of each artifact directory, so that writers and readers agree, and
for the validating readers of the JSON artifacts that one step hands to another.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

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
# Validating readers: every step reads another step's JSON artifacts through these, so a
# missing, corrupt or malformed file is one `DataError` line naming the file and the key.
# Each schema lists the keys readers rely on (see `check_fields`); other keys pass unchecked.

_NUMBER_TYPES = (int, float)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, _NUMBER_TYPES) and not isinstance(v, bool)


KINDS = {  # kind -> (test, what it must be)
    "text": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "count": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "positive": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "finite": (lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
    "number": (lambda v: v is None or _is_number(v), "a number or null"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "tier": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}

EVAL_METRICS_SCHEMA = {
    "variant": ("text", True), "name": ("string", False), "tier": ("tier", False),
    "smoke": ("flag", False), "n_test_images": ("count", False),
    "iwelbo": ({"k": ("positive", True), "n_images": ("positive", True),
                "mean_nats": ("finite", True), "stderr_nats": ("number", False),
                "bits_per_dim": ("number", False)}, True),
    "untrained": ({"n_images": ("count", False), "mean_nats": ("number", False),
                   "stderr_nats": ("number", False),
                   "trained_same_images_nats": ("number", False)}, False),
    "classifier": ({"kind": ("string", False), "n_train": ("count", False),
                    "test_accuracy": ("number", False)}, False),
    "reconstruction": ({"n_images": ("count", False), "accuracy": ("number", False),
                        "classifier_accuracy_originals": ("number", False)}, False),
    "prior_samples": ({"n_images": ("count", False),
                       "mean_top_probability": ("number", False)}, False),
    "damage": ({"n_images": ("count", False), "damage_at": ("count", False),
                "recovery_steps": ("count", False), "recovered_fraction": ("number", False),
                "meaningful": ("flag", False)}, False),
    "probe": ({"accuracy": ("number", False), "n_train_images": ("count", False),
               "n_test_images": ("count", False)}, False),
    "tsne": ({"n_images": ("count", False)}, False),
    "growth": ({}, False), "interpolation": ({}, False), "seconds": ({}, False),
}
TRAIN_SUMMARY_SCHEMA = {
    "variant": ("text", True), "name": ("string", False), "steps": ("count", True),
    "wall_time_s": ("number", False), "hardware": ("string", False),
    "n_devices": ("positive", False), "param_count": ("count", False),
    "final_loss": ("number", False), "smoke": ("flag", False), "tier": ("tier", False),
}
TRAIN_RECORD_SCHEMA = {  # one line of metrics.jsonl; NaN losses are numbers (a diverged step)
    "step": ("count", True), "split": ("string", False),
    **{k: ("number", False) for k in ("loss", "kl", "recon", "elbo", "grad_norm", "val_elbo",
                                      "images_per_s", "elapsed_s", "lr")},
}


def check_fields(d: dict, schema: dict, where: str, prefix: str = "") -> dict:
    """`d`, after checking every key of `schema`: {key: (kind, required)}, or
    {key: (sub-schema, required)} for a nested object."""
    for key, (rule, required) in schema.items():
        name = prefix + key
        kind = "object" if isinstance(rule, dict) else rule
        if key not in d:
            if required:
                raise DataError(f"{where}: missing '{name}' ({KINDS[kind][1]})")
            continue
        test, what = KINDS[kind]
        if not test(d[key]):
            raise DataError(f"{where}: '{name}' must be {what}, got {_short(d[key])}")
        if isinstance(rule, dict):
            check_fields(d[key], rule, where, name + ".")
    return d


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding one object; `DataError` if missing, unreadable or anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_eval_metrics(path: str | os.PathLike) -> dict:
    """`EVAL_DIR/metrics.json` (written by `vnca.evaluate`), checked against its schema."""
    return check_fields(read_json_object(path), EVAL_METRICS_SCHEMA, str(path))


def read_train_summary(path: str | os.PathLike) -> dict:
    """`MODEL_DIR/summary.json` (written by `vnca.train`), checked against its schema."""
    return check_fields(read_json_object(path), TRAIN_SUMMARY_SCHEMA, str(path))


def read_train_metrics(path: str | os.PathLike) -> list[dict]:
    """`MODEL_DIR/metrics.jsonl`: one JSON object a line, each checked. A broken *last* line
    (a run interrupted mid-write) is dropped; any other bad line is a `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not valid JSON") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {i + 1} is not a JSON object")
        records.append(check_fields(rec, TRAIN_RECORD_SCHEMA, f"{path}: line {i + 1}"))
    return records


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
