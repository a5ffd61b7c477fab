#!/usr/bin/env bash
# Build the CPU, TPU and CUDA images, push them to Artifact Registry, and compile the Vertex AI
# pipelines against the pushed tags.
#
#   images/build.sh REGISTRY [TAG]
#
#   REGISTRY  an Artifact Registry Docker repository, e.g.
#             us-central1-docker.pkg.dev/MY_PROJECT/vnca  (create it once with
#             `gcloud artifacts repositories create vnca --repository-format=docker
#              --location=us-central1` and `gcloud auth configure-docker us-central1-docker.pkg.dev`)
#   TAG       default: the short git commit, with "-dirty" if the working tree has changes
#
# Environment: ACCELS="cpu tpu cuda" (the flavours to build), PUSH=0 (build only, no push or
# compile), EXTRAS="tfds" (extra dependency groups, see images/Dockerfile).
#
# Writes build/pipeline-vertex-tpu.yaml and build/pipeline-vertex-gpu.yaml (the committed
# pipeline.yaml keeps the default image of components/images.py) and prints the submit command.
#
#   images/build.sh --freeze   rewrite images/constraints.txt from the project's .venv
set -euo pipefail
cd "$(dirname "$0")/.."

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

registry="${1:?usage: images/build.sh REGISTRY [TAG]   (or images/build.sh --freeze)}"
registry="${registry%/}"
commit="$(git rev-parse HEAD)"
dirty=""
git diff --quiet HEAD -- || dirty="-dirty"
tag="${2:-$(git rev-parse --short=12 HEAD)${dirty}}"
accels="${ACCELS:-cpu tpu cuda}"
vnca="${VNCA:-vnca}"
command -v "$vnca" >/dev/null || vnca=".venv/bin/vnca"

for accel in $accels; do
    image="${registry}/vnca-python-${accel}:${tag}"
    echo "== building ${image}"
    DOCKER_BUILDKIT=1 docker build \
        -f images/Dockerfile \
        --build-arg ACCEL="${accel}" \
        --build-arg EXTRAS="${EXTRAS:-}" \
        --build-arg GIT_COMMIT="${commit}${dirty}" \
        -t "${image}" .
    if [[ "${PUSH:-1}" != "0" ]]; then
        docker push "${image}"
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
