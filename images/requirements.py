"""Print the image's pinned third-party requirements, one per line, from pyproject.toml.

    python images/requirements.py --accel tpu [--extras tfds] pyproject.toml

`--accel` picks the JAX flavour: cpu (plain jax), tpu (the `tpu` extra, jax[tpu] + libtpu) or
cuda (the `cuda` extra, jax[cuda12]). `--extras` adds other optional groups (comma-separated).
Used by images/Dockerfile so the dependency layer is built from the same pins as the package.
"""

import argparse
import sys
import tomllib

ACCEL_EXTRA = {"cpu": None, "tpu": "tpu", "cuda": "cuda"}


def requirements(pyproject: dict, accel: str, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    groups = [ACCEL_EXTRA[accel]] + extras
    reqs = list(project["dependencies"])
    for group in filter(None, groups):
        if group not in optional:
            sys.exit(f"requirements.py: pyproject.toml has no optional group {group!r}")
        reqs += optional[group]
    return reqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--accel", choices=sorted(ACCEL_EXTRA), default="cpu")
    parser.add_argument("--extras", default="", help="comma-separated optional groups")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        pyproject = tomllib.load(f)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    print("\n".join(requirements(pyproject, args.accel, extras)))


if __name__ == "__main__":
    main()
