"""Google Cloud Storage: the one module that talks to GCS (google-cloud-storage).

Pipeline steps never call this: on Vertex AI, KFP hands them `/gcs/BUCKET/...` paths (Cloud
Storage FUSE), so they read and write files like anywhere else; `mounted_path` turns a `gs://`
URL a user passes as a parameter into that path. This module is for explicit copies from a
workstation or a script: a local artifact directory to `gs://` and back, listings and
existence checks, with retries on transient errors (429, 5xx, connection resets).

An upload is complete only when its marker object exists. `copy_dir_to_gcs` deletes the
marker first, uploads every file, deletes objects left over from an earlier upload to the same
prefix, and writes the marker (`_vnca_complete.json`, a manifest of every file's size and MD5)
last. So an interrupted upload, or one still running, is never taken for a complete one:
`exists` says False and `copy_gcs_to_dir` refuses it with one line. Running the upload again
completes it. Downloads land in a temporary directory renamed into place when every file has
been checked against the manifest.

`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` points the client at an emulator (the tests use
gcp-storage-emulator), with anonymous credentials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from vnca.errors import DataError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from google.api_core.retry import Retry
    from google.cloud import storage

# Written last by copy_dir_to_gcs; its presence means the directory upload is complete.
MARKER = "_vnca_complete.json"
# KFP and Vertex AI mount every bucket at /gcs/BUCKET inside a step.
FUSE_ROOT = "/gcs"
# Give up on one request after retrying transient errors for this long (seconds).
RETRY_TIMEOUT_S = 300.0


def _gcs():
    """The google.cloud.storage module, imported here (not at import time), or one line
    saying how to install it: it is in the `pipeline` extra, not a core dependency."""
    try:
        from google.cloud import storage
    except ImportError:
        raise UserError("gs:// copies need google-cloud-storage, which the pipeline extra "
                        "installs: pip install 'vnca[pipeline]'") from None
    return storage


def default_retry() -> Retry:
    """Retry transient errors (429, 500, 502, 503, 504, connection errors) with backoff."""
    _gcs()
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(RETRY_TIMEOUT_S)


def is_gcs_url(url: str | os.PathLike | None) -> bool:
    return isinstance(url, str) and url.startswith("gs://")


def split_url(url: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b'); raise UserError for anything else."""
    if not is_gcs_url(url):
        raise UserError(f"{url}: expected a gs://BUCKET/PATH URL")
    bucket, _, path = url[len("gs://"):].partition("/")
    if not bucket:
        raise UserError(f"{url}: the URL names no bucket (expected gs://BUCKET/PATH)")
    return bucket, path.strip("/")


def mounted_path(url: str | None) -> str | None:
    """The path at which a pipeline step sees `url`: gs://B/P -> /gcs/B/P; '' -> None.

    Local paths are returned unchanged, so a parameter may hold either.
    """
    if not url:
        return None
    if is_gcs_url(url):
        bucket, path = split_url(url)
        return f"{FUSE_ROOT}/{bucket}/{path}" if path else f"{FUSE_ROOT}/{bucket}"
    return url


