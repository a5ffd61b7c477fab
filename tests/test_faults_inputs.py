"""Bad inputs to `vnca prepare-data`, `vnca evaluate` and `vnca report`, through the real CLI.

Every case must end with exit status 2 and exactly one line on stderr, `vnca CMD: error: ...`,
never a traceback: nonexistent paths, a file where a directory is expected, empty directories,
truncated, zeroed and malformed artifacts (dataset.npz, params.msgpack, config.yaml,
digit_classifier.npz, metrics.json, summary.json, metrics.jsonl, match_report.json), an --out
that is a file, under a file, empty, too long, read-only or full. Read-only and full disks are
small tmpfs mounts, so those cases need root (they are skipped with the reason otherwise).

The inputs are made here in seconds by fixtures of tests/conftest.py: a synthetic 40-image
dataset, a smoke-config model with random parameters and report inputs; none of the cases
trains or evaluates anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vnca import artifacts
from vnca.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_eval_dataset, make_model_dir, report_inputs) -> dict:
    root = tmp_path_factory.mktemp("faults")
    make_eval_dataset(root / "data")
    from vnca.data import load_split
    from vnca.evaluation import classifier

    x, y = load_split(root / "data", "train")
    classifier.fit(x, y, seed=0).save(root / "data" / artifacts.DIGIT_CLASSIFIER)
    (root / "afile").write_text("not a directory\n")
    (root / "empty").mkdir()
    return {"root": root, "data": root / "data",
            "model": make_model_dir(root / "model", "doubling"),
            "report": report_inputs.make(root / "report"), "afile": root / "afile",
            "empty": root / "empty"}


def _variant_dirs(dirs: dict, key: str, name: str) -> dict:
    return {json.loads((d / name).read_text())["variant"]: d for d in dirs[key]}


# -- building blocks: each returns a path made under tmp from the module's good inputs ---------


def _copy_with(src: Path, dst: Path, files: tuple, name: str, content) -> Path:
    """`dst`: the files of `src` (links), with file `name` replaced (bytes, a function of the
    good bytes, or "DIR" for a directory in its place)."""
    dst.mkdir()
    for f in files:
        os.symlink(src / f, dst / f)
    _replace(dst / name, content)
    return dst


def model_with(inp, tmp: Path, name: str, content) -> Path:
    return _copy_with(inp["model"], tmp / "model", (artifacts.RESOLVED_CONFIG, artifacts.PARAMS),
                      name, content)


def data_with(inp, tmp: Path, name: str, content) -> Path:
    return _copy_with(inp["data"], tmp / "data", (artifacts.DATASET, artifacts.DIGIT_CLASSIFIER),
                      name, content)


def _replace(path: Path, content) -> None:
    good = path.read_bytes()
    path.unlink()
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content(good) if callable(content) else content)


def dataset_edit(key: str, fn):
    def edit(good: bytes) -> bytes:
        import io

        with np.load(io.BytesIO(good)) as npz:
            arrays = dict(npz)
        arrays[key] = fn(arrays[key])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    return edit


def half(good: bytes) -> bytes:
    return good[: len(good) // 2]


def zeros(good: bytes) -> bytes:
    return bytes(len(good))


def json_edit(edit):
    """A JSON artifact's good bytes with `edit` (a function changing the object) applied."""
    def apply(good: bytes) -> bytes:
        data = json.loads(good)
        edit(data)
        return json.dumps(data).encode()
    return apply


def second_line(line: bytes):
    """A JSON-lines file's good bytes with `line` put in as its second line."""
    def apply(good: bytes) -> bytes:
        first, *rest = good.splitlines(keepends=True)
        return first + line + b"\n" + b"".join(rest)
    return apply


def report_args(inp, tmp: Path, *, evals=None, trains=None, data=None, out=None) -> list:
    r = inp["report"]
    return ["report", "--evals", *map(str, evals or r["evals"]),
            "--train", *map(str, trains or r["trains"]), "--data", str(data or r["data"]),
            "--out", str(tmp / "report" if out is None else out)]


def report_with(inp, tmp: Path, kind: str, variant: str, name: str, content) -> list:
    """Report arguments with one variant's eval or train directory copied and one file in it
    replaced."""
    key, marker = (("evals", artifacts.EVAL_METRICS) if kind == "eval"
                   else ("trains", artifacts.TRAIN_SUMMARY))
    dirs = list(inp["report"][key])
    src = _variant_dirs(inp["report"], key, marker)[variant]
    copy = tmp / f"{kind}-{variant}"
    shutil.copytree(src, copy)
    _replace(copy / name, content)
    dirs[dirs.index(src)] = copy
    return report_args(inp, tmp, **{key: dirs})


