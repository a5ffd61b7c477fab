"""Run the whole pipeline on this machine with kfp.local: `vnca run-local`.

- `--runner subprocess` (default, no Docker): each step is a subprocess of this Python
  interpreter (`SubprocessRunner(use_venv=False)`), so it uses the installed `vnca`.
- `--runner docker`: each step runs in the pipeline's image (`--image`, default the CPU image
  from components/images.py) with KFP's DockerRunner; needs a Docker engine and
  `pip install docker`. The root directory is mounted into the containers at the same path.

By default each variant config gets configs/smoke.yaml layered on top and the data is the
sample bundled with the package, so the whole pipeline runs in minutes on a laptop CPU.
Outputs go under `ROOT/vnca-<timestamp>/<step>/<output>`; the report is
`.../report/report_dir/report.html`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from pipeline.pipeline import build_pipeline
from vnca import artifacts, storage
from vnca import config as vnca_config
from vnca.errors import UserError

RUNNERS = ("subprocess", "docker")


def _runner(kind: str):
    from kfp import local

    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    if kind == "docker":
        try:
            import docker  # noqa: F401 - DockerRunner needs it
        except ImportError:
            raise UserError("--runner docker needs the docker package: pip install docker") from None
        # Files written in the mounted root belong to the calling user, not root.
        return local.DockerRunner(
            user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp"}
        )
    raise UserError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")


def run_local(
    configs: Sequence[str | Path | vnca_config.Config] | None = None,
    root: str | Path = "runs/local",
    runner: str = "subprocess",
    smoke: bool = True,
    data_source: str = "bundled",
    raw_dir: str | Path | None = None,
    image: str | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Run prepare-data, train and evaluate per variant, and the report; return report.html."""
    if storage.is_gcs_url(str(root)):
        raise UserError(
            f"--root {root}: run-local writes to a local directory (kfp.local would create a "
            "folder named 'gs:'); use a local path, or `vnca submit --pipeline-root` for GCS"
        )
    if data_source == "raw":
        if not raw_dir:
            raise UserError("--data-source raw needs --raw-dir DIR (the raw MNIST files)")
        raw_dir = Path(raw_dir).resolve()
        if not raw_dir.is_dir():
            raise UserError(f"--raw-dir {raw_dir}: directory not found")
    root = Path(root).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--root {root}: exists and is not a directory")

    pipeline_func = build_pipeline(
        target="local", image=image, configs=configs, smoke=smoke, overrides=overrides
    )
    kfp_runner = _runner(runner)
    root.mkdir(parents=True, exist_ok=True)

    from kfp import local

    local.init(
        runner=kfp_runner, pipeline_root=str(root), workspace_root=str(root / ".workspace"),
        raise_on_error=True, enable_caching=False,
    )
    try:
        run = pipeline_func(
            data_source=data_source, raw_dir=str(raw_dir or ""), download=False, tfds_dir=""
        )
    except RuntimeError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # kfp colours its messages
        first = text.splitlines()[0] if text else type(e).__name__
        if "finished with status" in first:
            raise UserError(f"{first} (the failing step's log is above)") from None
        raise
    report = Path(run.output.path) / artifacts.REPORT_HTML
    if not report.is_file():
        raise UserError(f"the pipeline finished but {report} is missing")
    return report
