#!/usr/bin/env bash
# CI's container stage: build the image and run the whole pipeline in containers, with podman.
#
#   images/ci_containers.sh          (as root, from anywhere; .ci/run calls it after the tests)
#
#   1. installs podman, runc and debootstrap (Debian packages) and the Python docker SDK;
#   2. writes podman's settings for this kind of machine (containers.conf, storage.conf) into
#      a fresh state folder outside the repository ($VNCA_CI_STATE, default
#      /var/tmp/vnca-ci-containers; removed at the start of each run);
#   3. builds the Python base image from Debian packages (images/build_base.sh; no registry is
#      needed) and the CPU image on it (images/build.sh --local), pip trusting $CA_BUNDLE;
#   4. starts `podman system service` on a socket in the state folder (stopped by its PID on
#      exit), runs `vnca run-local --runner docker --smoke` on the bundled sample, and checks
#      every step's artifacts and the report, the image itself and a failing step
#      (tests/test_containers.py with VNCA_REQUIRE_CONTAINERS=1: no skips);
#   5. prints each phase's time and the image's layers.
# Any failure ends the stage with one "ci_containers: FAILED: ..." line naming the phase.
#
# Environment: VNCA_CI_STATE (state folder), CA_BUNDLE (PEM bundle for pip inside the build;
# default: the system bundle /etc/ssl/certs/ca-certificates.crt, which holds any CA this
# machine was told to trust), MIRROR (Debian mirror for the base; default: the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

state="${VNCA_CI_STATE:-/var/tmp/vnca-ci-containers}"
base_image="localhost/vnca-python-base:3.11-bookworm"
ca_bundle="${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
phase="start"
t_stage=$SECONDS
t_phase=$SECONDS
times=()
service_pid=""

begin() {  # begin PHASE: close the previous phase's clock, print a header
    [[ "$phase" == start ]] || times+=("$(printf '  %-48s %4d s' "$phase" $((SECONDS - t_phase)))")
    phase="$1"
    t_phase=$SECONDS
    echo
    echo "== ci_containers [$(date +%H:%M:%S), +$((SECONDS - t_stage)) s]: $phase"
}

retry() {  # retry CMD...: three tries, 10 s apart (mirrors and indexes have bad minutes)
    local n
    for n in 1 2 3; do
        "$@" && return 0
        (( n < 3 )) && { echo "ci_containers: '$*' failed, retrying in 10 s" >&2; sleep 10; }
    done
    return 1
}

finish() {
    local rc=$?
    if [[ -n "$service_pid" ]] && kill -0 "$service_pid" 2>/dev/null; then
        kill "$service_pid" 2>/dev/null || true
        wait "$service_pid" 2>/dev/null || true
    fi
    if [[ $rc != 0 ]]; then
        echo "ci_containers: FAILED: ${phase} (exit status ${rc}; see the lines above${service_pid:+;" \
             "podman service log: ${state}/service.log})" >&2
    fi
    exit $rc
}
trap finish EXIT

[[ "$(id -u)" == 0 ]] || { echo "ci_containers: needs root (debootstrap, rootful podman)" >&2; exit 1; }

begin "install podman, runc, debootstrap"
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if (( ${#missing[@]} )); then
    export DEBIAN_FRONTEND=noninteractive
    retry apt-get update -qq
    retry apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null
fi
python -c "import docker" 2>/dev/null || retry python -m pip install -q "docker==7.1.0"
echo "$(podman --version), $(runc --version | head -1), debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"

begin "podman settings in ${state}"
if [[ -d "$state" ]]; then
    # A killed earlier run may have left overlay mounts under the state folder.
    awk -v s="$state/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r \
        | xargs -r -n1 umount -l
    rm -rf "$state"
fi
mkdir -p "$state"
cat > "$state/containers.conf" <<'EOF'
[containers]
# The hard RLIMIT_NOFILE here is 20000 and CAP_SYS_RESOURCE is absent: podman's default
# (raise nofile to 1048576) fails with "setrlimit RLIMIT_NOFILE: Operation not permitted".
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
# crun refuses the hybrid cgroup layout ("cgroups in hybrid mode not supported"); runc works.
runtime = "runc"
EOF
cat > "$state/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "${state}/storage"
runroot = "${state}/run"
EOF
export CONTAINERS_CONF="$state/containers.conf" CONTAINERS_STORAGE_CONF="$state/storage.conf"
export ENGINE=podman TMPDIR="$state"
podman info --format 'podman storage {{.Store.GraphDriverName}} in {{.Store.GraphRoot}}, runtime {{.Host.OCIRuntime.Name}}, cgroups {{.Host.CgroupsVersion}}'

begin "base image (debootstrap + import)"
images/build_base.sh "$base_image"

begin "CPU image (images/build.sh --local)"
if [[ -n "$ca_bundle" && ! -s "$ca_bundle" ]]; then ca_bundle=""; fi
BASE_IMAGE="$base_image" CA_BUNDLE="$ca_bundle" images/build.sh --local
image="$(python -c 'from vnca_pipeline.components.images import image_uri; print(image_uri("cpu"))')"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$image" \
    | awk -F'\t' '$1 != "0 B" { printf "  %10s  %.90s\n", $1, $2 }'

begin "podman system service"
socket="${state}/podman.sock"
podman system service --time=0 "unix://${socket}" > "${state}/service.log" 2>&1 &
service_pid=$!
export DOCKER_HOST="unix://${socket}"
for _ in $(seq 60); do
    python -c "import docker; docker.from_env(timeout=5).ping()" 2>/dev/null && break
    kill -0 "$service_pid" 2>/dev/null || { cat "${state}/service.log" >&2; exit 1; }
    sleep 0.5
done
python -c "import docker; print('Docker API', docker.from_env().version()['ApiVersion'], 'at', '${socket}')"

begin "vnca run-local --runner docker --smoke"
runs="${state}/runs"
vnca run-local --runner docker --smoke --root "$runs"

begin "check the run, the image and a failing step"
VNCA_CONTAINER_RUN="$runs" VNCA_REQUIRE_CONTAINERS=1 VNCA_IMAGE="$image" \
    python -m pytest -q -p no:cacheprovider "$repo/tests/test_containers.py"

begin "done"
echo "container stage times:"
printf '%s\n' "${times[@]}"
printf '  %-48s %4d s\n' "total" $((SECONDS - t_stage))
echo "image ${image}: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
