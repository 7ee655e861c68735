#!/usr/bin/env bash
# make test-compose: docker-compose.yaml started for real, on a machine with no container registry.
#   1. installs what is missing (Debian's docker.io, docker-compose v1, debootstrap) with apt-get;
#   2. starts a private dockerd on the host network (bridge and iptables off) and builds the images: the offline
#      base and stand-ins (scripts/build-base-images.sh), then Conveyor's image from docker/Dockerfile on them;
#   3. restarts that daemon inside a network namespace of its own and runs tests/stack there (pytest in the same
#      namespace: every request goes to 127.0.0.1 or the compose network, both inside it);
#   4. always ends with `down -v` (tests/stack), the daemon stopped by pid, its mounts and the namespace removed.
# Where no engine can run (not root, no apt-get, dockerd refusing to start) it prints one SKIP line and exits 0.
# Images, layers and the debootstrap tarball stay in $CONVEYOR_STACK_CACHE (~/.cache/conveyor/compose).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
ROOT=${CONVEYOR_STACK_ROOT:-$PWD/.state/compose-test}
NETNS=${CONVEYOR_STACK_NETNS:-conveyor-stack}
TIMES="$ROOT/times.json"
export CONVEYOR_STACK_ROOT=$ROOT CONVEYOR_STACK_NETNS=$NETNS DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

skip() { echo "SKIP test-compose: $*"; exit 0; }

[[ "$(uname -s)" == Linux ]] || skip "needs Linux (a Docker engine run by this script)"
[[ "$(id -u)" == 0 ]] || skip "needs root to start its own Docker daemon and network namespace"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    echo "==> apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null \
        || skip "apt-get could not install ${missing[*]}"
fi

cleanup() {
    if [[ "${CONVEYOR_STACK_KEEP:-}" == 1 ]]; then
        echo "==> CONVEYOR_STACK_KEEP=1: the stack and its daemon are left running (scripts/stack-docker.sh stop)"
    else
        scripts/stack-docker.sh stop || true
    fi
}
trap cleanup EXIT
eval "$(scripts/stack-docker.sh env)"
scripts/stack-docker.sh stop >/dev/null 2>&1 || true  # what a killed run left
scripts/stack-docker.sh start build >/dev/null || skip "dockerd does not start here ($(tail -1 /run/conveyor-stack/dockerd.log 2>/dev/null))"

mkdir -p "$ROOT"
[[ -f "$ROOT/.env" ]] || python3 docker/check_secrets.py --write "$ROOT/.env" >/dev/null
if [[ -z "${CONVEYOR_EXTRA_CA_CERTS+set}" ]]; then
    CONVEYOR_EXTRA_CA_CERTS=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
fi
export CONVEYOR_EXTRA_CA_CERTS EXTRA_CA_CERTS=$CONVEYOR_EXTRA_CA_CERTS
compose=(docker-compose)
docker compose version >/dev/null 2>&1 && compose=(docker compose)
compose+=(--project-directory "$PWD" --env-file "$ROOT/.env" -f docker-compose.yaml -f docker-compose.test.yaml)

t0=$(date +%s)
scripts/build-base-images.sh
t1=$(date +%s)
echo "==> ${compose[*]} build (Conveyor's image on the Airflow stand-in)"
"${compose[@]}" build secrets-check >"$ROOT/build.log" 2>&1 || { tail -40 "$ROOT/build.log"; exit 1; }
t2=$(date +%s)
printf '{"base_images_s": %d, "conveyor_image_s": %d}\n' $((t1 - t0)) $((t2 - t1)) >"$TIMES"
echo "==> images built: base $((t1 - t0)) s, Conveyor $((t2 - t1)) s"
scripts/stack-docker.sh stop

scripts/stack-docker.sh start stack
echo "==> tests/stack in the network namespace $NETNS"
# CONVEYOR_STACK_COMMAND replaces the tests with another command in the namespace (bench/compose.py uses it).
status=0
if [[ -n "${CONVEYOR_STACK_COMMAND:-}" ]]; then
    nsenter --net="/var/run/netns/$NETNS" env CONVEYOR_STACK_DAEMON=1 bash -c "$CONVEYOR_STACK_COMMAND" || status=$?
else
    nsenter --net="/var/run/netns/$NETNS" env CONVEYOR_STACK_DAEMON=1 \
        "$PY" -m pytest tests/stack -x -p no:cacheprovider "$@" || status=$?
fi
exit $status
