"""`vnca prepare-data` on bad input: one line naming the file, exit 2, no artifact left."""

import gzip
import os
import socket
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from vnca import cli
from vnca.data import prepare, raw, tfds_source

# The real raw files: $VNCA_RAW_DIR, else ../shared/data next to the checkout.
SHARED = Path(os.environ.get("VNCA_RAW_DIR")
              or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(),
                                  reason=f"real data not present at {SHARED} (set VNCA_RAW_DIR)")


def run(argv, capsys):
    rc = cli.main(["prepare-data", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_failed(rc, err, must_name, out: Path):
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vnca prepare-data: error: ")
    assert must_name in err
    assert not (out / "dataset.npz").exists()
    assert not list(out.glob(".prepare-data-*")) if out.exists() else True


def raw_dir_with(tmp_path, replace: dict[str, bytes] | None = None, drop=()) -> Path:
    """A flat raw dir linking the real files, some replaced by given content or left out."""
    d = tmp_path / "raw"
    d.mkdir()
    replace = replace or {}
    for sub in ("binarized_mnist", "mnist"):
        for f in (SHARED / sub).glob("*.gz"):
            stem = f.name[:-3]
            if stem in drop or stem in replace or f.name in replace:
                continue
            os.symlink(f, d / f.name)
    for name, content in replace.items():
        (d / name).write_bytes(content)
    return d


def test_missing_directory(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(tmp_path / "nowhere"), "--out", str(out)],
                  capsys)
    assert_failed(rc, err, str(tmp_path / "nowhere"), out)
    assert "raw data directory not found" in err


def test_raw_without_raw_dir(tmp_path, capsys):
    rc, err = run(["--source", "raw", "--out", str(tmp_path / "o")], capsys)
    assert_failed(rc, err, "--raw-dir", tmp_path / "o")


@needs_shared
def test_missing_file(tmp_path, capsys):
    d = raw_dir_with(tmp_path, drop=("t10k-labels-idx1-ubyte",))
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, str(d / "t10k-labels-idx1-ubyte"), out)


