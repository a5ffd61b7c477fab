"""Shared output of the benchmarks: one JSON line and one readable line per result."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def emit(res: dict, json_path: str | None, line: Callable[[dict], str]) -> None:
    """Stamp the load average on `res`, print it as JSON and as `line(res)`, and append the JSON
    to `json_path` when given."""
    res["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res), flush=True)
    print(line(res), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(res) + "\n")
