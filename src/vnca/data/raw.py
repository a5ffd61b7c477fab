"""Raw files: Larochelle's binarized MNIST (`.amat`) and MNIST's idx files, read with numpy.

Every reader checks the format (line length, idx header, gzip integrity) and the sha256 of the
*decompressed* content against the table below (the gzip headers of local copies may differ
from the official ones; the content may not). A problem raises `DataError` with one line that
names the file.

Shapes: N images, D = 784 pixels (28 x 28, row-major).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from vnca.errors import DataError
from vnca.fileio import atomic_path

AMAT_LINE_BYTES = 1568  # 784 values '0'/'1', each followed by ' ' or (last) '\n'
IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE


@dataclasses.dataclass(frozen=True)
class RawFile:
    name: str          # decompressed file name
    kind: str          # "amat", "idx3" (images) or "idx1" (labels)
    n: int             # number of records
    size: int          # decompressed bytes
    sha256: str        # of the decompressed content
    url: str           # public download URL (fetched by --download)


_LAROCHELLE = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_MNIST_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"

# Sizes and decompressed sha256 values from ../shared/data/README.md (the amat values equal the
# checksums TFDS publishes for Larochelle's original files).
RAW_FILES: dict[str, RawFile] = {
    f.name: f for f in (
        RawFile("binarized_mnist_train.amat", "amat", 50000, 78400000,
                "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
                _LAROCHELLE + "binarized_mnist_train.amat"),
        RawFile("binarized_mnist_valid.amat", "amat", 10000, 15680000,
                "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
                _LAROCHELLE + "binarized_mnist_valid.amat"),
        RawFile("binarized_mnist_test.amat", "amat", 10000, 15680000,
                "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
                _LAROCHELLE + "binarized_mnist_test.amat"),
        RawFile("train-images-idx3-ubyte", "idx3", 60000, 47040016,
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                _MNIST_MIRROR + "train-images-idx3-ubyte.gz"),
        RawFile("train-labels-idx1-ubyte", "idx1", 60000, 60008,
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                _MNIST_MIRROR + "train-labels-idx1-ubyte.gz"),
        RawFile("t10k-images-idx3-ubyte", "idx3", 10000, 7840016,
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                _MNIST_MIRROR + "t10k-images-idx3-ubyte.gz"),
        RawFile("t10k-labels-idx1-ubyte", "idx1", 10000, 10008,
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                _MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz"),
    )
}
# `multiset_sha256` of the parsed arrays (order-free; for TFDS, which reorders records).
MULTISET_SHA256 = {
    "binarized_train": "2b012931cd913fd0706a0bdee7855d3b4201708183b5757769e6ebbee8001180",
    "binarized_valid": "9241c8a3bddf72f97dbd3e82dfd0cc0501d3bc43c986e9dfe6f3862b5046fbd4",
    "binarized_test": "6c126d0d05ec3a5622934ea5d942ae0da93d61cc9b28ce8ffe7269341c75f831",
    "mnist_train": "da6370735bf1d490f086dde49c15f2ed0480ad05dc7c70abf5d36bf471d5e312",
    "mnist_test": "0c7bc63f656fb2440dc2b5bea4ff3ac8632e305b73ec1dc88141a32d36204fac",
}
BINARIZED = {s: f"binarized_mnist_{s}.amat" for s in ("train", "valid", "test")}
MNIST = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Read order: the small test files first, so a bad file there fails in well under a second.
READ_ORDER = (
    BINARIZED["test"], *MNIST["test"], BINARIZED["valid"], BINARIZED["train"], *MNIST["train"],
)
SUBDIRS = ("", "binarized_mnist", "mnist")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def locate(raw_dir: str | os.PathLike, name: str) -> Path:
    """Path of `name` or `name.gz` in `raw_dir` or its `binarized_mnist/`, `mnist/` folders."""
    root = Path(raw_dir)
    for sub in SUBDIRS:
        for candidate in (name, name + ".gz"):
            p = root / sub / candidate
            if p.is_file():
                return p
    raise DataError(
        f"{root / name}[.gz]: file not found (also looked in {root}/binarized_mnist and "
        f"{root}/mnist); pass --download to fetch it"
    )


def locate_all(raw_dir: str | os.PathLike) -> dict[str, Path]:
    """Paths of all seven raw files; raises on a missing directory or the first missing file."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise DataError(f"{root}: raw data directory not found")
    return {name: locate(root, name) for name in READ_ORDER}


