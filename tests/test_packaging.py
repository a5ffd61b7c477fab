"""How the project is packaged: the library (src/vnca) needs no kfp and never imports the
pipeline; the folders pipeline/ and components/ install as vnca_pipeline(.components), and
configs/ as vnca.configs (package data; tests/test_install.py checks an installed copy); kfp
and google-cloud-storage are the `pipeline` extra, and without them the commands that need
them say so in one line."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vnca.errors import UserError
from vnca_pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Packages whose folder is not under src/: the pipeline's, and the configs as package data.
MAPPED_PACKAGES = {"vnca_pipeline": "pipeline", "vnca_pipeline.components": "components",
                   "vnca.configs": "configs"}


def test_the_library_imports_no_kfp_no_gcs_and_not_the_pipeline():
    # `google.cloud` itself may be in sys.modules from the start: google-cloud-aiplatform's
    # `-nspkg.pth` file imports that (empty) namespace package at interpreter start-up.
    code = ("import sys\n"
            "import vnca, vnca.train, vnca.evaluate, vnca.report, vnca.storage, vnca.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('kfp', 'vnca_pipeline')\n"
            "       or m.startswith('google.cloud.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_no_library_module_imports_the_pipeline():
    found = []
    for path in sorted((ROOT / "src" / "vnca").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names
                      if n.split(".")[0] in ("vnca_pipeline", "pipeline", "components")]
    assert not found


def test_pyproject_installs_every_package_under_its_name():
    setuptools = PYPROJECT["tool"]["setuptools"]
    library = sorted("vnca" + ".".join(("",) + p.parent.relative_to(ROOT / "src/vnca").parts)
                     for p in (ROOT / "src" / "vnca").rglob("__init__.py"))
    assert sorted(setuptools["packages"]) == sorted(library + list(MAPPED_PACKAGES)), (
        "a package was added or removed: update [tool.setuptools] packages in pyproject.toml")
    for package, folder in MAPPED_PACKAGES.items():
        assert setuptools["package-dir"][package] == folder
        assert [p.parent for p in (ROOT / folder).rglob("__init__.py")] == [ROOT / folder]
    # Every YAML file under configs/, tier folders included, is package data.
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["vnca.configs"] == ["**/*.yaml"]
    assert PYPROJECT["project"]["scripts"] == {"vnca": "vnca_pipeline.cli:main"}


def test_the_packaged_configs_are_the_checkouts_in_an_editable_install():
    from vnca import configs
    from vnca_pipeline import variants

    assert configs.directory() == variants.CONFIG_DIR == ROOT / "configs"
    assert variants.default_config_paths() == [ROOT / "configs" / f"{n}.yaml"
                                               for n in variants.DEFAULT_VARIANTS]
    assert variants.tier_overlay("demo", "doubling") == ROOT / "configs/demo/doubling.yaml"
    assert variants.tier_overlay("smoke", "doubling") == ROOT / "configs/smoke.yaml"
    assert variants.tier_overlay("paper", "doubling") is None


def test_a_packaged_config_this_install_lacks_is_a_one_line_error_naming_it():
    from vnca import configs

    with pytest.raises(UserError) as e:
        configs.path("demo/widening.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("configs/demo/widening.yaml: not among the configs installed")
    assert str(ROOT / "configs") in str(e.value)


def test_the_dev_extra_installs_the_build_backend():
    """tests/test_install.py builds the package without build isolation (no network)."""
    backend = PYPROJECT["build-system"]["requires"]
    assert set(backend) <= set(PYPROJECT["project"]["optional-dependencies"]["dev"])


def test_kfp_and_gcs_are_the_pipeline_extra():
    names = [r.split("=")[0].split("[")[0] for r in PYPROJECT["project"]["dependencies"]]
    assert not {"kfp", "google-cloud-storage"} & set(names)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["pipeline"] == ["kfp==2.17.3", "google-cloud-storage==3.17.1"]
    assert "vnca[pipeline]" in extras["vertex"] and "vnca[pipeline,vertex]" in extras["dev"]


@pytest.mark.parametrize("argv", [["compile"], ["run-local"],
                                  ["submit", "--pipeline-root", "gs://b/x", "--dry-run"]])
def test_a_pipeline_command_without_kfp_says_which_extra_in_one_line(argv, monkeypatch,
                                                                      capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "kfp", None)  # `import kfp` raises ImportError
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vnca {argv[0]}: error: ")
    assert "pip install 'vnca[pipeline]'" in err
    assert list(tmp_path.iterdir()) == []
