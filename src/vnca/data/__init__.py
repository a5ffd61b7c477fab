"""Dataset artifact readers and the model-input padding step (numpy only; light to import).

`vnca prepare-data` (see `vnca.data.prepare`) writes `dataset.npz` with, per split in
train / valid / test: `{split}_x` uint8 (N, 28, 28) in {0, 1}, `{split}_y` int64 labels from
label matching and `{split}_mnist_index` int64. Images are stored unpadded; `pad_images` is the
models' input step (28 -> 32 zero-pads 2 pixels on every side, as both VNCA code bases do).

Shapes: N images, H = W = 28 stored, P = pad_to.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vnca.artifacts import DATASET, SPLITS, read_npz
from vnca.errors import ConfigError, DataError

__all__ = ["DATASET", "SPLITS", "check_split", "load_dataset", "load_split", "pad_images"]


def pad_images(x_NxHxW: np.ndarray, pad_to: int) -> np.ndarray:
    """Binary images (N, H, W) -> float32 (N, P, P, 1), zero-padded equally on every side."""
    x_NxHxW = np.asarray(x_NxHxW)
    if x_NxHxW.ndim != 3 or x_NxHxW.shape[1] != x_NxHxW.shape[2]:
        raise ValueError(f"pad_images expects (N, H, H) images, got shape {x_NxHxW.shape}")
    side = x_NxHxW.shape[1]
    extra = pad_to - side
    if extra < 0 or extra % 2:
        raise ConfigError(
            f"data.pad_to={pad_to} cannot centre {side}x{side} images (needs >= {side}, "
            f"same parity)")
    p = extra // 2
    out_NxPxPx1 = np.zeros((len(x_NxHxW), pad_to, pad_to, 1), np.float32)
    out_NxPxPx1[:, p:p + side, p:p + side, 0] = x_NxHxW
    return out_NxPxPx1


def load_dataset(data_dir: str | os.PathLike, splits=SPLITS) -> dict[str, np.ndarray]:
    """All arrays of `dataset.npz` for `splits` (x, y, mnist_index), each checked
    (`check_split`): a missing, corrupt or malformed file is one `DataError` line."""
    path = Path(data_dir) / DATASET
    if not path.is_file():
        raise DataError(f"{path}: dataset not found (run `vnca prepare-data --out {data_dir}`)")
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"{path}: unknown split {split!r} (expected one of {SPLITS})")
    keys = [f"{split}_{k}" for split in splits for k in ("x", "y", "mnist_index")]
    out = read_npz(path, keys, "dataset")
    for split in splits:
        check_split(path, split, out[f"{split}_x"], out[f"{split}_y"],
                    out[f"{split}_mnist_index"])
    return out


def check_split(path: Path, split: str, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> None:
    """One split of `dataset.npz` as `vnca prepare-data` writes it, or a `DataError` naming the
    file and the array: x uint8 (N, 28, 28) in {0, 1}; y integer (N,) in 0..9; mnist_index
    integer (N,), non-negative."""
    def fail(key: str, what: str) -> DataError:
        return DataError(f"{path}: {split}_{key} {what}")

    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise fail("x", f"must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
    if x.size and x.max() > 1:
        raise fail("x", "has values other than 0 and 1")
    n = len(x)
    for key, arr in (("y", y), ("mnist_index", idx)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise fail(key, f"must be integers, got {arr.dtype}")
        if arr.shape != (n,):
            raise fail(key, f"must have shape ({n},) like {split}_x, got {arr.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        bad = y[(y < 0) | (y > 9)][0]
        raise fail("y", f"has label {int(bad)} outside 0..9")
    if idx.size and idx.min() < 0:
        raise fail("mnist_index", f"has negative index {int(idx.min())}")


def load_split(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, 28, 28) in {0, 1}, y int64 (N,)) of one split of `DATA_DIR/dataset.npz`."""
    arrays = load_dataset(data_dir, (split,))
    return arrays[f"{split}_x"], arrays[f"{split}_y"]
