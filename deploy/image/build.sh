#!/usr/bin/env bash
# Build deploy/Dockerfile into an image (what `make image` runs). From the repository root:
#
#   deploy/image/build.sh [--if-missing]
#
# Environment: IMAGE (default lungmae:latest), BASE_IMAGE (default python:3.11-slim; "debian-local" builds and
# uses deploy/image/debian-base.sh's image), ENGINE (default podman, else docker when its daemon answers),
# PYTHON (the pip that fills the wheelhouse; default .venv/bin/python, else python3).
#
# 1. The wheelhouse .whl/ gets the CPU torch wheel (where pip finds one) and every wheel of the lock file,
#    hashes checked; when all are there the build runs with --no-index and without network.
# 2. The image is labelled with a hash of everything it is built from; with --if-missing an image carrying
#    the same hash is reused instead of rebuilt (the container test relies on this).
set -euo pipefail
cd "$(dirname "$0")/../.."
IF_MISSING=0
[ "${1:-}" = "--if-missing" ] && IF_MISSING=1
IMAGE=${IMAGE:-lungmae:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
LOCK=${LOCK:-requirements/deploy.txt}
TORCH_VERSION=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements/torch-constraint.txt)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  else echo "build.sh: neither podman nor a running docker daemon found" >&2; exit 3; fi
fi
# Hybrid (v1) cgroup hosts: crun fails there; runc with cgroupfs works (see containers.conf).
if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ ! -e /sys/fs/cgroup/cgroup.controllers ] \
   && command -v runc >/dev/null 2>&1; then
  export CONTAINERS_CONF=$PWD/deploy/image/containers.conf
fi
if [ "$BASE_IMAGE" = debian-local ]; then
  BASE_IMAGE=$(ENGINE=$ENGINE deploy/image/debian-base.sh | tail -n 1)
fi

# The hash of the inputs: Dockerfile, lock, base, and the files the image copies.
KEY=$( { echo "$BASE_IMAGE $TORCH_VERSION $LOCK"; cat deploy/Dockerfile .containerignore "$LOCK" pyproject.toml README.md;
         git ls-files -z -- lungmae_core client server lungmae_cli deploy 2>/dev/null | sort -z | xargs -0 cat 2>/dev/null \
         || find lungmae_core client server lungmae_cli deploy -type f -not -path '*/__pycache__/*' | sort | xargs cat; } \
       | sha256sum | cut -c1-16)
if [ "$IF_MISSING" = 1 ] && [ "$($ENGINE image inspect --format '{{index .Labels "lungmae.build-key"}}' "$IMAGE" 2>/dev/null || true)" = "$KEY" ]; then
  echo "build.sh: $IMAGE is up to date (build key $KEY)" >&2
  echo "$IMAGE"
  exit 0
fi

mkdir -p .whl
INDEX_ARGS=""
NETWORK_ARGS=""
if "$PYTHON" -m pip download -q --no-deps -d .whl "torch==$TORCH_VERSION" >&2 2>/dev/null \
   && ls .whl/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  rm -f $(ls .whl/torch-*.whl | grep -v "+cpu") 2>/dev/null || true   # only the CPU build goes in
  if "$PYTHON" -m pip download -q --no-deps --require-hashes -d .whl -r "$LOCK" >&2; then
    INDEX_ARGS=--no-index
    NETWORK_ARGS=--network=none   # everything is in the wheelhouse: prove the build needs no network
  fi
else
  rm -f .whl/torch-*.whl   # no CPU wheel here: the Dockerfile takes torch from TORCH_INDEX
  "$PYTHON" -m pip download -q --no-deps --require-hashes -d .whl -r "$LOCK" >&2 || true
fi
echo "build.sh: $ENGINE build of $IMAGE from $BASE_IMAGE (key $KEY) ${INDEX_ARGS:+offline}" >&2
$ENGINE build -f deploy/Dockerfile -t "$IMAGE" $NETWORK_ARGS \
  --label "lungmae.build-key=$KEY" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_SPEC=torch==$TORCH_VERSION" \
  --build-arg "PIP_INDEX_ARGS=$INDEX_ARGS" --build-arg "LOCK=$LOCK" . >&2
echo "$IMAGE"
