"""Raw readers on the real files in ../shared/data (test split) and on files made in the test."""

import gzip
import io
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from vnca.data import matching, raw
from vnca.errors import DataError

# The real raw files: $VNCA_RAW_DIR, else ../shared/data next to the checkout.
SHARED = Path(os.environ.get("VNCA_RAW_DIR")
              or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(),
                                  reason=f"real data not present at {SHARED} (set VNCA_RAW_DIR)")

TEST_FILES = ("binarized_mnist_test.amat", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read(root, name):
    return raw.read_file(raw.locate(root, name), raw.RAW_FILES[name])


@pytest.fixture(scope="module")
def real_test_split():
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"real data not present at {SHARED}")
    return {name: _read(SHARED, name) for name in TEST_FILES}


@needs_shared
def test_real_test_split_read_and_verified(real_test_split):
    (xb, hb), (mx, hx), (my, hy) = (real_test_split[n] for n in TEST_FILES)
    assert xb.shape == (10000, 784) and xb.dtype == np.uint8
    assert set(np.unique(xb).tolist()) == {0, 1}
    assert xb.mean() == pytest.approx(0.13251, abs=5e-6)          # README section 2
    assert mx.shape == (10000, 784) and mx.mean() / 255 == pytest.approx(0.13251, abs=5e-6)
    assert np.bincount(my).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert (hb, hx, hy) == tuple(raw.RAW_FILES[n].sha256 for n in TEST_FILES)
    assert raw.multiset_sha256(xb) == raw.MULTISET_SHA256["binarized_test"]
    # Order-free: TFDS's reordering of the same records gives the same digest.
    perm = np.random.default_rng(0).permutation(10000)
    assert raw.multiset_sha256(mx[perm], my[perm]) == raw.MULTISET_SHA256["mnist_test"]
    assert raw.multiset_sha256(mx[perm][1:], my[perm][1:]) != raw.MULTISET_SHA256["mnist_test"]


@needs_shared
def test_flat_layout_and_plain_amat(tmp_path, real_test_split):
    # A flat folder with the uncompressed .amat and the idx .gz files reads the same.
    (tmp_path / "binarized_mnist_test.amat").write_bytes(
        gzip.decompress((SHARED / "binarized_mnist" / "binarized_mnist_test.amat.gz")
                        .read_bytes()))
    for n in TEST_FILES[1:]:
        os.symlink(SHARED / "mnist" / (n + ".gz"), tmp_path / (n + ".gz"))
    assert raw.locate(tmp_path, "binarized_mnist_test.amat").name == "binarized_mnist_test.amat"
    for n in TEST_FILES:
        arr, digest = _read(tmp_path, n)
        np.testing.assert_array_equal(arr, real_test_split[n][0])
        assert digest == raw.RAW_FILES[n].sha256


@needs_shared
def test_real_test_split_matching_figures(real_test_split):
    """The figures of ../shared/data/README.md section 3 for the test split."""
    xb, mx, my = (real_test_split[n][0] for n in TEST_FILES)
    mt = matching.match(xb, mx, my, k=16, progress=False)
    s = matching.summarize(mt, xb, mx)
    assert s["collisions_before_assignment"] == {"distinct": 9992, "references": 8, "rows": 16}
    assert s["collisions_after_assignment"]["references"] == 0
    assert s["rows_changed_by_assignment"] == 8 and s["labels_changed_by_assignment"] == 0
    assert s["impossible_pixels"] == {"total": 0, "pairs_with_any": 0}
    m = s["margin_top1_top2_nats"]
    assert (m["count_below_1"], m["count_below_10"], m["count_below_50"]) == (14, 286, 1243)
    assert m["min"] == pytest.approx(0.05, abs=0.01) and m["p50"] == pytest.approx(140.5, 0.01)
    assert s["label_histogram"] == np.bincount(my, minlength=10).tolist()
    # Every image's label agrees with a dense float64 brute force on the hardest 300 rows.
    hard = np.argsort(mt.top_ll_MxK[:, 0] - mt.top_ll_MxK[:, 1])[:300]
    dense = matching.loglik_dense(xb[hard], mx)
    np.testing.assert_array_equal(my[dense.argmax(1)], mt.labels_M[hard])
    np.testing.assert_allclose(dense.max(1), mt.top_ll_MxK[hard, 0], atol=1e-8)


def _amat(rows_NxD):
    return b"".join(b" ".join(b"01"[v:v + 1] for v in r) + b"\n" for r in rows_NxD)


def test_parse_amat_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (5, 784)).astype(np.uint8)
    data = _amat(x)
    p = tmp_path / "f.amat"
    np.testing.assert_array_equal(raw.parse_amat(data, p), x)
    lines = data.split(b"\n")
    short = b"\n".join(lines[:2] + [lines[2][:-2]] + lines[3:])
    with pytest.raises(DataError, match=r"f\.amat: line 3 has 1565 characters, expected 1567"):
        raw.parse_amat(short, p)
    with pytest.raises(DataError, match=r"f\.amat: truncated: last line \(5\)"):
        raw.parse_amat(data[:-100], p)
    bad = bytearray(data)
    bad[1568 * 3 + 10] = ord("2")
    with pytest.raises(DataError, match=r"line 4 is not 784 values"):
        raw.parse_amat(bytes(bad), p)
    with pytest.raises(DataError, match="empty file"):
        raw.parse_amat(b"", p)


