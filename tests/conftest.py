"""Fixtures shared by the test modules."""

import json

import pytest

from vnca.errors import DataError


@pytest.fixture
def refuses_edited_copies(tmp_path):
    """`check(read, name, good, cases)`: for each `(edit, needle)` in `cases`, a copy of the
    JSON object `good` changed by `edit(copy)` and written to `tmp_path / name` is refused by
    `read(path)` with one `DataError` line that names the copy and contains `needle`."""

    def check(read, name: str, good: dict, cases) -> None:
        for edit, needle in cases:
            bad = json.loads(json.dumps(good))
            edit(bad)
            copy = tmp_path / name
            copy.write_text(json.dumps(bad))
            with pytest.raises(DataError) as e:
                read(copy)
            assert "\n" not in str(e.value) and str(e.value).startswith(f"{copy}: "), needle
            assert needle in str(e.value)

    return check