def evaluate_args(inp, tmp: Path, *, model=None, data=None, out=None) -> list:
    return ["evaluate", "--model", str(model or inp["model"]), "--data", str(data or inp["data"]),
            "--out", str(tmp / "eval" if out is None else out)]


def prepare_args(tmp: Path, *args, out=None) -> list:
    return ["prepare-data", *args, "--out", str(tmp / "prepared" if out is None else out)]


# -- the cases: id -> (function of (inputs, tmp) giving argv, text the error line must hold) ---

LONG = "x" * 300  # one path component over NAME_MAX

CASES = {
    # prepare-data
    "prepare/raw-dir-missing": (lambda i, t: prepare_args(
        t, "--source", "raw", "--raw-dir", str(t / "nope")), "raw data directory not found"),
    "prepare/raw-dir-is-file": (lambda i, t: prepare_args(
        t, "--source", "raw", "--raw-dir", str(i["afile"])), "raw data directory not found"),
    "prepare/raw-dir-empty": (lambda i, t: prepare_args(
        t, "--source", "raw", "--raw-dir", str(i["empty"])), "file not found"),
    "prepare/raw-without-dir": (lambda i, t: prepare_args(t, "--source", "raw"), "--raw-dir"),
    "prepare/out-is-file": (lambda i, t: prepare_args(t, out=i["afile"]), "not a directory"),
    "prepare/out-under-file": (lambda i, t: prepare_args(t, out=i["afile"] / "sub"),
                               "not a directory"),
    "prepare/out-empty": (lambda i, t: prepare_args(t, out=""), "--out is empty"),
    "prepare/out-name-too-long": (lambda i, t: prepare_args(t, out=t / LONG), "too long"),
    # evaluate: the model directory
    "evaluate/model-missing": (lambda i, t: evaluate_args(i, t, model=t / "nope"), "not found"),
    "evaluate/model-is-file": (lambda i, t: evaluate_args(i, t, model=i["afile"]), "not found"),
    "evaluate/model-empty": (lambda i, t: evaluate_args(i, t, model=i["empty"]),
                             "config.yaml: missing"),
    "evaluate/params-truncated": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.PARAMS, half)), "corrupt or truncated"),
    "evaluate/params-zeroed": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.PARAMS, zeros)), "corrupt or truncated"),
    "evaluate/params-empty": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.PARAMS, b"")), "corrupt or truncated"),
    "evaluate/params-is-dir": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.PARAMS, "DIR")), "params.msgpack: missing"),
    "evaluate/config-not-utf8": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.RESOLVED_CONFIG, b"\xff\xfe\x00model: 1")),
        "config.yaml: cannot read"),
    "evaluate/config-empty": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.RESOLVED_CONFIG, b"")), "config.yaml"),
    "evaluate/config-bad-yaml": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.RESOLVED_CONFIG, b"model: [\n")), "config.yaml"),
    "evaluate/config-a-list": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.RESOLVED_CONFIG, b"- 1\n")), "config.yaml"),
    "evaluate/config-is-dir": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.RESOLVED_CONFIG, "DIR")), "config.yaml"),
    "evaluate/config-truncated": (lambda i, t: evaluate_args(
        i, t, model=model_with(i, t, artifacts.RESOLVED_CONFIG, half)), "config.yaml"),
    # evaluate: the data directory
    "evaluate/data-missing": (lambda i, t: evaluate_args(i, t, data=t / "nope"),
                              "dataset not found"),
    "evaluate/data-is-file": (lambda i, t: evaluate_args(i, t, data=i["afile"]),
                              "dataset not found"),
    "evaluate/data-empty": (lambda i, t: evaluate_args(i, t, data=i["empty"]),
                            "dataset not found"),
    "evaluate/dataset-truncated": (lambda i, t: evaluate_args(
        i, t, data=data_with(i, t, artifacts.DATASET, half)), "unreadable or corrupt"),
    "evaluate/dataset-zeroed": (lambda i, t: evaluate_args(
        i, t, data=data_with(i, t, artifacts.DATASET, zeros)), "unreadable or corrupt"),
    "evaluate/dataset-labels-negative": (lambda i, t: evaluate_args(i, t, data=data_with(
        i, t, artifacts.DATASET, dataset_edit("test_y", lambda y: y - 1))), "test_y has label"),
    "evaluate/dataset-labels-42": (lambda i, t: evaluate_args(i, t, data=data_with(
        i, t, artifacts.DATASET, dataset_edit("test_y", lambda y: y + 42))), "test_y has label"),
    "evaluate/dataset-index-float": (lambda i, t: evaluate_args(i, t, data=data_with(
        i, t, artifacts.DATASET, dataset_edit("test_mnist_index", lambda a: a * 1.0))),
        "test_mnist_index must be integers"),
    "evaluate/classifier-not-zip": (lambda i, t: evaluate_args(
        i, t, data=data_with(i, t, artifacts.DIGIT_CLASSIFIER, b"PK\x03\x04junk")),
        "unreadable or corrupt digit classifier"),
    "evaluate/classifier-truncated": (lambda i, t: evaluate_args(
        i, t, data=data_with(i, t, artifacts.DIGIT_CLASSIFIER, half)),
        "unreadable or corrupt digit classifier"),
    # evaluate: --out
    "evaluate/out-is-file": (lambda i, t: evaluate_args(i, t, out=i["afile"]),
                             "not a directory"),
    "evaluate/out-under-file": (lambda i, t: evaluate_args(i, t, out=i["afile"] / "x"),
                                "not a directory"),
    "evaluate/out-name-too-long": (lambda i, t: evaluate_args(i, t, out=t / LONG), "too long"),
    # report
    "report/evals-missing": (lambda i, t: report_args(i, t, evals=[t / "nope"]), "not found"),
    "report/evals-is-file": (lambda i, t: report_args(i, t, evals=[i["afile"]]), "not found"),
    "report/evals-empty": (lambda i, t: report_args(i, t, evals=[i["empty"]]), "missing file"),
    "report/train-missing": (lambda i, t: report_args(i, t, trains=[t / "nope"]), "not found"),
    "report/train-is-file": (lambda i, t: report_args(i, t, trains=[i["afile"]]), "not found"),
    "report/train-empty": (lambda i, t: report_args(i, t, trains=[i["empty"]]), "missing file"),
    "report/data-missing": (lambda i, t: report_args(i, t, data=t / "nope"), "not found"),
    "report/data-is-file": (lambda i, t: report_args(i, t, data=i["afile"]), "not found"),
    "report/data-empty": (lambda i, t: report_args(i, t, data=i["empty"]), "missing file"),
    "report/eval-dir-as-train": (lambda i, t: report_args(
        i, t, trains=i["report"]["evals"]), "missing file"),
    "report/unpairable": (lambda i, t: report_args(
        i, t, evals=[_variant_dirs(i["report"], "evals", artifacts.EVAL_METRICS)["baseline"]],
        trains=[_variant_dirs(i["report"], "trains", artifacts.TRAIN_SUMMARY)["doubling"]]),
        "cannot pair"),
    "report/metrics-truncated": (lambda i, t: report_with(
        i, t, "eval", "doubling", artifacts.EVAL_METRICS, half), "not valid JSON"),
    "report/metrics-not-utf8": (lambda i, t: report_with(
        i, t, "eval", "doubling", artifacts.EVAL_METRICS, b"\xff{}"), "cannot read"),
    "report/metrics-no-bound": (lambda i, t: report_with(
        i, t, "eval", "doubling", artifacts.EVAL_METRICS, json_edit(lambda d: d.pop("iwelbo"))),
        "missing 'iwelbo'"),
    "report/metrics-null-bound": (lambda i, t: report_with(
        i, t, "eval", "doubling", artifacts.EVAL_METRICS,
        json_edit(lambda d: d["iwelbo"].update(mean_nats=None))),
        "'iwelbo.mean_nats' must be a finite number"),
    "report/metrics-zeroed": (lambda i, t: report_with(
        i, t, "eval", "nondoubling", artifacts.EVAL_METRICS, zeros), "not valid JSON"),
    "report/summary-truncated": (lambda i, t: report_with(
        i, t, "train", "baseline", artifacts.TRAIN_SUMMARY, half), "not valid JSON"),
    "report/summary-steps-string": (lambda i, t: report_with(
        i, t, "train", "baseline", artifacts.TRAIN_SUMMARY,
        json_edit(lambda d: d.update(steps="10"))), "'steps' must be"),
    "report/jsonl-bad-line": (lambda i, t: report_with(
        i, t, "train", "baseline", artifacts.TRAIN_METRICS, second_line(b"[1]")),
        "line 2"),
    "report/train-config-not-utf8": (lambda i, t: report_with(
        i, t, "train", "baseline", artifacts.RESOLVED_CONFIG, b"\xff\xfe"), "cannot read"),
    "report/match-report-list": (lambda i, t: report_args(
        i, t, data=data_dir_copy(i, t, artifacts.MATCH_REPORT, b"[]")), "expected a JSON object"),
    "report/out-is-file": (lambda i, t: report_args(i, t, out=i["afile"]), "not a directory"),
    "report/out-under-file": (lambda i, t: report_args(i, t, out=i["afile"] / "x"),
                              "not a directory"),
    "report/out-name-too-long": (lambda i, t: report_args(i, t, out=t / LONG), "too long"),
}


