"""Run the whole pipeline on this machine with kfp.local: `vnca run-local`.

- `--runner subprocess` (default, no Docker): each step is a subprocess of this Python
  interpreter (`SubprocessRunner(use_venv=False)`), so it uses the installed `vnca`.
- `--runner docker`: each step runs in the pipeline's image (`--image`, default the CPU image
  from components/images.py) with KFP's DockerRunner; needs a Docker engine and
  `pip install docker`. The root directory is mounted into the containers at the same path.

By default each variant config gets its demo overlay (configs/demo/<variant>.yaml) and the data
is the sample bundled with the package: a run that visibly learns in minutes on a laptop CPU.
`tier="smoke"` is the seconds-scale run of the tests, `"cpu"` the full-data CPU run,
`"paper"` the paper's configs. Outputs go under `ROOT/vnca-<timestamp>/<step>/<output>`; the
report is `.../report/report_dir/report.html`, the full log of every step `.../run.log`.

Compiled XLA programs are kept in `ROOT/.jax-cache` (JAX's persistent compilation cache), so
a second run with the same root skips most compilation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from pipeline.console import StepConsole, format_seconds
from pipeline.pipeline import build_pipeline
from vnca import artifacts, storage
from vnca import config as vnca_config
from vnca.errors import UserError

RUNNERS = ("subprocess", "docker")
JAX_CACHE = ".jax-cache"


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
    tier: str = "demo",
    data_source: str = "bundled",
    raw_dir: str | Path | None = None,
    image: str | None = None,
    overrides: Sequence[str] = (),
    verbose: bool = False,
) -> Path:
    """Run prepare-data, train and evaluate per variant, and the report; return report.html.

    The terminal shows one line per step and its progress (`pipeline.console`); everything
    kfp.local and the steps print goes to the run's `run.log` (and, with `verbose`, also to
    the terminal)."""
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
        target="local", image=image, configs=configs, tier=tier, overrides=overrides
    )
    kfp_runner = _runner(runner)
    root.mkdir(parents=True, exist_ok=True)
    # Every step's process (a child of this one) inherits the cache settings.
    cache_env = {"JAX_COMPILATION_CACHE_DIR": str(root / JAX_CACHE),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}

    from kfp import local

    local.init(
        runner=kfp_runner, pipeline_root=str(root), workspace_root=str(root / ".workspace"),
        raise_on_error=True, enable_caching=False,
    )
    log_path = root / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    terminal = sys.stdout
    t_start = time.perf_counter()
    print(f"vnca run-local: {tier} tier, {data_source} data, runner {runner}; "
          f"full log in {log_path}", file=terminal, flush=True)
    with open(log_path, "w") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfp's image-name and deprecation warnings
        console = StepConsole(terminal, log, verbose)
        try:
            with contextlib.redirect_stdout(console), _environment(cache_env):
                run = pipeline_func(data_source=data_source, raw_dir=str(raw_dir or ""),
                                    download=False, tfds_dir="")
        except RuntimeError as e:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # kfp colours its messages
            first = text.splitlines()[0] if text else type(e).__name__
            if "finished with status" in first:
                raise UserError(f"{first} (its last lines are above; full log: {log_path})"
                                ) from None
            raise
    report = Path(run.output.path) / artifacts.REPORT_HTML
    if not report.is_file():
        raise UserError(f"the pipeline finished but {report} is missing")
    run_dir = report.parent.parent.parent
    shutil.copyfile(log_path, run_dir / "run.log")
    log_path.unlink()
    print_summary(terminal, run_dir, console.times, time.perf_counter() - t_start)
    return report


@contextlib.contextmanager
def _environment(values: dict):
    """Set environment variables that the user has not set, for the duration of a run."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def print_summary(out, run_dir: Path, times: list, total_s: float) -> None:
    """Each step's time, then the headline numbers of every evaluated variant."""
    print("\nstep times:", file=out)
    for name, seconds, status in times:
        flag = "" if status == "SUCCESS" else f"  ({status})"
        print(f"  {name:<24} {format_seconds(seconds):>8}{flag}", file=out)
    print(f"  {'total':<24} {format_seconds(total_s):>8}", file=out)
    rows = []
    for path in sorted(run_dir.glob(f"evaluate-*/evaluation/{artifacts.EVAL_METRICS}")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        iw, rec = m.get("iwelbo") or {}, m.get("reconstruction") or {}
        untrained = (m.get("untrained") or {}).get("mean_nats")
        rows.append((m.get("name", path.parent.parent.name), iw.get("k"), iw.get("mean_nats"),
                     iw.get("stderr_nats"), untrained, rec.get("accuracy"),
                     (m.get("classifier") or {}).get("test_accuracy")))
    if rows:
        print("\nheadline numbers (test split):", file=out)
        print(f"  {'variant':<14} {'IW bound (nats)':>18} {'untrained':>10} "
              f"{'recon. accuracy':>16}", file=out)
        for name, k, mean, se, untrained, acc, clf in rows:
            bound = f"{mean:.1f} ± {se:.1f}" if mean is not None and se is not None else "—"
            print(f"  {name:<14} {bound:>18} {_num(untrained, '.1f'):>10} "
                  f"{_num(acc, '.1%'):>16}", file=out)
        clf = next((r[6] for r in rows if r[6] is not None), None)
        k = rows[0][1]
        print(f"  (K = {k}; reconstructions labelled by a digit classifier that is "
              f"{_num(clf, '.1%')} accurate on the real test images)", file=out)


def _num(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)
