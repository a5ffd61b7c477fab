"""Print the image's pinned third-party requirements, one per line, from pyproject.toml.

    python images/requirements.py --accel tpu [--extras tfds] pyproject.toml

`--accel` picks the JAX flavour: cpu (plain jax), tpu (the `tpu` extra, jax[tpu] + libtpu) or
cuda (the `cuda` extra, jax[cuda12]). `--extras` adds other optional groups (comma-separated;
images/Dockerfile always passes `pipeline`, kfp). A group that names another of the project's
own groups (`vnca[pipeline]`) contributes that group's requirements instead.
Used by images/Dockerfile so the dependency layer is built from the same pins as the package.
"""

import argparse
import re
import sys
import tomllib

ACCEL_EXTRA = {"cpu": None, "tpu": "tpu", "cuda": "cuda"}


def requirements(pyproject: dict, accel: str, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    own = re.compile(rf"^{re.escape(project['name'])}\[(?P<groups>[^\]]+)\]$")
    reqs = list(project["dependencies"])
    pending, seen = [g for g in [ACCEL_EXTRA[accel], *extras] if g], set()
    while pending:
        group = pending.pop(0)
        if group in seen:
            continue
        seen.add(group)
        if group not in optional:
            sys.exit(f"requirements.py: pyproject.toml has no optional group {group!r}")
        for req in optional[group]:
            if m := own.match(req.replace(" ", "")):
                pending += [g.strip() for g in m.group("groups").split(",")]
            elif req not in reqs:
                reqs.append(req)
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
