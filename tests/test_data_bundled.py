"""Bundled source end to end, the dataset artifact readers and the padding step."""

import json
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from vnca import artifacts, cli, contracts
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


def test_match_report_is_read_through_its_contract(bundled_out, refuses_edited_copies):
    """The report the step wrote reads back with its splits and groups typed; the same file
    with one thing wrong is refused in one line naming it."""
    path = bundled_out / artifacts.MATCH_REPORT
    report = contracts.MatchReport.read(path)
    assert report.counts == {"train": 2000, "valid": 500, "test": 1000}
    assert sorted(report.groups) == ["test", "train+valid"]
    margins = report.splits["test"].label_margin_nats
    assert margins.n == 1000 and [q for q, _ in margins.percentiles()] == [
        0.1, 1, 5, 25, 50, 75, 95]
    good = json.loads(path.read_text())
    assert good["version"] == contracts.MatchReport.VERSION
    cases = [
        (lambda d: d.pop("version"), "no 'version'"),
        (lambda d: d.pop("version"), "rerun `vnca prepare-data`"),
        (lambda d: d["splits"].pop("valid"), "'splits' must have the keys train, valid, test"),
        (lambda d: d["splits"]["test"]["margin_top1_top2_nats"].update(p50="x"),
         "'splits.test.margin_top1_top2_nats.p50' must be a finite number or null"),
        (lambda d: d["splits"]["train"]["label_histogram"].append(-1),
         "'splits.train.label_histogram[10]' must be a non-negative integer"),
        (lambda d: d["splits"]["test"].update(margin={"counts": [1], "edges": [0, 1]}),
         "unknown key 'splits.test.margin'"),
    ]
    refuses_edited_copies(contracts.MatchReport.read, artifacts.MATCH_REPORT, good, cases)


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


def _with(arrays: dict, key: str, fn) -> dict:
    return {**arrays, key: fn(arrays[key])}


@pytest.mark.parametrize("key, fn, needle", [
    ("test_y", lambda y: np.where(np.arange(len(y)) == 3, -1, y), "test_y has label -1 outside"),
    ("test_y", lambda y: np.where(np.arange(len(y)) == 0, 42, y), "test_y has label 42 outside"),
    ("test_y", lambda y: y.astype(np.float64), "test_y must be integers, got float64"),
    ("test_y", lambda y: y[:-1], "test_y must have shape (1000,)"),
    ("test_y", lambda y: y[:, None], "test_y must have shape (1000,)"),
    ("test_mnist_index", lambda i: i.astype(np.float32), "test_mnist_index must be integers"),
    ("test_mnist_index", lambda i: i - 5000, "test_mnist_index has negative index"),
    ("test_mnist_index", lambda i: i[:10], "test_mnist_index must have shape (1000,)"),
    ("test_x", lambda x: x.astype(np.float32), "test_x must be uint8"),
    ("test_x", lambda x: x[:, :27], "test_x must be uint8 (N, 28, 28)"),
])
def test_malformed_dataset_is_one_data_error(tmp_path, bundled_out, key, fn, needle):
    """Labels of -1 failed deep in evaluate; 42 and a float mnist_index were accepted."""
    arrays = load_dataset(bundled_out)
    np.savez(tmp_path / artifacts.DATASET, **_with(arrays, key, fn))
    with pytest.raises(DataError) as e:
        load_split(tmp_path, "test")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / artifacts.DATASET}: ")
    assert needle in msg
    load_split(tmp_path, "train")  # the other splits are still fine


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "flipped", "plain npy"])
def test_damaged_dataset_file_is_one_data_error(tmp_path, bundled_out, damage):
    data = (bundled_out / artifacts.DATASET).read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "zeroed":
        data = bytes(len(data))
    elif damage == "plain npy":  # np.load returns an array, not an archive
        import io

        buf = io.BytesIO()
        np.save(buf, np.zeros((3, 28, 28), np.uint8))
        data = buf.getvalue()
    else:  # corrupt the compressed bytes in the middle of the test images
        with zipfile.ZipFile(bundled_out / artifacts.DATASET) as z:
            info = z.getinfo("test_x.npy")
        mid = info.header_offset + 100 + info.compress_size // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    (tmp_path / artifacts.DATASET).write_bytes(data)
    with pytest.raises(DataError, match="unreadable or corrupt dataset") as e:
        load_dataset(tmp_path)
    assert "\n" not in str(e.value)


def test_array_header_claiming_more_than_the_file_holds(tmp_path, bundled_out):
    """A header claiming a 73 GB array made numpy try to allocate it (MemoryError)."""
    import io

    from numpy.lib import format as npy_format

    arrays = load_dataset(bundled_out)
    with zipfile.ZipFile(tmp_path / artifacts.DATASET, "w") as z:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            if key == "test_x":
                npy_format.write_array_header_1_0(
                    buf, {"descr": "|u1", "fortran_order": False, "shape": (10**8, 28, 28)})
                buf.write(bytes(100))
            else:
                npy_format.write_array(buf, arr)
            z.writestr(f"{key}.npy", buf.getvalue())
    with pytest.raises(DataError, match=r"test_x is corrupt \(its header claims 78,400,000,000"):
        load_split(tmp_path, "test")
    assert len(load_split(tmp_path, "valid")[0]) == 500


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
