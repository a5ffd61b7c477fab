"""Bundled source end to end, the dataset artifact readers and the padding step."""

import json
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from vnca import artifacts, cli
from vnca.data import bundled_source as bundled
from vnca.data import load_dataset, load_split, pad_images
from vnca.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def bundled_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "data"
    rc = cli.main(["prepare-data", "--source", "bundled", "--out", str(out)])
    assert rc == 0
    return out


def test_bundled_labels_match_provenance(bundled_out):
    exp = bundled.expected()
    manifest = bundled.read_manifest()
    sizes = {"train": 2000, "valid": 500, "test": 1000}
    for split, n in sizes.items():
        x, y = load_split(bundled_out, split)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        assert manifest["counts"][f"binarized_{split}"] == n
        np.testing.assert_array_equal(y, exp[f"{split}_y"])
    arrays = load_dataset(bundled_out)
    for split in sizes:
        np.testing.assert_array_equal(arrays[f"{split}_mnist_index"], exp[f"{split}_mnist_index"])
    # The sample's test rows are a random draw, not the digit-grouped head of the file.
    assert np.bincount(arrays["test_y"], minlength=10).min() > 50


def test_bundled_images_are_the_real_rows():
    """The shipped images are bit-exact rows of Larochelle's files (checked by digest)."""
    arrays = bundled.read_sample_arrays()
    manifest = bundled.read_manifest()
    assert manifest["source_files"]["binarized_mnist_test.amat"] == (
        "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c")
    rows = arrays["bin_test_row"]
    assert len(np.unique(rows)) == len(rows) == 1000 and rows.max() < 10000
    assert arrays["mnist_test_x"].shape == (1250, 784)  # 1000 matched + 250 distractors
    assert set(arrays["expected_test_mnist_index"]) <= set(arrays["mnist_test_index"])


def test_artifact_files(bundled_out):
    with np.load(bundled_out / artifacts.DATASET, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(
            f"{s}_{k}" for s in artifacts.SPLITS for k in ("x", "y", "mnist_index"))
        assert all(npz[f"{s}_mnist_index"].dtype == np.int64 for s in artifacts.SPLITS)
    report = json.loads((bundled_out / artifacts.MATCH_REPORT).read_text())
    assert report["counts"] == {"train": 2000, "valid": 500, "test": 1000}
    for split in artifacts.SPLITS:
        s = report["splits"][split]
        assert s["impossible_pixels"]["total"] == 0
        assert s["collisions_after_assignment"]["references"] == 0
        assert sum(s["label_histogram"]) == report["counts"][split]
        assert {"margin_top1_top2_nats", "label_margin_nats"} <= set(s)
    assert report["groups"]["train+valid"]["n_references"] == 3000
    assert "2000" in report["summary"]
    png = (bundled_out / artifacts.MATCHED_PAIRS_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert 600 < width < 2000 and 150 < height < 600
    assert not list(bundled_out.glob(".prepare-data-*"))


def test_tampered_bundle_is_refused(monkeypatch):
    monkeypatch.setattr(bundled, "read_manifest", lambda: {"sample_sha256": "0" * 64})
    with pytest.raises(DataError, match=r"sample\.npz: sha256 .* differs from provenance.json"):
        bundled.read_bundled()


def test_load_split_errors(tmp_path, bundled_out):
    with pytest.raises(DataError, match=r"dataset\.npz: dataset not found"):
        load_split(tmp_path / "nothing", "train")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "dataset.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"corrupt/dataset\.npz: unreadable or corrupt") as e:
        load_split(tmp_path / "corrupt", "valid")
    assert "\n" not in str(e.value)
    arrays = load_dataset(bundled_out)
    (tmp_path / "partial").mkdir()
    np.savez(tmp_path / "partial" / "dataset.npz",
             **{k: v for k, v in arrays.items() if k != "valid_y"})
    with pytest.raises(DataError, match=r"partial/dataset\.npz: missing array 'valid_y'"):
        load_split(tmp_path / "partial", "valid")
    x, y = load_split(tmp_path / "partial", "test")  # other splits still readable
    assert len(x) == len(y) == 1000
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "dataset.npz", **{**arrays, "test_x": arrays["test_x"] * 255})
    with pytest.raises(DataError, match="test_x has values other than 0 and 1"):
        load_split(tmp_path / "bad", "test")
    with zipfile.ZipFile(tmp_path / "bad" / "dataset.npz") as z:
        assert "test_x.npy" in z.namelist()


def test_pad_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (3, 28, 28)).astype(np.uint8)
    p = pad_images(x, 32)
    assert p.shape == (3, 32, 32, 1) and p.dtype == np.float32
    np.testing.assert_array_equal(p[:, 2:30, 2:30, 0], x)
    assert p.sum() == x.sum()  # the 2-pixel border is all zeros
    q = pad_images(x, 28)
    assert q.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(q[..., 0], x)
    tiny = pad_images(np.array([[[1, 0], [0, 1]]], np.uint8), 4)
    np.testing.assert_array_equal(tiny[0, :, :, 0], [[0, 0, 0, 0], [0, 1, 0, 0],
                                                     [0, 0, 1, 0], [0, 0, 0, 0]])
    for bad in (26, 31):
        with pytest.raises(ConfigError, match=f"data.pad_to={bad}"):
            pad_images(x, bad)


def test_package_import_is_light():
    code = ("import sys, vnca.data; heavy = [m for m in ('scipy', 'matplotlib', 'tqdm', 'jax', "
            "'tensorflow_datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
