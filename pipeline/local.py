"""Run the whole pipeline on this machine with kfp.local: `vnca run-local`.

- `--runner subprocess` (default, no Docker): each step is a subprocess of this Python
  interpreter (`SubprocessRunner(use_venv=False)`), so it uses the installed `vnca`.
- `--runner docker`: each step runs in the pipeline's image (`--image`, default the CPU image
  from components/images.py) with KFP's DockerRunner; needs a Docker engine (or podman's
  Docker-API service) and `pip install docker`. The root directory is mounted into the
  containers at the same path, and so is a `--raw-dir` outside it (read-only).

kfp.local's own verdict on a step is not trusted: its Docker handler reports SUCCESS for a
container that is already gone when it asks for the exit code (always so with podman). After
the run, and when kfp raises, every step's folder is checked for the files the step must leave
(`STEP_OUTPUTS`: its executor output, which kfp's executor writes only when the step's function
returned, and the artifact files the next steps read); the first step that lacks one fails the
run with that step's own last error line from the log.

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
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from vnca import artifacts, contracts, storage
from vnca import config as vnca_config
from vnca.errors import UserError
from vnca_pipeline.components.images import default_image
from vnca_pipeline.console import ANSI, BAR, STARTED, StepConsole, format_seconds
from vnca_pipeline.pipeline import build_pipeline
from vnca_pipeline.variants import load_variants

RUNNERS = ("subprocess", "docker")
JAX_CACHE = ".jax-cache"


# The files each step leaves in its task folder when it has succeeded, relative to that folder
# (the artifact folders are named after the components' outputs). Train and evaluate are
# per variant: "{name}" is the variant's name.
EXECUTOR_OUTPUT = "executor_output.json"
STEP_OUTPUTS = {
    "prepare-data": (f"dataset/{artifacts.DATASET}", f"dataset/{artifacts.DIGIT_CLASSIFIER}",
                     f"dataset/{artifacts.MATCH_REPORT}"),
    "train-{name}": (f"model/{artifacts.PARAMS}", f"model/{artifacts.TRAIN_SUMMARY}",
                     f"model/{artifacts.RESOLVED_CONFIG}"),
    "evaluate-{name}": (f"evaluation/{artifacts.EVAL_METRICS}",),
    "report": (f"report_dir/{artifacts.REPORT_HTML}", f"report_dir/{artifacts.REPORT_MD}",
               "report_html", "report_md"),
}
# A step's own error in its log: the last line of a Python traceback ("vnca.errors.DataError:
# msg") or a CLI's "error: msg" line.
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<exc>[A-Za-z_]\w*(?:Error|Exception)): (?P<msg>.+)$"
                        r"|^(?:[\w.-]+(?: [\w.-]+)*: )?error: (?P<cli>.+)$")


def _runner(kind: str, mounts: Sequence[Path] = (), environment: dict | None = None):
    """The kfp.local runner; for docker, `mounts` are extra host folders (read-only, same path)
    and `environment` extra variables for every container."""
    from kfp import local

    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    if kind == "docker":
        try:
            import docker
        except ImportError:
            raise UserError("--runner docker needs the docker package: pip install docker") from None
        # Files written in the mounted root belong to the calling user, not root.
        return local.DockerRunner(
            user=f"{os.getuid()}:{os.getgid()}",
            environment={"HOME": "/tmp", **(environment or {})},
            mounts=[docker.types.Mount(target=str(p), source=str(p), type="bind", read_only=True)
                    for p in mounts],
        )
    raise UserError(f"unknown runner {kind!r}; choose one of {', '.join(RUNNERS)}")


@contextlib.contextmanager
def _container_exit_codes():
    """While a run lasts, kfp.local's DockerRunner starts each step's container without
    auto-removal, so that its logs and exit code can still be read however fast it ends, and
    removes it afterwards. kfp 2.17's own `run_docker_container` starts it with
    `auto_remove=True`: on podman a container that fails within a second is gone before its
    logs are read (the run dies in docker.errors.APIError) and one that ends later is reported
    as a success whatever its exit code."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """Run one step's container (kfp.local's DockerTaskHandler calls this), print its output
    line by line and return its exit code; the container is removed in any case."""
    import codecs

    import docker
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    image = add_latest_tag_if_not_present(image)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        client.images.pull(image)
    container = client.containers.run(image=image, command=command, detach=True, stdout=True,
                                      stderr=True, volumes=volumes, **run_args)
    try:
        decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        for chunk in container.logs(stream=True, follow=True):
            *lines, pending = (pending + decoder.decode(chunk)).split("\n")
            for line in lines:
                print(line)
        if rest := pending + decoder.decode(b"", final=True):
            print(rest)
        return int(container.wait()["StatusCode"])
    finally:
        try:
            container.remove(force=True)
        except docker.errors.DockerException:
            pass


def check_docker(image: str) -> None:
    """A container engine answers and `image` is on it (pulled here if not): else one line."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        raise UserError(
            f"--runner docker: no container engine answers at {where} ({_first_line(e)}); start "
            "Docker, or podman's service and DOCKER_HOST (docs/running.md)") from None
    try:
        if ":" not in image.rsplit("/", 1)[-1]:
            image += ":latest"  # what kfp.local does
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            try:
                client.images.pull(image)
            except docker.errors.DockerException as e:
                raise UserError(
                    f"--runner docker: image {image} is not on this machine and cannot be "
                    f"pulled ({_first_line(e)}); build it with `images/build.sh --local`, or "
                    "pass --image") from None
    finally:
        client.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def expected_outputs(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Step (task folder name) -> the files it must leave, for variants `names`, in
    pipeline order."""
    steps = {}
    for pattern, files in STEP_OUTPUTS.items():
        for name in (names if "{name}" in pattern else [None]):
            steps[pattern.format(name=name)] = (*files, EXECUTOR_OUTPUT)
    return steps


def step_logs(log_text: str) -> dict[str, list[str]]:
    """Each step's lines in a run's log (kfp.local's "Executing task" line starts a step),
    in the order the steps started; ANSI colours and kfp's indentation removed."""
    steps: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for raw in log_text.splitlines():
        line = ANSI.sub("", raw).strip()
        if (m := STARTED.search(line)) and not BAR.match(line):
            lines = steps.setdefault(m.group(1), [])
        elif lines is not None and line:
            lines.append(line)
    return steps


def last_error(lines: Sequence[str]) -> str | None:
    """A step's own one-line error: its last traceback or `error:` line, or None."""
    for line in reversed(lines):
        if m := ERROR_LINE.match(line):
            return m.group("cli") or f"{m.group('exc')}: {m.group('msg')}"
    return None


def failed_step(run_dir: Path, names: Sequence[str], log_text: str) -> str | None:
    """One line naming the first step (in the order they ran) that lacks a file it must
    leave in `run_dir`, with its own error line; None if every step left all of them."""
    expected = expected_outputs(names)
    logs = step_logs(log_text)
    order = [s for s in logs if s in expected] + [s for s in expected if s not in logs]
    for step in order:
        task = run_dir / step
        missing = [f for f in expected[step] if not _nonempty(task / f)]
        if not missing:
            continue
        if step not in logs:
            return f"step {step} did not run (no {missing[0]} in {task})"
        error = last_error(logs[step])
        return f"step {step} failed: " + (error or f"it left no {missing[0]} in {task}")
    return None


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _run_dirs(root: Path) -> set[Path]:
    return {p for p in root.glob("vnca-*") if p.is_dir()}


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
    cache: bool = True,
) -> Path:
    """Run prepare-data, train and evaluate per variant, and the report; return report.html.

    The terminal shows one line per step and its progress (`vnca_pipeline.console`); everything
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

    image = image or default_image("local")
    pipeline_func = build_pipeline(
        target="local", image=image, configs=configs, tier=tier, overrides=overrides
    )
    names = [v.name for v in load_variants(configs, tier, overrides)]
    # Every step's process (a child of this one, or a container) gets the cache settings.
    # Step outputs are never reused (kfp.local's own cache stays off, below: each run is a
    # folder of its own, which the checks after the run read); `cache=False` (--no-cache)
    # also keeps the steps from reading or writing compiled programs in ROOT/.jax-cache.
    cache_env = ({"JAX_COMPILATION_CACHE_DIR": str(root / JAX_CACHE),
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"} if cache
                 else {"JAX_ENABLE_COMPILATION_CACHE": "false"})
    # Containers see the root; a raw-data folder elsewhere is mounted too (read-only).
    mounts = [raw_dir] if data_source == "raw" and not raw_dir.is_relative_to(root) else []
    kfp_runner = _runner(runner, mounts=mounts, environment=cache_env)
    if runner == "docker":
        check_docker(image)
    root.mkdir(parents=True, exist_ok=True)
    runs_before = _run_dirs(root)

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
    print(f"watch training: tensorboard --logdir {root}  (pip install tensorboard)",
          file=terminal, flush=True)
    with open(log_path, "w") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfp's image-name and deprecation warnings
        console = StepConsole(terminal, log, verbose)
        run, failure = None, None
        try:
            with contextlib.redirect_stdout(console), _environment(cache_env), \
                    (_container_exit_codes() if runner == "docker" else contextlib.nullcontext()):
                run = pipeline_func(data_source=data_source, raw_dir=str(raw_dir or ""),
                                    download=False, tfds_dir="")
        # kfp raises RuntimeError for a step it saw fail, ValueError or KeyError when a step
        # it took for a success left no outputs for the next one.
        except (RuntimeError, ValueError, KeyError) as e:
            failure = e
    new_runs = sorted(_run_dirs(root) - runs_before)
    if new_runs:
        problem = failed_step(new_runs[-1], names, log_path.read_text(errors="replace"))
        if problem:
            raise UserError(f"{problem} (full log: {log_path})")
    if failure is not None:
        text = ANSI.sub("", str(failure)).strip()  # kfp colours its messages
        first = text.splitlines()[0] if text else type(failure).__name__
        if isinstance(failure, RuntimeError) and "finished with status" in first:
            raise UserError(f"{first} (its last lines are above; full log: {log_path})")
        raise failure
    report = Path(run.output.path) / artifacts.REPORT_HTML
    if not report.is_file():
        raise UserError(f"the pipeline finished but {report} is missing")
    run_dir = report.parent.parent.parent
    shutil.copyfile(log_path, run_dir / "run.log")
    log_path.unlink()
    print_summary(terminal, run_dir, console.times, time.perf_counter() - t_start)
    print(f"\nTensorBoard event files: {run_dir}/train-*/model/events.out.tfevents.*",
          file=terminal)
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
        m = contracts.EvalMetrics.read(path)  # every step's outputs were checked already
        rows.append((m.name, m.iwelbo.k, m.iwelbo.mean_nats, m.iwelbo.stderr_nats,
                     m.untrained.mean_nats if m.untrained else None,
                     m.reconstruction.accuracy if m.reconstruction else None,
                     m.classifier.test_accuracy))
    if rows:
        print("\nheadline numbers (test split):", file=out)
        print(f"  {'variant':<14} {'IW bound (nats)':>18} {'untrained':>10} "
              f"{'recon. accuracy':>16}", file=out)
        for name, k, mean, se, untrained, acc, clf in rows:
            bound = "—" if mean is None else f"{mean:.1f}" + ("" if se is None else f" ± {se:.1f}")
            print(f"  {name:<14} {bound:>18} {_num(untrained, '.1f'):>10} "
                  f"{_num(acc, '.1%'):>16}", file=out)
        clf = next((r[6] for r in rows if r[6] is not None), None)
        k = rows[0][1]
        print(f"  (K = {k}; reconstructions labelled by a digit classifier that is "
              f"{_num(clf, '.1%')} accurate on the real test images)", file=out)


def _num(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)
