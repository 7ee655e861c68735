#!/usr/bin/env bash
# The official postgres image's first-start contract, on Debian's PostgreSQL 15 (see the Dockerfile).
set -euo pipefail

if [[ "$(id -u)" == 0 ]]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is empty: the postgres stand-in refuses to start without one}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
export POSTGRES_USER POSTGRES_DB

if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") -D "$PGDATA" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [[ "$POSTGRES_DB" != postgres ]]; then
        psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname postgres -v db="$POSTGRES_DB" \
            <<<'CREATE DATABASE :"db";'
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sh) echo "docker-entrypoint: running $script"; if [[ -x "$script" ]]; then "$script"; else . "$script"; fi ;;
            *.sql) echo "docker-entrypoint: running $script"; psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$script" ;;
            *) ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "docker-entrypoint: PostgreSQL init process complete; ready for start up."
fi

if [[ "${1:-}" == postgres ]]; then
    shift
    exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