def size_cap(spec: RawFile) -> int:
    """Most bytes a raw file may hold (decompressed): its published size and a little slack.
    Reading stops there, so a gzip bomb costs neither the memory nor the time it asks for."""
    return spec.size + spec.size // 64 + 4096


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """File content, gunzipped when the name ends in `.gz`. With `limit`, content longer than
    `limit` bytes is a `DataError`, raised without reading or decompressing past the limit."""
    try:
        if path.suffix != ".gz":
            size = path.stat().st_size
            if limit is not None and size > limit:
                raise DataError(f"{path}: {size:,} bytes, more than the {limit:,} this file "
                                "may have")
            return path.read_bytes()
        out = bytearray()
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                out += chunk
                if limit is not None and len(out) > limit:
                    raise DataError(f"{path}: decompresses to more than {limit:,} bytes (the "
                                    "file it should hold is smaller; a corrupt or wrong file)")
        return bytes(out)
    except DataError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({_one_line(e)})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(path: Path, data: bytes, spec: RawFile) -> str:
    """sha256 of the decompressed `data`; raises unless it equals the published value."""
    digest = sha256_hex(data)
    if digest != spec.sha256:
        raise DataError(
            f"{path}: sha256 mismatch of the decompressed content: got {digest[:16]}..., "
            f"expected {spec.sha256[:16]}... ({spec.name}, {spec.size} bytes)"
        )
    return digest


def parse_amat(data: bytes, path: Path) -> np.ndarray:
    """`.amat` text (one image per line, 784 '0'/'1' separated by spaces) -> uint8 (N, 784)."""
    buf_B = np.frombuffer(data, np.uint8)
    if len(buf_B) == 0:
        raise DataError(f"{path}: empty file")
    ends = np.flatnonzero(buf_B == ord("\n")) + 1
    complete = len(ends) > 0 and ends[-1] == len(buf_B)
    if not complete:
        ends = np.concatenate([ends, [len(buf_B)]])
    lengths = np.diff(ends, prepend=0)  # bytes per line, with its '\n'
    bad = np.flatnonzero(lengths != AMAT_LINE_BYTES)
    if not complete and (len(bad) == 0 or bad[0] == len(lengths) - 1):
        raise DataError(
            f"{path}: truncated: last line ({len(lengths)}) has {int(lengths[-1])} bytes and no "
            f"newline, expected {AMAT_LINE_BYTES} (784 values '0'/'1' separated by spaces)"
        )
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}: line {i + 1} has {int(lengths[i]) - 1} characters, expected "
            f"{AMAT_LINE_BYTES - 1} (784 values '0'/'1' separated by spaces)"
        )
    rows_NxL = buf_B.reshape(-1, AMAT_LINE_BYTES)
    values_NxD = rows_NxL[:, 0::2]
    seps_NxD = rows_NxL[:, 1::2]
    ok_values = (values_NxD == ord("0")) | (values_NxD == ord("1"))
    ok_seps = np.concatenate(
        [seps_NxD[:, :-1] == ord(" "), seps_NxD[:, -1:] == ord("\n")], axis=1)
    bad_rows = np.flatnonzero(~(ok_values.all(1) & ok_seps.all(1)))
    if len(bad_rows):
        i = int(bad_rows[0])
        raise DataError(
            f"{path}: line {i + 1} is not 784 values '0'/'1' separated by single spaces")
    return (values_NxD - ord("0")).astype(np.uint8)


def parse_idx(data: bytes, path: Path, kind: str) -> np.ndarray:
    """idx file -> uint8 (N, 784) images (`kind` "idx3") or uint8 (N,) labels ("idx1")."""
    header = 16 if kind == "idx3" else 8
    magic_expected = 0x803 if kind == "idx3" else 0x801
    if len(data) < header:
        raise DataError(f"{path}: truncated idx file ({len(data)} bytes, header needs {header})")
    magic, n = struct.unpack(">II", data[:8])
    if magic != magic_expected:
        raise DataError(
            f"{path}: not an {kind} file (magic 0x{magic:08x}, expected 0x{magic_expected:08x})")
    item = 1
    if kind == "idx3":
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        item = N_PIXELS
    expected = header + n * item
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise DataError(
            f"{path}: {what} idx file: header says {n} records ({expected} bytes), "
            f"file has {len(data)} bytes")
    arr = np.frombuffer(data, np.uint8, offset=header)
    if kind == "idx3":
        return arr.reshape(n, N_PIXELS)
    if arr.size and arr.max() > 9:
        raise DataError(f"{path}: label {int(arr.max())} outside 0..9")
    return arr.copy()