def test_parse_idx_errors(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    good = (0x803).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    good += bytes(range(256)) * 6 + bytes(32)
    assert raw.parse_idx(good, p, "idx3").shape == (2, 784)
    with pytest.raises(DataError, match=r"truncated idx file: header says 2 records"):
        raw.parse_idx(good[:-1], p, "idx3")
    with pytest.raises(DataError, match=r"not an idx1 file \(magic 0x00000803"):
        raw.parse_idx(good, p, "idx1")
    labels = (0x801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 11])
    with pytest.raises(DataError, match="label 11 outside 0..9"):
        raw.parse_idx(labels, p, "idx1")


def test_gzip_bomb_stops_at_the_expected_size(tmp_path, gzip_bomb):
    """A gzip of zeros far larger than the file it stands for raised MemoryError (1.5 GB)."""
    import tracemalloc

    spec = raw.RAW_FILES["binarized_mnist_test.amat"]  # 15,680,000 bytes
    bomb = gzip_bomb(tmp_path / "binarized_mnist_test.amat.gz", 200 << 20)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            raw.read_file(bomb, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bomb}: decompresses to more than ")
    assert f"{raw.size_cap(spec):,} bytes" in msg and spec.size < raw.size_cap(spec) < 17e6
    assert peak < 3 * raw.size_cap(spec)  # stopped near the cap, not after 200 MB


def test_oversized_plain_file_is_refused_unread(tmp_path):
    spec = raw.RAW_FILES["t10k-labels-idx1-ubyte"]
    big = tmp_path / "t10k-labels-idx1-ubyte"
    with open(big, "wb") as f:  # sparse: 1 GB on paper, nothing on disk
        f.truncate(1 << 30)
    with pytest.raises(DataError, match=f"1,073,741,824 bytes, more than the "
                                        f"{raw.size_cap(spec):,} this file may have"):
        raw.read_file(big, spec)


def test_a_file_exactly_at_its_size_is_read(tmp_path):
    labels = (0x801).to_bytes(4, "big") + (10000).to_bytes(4, "big") + bytes(10000)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(labels))
    arr, _ = raw.read_file(p, raw.RAW_FILES["t10k-labels-idx1-ubyte"], check_sha256=False)
    assert arr.shape == (10000,)


def test_missing_dir_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope: raw data directory not found"):
        raw.locate_all(tmp_path / "nope")
    with pytest.raises(DataError, match=r"binarized_mnist_test\.amat\[\.gz\]: file not found"):
        raw.locate_all(tmp_path)


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def _fake_urlopen(served):
    def urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[1]
        if name not in served:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return _FakeResponse(served[name])
    return urlopen


@needs_shared
def test_download_fetches_missing_files_and_verifies(tmp_path, monkeypatch):
    """Network replaced by the local copies: the download path writes and verifies files."""
    for sub in ("binarized_mnist", "mnist"):
        for f in (SHARED / sub).glob("*.gz"):
            if f.name not in ("binarized_mnist_test.amat.gz", "t10k-labels-idx1-ubyte.gz"):
                os.symlink(f, tmp_path / f.name)
    amat = gzip.decompress((SHARED / "binarized_mnist/binarized_mnist_test.amat.gz").read_bytes())
    served = {"binarized_mnist_test.amat": amat,
              "t10k-labels-idx1-ubyte.gz": (SHARED / "mnist/t10k-labels-idx1-ubyte.gz")
              .read_bytes()}
    monkeypatch.setattr(raw.urllib.request, "urlopen", _fake_urlopen(served))
    fetched = raw.download_raw(tmp_path)
    assert sorted(p.name for p in fetched) == sorted(served)
    assert (tmp_path / "binarized_mnist_test.amat").read_bytes() == amat
    assert raw.download_raw(tmp_path) == []  # everything present now
    # Served content with the wrong checksum is removed again and named in the error.
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    bad = gzip.compress(gzip.decompress(served["t10k-labels-idx1-ubyte.gz"])[:-1] + b"\x03")
    monkeypatch.setattr(raw.urllib.request, "urlopen",
                        _fake_urlopen({"t10k-labels-idx1-ubyte.gz": bad}))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 mismatch"):
        raw.download_raw(tmp_path)
    assert not list(tmp_path.glob("t10k-labels*"))


def test_download_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(raw.urllib.request, "urlopen", _fake_urlopen({}))
    with pytest.raises(DataError) as e:
        raw.download_raw(tmp_path / "raw")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(raw.RAW_FILES["binarized_mnist_test.amat"].url)
    assert "Temporary failure in name resolution" in msg
    assert list((tmp_path / "raw").iterdir()) == []
