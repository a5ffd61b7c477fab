"""`--source tfds`: the TFDS `binarized_mnist` and `mnist` builders, read without TensorFlow.

Preparation (`download_and_prepare(file_format="array_record")`) needs tensorflow-datasets,
importlib_resources and TensorFlow (the `vnca[tfds]` extra) and the network; reading back with
`tfds.data_source` needs only tensorflow-datasets. Offline, TFDS would retry for minutes
(../shared/docs/platform.md section 6), so a short DNS + TCP preflight runs first and fails in
seconds with one line. Already prepared data in `--tfds-dir` is read without any network.

TFDS reorders records when it writes them, so the rows here are in TFDS order; nothing assumes
index alignment with the raw files. `mnist_index` then refers to TFDS's `mnist` record order.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from pathlib import Path

import numpy as np

from vnca.data.raw import MULTISET_SHA256, N_PIXELS, RawData, multiset_sha256
from vnca.errors import DataError, UserError

BUILDERS = {"binarized_mnist": ("train", "validation", "test"), "mnist": ("train", "test")}
# Hosts the two builders download from (TFDS's binarized_mnist and mnist URLs).
HOSTS = ("www.cs.toronto.edu", "storage.googleapis.com")
INSTALL_HINT = "pip install 'vnca[tfds]'"


def _import_tfds():
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise UserError(
            f"--source tfds needs tensorflow-datasets, which is not installed ({e.name or e}); "
            f"{INSTALL_HINT}") from None


def preflight(hosts=HOSTS, timeout: float = 3.0) -> None:
    """Fail within seconds, with one line, when a download host cannot be reached."""
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            with socket.create_connection(infos[0][4][:2], timeout=timeout):
                pass
        except (OSError, IndexError) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise UserError(
                f"--source tfds: cannot reach {host} ({msg}); TFDS needs the network to prepare "
                f"binarized_mnist and mnist (or pass --tfds-dir with prepared data, or use "
                f"--source raw / bundled)") from None


def _is_prepared(builder) -> bool:
    return (Path(str(builder.data_dir)) / "dataset_info.json").is_file()


def missing_prepare_deps() -> list[str]:
    """Modules that `download_and_prepare` needs beyond tensorflow-datasets (platform.md 6)."""
    return [m for m in ("tensorflow", "importlib_resources")
            if importlib.util.find_spec(m) is None]


def _prepare(tfds, name: str, data_dir: str | None):
    builder = tfds.builder(name, data_dir=data_dir)
    if _is_prepared(builder):
        return builder
    missing = missing_prepare_deps()
    if missing:
        raise UserError(f"--source tfds: preparing {name} needs {', '.join(missing)}, which "
                        f"is not installed; {INSTALL_HINT}")
    preflight()
    builder.download_and_prepare(file_format="array_record")
    return builder


def _read_split(builder, split: str, with_labels: bool, batch: int = 2000):
    """All records of one split: images (N, 784) uint8 and labels (N,) or None."""
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - TFDS raises assorted types for missing/tfrecord data
        msg = " ".join(str(e).split())
        raise DataError(f"{builder.data_dir}: cannot open split {split!r} as a random-access "
                        f"source ({msg}); prepare it with file_format='array_record'") from None
    n = len(source)
    images = np.empty((n, N_PIXELS), np.uint8)
    labels = np.empty(n, np.int64) if with_labels else None
    for r0 in range(0, n, batch):
        keys = list(range(r0, min(n, r0 + batch)))
        for i, rec in zip(keys, source.__getitems__(keys)):
            images[i] = np.asarray(rec["image"], np.uint8).reshape(N_PIXELS)
            if with_labels:
                labels[i] = int(rec["label"])
    return images, labels


def _check(x, y, key: str, builder, split: str) -> str:
    """Same records as the raw files, in any order (order-free digest), else one line."""
    digest = multiset_sha256(x, y)
    if digest != MULTISET_SHA256[key]:
        raise DataError(
            f"{builder.data_dir}: {builder.name} {split} ({len(x)} records) differs from the "
            f"raw files (order-free sha256 {digest[:16]}..., expected "
            f"{MULTISET_SHA256[key][:16]}...)")
    return digest


def read_tfds(data_dir: str | os.PathLike | None = None) -> RawData:
    """Prepare (if needed) and read both builders; binarized images must be 0/1."""
    tfds = _import_tfds()
    data_dir = None if data_dir is None else str(data_dir)
    b_bin = _prepare(tfds, "binarized_mnist", data_dir)
    b_mnist = _prepare(tfds, "mnist", data_dir)
    binarized, digests = {}, {}
    for ours, theirs in zip(("train", "valid", "test"), BUILDERS["binarized_mnist"]):
        x, _ = _read_split(b_bin, theirs, with_labels=False)
        digests[f"binarized_{ours}"] = _check(x, None, f"binarized_{ours}", b_bin, theirs)
        binarized[ours] = x
    mnist_x, mnist_y, mnist_index = {}, {}, {}
    for split in BUILDERS["mnist"]:
        mnist_x[split], mnist_y[split] = _read_split(b_mnist, split, with_labels=True)
        digests[f"mnist_{split}"] = _check(mnist_x[split], mnist_y[split], f"mnist_{split}",
                                           b_mnist, split)
        mnist_index[split] = np.arange(len(mnist_x[split]), dtype=np.int64)
    provenance = {
        "source": "tfds",
        "data_dir": data_dir,
        "builders": {"binarized_mnist": str(b_bin.data_dir), "mnist": str(b_mnist.data_dir)},
        "tfds_version": getattr(tfds, "__version__", "unknown"),
        "multiset_sha256": digests,
        "verified": True,
        "note": "TFDS record order; mnist_index refers to TFDS mnist record order",
    }
    return RawData(binarized, mnist_x, mnist_y, mnist_index, provenance)
