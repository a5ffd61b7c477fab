"""The pipeline's image and `vnca run-local --runner docker` in real containers.

These need a container engine that speaks the Docker API (Docker, or podman's
`podman system service`, with DOCKER_HOST pointing at it) and the CPU image (`images/build.sh
--local`, or VNCA_IMAGE=NAME). Without them they are skipped, and so they are in the main test
run; CI's container stage (images/ci_containers.sh) builds the image, starts the engine and runs
them with VNCA_REQUIRE_CONTAINERS=1, which turns every skip into a failure. With
VNCA_CONTAINER_RUN=ROOT, the pipeline test checks the run that stage made under ROOT
(`vnca run-local --runner docker --smoke --root ROOT`) instead of running its own.
"""

import os
from pathlib import Path

import pytest

from vnca_pipeline import cli
from vnca_pipeline.components.images import default_image

IMAGE = os.environ.get("VNCA_IMAGE") or default_image("local")
REQUIRED = os.environ.get("VNCA_REQUIRE_CONTAINERS") == "1"
FAST = ["train.steps=3", "train.log_every=1", "train.val_every=3", "eval.probe_steps=10"]


def _unavailable(why: str):
    (pytest.fail if REQUIRED else pytest.skip)(why)


@pytest.fixture(scope="module")
def client():
    try:
        import docker
    except ImportError:
        _unavailable("the docker package is not installed (pip install docker)")
    try:
        engine = docker.from_env(timeout=20)
        engine.ping()
    except docker.errors.DockerException as e:
        _unavailable(f"no container engine answers ({str(e).splitlines()[0]})")
    try:
        engine.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"image {IMAGE} not built (images/build.sh --local)")
    yield engine
    engine.close()


def test_image_runs_as_an_unprivileged_user_without_build_leftovers(client):
    image = client.images.get(IMAGE)
    assert image.attrs["Config"]["User"] == "vnca"
    assert image.labels.get("vnca.accel") == "cpu"
    assert image.labels.get("org.opencontainers.image.revision")
    # The configs are the package's own (package data), not a separate copy under /opt/vnca.
    script = ("id -u; ls -A /opt/vnca; python -c 'import vnca.cli, kfp, jax'; "
              "pip show vnca | grep -c '^Location: .*site-packages'; "
              "python -c 'from vnca import configs; print(configs.path(\"demo/doubling.yaml\"))'")
    out = client.containers.run(IMAGE, ["sh", "-c", script], remove=True).decode().split()
    assert out[:3] == ["1000", "deps", "1"], out  # no build/, no vnca.egg-info
    assert len(out) == 4 and out[3].endswith("/site-packages/vnca/configs/demo/doubling.yaml"), out


def _garbage_raw_dir(path: Path) -> Path:
    path.mkdir()
    for name in ("binarized_mnist_test.amat", "binarized_mnist_valid.amat",
                 "binarized_mnist_train.amat", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (path / name).write_text("not a raw file\n")
    return path


def test_a_failing_step_in_a_container_ends_the_run_with_its_error_line(client, tmp_path,
                                                                         capsys):
    """prepare-data fails inside its container on a bad raw file: run-local exits 2 with that
    step's own error line. The raw folder is outside --root, so the step can only read the
    file (and fail on its content, not on a missing folder) if the folder was mounted."""
    raw = _garbage_raw_dir(tmp_path / "raw")
    rc = cli.main(["run-local", "--runner", "docker", "--image", IMAGE, "--smoke",
                   "--root", str(tmp_path / "runs"), "--data-source", "raw",
                   "--raw-dir", str(raw)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1
    assert err.startswith("vnca run-local: error: step prepare-data failed: DataError: "
                          f"{raw}/binarized_mnist_test.amat: line 1 has 14 characters"), err
    assert not client.containers.list(all=True, filters={"ancestor": IMAGE})  # all removed


def test_the_smoke_pipeline_in_containers(client, tmp_path, capsys, check_smoke_run):
    root, steps = os.environ.get("VNCA_CONTAINER_RUN"), None  # CI's own run: the smoke steps
    if root:
        root = Path(root)
    else:
        steps = 3
        root = tmp_path / "runs"
        sets = [arg for item in FAST for arg in ("--set", item)]
        assert cli.main(["run-local", "--runner", "docker", "--image", IMAGE, "--smoke",
                         "--root", str(root), *sets]) == 0, capsys.readouterr().err
    check_smoke_run(root, train_steps=steps)