@needs_shared
def test_truncated_gzip(tmp_path, capsys):
    gz = (SHARED / "binarized_mnist" / "binarized_mnist_test.amat.gz").read_bytes()
    d = raw_dir_with(tmp_path, {"binarized_mnist_test.amat.gz": gz[: len(gz) // 2]})
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, str(d / "binarized_mnist_test.amat.gz"), out)
    assert "truncated or corrupt gzip" in err


@needs_shared
def test_corrupt_gzip(tmp_path, capsys):
    gz = bytearray((SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    gz[len(gz) // 2: len(gz) // 2 + 64] = bytes(64)
    d = raw_dir_with(tmp_path, {"t10k-images-idx3-ubyte.gz": bytes(gz)})
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, str(d / "t10k-images-idx3-ubyte.gz"), out)


@needs_shared
def test_truncated_idx_content(tmp_path, capsys):
    data = gzip.decompress((SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    d = raw_dir_with(tmp_path, {"t10k-images-idx3-ubyte.gz": gzip.compress(data[:-784 * 3], 1)})
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, "t10k-images-idx3-ubyte.gz", out)
    assert "truncated idx file: header says 10000 records" in err


@needs_shared
def test_wrong_line_length(tmp_path, capsys):
    data = gzip.decompress(
        (SHARED / "binarized_mnist" / "binarized_mnist_test.amat.gz").read_bytes())
    i = 1568 * 41 + 100  # drop two characters inside line 42
    d = raw_dir_with(tmp_path, {"binarized_mnist_test.amat": data[:i] + data[i + 2:]})
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, str(d / "binarized_mnist_test.amat"), out)
    assert "line 42 has 1565 characters, expected 1567" in err


@needs_shared
def test_sha256_mismatch(tmp_path, capsys):
    data = bytearray(gzip.decompress(
        (SHARED / "binarized_mnist" / "binarized_mnist_test.amat.gz").read_bytes()))
    data[1568 * 7 + 2 * 300] ^= 1  # flip one pixel ('0' <-> '1'): still a well-formed file
    d = raw_dir_with(tmp_path, {"binarized_mnist_test.amat": bytes(data)})
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, str(d / "binarized_mnist_test.amat"), out)
    assert "sha256 mismatch" in err


def test_download_failure_via_cli(tmp_path, capsys, monkeypatch):
    def offline(url, timeout=None):
        raise raw.urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(raw.urllib.request, "urlopen", offline)
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(tmp_path / "dl"), "--download",
                   "--out", str(out)], capsys)
    assert_failed(rc, err, "binarized_mnist_test.amat", out)
    assert "Name or service not known" in err
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_only_with_raw(tmp_path, capsys):
    rc, err = run(["--source", "bundled", "--download", "--out", str(tmp_path / "o")], capsys)
    assert_failed(rc, err, "--download", tmp_path / "o")


def test_interrupted_write_leaves_no_dataset(tmp_path, monkeypatch):
    """An interruption while writing leaves neither dataset.npz nor the staging folder."""
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_pairs_figure", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_data("bundled", out, progress=False)
    assert list(out.iterdir()) == []


def test_tfds_missing_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    rc, err = run(["--source", "tfds", "--out", str(tmp_path / "o")], capsys)
    assert_failed(rc, err, "pip install 'vnca[tfds]'", tmp_path / "o")
    assert "tensorflow-datasets" in err


class _FakeBuilder:
    def __init__(self, name, data_dir):
        self.name = name
        self.data_dir = Path(data_dir or "/nonexistent") / name / "1.0.0"
        self.prepared_with = None

    def download_and_prepare(self, **kw):
        raise AssertionError("download_and_prepare must not run offline")


def _fake_tfds(builders):
    mod = types.ModuleType("tensorflow_datasets")

    def builder(name, data_dir=None):
        b = builders.get(name) or _FakeBuilder(name, data_dir)
        return b

    mod.builder = builder
    mod.__version__ = "fake"
    return mod


def test_tfds_offline_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds({}))
    monkeypatch.setattr(tfds_source, "missing_prepare_deps", list)

    def no_dns(*a, **k):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(tfds_source.socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    rc, err = run(["--source", "tfds", "--tfds-dir", str(tmp_path / "tfds"),
                   "--out", str(tmp_path / "o")], capsys)
    assert time.perf_counter() - t0 < 5
    assert_failed(rc, err, "cannot reach www.cs.toronto.edu", tmp_path / "o")
    assert "Temporary failure in name resolution" in err


def test_tfds_prepare_needs_tensorflow(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds({}))
    monkeypatch.setattr(tfds_source, "missing_prepare_deps", lambda: ["tensorflow"])
    rc, err = run(["--source", "tfds", "--out", str(tmp_path / "o")], capsys)
    assert_failed(rc, err, "needs tensorflow", tmp_path / "o")


def test_preflight_real_socket_refused_fast():
    """The real preflight against a closed local port fails at once with one line."""
    with socket.socket() as s:  # find a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    orig = socket.getaddrinfo

    def local(host, p, *a, **k):
        return orig("127.0.0.1", port, *a, **k)

    t0 = time.perf_counter()
    try:
        tfds_source.socket.getaddrinfo = local
        with pytest.raises(tfds_source.UserError, match="cannot reach example.org"):
            tfds_source.preflight(("example.org",), timeout=2)
    finally:
        tfds_source.socket.getaddrinfo = orig
    assert time.perf_counter() - t0 < 3


class _Source:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitems__(self, keys):
        return [self.records[k] for k in keys]


class _PreparedBuilder:
    def __init__(self, name, splits, root):
        self.name = name
        self.data_dir = root / name / "1.0.0"
        self.data_dir.mkdir(parents=True)
        (self.data_dir / "dataset_info.json").write_text("{}")
        self.splits = splits

    def as_data_source(self, split):
        return _Source(self.splits[split])

    def download_and_prepare(self, **kw):
        raise AssertionError("prepared data must not be prepared again")


def test_tfds_read_path_with_prepared_data(tmp_path, monkeypatch):
    """Reading prepared builders: records in TFDS's own order, content checked order-free."""
    rng = np.random.default_rng(0)
    bins = {s: rng.integers(0, 2, (n, 28, 28, 1), dtype=np.uint8)
            for s, n in (("train", 30), ("validation", 10), ("test", 12))}
    mn = {s: (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n))
          for s, n in (("train", 40), ("test", 15))}
    builders = {
        "binarized_mnist": _PreparedBuilder(
            "binarized_mnist", {s: [{"image": im} for im in x] for s, x in bins.items()},
            tmp_path),
        "mnist": _PreparedBuilder(
            "mnist", {s: [{"image": im, "label": lab} for im, lab in zip(*v)]
                      for s, v in mn.items()}, tmp_path),
    }
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(builders))
    expected = {"binarized_train": bins["train"], "binarized_valid": bins["validation"],
                "binarized_test": bins["test"]}
    digests = {k: raw.multiset_sha256(v[::-1].reshape(len(v), -1)) for k, v in expected.items()}
    digests.update({f"mnist_{s}": raw.multiset_sha256(x.reshape(len(x), -1), y)
                    for s, (x, y) in mn.items()})
    monkeypatch.setattr(tfds_source, "MULTISET_SHA256", digests)
    data = tfds_source.read_tfds(tmp_path)
    np.testing.assert_array_equal(data.binarized["valid"], bins["validation"].reshape(10, 784))
    np.testing.assert_array_equal(data.mnist_y["test"], mn["test"][1])
    assert data.provenance["multiset_sha256"] == digests
    # A record that differs from the raw files' content is refused, naming the builder dir.
    bins["test"][3, 0, 0, 0] ^= 1
    builders["binarized_mnist"].splits["test"][3] = {"image": bins["test"][3]}
    with pytest.raises(tfds_source.DataError, match=r"binarized_mnist test \(12 records\)"):
        tfds_source.read_tfds(tmp_path)


@needs_shared
def test_gzip_bomb_via_cli(tmp_path, capsys, gzip_bomb):
    d = raw_dir_with(tmp_path, drop=("binarized_mnist_test.amat",))
    gzip_bomb(d / "binarized_mnist_test.amat.gz", 200 << 20)
    out = tmp_path / "out"
    rc, err = run(["--source", "raw", "--raw-dir", str(d), "--out", str(out)], capsys)
    assert_failed(rc, err, str(d / "binarized_mnist_test.amat.gz"), out)
    assert "decompresses to more than" in err


@pytest.mark.slow
def test_stale_staging_folders_of_killed_runs_are_removed(tmp_path):
    """A SIGKILL during prepare-data left OUT/.prepare-data-PID.partial behind forever."""
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = out / f".prepare-data-{dead.pid}.partial"
        busy = out / f".prepare-data-{live.pid}.partial"
        other = out / ".prepare-data-notapid.partial"
        for d in (stale, busy, other):
            (d / "sub").mkdir(parents=True)
            (d / "sub" / "dataset.npz").write_bytes(b"half")
        prepare.prepare_data("bundled", out, progress=False)
        assert not stale.exists()                  # its process is gone: removed
        assert busy.is_dir() and other.is_dir()    # a live run's, and not ours: kept
        assert (out / "dataset.npz").is_file()
    finally:
        live.kill()
        live.wait()