def data_dir_copy(inp, tmp: Path, name: str, content) -> Path:
    copy = tmp / "report-data"
    shutil.copytree(inp["report"]["data"], copy)
    _replace(copy / name, content)
    return copy


def assert_one_line_error(rc: int, err: str, command: str, needle: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vnca {command}: error: "), err
    assert needle in lines[0], err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, inputs, tmp_path, capsys):
    build, needle = CASES[case]
    argv = build(inputs, tmp_path)
    rc = main(argv)
    assert_one_line_error(rc, capsys.readouterr().err, argv[0], needle)
    assert not (tmp_path / "eval" / artifacts.EVAL_METRICS).exists()
    assert not (tmp_path / "report" / artifacts.REPORT_HTML).exists()


def test_good_inputs_pass_and_optional_files_are_tolerated(inputs, tmp_path, capsys):
    """The cases' inputs are otherwise good: the report builds from them, also when an
    optional file (arrays.npz, a figure) is corrupt: the report says what is missing."""
    assert main(report_args(inputs, tmp_path)) == 0
    assert (tmp_path / "report" / artifacts.REPORT_HTML).is_file()
    argv = report_with(inputs, tmp_path, "eval", "nondoubling", artifacts.EVAL_ARRAYS, half)
    argv[argv.index("--out") + 1] = str(tmp_path / "tolerant")
    evals = argv[argv.index("--evals") + 1: argv.index("--train")]
    copy = next(Path(e) for e in evals if Path(e).parent == tmp_path)
    (copy / "growth.png").write_bytes((copy / "growth.png").read_bytes()[:20])  # truncated
    assert main(argv) == 0, capsys.readouterr().err
    html = (tmp_path / "tolerant" / artifacts.REPORT_HTML).read_text()
    assert "truncated PNG file" in html


