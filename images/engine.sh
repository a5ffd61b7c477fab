# Helpers shared by the scripts in images/ (sourced, not run).

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 1
}

# The name components/images.py gives the CPU image, `vnca run-local --runner docker`'s
# default (read with any python3, without importing kfp).
default_cpu_image() {
    python3 -c '
import ast
names = {}
for node in ast.parse(open("components/images.py").read()).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        try:
            names[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            pass
print(names["REGISTRY"] + "/" + names["IMAGE_NAMES"]["cpu"] + ":" + names["TAG"])
'
}

# The container engine to use: $ENGINE if set (docker or podman), else podman if installed,
# else docker. Podman builds and runs without a daemon; docker needs a reachable engine.
pick_engine() {
    local engine="${ENGINE:-}"
    if [[ -z "$engine" ]]; then
        if command -v podman >/dev/null; then engine=podman; else engine=docker; fi
    fi
    command -v "$engine" >/dev/null || die "container engine '$engine' not found (set ENGINE=docker or ENGINE=podman)"
    echo "$engine"
}
