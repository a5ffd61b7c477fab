#!/usr/bin/env bash
# Build the Python base image from Debian packages, for machines that cannot pull
# `python:3.11-slim` (no registry reachable). Everyone else skips this: images/Dockerfile pulls
# python:3.11.7-slim-bookworm by default.
#
#   images/build_base.sh [IMAGE]        (as root; default IMAGE: see BASE_IMAGE below)
#
# What it does:
#   1. debootstrap --variant=minbase bookworm (python3, python3-venv, ca-certificates) into a
#      scratch folder, from the Debian mirror this machine's own apt uses (MIRROR overrides it);
#   2. `python3 -m venv /opt/python` inside it (pip from Debian's bundled wheel, offline), first
#      on PATH, as /usr/local/bin is in python:3.11-slim;
#   3. `ENGINE import` of the folder as IMAGE, then removes the folder.
# Then build the pipeline image on it:  BASE_IMAGE=IMAGE images/build.sh --local
#
# Environment: ENGINE (docker or podman; default podman if installed, else docker), MIRROR,
# SUITE (default bookworm), TMPDIR (where the scratch folder goes; about 250 MB).
# Needs: root, debootstrap (`apt-get install debootstrap`), about 2-3 minutes.
# The result has Debian's bookworm packages as of the mirror's release (no security updates
# applied): good for local and CI runs, not an image to publish.
set -euo pipefail
cd "$(dirname "$0")/.."
source images/engine.sh

image="${1:-${BASE_IMAGE:-localhost/vnca-python-base:3.11-bookworm}}"
suite="${SUITE:-bookworm}"
engine="$(pick_engine)"

[[ "$(id -u)" == 0 ]] || die "debootstrap needs root (run as root or with sudo)"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"

if [[ -z "${MIRROR:-}" ]]; then
    # The mirror of this machine's own apt sources for the suite (deb822 or one-line format).
    MIRROR="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
              | awk -v s="$suite" '$2 == s { print $1; exit }')"
    MIRROR="${MIRROR:-http://deb.debian.org/debian/}"
fi

rootfs="$(mktemp -d "${TMPDIR:-/var/tmp}/vnca-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT

echo "== debootstrap ${suite} from ${MIRROR} into ${rootfs}"
t0=$SECONDS
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$suite" "$rootfs" "$MIRROR" > "$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    die "debootstrap failed (full log: $rootfs.log); is ${MIRROR} reachable? set MIRROR=..."
fi
rm -f "$rootfs.log"

echo "== python venv in /opt/python"
chroot "$rootfs" /usr/bin/python3 -m venv /opt/python
chroot "$rootfs" /opt/python/bin/python -c "import ssl, sys, venv; print('python', sys.version.split()[0])"
# What an image does not need: package caches and indexes, docs, man pages, locales.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old

echo "== ${engine} import -> ${image}"
tar --numeric-owner -C "$rootfs" -c . | "$engine" import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
echo "built ${image} in $((SECONDS - t0)) s ($("$engine" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}'))"
