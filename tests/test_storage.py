"""vnca.storage against a real GCS emulator server (gcp-storage-emulator) on 127.0.0.1.

The emulator runs in-process on a free port; STORAGE_EMULATOR_HOST points the client at it.
Faults are injected into the client's HTTP session: a 503 the retry policy must absorb, and a
crash in the middle of a directory upload that must never look like a complete upload.
"""

import base64
import hashlib
import json
import socket

import pytest
import requests

from vnca import storage
from vnca.errors import DataError, UserError

BUCKET = "vnca-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def client(emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    c = storage.make_client(project="test")
    yield c
    for blob in c.list_blobs(BUCKET):
        blob.delete()


@pytest.fixture
def fast_retry():
    return storage.default_retry().with_delay(initial=0.01, maximum=0.05).with_timeout(10)


def _tree(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def artifact_dir(tmp_path):
    """A model-like artifact: nested files, an empty file and a 9 MB (resumable) file."""
    root = tmp_path / "model"
    (root / "ckpt" / "10").mkdir(parents=True)
    (root / "config.yaml").write_text("name: doubling\n")
    (root / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (root / "ckpt" / "10" / "commit_success.txt").write_bytes(b"")
    (root / "ckpt" / "10" / "state.bin").write_bytes(bytes(range(256)) * (9 * 4096))
    return root


class _FaultySession:
    """Wraps the client's HTTP session; `fail(request_no)` decides what to do per request."""

    def __init__(self, client, fault):
        self.inner = client._http
        self.fault = fault
        self.calls = []
        client._http_internal = self

    def request(self, method, url, *args, **kwargs):
        self.calls.append((method, url))
        action = self.fault(method, url, len(self.calls))
        if action == "crash":
            raise RuntimeError("simulated crash of the uploading process")
        if action == "503":
            resp = requests.Response()
            resp.status_code = 503
            resp._content = b'{"error": {"code": 503, "message": "backend unavailable"}}'
            resp.headers["content-type"] = "application/json"
            resp.url = url
            resp.request = requests.Request(method, url).prepare()
            return resp
        return self.inner.request(method, url, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _is_upload(method, url):
    return method in ("POST", "PUT") and "/upload/" in url


def test_mounted_path_and_url_parsing():
    assert storage.mounted_path("gs://bkt/runs/a") == "/gcs/bkt/runs/a"
    assert storage.mounted_path("gs://bkt") == "/gcs/bkt"
    assert storage.mounted_path("/data/raw") == "/data/raw"
    assert storage.mounted_path("") is None
    assert storage.split_url("gs://b/x/y/") == ("b", "x/y")
    with pytest.raises(UserError, match="gs://BUCKET/PATH"):
        storage.split_url("/local/path")
    with pytest.raises(UserError, match="names no bucket"):
        storage.split_url("gs:///x")


def test_round_trip_is_exact(client, artifact_dir, tmp_path):
    url = f"gs://{BUCKET}/runs/r1/model"
    assert not storage.exists(url, client=client)
    n = storage.copy_dir_to_gcs(artifact_dir, url, client=client)
    assert n == 4
    assert storage.exists(url, client=client)
    assert storage.exists(url + "/config.yaml", client=client)
    assert not storage.exists(url + "/nope.txt", client=client)
    assert storage.list_files(url, client=client) == sorted(
        ["config.yaml", "metrics.jsonl", "ckpt/10/commit_success.txt", "ckpt/10/state.bin",
         storage.MARKER]
    )
    out = tmp_path / "back" / "model"
    assert storage.copy_gcs_to_dir(url, out, client=client) == 4
    assert _tree(out) == _tree(artifact_dir)
    # No temporary directory is left next to the result.
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    with pytest.raises(UserError, match="not an empty directory"):
        storage.copy_gcs_to_dir(url, out, client=client)


def test_transient_503_is_retried(client, artifact_dir, tmp_path, fast_retry):
    failed = []

    def fault(method, url, n):
        if _is_upload(method, url) and not failed:
            failed.append(url)
            return "503"
        return None

    session = _FaultySession(client, fault)
    url = f"gs://{BUCKET}/runs/retry/model"
    assert storage.copy_dir_to_gcs(artifact_dir, url, client=client, retry=fast_retry) == 4
    assert len(failed) == 1  # the fault fired, and the upload still completed
    assert sum(_is_upload(m, u) for m, u in session.calls) >= 6  # 4 files + marker + 1 retry
    out = tmp_path / "back"
    storage.copy_gcs_to_dir(url, out, client=client)
    assert _tree(out) == _tree(artifact_dir)


def test_interrupted_upload_is_never_complete_and_rerun_completes(
    client, artifact_dir, tmp_path, fast_retry
):
    url = f"gs://{BUCKET}/runs/crash/model"
    # A first, complete upload of an older version of the directory...
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("name: old\n")
    (old / "stale.txt").write_text("only in the old upload\n")
    storage.copy_dir_to_gcs(old, url, client=client)
    assert storage.exists(url, client=client)

    # ...then a new upload to the same prefix crashes after its second file.
    uploads = []

    def fault(method, url_, n):
        if _is_upload(method, url_):
            uploads.append(url_)
            if len(uploads) == 3:
                return "crash"
        return None

    real_http = client._http
    _FaultySession(client, fault)
    with pytest.raises(RuntimeError, match="simulated crash"):
        storage.copy_dir_to_gcs(artifact_dir, url, client=client, retry=fast_retry)
    client._http_internal = real_http

    files = storage.list_files(url, client=client)
    assert storage.MARKER not in files
    assert len(files) >= 2  # some objects of the new upload are there...
    assert not storage.exists(url, client=client)  # ...but it is not complete,
    with pytest.raises(DataError, match="interrupted"):  # and cannot be downloaded.
        storage.copy_gcs_to_dir(url, tmp_path / "partial", client=client)
    assert not (tmp_path / "partial").exists()

    # Running the upload again completes it; the old upload's stale file is gone.
    assert storage.copy_dir_to_gcs(artifact_dir, url, client=client) == 4
    assert storage.exists(url, client=client)
    assert "stale.txt" not in storage.list_files(url, client=client)
    out = tmp_path / "back"
    storage.copy_gcs_to_dir(url, out, client=client)
    assert _tree(out) == _tree(artifact_dir)


def test_object_changed_after_upload_is_detected(client, artifact_dir, tmp_path):
    url = f"gs://{BUCKET}/runs/changed/model"
    storage.copy_dir_to_gcs(artifact_dir, url, client=client)
    client.bucket(BUCKET).blob("runs/changed/model/config.yaml").upload_from_string("tampered")
    with pytest.raises(DataError, match="config.yaml: content differs"):
        storage.copy_gcs_to_dir(url, tmp_path / "back", client=client)
    assert not (tmp_path / "back").exists()


def _plant_marker(client, prefix: str, manifest) -> None:
    client.bucket(BUCKET).blob(f"{prefix}/{storage.MARKER}").upload_from_string(
        manifest if isinstance(manifest, str) else json.dumps(manifest))


def _media_gets(session) -> list:
    return [u for m, u in session.calls if m == "GET" and "alt=media" in u
            and storage.MARKER not in u]


@pytest.mark.parametrize("name", [
    "ABSOLUTE", "../outside.txt", "a/../../outside.txt", "a/..", "./a", "a//b", "a/", "",
    "a/\x00b", "..",
])
def test_manifest_name_outside_target_is_refused_before_any_download(
        client, tmp_path, fast_retry, name):
    """A marker planted in the bucket must not make a download write outside its target."""
    outside = tmp_path / "outside.txt"
    if name == "ABSOLUTE":  # the emulator stores 'p//abs/path'; joined, it is the absolute path
        name = str(outside)
    prefix = "runs/evil/model"
    bucket = client.bucket(BUCKET)
    bucket.blob(f"{prefix}/config.yaml").upload_from_string("name: x\n")
    if ".." not in name.split("/") and "\x00" not in name:  # the emulator refuses these
        bucket.blob(f"{prefix}/{name}").upload_from_string("pwned")
    _plant_marker(client, prefix, {"files": {
        "config.yaml": {"size": 8, "md5": "x"},
        name: {"size": 5, "md5": base64.b64encode(hashlib.md5(b"pwned").digest()).decode()}}})
    session = _FaultySession(client, lambda *a: None)
    dest = tmp_path / "dl" / "model"
    with pytest.raises(DataError) as e:
        storage.copy_gcs_to_dir(f"gs://{BUCKET}/{prefix}", dest, client=client, retry=fast_retry)
    msg = str(e.value)
    assert "\n" not in msg and repr(name) in msg and "unsafe" in msg
    assert _media_gets(session) == []  # refused before downloading anything
    assert not outside.exists() and not dest.exists()
    assert list(tmp_path.iterdir()) == []  # nothing created, no partial folder either


@pytest.mark.parametrize("marker", [
    "[1, 2]", '"files"', "{}", '{"files": ["a"]}', '{"files": {"a": 3}}',
    '{"files": {"a": {"size": "8", "md5": "x"}}}', '{"files": {"a": {"size": 8}}}',
    '{"files": {"a": {"size": -1, "md5": "x"}}}', '{"files": {"a": {"size": true, "md5": "x"}}}',
    '{"files": {"a": {"size": 1, "md5": "x"}, "a/b": {"size": 1, "md5": "x"}}}',
    "{not json", "\udcff",
])
def test_malformed_marker_is_one_line(client, tmp_path, marker):
    prefix = "runs/bad-marker/model"
    if marker == "\udcff":  # not UTF-8
        client.bucket(BUCKET).blob(f"{prefix}/{storage.MARKER}").upload_from_string(b"\xff{")
    else:
        _plant_marker(client, prefix, marker)
    with pytest.raises(DataError) as e:
        storage.copy_gcs_to_dir(f"gs://{BUCKET}/{prefix}", tmp_path / "dl", client=client)
    assert "\n" not in str(e.value) and storage.MARKER in str(e.value)
    assert not (tmp_path / "dl").exists()


def test_check_name_and_resolution_via_symlink(tmp_path):
    assert storage.check_name("ckpt/10/state.bin", "m") == "ckpt/10/state.bin"
    for bad in ("/etc/passwd", "a/../b", "", None, 3):
        with pytest.raises(DataError):
            storage.check_name(bad, "m")
    # A name that is lexically fine but resolves outside through a symlink is refused too.
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(DataError, match="outside"):
        storage._inside(tmp_path / "root", "link/x.txt")
    assert storage._inside(tmp_path / "root", "a/b") == tmp_path / "root" / "a" / "b"
