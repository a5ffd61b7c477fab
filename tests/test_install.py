"""Any installed copy works, not only the editable checkout: the package built from this
checkout the way a release is (an sdist, then a wheel from the sdist) and installed
NON-editably into a fresh venv carries every config of configs/, and its `vnca compile` and
`vnca run-local --smoke` run from a folder outside the checkout with the installed configs.

The venv sees the base environment's packages (`--system-site-packages`: no download, no
registry), so its own copy of vnca must shadow the editable one installed there; the tests
check that it does. The build uses the backend the dev extra installs (pip
--no-build-isolation), so it needs no network either.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from vnca import artifacts, config
from vnca_pipeline.variants import DEFAULT_VARIANTS, config_text

ROOT = Path(__file__).resolve().parents[1]
# Everything the package is built from (what images/Dockerfile copies into its build stage).
SOURCES = ("pyproject.toml", "README.md", "src", "pipeline", "components", "configs")
# The smoke overlay, shortened further (as tests/test_run_local.py runs it).
FAST = ["train.steps=3", "train.log_every=1", "train.val_every=3", "eval.probe_steps=10"]


def _repo_configs() -> list[str]:
    return sorted(p.relative_to(ROOT / "configs").as_posix()
                  for p in (ROOT / "configs").rglob("*.yaml"))


def _run(cmd, cwd, env=None, timeout=600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


class Installed:
    """A venv holding a non-editable vnca, and a working folder outside the checkout."""

    def __init__(self, base: Path):
        self.base = base
        self.venv = base / "venv"
        self.python = self.venv / "bin" / "python"
        self.vnca = self.venv / "bin" / "vnca"
        self.cwd = base / "elsewhere"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

    def run(self, *args, timeout=600) -> str:
        return _run(args, cwd=self.cwd, env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """Build the sdist from a copy of the checkout's sources (so that no build/ or egg-info
    lands in the checkout), the wheel from the sdist, and install the wheel into a venv."""
    base = tmp_path_factory.mktemp("install")
    src, dist = base / "src", base / "dist"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    build_sdist = ("import sys; from setuptools import build_meta; "
                   "print(build_meta.build_sdist(sys.argv[1]))")
    _run([sys.executable, "-c", build_sdist, dist], cwd=src)
    (sdist,) = dist.glob("vnca-*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--quiet", "--wheel-dir", dist, sdist], cwd=base)
    (wheel,) = dist.glob("vnca-*.whl")
    inst = Installed(base)
    inst.cwd.mkdir()
    # --without-pip: the venv runs the base environment's pip (no ensurepip needed).
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", inst.venv],
         cwd=base)
    # --ignore-installed: the base environment's editable vnca (same name and version) is
    # visible to this venv's pip and must not count as already installed (nor be uninstalled).
    inst.run(inst.python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
             "--quiet", wheel)
    inst.sdist, inst.wheel = sdist, wheel
    return inst


def test_sdist_and_wheel_carry_every_config_of_the_checkout(installed):
    with tarfile.open(installed.sdist) as tar:
        in_sdist = sorted(n.split("/configs/", 1)[1] for n in tar.getnames()
                          if "/configs/" in n and n.endswith(".yaml"))
    with zipfile.ZipFile(installed.wheel) as whl:
        in_wheel = sorted(n.removeprefix("vnca/configs/") for n in whl.namelist()
                          if n.startswith("vnca/configs/") and n.endswith(".yaml"))
    assert "demo/doubling.yaml" in _repo_configs()
    assert in_sdist == _repo_configs()
    assert in_wheel == _repo_configs(), (
        "the wheel lacks configs: see [tool.setuptools.package-data] in pyproject.toml")


def test_the_venv_imports_its_own_installed_copy_not_the_checkout(installed):
    code = ("import json, vnca, vnca.configs, vnca_pipeline\n"
            "from vnca import configs\n"
            "print(json.dumps([vnca.__file__, vnca_pipeline.__file__, str(configs.directory()),"
            " str(configs.path('demo/doubling.yaml'))]))")
    paths = [Path(p) for p in json.loads(installed.run(installed.python, "-c", code))]
    site = installed.venv / "lib"
    for path in paths:
        assert path.is_relative_to(site) and "site-packages" in path.parts, path
    assert paths[2] == paths[0].parent / "configs"
    installed_names = sorted(p.relative_to(paths[2]).as_posix() for p in paths[2].rglob("*.yaml"))
    assert installed_names == _repo_configs()


def test_compile_outside_the_checkout_bakes_in_the_installed_configs(installed):
    out = installed.run(installed.vnca, "compile", "--output", "pipeline.yaml")
    assert "compiled pipeline written to" in out
    spec = yaml.safe_load((installed.cwd / "pipeline.yaml").read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in DEFAULT_VARIANTS:
        expected = config_text(config.load([ROOT / "configs" / f"{name}.yaml"]))
        assert params[f"config_{name}"]["defaultValue"] == expected


@pytest.mark.slow
def test_run_local_smoke_outside_the_checkout(installed):
    """The installed smoke overlay on a user's own config file (the baseline, copied out of the
    checkout: one variant keeps it to four steps; compile above covers the default configs)."""
    shutil.copy2(ROOT / "configs" / "baseline.yaml", installed.cwd / "my-baseline.yaml")
    sets = [arg for item in FAST for arg in ("--set", item)]
    out = installed.run(installed.vnca, "run-local", "--smoke", "--root", "runs",
                        "--config", "my-baseline.yaml", *sets)
    report = Path(out.strip().splitlines()[-1].split("report: ", 1)[1])
    assert report.is_file() and report.name == artifacts.REPORT_HTML
    assert report.is_relative_to(installed.cwd / "runs")
    assert "baseline" in report.read_text()
    (run,) = [p for p in (installed.cwd / "runs").iterdir() if p.name.startswith("vnca-")]
    resolved = config.load([run / "train-baseline" / "model" / artifacts.RESOLVED_CONFIG])
    assert (resolved.name, resolved.smoke, resolved.train.steps) == ("baseline", True, 3)
