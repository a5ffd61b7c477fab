"""The configs that ship with vnca: this folder, installed as the package `vnca.configs`.

pyproject.toml maps the repository's configs/ folder to the package `vnca.configs` and installs
its YAML files (this folder's and its tier folders', e.g. demo/doubling.yaml) as package data,
and everything that needs a packaged config asks `path` here (importlib.resources), so every
kind of install finds the same files: an editable install (`pip install -e .`) reads the
checkout's configs/, a wheel, `pip install .` and the pipeline's image their own copies in
site-packages. A path a user passes (`--config my.yaml`, or `--config configs/doubling.yaml`
from the checkout) is an ordinary file path and does not come through here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vnca.errors import UserError


def directory() -> Path:
    """The folder that holds the packaged configs (the checkout's configs/ when editable)."""
    # vnca installs as files (never zipped), so the package's resources are a real folder.
    return Path(str(resources.files(__name__)))


def path(name: str) -> Path:
    """The packaged config `name`, relative to configs/ ("doubling.yaml", "demo/doubling.yaml").

    A config this installation lacks is a UserError that names it as configs/NAME and says
    where it was looked for.
    """
    file = directory() / name
    if not file.is_file():
        raise UserError(f"configs/{name}: not among the configs installed with vnca "
                        f"(looked in {directory()}); reinstall vnca")
    return file
