#!/usr/bin/env bash
# PostgreSQL and Redis for Conveyor's distributed (Celery) run and its tests.
#
#   scripts/services.sh up                  start PostgreSQL and Redis when they are not running; wait until ready
#   scripts/services.sh fresh-db NAME...    (re)create empty PostgreSQL databases (dropped first when they exist)
#   scripts/services.sh drop-db NAME...     drop PostgreSQL databases (no error when missing)
#   scripts/services.sh status              say what runs
#
# Where: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres); CONVEYOR_REDIS_HOST (127.0.0.1),
# CONVEYOR_REDIS_PORT (6379). A service on another host is only waited for, never started.
# Exit codes: 0 ready, 1 a command failed, 3 a service is down and this machine cannot start it.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
REDIS_HOST=${CONVEYOR_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${CONVEYOR_REDIS_PORT:-6379}
WAIT_S=${CONVEYOR_SERVICES_WAIT_S:-60}
export PGHOST PGPORT PGUSER

say() { echo "services: $*" >&2; }

is_local() { [[ "$1" == 127.* || "$1" == localhost || "$1" == ::1 ]]; }

# A TCP connect through bash's /dev/tcp: no client needed to know whether something listens.
listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

postgres_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$PGHOST" -p "$PGPORT" -t 2
    else
        listening "$PGHOST" "$PGPORT"
    fi
}

redis_ready() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
    else
        listening "$REDIS_HOST" "$REDIS_PORT"
    fi
}

wait_for() {  # wait_for NAME CHECK
    local deadline=$((SECONDS + WAIT_S))
    until "$2"; do
        if ((SECONDS >= deadline)); then
            say "$1 did not become ready within ${WAIT_S}s"
            return 1
        fi
        sleep 1
    done
}

start_postgres() {
    if ! is_local "$PGHOST"; then
        say "PostgreSQL at $PGHOST:$PGPORT is not answering and is not on this machine: start it there"
        return 3
    fi
    if command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]]; then
        local version
        version=$(ls /etc/postgresql | sort -V | tail -1)
        say "starting PostgreSQL $version (pg_ctlcluster $version main start)"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    elif command -v pg_ctl >/dev/null 2>&1 && [[ -n "${PGDATA:-}" ]]; then
        say "starting PostgreSQL (pg_ctl -D $PGDATA start)"
        pg_ctl -D "$PGDATA" -l "$PGDATA/conveyor-start.log" start || true
    else
        say "PostgreSQL is not running on $PGHOST:$PGPORT and no pg_ctlcluster (Debian) or pg_ctl with PGDATA is" \
            "here to start it: install and start PostgreSQL (Debian: apt-get install postgresql)"
        return 3
    fi
    wait_for PostgreSQL postgres_ready
}

start_redis() {
    if ! is_local "$REDIS_HOST"; then
        say "Redis at $REDIS_HOST:$REDIS_PORT is not answering and is not on this machine: start it there"
        return 3
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        say "Redis is not running on $REDIS_HOST:$REDIS_PORT and redis-server is not installed" \
            "(Debian: apt-get install redis-server)"
        return 3
    fi
    local dir=/var/lib/redis logfile=/var/log/redis/conveyor.log
    [[ -w $dir ]] || dir=$(mktemp -d)
    [[ -w $(dirname "$logfile") ]] || logfile="$dir/redis.log"
    say "starting Redis on $REDIS_HOST:$REDIS_PORT (no persistence)"
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$dir" --logfile "$logfile"
    wait_for Redis redis_ready
}

psql_admin() {  # run one SQL statement on the postgres database, as PGUSER
    if command -v psql >/dev/null 2>&1; then
        PGOPTIONS="-c client_min_messages=warning" psql -v ON_ERROR_STOP=1 -q -d postgres -c "$1"
    else
        local python
        python="$(dirname "$0")/../.venv/bin/python"
        [[ -x $python ]] || python=python3
        "$python" - "$1" <<'EOF'
import os, sys
import psycopg2
conn = psycopg2.connect(host=os.environ["PGHOST"], port=os.environ["PGPORT"], user=os.environ["PGUSER"], dbname="postgres")
conn.autocommit = True
conn.cursor().execute(sys.argv[1])
EOF
    fi
}

check_name() {
    if [[ ! "$1" =~ ^[a-z_][a-z0-9_]{0,62}$ ]]; then
        say "database name '$1' is not allowed: lower-case letters, digits and '_' (63 at most)"
        exit 1
    fi
}

case "${1:-}" in
    up)
        postgres_ready || start_postgres
        redis_ready || start_redis
        say "PostgreSQL $PGHOST:$PGPORT and Redis $REDIS_HOST:$REDIS_PORT are ready"
        ;;
    fresh-db)
        shift
        for name in "$@"; do
            check_name "$name"
            psql_admin "DROP DATABASE IF EXISTS $name WITH (FORCE)"
            psql_admin "CREATE DATABASE $name"
        done
        ;;
    drop-db)
        shift
        for name in "$@"; do
            check_name "$name"
            psql_admin "DROP DATABASE IF EXISTS $name WITH (FORCE)"
        done
        ;;
    status)
        if postgres_ready; then say "PostgreSQL $PGHOST:$PGPORT: ready"; else say "PostgreSQL $PGHOST:$PGPORT: down"; fi
        if redis_ready; then say "Redis $REDIS_HOST:$REDIS_PORT: ready"; else say "Redis $REDIS_HOST:$REDIS_PORT: down"; fi
        ;;
    *)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        exit 1
        ;;
esac
