#!/usr/bin/env bash
# Build a minimal Debian bookworm image with python3, python3-venv and python3-pip, for
# machines that reach Debian's package mirror but no container registry. The Dockerfile
# accepts it as BASE_IMAGE (it creates its own venv, so the Debian python works as well as
# the official python image).
#
# Usage: sudo scripts/make-base-image.sh [IMAGE_NAME] [MIRROR]
#   IMAGE_NAME  default localhost/bookworm-python
#   MIRROR      default http://deb.debian.org/debian
# Needs: debootstrap and podman (or docker), run as root.
set -euo pipefail

image_name=${1:-localhost/bookworm-python}
mirror=${2:-http://deb.debian.org/debian}

if command -v podman >/dev/null 2>&1; then
    engine=podman
elif command -v docker >/dev/null 2>&1; then
    engine=docker
else
    echo "make-base-image: neither podman nor docker found" >&2
    exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "make-base-image: debootstrap not found (apt-get install debootstrap)" >&2
    exit 1
}

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/bookworm-rootfs.XXXXXX")
# The root file system is large and owned by root: always remove it, even on failure.
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror"

# Slim the image: package lists, apt caches and docs are not needed at run time.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/cache/apt/archives/*.deb \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

tar -C "$rootfs" -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$image_name"

echo "make-base-image: built $image_name with $engine"
