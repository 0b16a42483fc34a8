#!/usr/bin/env bash
# Build a minimal Debian base image from Debian's own packages and import it into podman, for machines
# where no container registry is reachable (CI, air-gapped hospitals): mmdebstrap -> tarball -> podman import.
# The tarball is cached (LUNGMAE_IMAGE_CACHE, default ~/.cache/lungmae-image) and reused while this script
# and its package list are unchanged; the podman image is reused while it exists.
#
# Usage: deploy/image/debian-base.sh [IMAGE_NAME]      (default: localhost/lungmae-base:bookworm)
# Prints the image name on its last line.
set -euo pipefail
IMAGE=${1:-localhost/lungmae-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3-venv: the image's venv; tini: PID 1; openssl/openssh-client: certificate and key checks;
# nginx: the coordinator's mutual-TLS proxy (`lungmae server start --proxy-listen`).
PACKAGES=python3,python3-venv,ca-certificates,openssl,openssh-client,tini,nginx
CACHE=${LUNGMAE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lungmae-image}
KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" | cat - "$0" | sha256sum | cut -c1-16)
TARBALL=$CACHE/debian-$SUITE-$KEY.tar
ENGINE=${ENGINE:-podman}

if $ENGINE image exists "$IMAGE" 2>/dev/null \
   && [ "$($ENGINE image inspect --format '{{index .Labels "lungmae.base-key"}}' "$IMAGE" 2>/dev/null || true)" = "$KEY" ]; then
  echo "$IMAGE"
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ]; then
  echo "debian-base: building $TARBALL with mmdebstrap ($SUITE, $PACKAGES)" >&2
  tmp=$(mktemp "$CACHE/.debian-$SUITE.XXXXXX.tar")
  trap 'rm -f "$tmp"' EXIT
  # --variant=apt: essential packages + apt only; docs and man pages are left out of the image.
  mmdebstrap --quiet --variant=apt --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$tmp" "$MIRROR" >&2
  mv "$tmp" "$TARBALL"   # only a complete tarball gets the cached name
  trap - EXIT
fi
$ENGINE import --change 'CMD ["/bin/bash"]' --change "LABEL lungmae.base-key=$KEY" \
  --change 'ENV LANG=C.UTF-8' "$TARBALL" "$IMAGE" >&2
echo "$IMAGE"