def make_client(project: str | None = None) -> storage.Client:
    """A storage client; with STORAGE_EMULATOR_HOST set it talks to that emulator."""
    storage = _gcs()
    from google.auth.exceptions import DefaultCredentialsError

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client(project=project)
    except DefaultCredentialsError:
        raise UserError(
            "no Google Cloud credentials found: run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


def _md5_b64(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def _prefix(path: str) -> str:
    return f"{path}/" if path else ""


def _local_files(local_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()
    )


def copy_dir_to_gcs(
    local_dir: str | os.PathLike,
    url: str,
    *,
    client: storage.Client | None = None,
    retry: Retry | None = None,
) -> int:
    """Mirror the files under `local_dir` to the prefix `url`; return the number of files.

    Objects under the prefix that are not in `local_dir` are deleted, so the prefix ends up
    holding exactly the directory's files plus the completion marker, written last.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise UserError(f"{local_dir}: not a directory")
    bucket_name, path = split_url(url)
    client = client or make_client()
    retry = retry or default_retry()
    bucket = client.bucket(bucket_name)
    prefix = _prefix(path)
    names = [n for n in _local_files(local_dir) if n != MARKER]

    # 1. Withdraw the marker of any earlier upload: from here on the prefix is incomplete.
    marker = bucket.blob(prefix + MARKER)
    if marker.exists(retry=retry):
        marker.delete(retry=retry)
    # 2. Upload every file.
    manifest = {}
    for name in tqdm(names, desc=f"upload to {url}", unit="file", disable=None):
        src = local_dir / name
        bucket.blob(prefix + name).upload_from_filename(str(src), retry=retry)
        manifest[name] = {"size": src.stat().st_size, "md5": _md5_b64(src)}
    # 3. Delete what an earlier upload left that this directory does not have.
    wanted = {prefix + n for n in names}
    for blob in client.list_blobs(bucket_name, prefix=prefix, retry=retry):
        if blob.name not in wanted and blob.name != prefix + MARKER:
            blob.delete(retry=retry)
    # 4. The marker, last.
    marker.upload_from_string(
        json.dumps({"files": manifest}, indent=1, sort_keys=True),
        content_type="application/json", retry=retry,
    )
    return len(names)


def _read_manifest(bucket, prefix: str, url: str, retry) -> dict[str, dict]:
    from google.api_core.exceptions import NotFound

    try:
        data = bucket.blob(prefix + MARKER).download_as_bytes(retry=retry)
    except NotFound:
        raise DataError(
            f"{url}: no completion marker ({MARKER}); the upload there was interrupted or "
            "never finished - run it again"
        ) from None
    where = f"{url}/{MARKER}"
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{where}: not a valid completion marker (not UTF-8 JSON)") from None
    return check_manifest(doc, where)


def check_name(name: object, where: str) -> str:
    """`name` if it is a safe relative POSIX path (no '', '.', '..' part, not absolute, no NUL
    or control character); otherwise `DataError` naming it. Such a name stays inside any
    directory it is joined to."""
    if (not isinstance(name, str) or not name
            or any(ord(c) < 0x20 or c == "\x7f" for c in name)
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise DataError(f"{where}: unsafe file name {name!r} (empty, absolute, a '..', '.' or "
                        "empty part, or a control character): refusing to download")
    return name


def check_manifest(doc: object, where: str) -> dict[str, dict]:
    """The `files` of a completion marker, {name: {"size": int, "md5": str}}, with every name
    checked by `check_name` and no name a folder of another; else one-line `DataError`."""
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        raise DataError(f"{where}: not a valid completion marker (expected an object with "
                        "'files': {name: {size, md5}})")
    for name, info in files.items():
        check_name(name, where)
        size = info.get("size") if isinstance(info, dict) else None
        md5 = info.get("md5") if isinstance(info, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 \
                or not isinstance(md5, str):
            raise DataError(f"{where}: entry {name!r} is not {{size: non-negative int, "
                            "md5: str}")
    for name in files:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise DataError(f"{where}: {'/'.join(parts[:i])!r} is listed both as a file "
                                f"and as the folder of {name!r}")
    return files


def _inside(root: Path, name: str) -> Path:
    """root / name, refused unless it resolves (symlinks followed) to a path inside root."""
    dst = root / name
    if not dst.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{name!r}: resolves to {dst.resolve()}, outside {root}: refusing to "
                        "download")
    return dst


def copy_gcs_to_dir(
    url: str,
    local_dir: str | os.PathLike,
    *,
    client: storage.Client | None = None,
    retry: Retry | None = None,
) -> int:
    """Download a complete upload at `url` into `local_dir` (new or empty); return file count.

    The manifest is checked before anything is downloaded: a name that is absolute, has a '..'
    part or would land outside `local_dir` is refused with `DataError` (whoever can write the
    bucket must not be able to write elsewhere on this machine). Every file is checked against
    the marker's manifest (size and MD5) before the directory appears under its final name.
    """
    local_dir = Path(local_dir)
    if local_dir.exists() and (not local_dir.is_dir() or any(local_dir.iterdir())):
        raise UserError(f"{local_dir}: already exists and is not an empty directory")
    bucket_name, path = split_url(url)
    client = client or make_client()
    retry = retry or default_retry()
    bucket = client.bucket(bucket_name)
    prefix = _prefix(path)
    manifest = _read_manifest(bucket, prefix, url, retry)

    from google.api_core.exceptions import NotFound

    try:
        local_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.partial-", dir=local_dir.parent))
    except OSError as e:
        raise UserError(f"{local_dir}: cannot create ({e.strerror or e})") from None
    try:
        targets = {name: _inside(tmp, name) for name in manifest}  # every name, before any I/O
        for name, info in tqdm(sorted(manifest.items()), desc=f"download {url}", unit="file",
                               disable=None):
            dst = targets[name]
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                bucket.blob(prefix + name).download_to_filename(str(dst), retry=retry)
            except NotFound:
                raise DataError(f"{url}/{name}: listed in {MARKER} but missing") from None
            if dst.stat().st_size != info["size"] or _md5_b64(dst) != info["md5"]:
                raise DataError(f"{url}/{name}: content differs from {MARKER} (changed since?)")
        if local_dir.exists():
            local_dir.rmdir()
        tmp.rename(local_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return len(manifest)


def list_files(
    url: str, *, client: storage.Client | None = None, retry: Retry | None = None
) -> list[str]:
    """Names (relative to `url`) of every object under the prefix, marker included, sorted."""
    bucket_name, path = split_url(url)
    client = client or make_client()
    prefix = _prefix(path)
    blobs = client.list_blobs(bucket_name, prefix=prefix, retry=retry or default_retry())
    return sorted(b.name[len(prefix):] for b in blobs)


def exists(url: str, *, client: storage.Client | None = None, retry: Retry | None = None) -> bool:
    """True if `url` is an object, or a directory whose upload completed (marker present)."""
    bucket_name, path = split_url(url)
    client = client or make_client()
    retry = retry or default_retry()
    bucket = client.bucket(bucket_name)
    if path and bucket.blob(path).exists(retry=retry):
        return True
    return bucket.blob(_prefix(path) + MARKER).exists(retry=retry)
