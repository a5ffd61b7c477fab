#!/usr/bin/env bash
# Build the pipeline's images with docker or podman.
#
#   images/build.sh --local            the CPU image under the name `vnca run-local --runner
#                                      docker` uses by default (components/images.py); no push
#   images/build.sh REGISTRY [TAG]     the CPU, TPU and CUDA images, pushed to REGISTRY, and the
#                                      Vertex AI pipelines compiled against the pushed tags
#   images/build.sh --freeze           rewrite images/constraints.txt from the project's .venv
#
#   REGISTRY  an Artifact Registry Docker repository, e.g.
#             us-central1-docker.pkg.dev/MY_PROJECT/vnca  (create it once with
#             `gcloud artifacts repositories create vnca --repository-format=docker
#              --location=us-central1` and `gcloud auth configure-docker us-central1-docker.pkg.dev`)
#   TAG       default: the short git commit, with "-dirty" if the working tree has changes
#
# Environment:
#   ENGINE=docker|podman   default: podman if installed, else docker
#   BASE_IMAGE=IMAGE       the Python base (default python:3.11.7-slim-bookworm, pulled); on a
#                          machine without a registry, build one with images/build_base.sh
#   CA_BUNDLE=FILE         CA bundle (PEM) for pip inside the build, when PyPI is reached
#                          through a TLS-inspecting proxy (e.g. /etc/ssl/certs/ca-certificates.crt
#                          on Debian); passed as the build secret `pip_ca`, not kept in the image
#   ACCELS="cpu tpu cuda"  the flavours to build;  PUSH=0  build only, no push or compile
#   EXTRAS="tfds"          extra dependency groups (see images/Dockerfile)
#
# Writes build/pipeline-vertex-tpu.yaml and build/pipeline-vertex-gpu.yaml (the committed
# pipeline.yaml keeps the default image of components/images.py) and prints the submit command.
set -euo pipefail
cd "$(dirname "$0")/.."
source images/engine.sh

if [[ "${1:-}" == "--freeze" ]]; then
    {
        echo "# Versions of every third-party package, as resolved and tested in the project's venv."
        echo "# images/Dockerfile installs with these as pip constraints (-c)."
        echo "# Regenerate after a dependency change: images/build.sh --freeze"
        .venv/bin/pip freeze --exclude-editable --disable-pip-version-check
    } > images/constraints.txt.tmp
    mv images/constraints.txt.tmp images/constraints.txt
    echo "wrote images/constraints.txt"
    exit 0
fi

engine="$(pick_engine)"
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
dirty=""
git diff --quiet HEAD -- 2>/dev/null || dirty="-dirty"

build_args=(-f images/Dockerfile --build-arg GIT_COMMIT="${commit}${dirty}"
            --build-arg EXTRAS="${EXTRAS:-}")
[[ -n "${BASE_IMAGE:-}" ]] && build_args+=(--build-arg PYTHON_IMAGE="${BASE_IMAGE}")
if [[ -n "${CA_BUNDLE:-}" ]]; then
    [[ -s "$CA_BUNDLE" ]] || die "CA_BUNDLE=$CA_BUNDLE: not a readable, non-empty file"
    build_args+=(--secret "id=pip_ca,src=${CA_BUNDLE}")
fi
if [[ "$engine" == podman ]]; then
    # podman does not look for <Dockerfile>.dockerignore by itself (BuildKit does).
    build_args+=(--ignorefile images/Dockerfile.dockerignore)
fi
export DOCKER_BUILDKIT=1   # RUN --mount (the CA secret, the wheel stage) needs BuildKit

build() {  # build IMAGE ACCEL
    local image="$1" accel="$2" t0=$SECONDS
    echo "== ${engine} build ${image} (ACCEL=${accel}${BASE_IMAGE:+, base ${BASE_IMAGE}})"
    "$engine" build "${build_args[@]}" --build-arg ACCEL="${accel}" -t "${image}" .
    local size
    size="$("$engine" image inspect --format '{{.Size}}' "$image")"
    echo "== built ${image} in $((SECONDS - t0)) s, $((size / 1000000)) MB (layers: ${engine} history ${image})"
}

if [[ "${1:-}" == "--local" ]]; then
    image="${IMAGE:-$(default_cpu_image)}" \
        || die "cannot read the default image name from components/images.py"
    build "$image" cpu
    exit 0
fi

registry="${1:?usage: images/build.sh --local | REGISTRY [TAG] | --freeze}"
registry="${registry%/}"
tag="${2:-$(git rev-parse --short=12 HEAD)${dirty}}"
accels="${ACCELS:-cpu tpu cuda}"
vnca="${VNCA:-vnca}"
command -v "$vnca" >/dev/null || vnca=".venv/bin/vnca"

for accel in $accels; do
    image="${registry}/vnca-python-${accel}:${tag}"
    build "$image" "$accel"
    if [[ "${PUSH:-1}" != "0" ]]; then
        "$engine" push "${image}"
    fi
done

if [[ "${PUSH:-1}" == "0" ]]; then
    echo "built (not pushed): ${registry}/vnca-python-{$(echo $accels | tr ' ' ',')}:${tag}"
    exit 0
fi

mkdir -p build
for target in vertex-tpu vertex-gpu; do
    accel=tpu
    [[ "$target" == vertex-gpu ]] && accel=cuda
    case " $accels " in *" $accel "*) ;; *) continue ;; esac
    "$vnca" compile --target "$target" --image "${registry}/vnca-python-${accel}:${tag}" \
        --output "build/pipeline-${target}.yaml"
done

echo
echo "submit with:"
echo "  vnca submit --project PROJECT --region REGION --pipeline-root gs://BUCKET/vnca \\"
echo "      --service-account SA --target vertex-tpu --image ${registry}/vnca-python-tpu:${tag}"
