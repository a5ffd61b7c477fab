"""The container images the pipeline's steps run in: the one place that names them.

Every step of a compiled pipeline runs in one image (`base_image`), chosen at compile time:
`vnca compile --image URI` (or `images/build.sh`, which builds, pushes and compiles with the tag
it pushed). Without `--image`, the target's default below is used. The images are built from
`images/Dockerfile` (`--build-arg ACCEL=cpu|tpu|cuda`); each already contains `vnca` with its
`pipeline` extra (kfp), so tasks never pip-install anything at run time (`install_kfp_package=False`).

The image names contain "python" on purpose: kfp.local's SubprocessRunner warns about images
whose name lacks it (the image is not used by that runner, only by Docker and Vertex AI).
"""

from kfp import dsl

# Artifact Registry repository the images are pushed to (images/build.sh REGISTRY overrides it).
REGISTRY = "us-central1-docker.pkg.dev/vnca-project/vnca"
# Tag of the default images (images/build.sh tags with the git commit instead).
TAG = "0.1.0"
# Accelerator flavour of the image (Dockerfile build argument ACCEL) -> image name.
IMAGE_NAMES = {"cpu": "vnca-python-cpu", "tpu": "vnca-python-tpu", "cuda": "vnca-python-cuda"}
# Pipeline target -> image flavour: every step of a TPU pipeline runs in the TPU image, etc.
TARGET_ACCEL = {"local": "cpu", "vertex-tpu": "tpu", "vertex-gpu": "cuda"}


def image_uri(accel: str, registry: str = REGISTRY, tag: str = TAG) -> str:
    """URI of the image with accelerator flavour `accel` ('cpu', 'tpu' or 'cuda')."""
    return f"{registry}/{IMAGE_NAMES[accel]}:{tag}"


def default_image(target: str) -> str:
    """The image a pipeline for `target` ('local', 'vertex-tpu', 'vertex-gpu') runs in."""
    return image_uri(TARGET_ACCEL[target])


# The image each component module names in its @dsl.component(base_image=...); with_image swaps it.
CPU_IMAGE = image_uri("cpu")


def with_image(component, image: str):
    """A fresh copy of `component` (a @dsl.component) that runs in `image`: the same function
    and options, the base image chosen when the pipeline is compiled (`--image`).

    No `packages_to_install` and no kfp install at task start: the image has everything.
    """
    return dsl.component(component.python_func, base_image=image, install_kfp_package=False)
