"""A preempted train step: Vertex AI restarts a TPU custom job with the same output location, so
the train component, killed (SIGKILL, as a preempted VM dies) after its first checkpoint and run
again on the same Model artifact, must resume from its own checkpoint and end with the
parameters of a run that was never stopped. Run on a local artifact and on a `gs://` artifact,
which KFP maps to `/gcs/BUCKET/...` (on Vertex AI a Cloud Storage FUSE mount; here a local
directory at that path, made for the test)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kfp.dsl import Dataset, Metrics, Model

from vnca import artifacts, train
from vnca_pipeline.components.train import train as train_op
from vnca_pipeline.variants import config_text

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
FAST = ("train.checkpoint_every=2", "train.log_every=2", "train.val_every=0",
        "train.batch_size=4", "train.pool.size=8", f"train.steps={STEPS}")
RUN_COMPONENT = (
    "import sys; from kfp.dsl import Dataset, Metrics, Model; "
    "from vnca_pipeline.components.train import train as train_op; "
    "train_op.python_func(config=sys.argv[1], data=Dataset(uri=sys.argv[2]), "
    "model=Model(uri=sys.argv[3]), metrics=Metrics(uri=sys.argv[3] + '-metrics'))")


def _ckpts(out: Path) -> list[int]:
    d = out / artifacts.CHECKPOINTS
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture
def model_uri(request, tmp_path):
    """A Model artifact's URI and the local path the component writes it to."""
    if request.param == "local":
        path = tmp_path / "model"
        yield str(path), path
        return
    bucket = f"vnca-test-{uuid.uuid4().hex[:8]}"
    try:
        Path("/gcs", bucket).mkdir(parents=True)
    except OSError as e:
        pytest.skip(f"cannot make /gcs/{bucket} to stand for the Cloud Storage mount: {e}")
    try:
        uri = f"gs://{bucket}/pipeline/train-nondoubling/model"
        path = Path("/gcs", bucket, "pipeline/train-nondoubling/model")
        assert Model(uri=uri).path == str(path)  # KFP's own mapping of gs:// to the mount
        yield uri, path
    finally:
        shutil.rmtree(Path("/gcs", bucket), ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("model_uri", ["local", "gcs"], indirect=True)
def test_a_killed_train_step_resumes_from_its_own_checkpoint(tmp_path, model_uri, smoke_cfg,
                                                             make_dataset):
    uri, path = model_uri
    data = make_dataset(tmp_path / "data")
    cfg = smoke_cfg("nondoubling", *FAST)
    train.train_and_evaluate(cfg, data, tmp_path / "straight")

    proc = subprocess.Popen([sys.executable, "-c", RUN_COMPONENT, config_text(cfg), str(data),
                             uri], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not _ckpts(path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # a preempted VM: no signal handler runs
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    at_kill = _ckpts(path)
    assert at_kill and max(at_kill) < STEPS and not (path / artifacts.PARAMS).exists()

    model = Model(uri=uri)  # the restarted job: the same output location
    metrics = Metrics(uri=f"{uri}-metrics")
    train_op.python_func(config=config_text(cfg), data=Dataset(uri=str(data)), model=model,
                         metrics=metrics)
    summary = json.loads((path / artifacts.TRAIN_SUMMARY).read_text())
    assert summary["resumed_from_step"] == max(at_kill) >= 2
    assert model.metadata["steps"] == STEPS
    assert ((path / artifacts.PARAMS).read_bytes()
            == (tmp_path / "straight" / artifacts.PARAMS).read_bytes())
