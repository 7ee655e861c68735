#!/usr/bin/env bash
# A private Docker daemon for the compose test (no systemd here, and nothing else's daemon is touched):
#   scripts/stack-docker.sh start build   host network, no bridge, no iptables: builds reach apt and PyPI
#   scripts/stack-docker.sh start stack   inside its own network namespace (bridges, compose networks and
#                                         iptables rules stay in there; lo is up), for `docker-compose up`
#   scripts/stack-docker.sh stop          stops the daemon by its pid, unmounts what it left, removes the namespace
#   scripts/stack-docker.sh env           prints the DOCKER_HOST line to source
# Images and layers live in $CONVEYOR_STACK_CACHE/docker (default ~/.cache/conveyor/compose), kept between runs.
set -euo pipefail

CACHE=${CONVEYOR_STACK_CACHE:-$HOME/.cache/conveyor/compose}
RUN_DIR=${CONVEYOR_STACK_RUN:-/run/conveyor-stack}
NETNS=${CONVEYOR_STACK_NETNS:-conveyor-stack}
SOCKET="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/dockerd.pid"
LOG="$RUN_DIR/dockerd.log"

start() {  # start build|stack
    local mode=$1 pid
    mkdir -p "$RUN_DIR" "$CACHE/docker"
    if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "stack-docker: a daemon is already running (pid $(cat "$PIDFILE")); stop it first" >&2
        return 1
    fi
    local args=(--data-root "$CACHE/docker" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" -H "unix://$SOCKET"
        --storage-driver=overlay2)
    if [[ "$mode" == build ]]; then
        setsid dockerd "${args[@]}" --iptables=false --ip6tables=false --ip-masq=false --bridge=none \
            >"$LOG" 2>&1 </dev/null &
    else
        ip netns add "$NETNS"
        nsenter --net="/var/run/netns/$NETNS" ip link set lo up
        setsid nsenter --net="/var/run/netns/$NETNS" dockerd "${args[@]}" >"$LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 60); do
        if DOCKER_HOST="unix://$SOCKET" docker version >/dev/null 2>&1; then
            echo "stack-docker: dockerd ($mode) up, pid $(cat "$PIDFILE")"
            return 0
        fi
        sleep 1
    done
    echo "stack-docker: dockerd ($mode) did not start; its log:" >&2
    tail -20 "$LOG" >&2
    stop
    return 1
}

stop() {
    local pid
    if [[ -f "$PIDFILE" ]]; then
        pid=$(cat "$PIDFILE")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
        rm -f "$PIDFILE"
    fi
    # dockerd can leave its netns bind mounts and the overlay mounts of the exec root behind.
    for mount in $(awk -v root="$RUN_DIR" '$2 ~ "^"root || $2 == "/run/docker/netns/default" {print $2}' /proc/mounts \
        | sort -r); do
        umount "$mount" 2>/dev/null || umount -l "$mount" || true
    done
    if ip netns list 2>/dev/null | grep -qw "$NETNS"; then
        ip netns delete "$NETNS"
    fi
}

case "${1:-}" in
    start) start "${2:?start build|stack}" ;;
    stop) stop ;;
    env) echo "export DOCKER_HOST=unix://$SOCKET" ;;
    *) echo "usage: $0 start build|stack | stop | env" >&2; exit 2 ;;
esac