def read_file(path: Path, spec: RawFile, check_sha256: bool = True) -> tuple[np.ndarray, str]:
    """Read, parse and verify one raw file. Returns (array, sha256 of the decompressed content)."""
    data = read_bytes(path, size_cap(spec))
    if spec.kind == "amat":
        arr = parse_amat(data, path)
    else:
        arr = parse_idx(data, path, spec.kind)
    if len(arr) != spec.n and check_sha256:
        raise DataError(f"{path}: {len(arr)} records, expected {spec.n}")
    digest = verify(path, data, spec) if check_sha256 else sha256_hex(data)
    return arr, digest


@dataclasses.dataclass(frozen=True)
class RawData:
    """Everything label matching needs. Binarized: uint8 (N, 784) in {0, 1}; MNIST: uint8."""

    binarized: dict[str, np.ndarray]      # train / valid / test
    mnist_x: dict[str, np.ndarray]        # train / test, (N, 784) 0..255
    mnist_y: dict[str, np.ndarray]        # train / test, (N,) 0..9
    mnist_index: dict[str, np.ndarray]    # train / test: index of each row in the full MNIST file
    provenance: dict


def read_raw(raw_dir: str | os.PathLike) -> RawData:
    """Read and verify all seven raw files (flat folder or `binarized_mnist/` + `mnist/`).

    About 3 s for all of them; no progress bar, so that an error is the only line on stderr.
    """
    paths = locate_all(raw_dir)
    arrays: dict[str, np.ndarray] = {}
    files = {}
    for name in READ_ORDER:
        arrays[name], digest = read_file(paths[name], RAW_FILES[name])
        files[name] = {"path": str(paths[name]), "sha256": digest, "verified": True}
    binarized = {s: arrays[f] for s, f in BINARIZED.items()}
    mnist_x = {s: arrays[MNIST[s][0]] for s in MNIST}
    mnist_y = {s: arrays[MNIST[s][1]] for s in MNIST}
    mnist_index = {s: np.arange(len(mnist_x[s]), dtype=np.int64) for s in MNIST}
    return RawData(binarized, mnist_x, mnist_y, mnist_index,
                   {"source": "raw", "raw_dir": str(raw_dir), "files": files})


def _fetch(url: str, dest: Path, timeout: float) -> None:
    try:
        with (atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as r,
              open(tmp, "wb") as f):
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: download into {dest.parent} failed ({_one_line(reason)})") from None


def download_raw(raw_dir: str | os.PathLike, timeout: float = 60.0) -> list[Path]:
    """Fetch any raw file missing from `raw_dir` from its public URL, verifying its sha256.

    Files already present (flat or in the sub-folders) are verified instead. A failed download
    or a checksum mismatch removes the partial file and raises `DataError` naming the URL/file.
    """
    root = Path(raw_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the raw data directory ({_one_line(e)})") from None
    fetched = []
    for name in READ_ORDER:
        spec = RAW_FILES[name]
        try:
            locate(root, name)
            continue  # present; read_raw verifies it
        except DataError:
            pass
        dest = root / spec.url.rsplit("/", 1)[1]
        _fetch(spec.url, dest, timeout)
        try:
            read_file(dest, spec)
        except DataError:
            dest.unlink(missing_ok=True)
            raise
        fetched.append(dest)
    return fetched


def multiset_sha256(images_NxD: np.ndarray, labels_N: np.ndarray | None = None) -> str:
    """Order-free content digest: sha256 of the sorted rows (label byte first, if given).

    TFDS stores records in its own order; this digest lets that order be checked against the
    raw files' content all the same (`MULTISET_SHA256`).
    """
    rows = np.ascontiguousarray(images_NxD, np.uint8)
    if labels_N is not None:
        rows = np.concatenate([np.asarray(labels_N, np.uint8)[:, None], rows], axis=1)
    rows = np.ascontiguousarray(rows)
    as_void = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    return sha256_hex(np.sort(as_void).tobytes())
