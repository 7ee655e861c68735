#!/usr/bin/env bash
# Builds, with no container registry, the images the compose test runs docker-compose.yaml on
# (docker-compose.test.yaml selects them): a Debian bookworm base from debootstrap, then stand-ins for
# apache/airflow:3.3.2-python3.11, postgres, redis and MinIO (docker/stack/*). Legacy builder, `--network host`
# (apt and PyPI as this machine reaches them). The debootstrap tarball is kept in $CONVEYOR_STACK_CACHE
# (default ~/.cache/conveyor/compose) and an image already present is kept (layers cached), so a second run is fast.
# EXTRA_CA_CERTS (PEM text) defaults to this machine's locally added CA certificates (/usr/local/share/ca-certificates).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${CONVEYOR_STACK_CACHE:-$HOME/.cache/conveyor/compose}
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
    /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TARBALL="$CACHE/bookworm-minbase.tar.gz"
DEBIAN_IMAGE=conveyor-local/debian:bookworm
export DOCKER_BUILDKIT=0
if [[ -z "${EXTRA_CA_CERTS+set}" ]]; then
    EXTRA_CA_CERTS=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
fi

mkdir -p "$CACHE"
if [[ ! -s "$TARBALL" ]]; then
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    echo "==> debootstrap --variant=minbase bookworm from $MIRROR (about 90 s)"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
    tar -C "$rootfs" -c . | gzip -1 >"$TARBALL.tmp" && mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$rootfs"
fi
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    echo "==> docker import $TARBALL $DEBIAN_IMAGE"
    docker import "$TARBALL" "$DEBIAN_IMAGE" >/dev/null
fi

# The Airflow stand-in's CPython 3.11 (3.11.5 or later: Debian's is 3.11.2): $STACK_PYTHON, else the first python3.11
# on PATH whose version fits, packed without its site-packages and tests (docker/stack/airflow-base/python.tar.gz).
pack_python() {
    local candidate prefix tarball=docker/stack/airflow-base/python.tar.gz
    [[ -s "$tarball" ]] && return 0
    for candidate in ${STACK_PYTHON:-} $(type -ap python3.11 python3) /root/.pyenv/versions/3.11*/bin/python3.11; do
        [[ -x "$candidate" ]] || continue
        prefix=$("$candidate" -c 'import sys; v = sys.version_info
print(sys.base_prefix if v[:2] == (3, 11) and v >= (3, 11, 5) else "")' 2>/dev/null || true)
        [[ -n "$prefix" && -e "$prefix/lib/libpython3.11.so.1.0" ]] && break
        prefix=""
    done
    [[ -n "$prefix" ]] || { echo "no shared CPython 3.11.5+ here (set STACK_PYTHON=/path/to/python3.11)" >&2; exit 1; }
    echo "==> packing CPython from $prefix"
    tar -C "$prefix" --exclude=./lib/python3.11/site-packages --exclude=./lib/python3.11/test \
        --exclude='*/__pycache__' -czf "$tarball.tmp" bin/python3.11 bin/python3 lib include
    mv "$tarball.tmp" "$tarball"
}

build() {  # build TAG FOLDER [--build-arg ...]
    local tag=$1 folder=$2
    shift 2
    echo "==> docker build $tag ($folder)"
    # The project's constraints.txt pins what the Airflow stand-in installs with pip (copied in for the build only).
    grep -q constraints.txt "$folder/Dockerfile" && cp constraints.txt "$folder/constraints.txt"
    local log="$CACHE/build-${tag//[\/:]/_}.log"
    docker build --network host --tag "$tag" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
        --build-arg EXTRA_CA_CERTS="$EXTRA_CA_CERTS" "$@" "$folder" >"$log" 2>&1 \
        || { rm -f "$folder/constraints.txt"; tail -30 "$log" >&2; echo "build of $tag failed ($log)" >&2; exit 1; }
    rm -f "$folder/constraints.txt"
}

build conveyor-local/postgres:15-bookworm docker/stack/postgres
build conveyor-local/redis:7.0-bookworm docker/stack/redis
build conveyor-local/s3:moto docker/stack/s3 --build-arg MOTO_VERSION="$(sed -n 's/^moto==//p' constraints.txt)"
pack_python
build conveyor-local/airflow:3.3.2-python3.11 docker/stack/airflow-base
echo "==> base images ready"