@pytest.mark.parametrize("case", ["evaluate/params-truncated", "report/unpairable"])
def test_real_process(case, inputs, tmp_path):
    """The same through a real `python -m vnca.cli` process: its status and its stderr."""
    build, needle = CASES[case]
    argv = build(inputs, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vnca.cli", *argv], capture_output=True,
                          text=True, timeout=120, check=False)
    assert_one_line_error(proc.returncode, proc.stderr, argv[0], needle)


# -- read-only and full disks: tmpfs mounts (root only) ---------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.parametrize("command", ["prepare-data", "evaluate", "report"])
def test_read_only_out(command, inputs, tmp_path, tmpfs, capsys):
    ro = tmpfs("ro,size=1m")
    make = {"prepare-data": lambda out: prepare_args(tmp_path, out=out),
            "evaluate": lambda out: evaluate_args(inputs, tmp_path, out=out),
            "report": lambda out: report_args(inputs, tmp_path, out=out)}[command]
    for out in (ro, ro / "sub"):
        rc = main(make(out))
        line = assert_one_line_error(rc, capsys.readouterr().err, command, "cannot write --out")
        assert str(out) in line


def test_full_disk_out_for_report(inputs, tmp_path, tmpfs, capsys):
    full = tmpfs("size=64k")
    rc = main(report_args(inputs, tmp_path, out=full / "report"))
    assert_one_line_error(rc, capsys.readouterr().err, "report", "No space left on device")
    assert not (full / "report" / artifacts.REPORT_HTML).exists()
