"""Cloud Storage URLs as pipeline steps see them.

Pipeline steps never talk to the GCS API: on Vertex AI, KFP hands them `/gcs/BUCKET/...` paths
(Cloud Storage FUSE), so they read and write files like anywhere else. `mounted_path` turns a
`gs://` URL that a user passes as a parameter into that path. To copy a run's artifacts to or
from a bucket, use `gcloud storage cp -r` (docs/running.md).
"""

from __future__ import annotations

import os

from vnca.errors import UserError

# KFP and Vertex AI mount every bucket at /gcs/BUCKET inside a step.
FUSE_ROOT = "/gcs"


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
