"""vnca.storage: gs:// URLs and the paths pipeline steps see them at."""

import pytest

from vnca import storage
from vnca.errors import UserError


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
