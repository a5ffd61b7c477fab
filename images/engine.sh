# Helpers shared by the scripts in images/ (sourced, not run).

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 1
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
