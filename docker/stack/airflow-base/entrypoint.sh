#!/usr/bin/env bash
# The official Airflow image's entrypoint contract (docker-stack/entrypoint.html), as docker-compose.yaml uses it:
# - an arbitrary UID gets a passwd entry (home /home/airflow, group 0);
# - unless CONNECTION_CHECK_MAX_COUNT is 0, wait for the metadata database (`airflow db check`, with retries);
# - _AIRFLOW_DB_MIGRATE (or _AIRFLOW_DB_UPGRADE) non-empty: `airflow db migrate`;
# - _AIRFLOW_WWW_USER_CREATE non-empty: `airflow users create` from _AIRFLOW_WWW_USER_* (an existing user is kept);
# - `bash ...` and `python ...` run as they are; `airflow X` and `X` run `airflow X`; scheduler and celery wait for
#   the Celery broker first.
set -euo pipefail

: "${CONNECTION_CHECK_MAX_COUNT:=20}"
: "${CONNECTION_CHECK_SLEEP_TIME:=3}"

if ! whoami &>/dev/null && [[ -w /etc/passwd ]]; then
    echo "${USER_NAME:-default}:x:$(id -u):0:${USER_NAME:-default} user:/home/airflow:/sbin/nologin" >>/etc/passwd
fi
export HOME="${HOME:-/home/airflow}"

run_check_with_retries() {  # run_check_with_retries WHAT COMMAND...
    local what=$1 countdown=${CONNECTION_CHECK_MAX_COUNT}
    shift
    while true; do
        if "$@" >/tmp/entrypoint-check.log 2>&1; then
            return 0
        fi
        countdown=$((countdown - 1))
        if ((countdown <= 0)); then
            echo "ERROR: ${what} unreachable after ${CONNECTION_CHECK_MAX_COUNT} tries:" >&2
            cat /tmp/entrypoint-check.log >&2
            exit 1
        fi
        echo "Waiting for ${what}: ${countdown} tries left" >&2
        sleep "${CONNECTION_CHECK_SLEEP_TIME}"
    done
}

wait_for_celery_broker() {  # the broker URL's host and port, as the official entrypoint waits for them
    local url host port
    url=$(airflow config get-value celery broker_url 2>/dev/null || true)
    [[ -z "$url" ]] && return 0
    host=$(python -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).hostname or "")' "$url")
    port=$(python -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).port or 6379)' "$url")
    run_check_with_retries "the Celery broker ${host}:${port}" \
        python -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()' "$host" "$port"
}

if [[ "${CONNECTION_CHECK_MAX_COUNT}" -gt 0 ]]; then
    run_check_with_retries "the metadata database" airflow db check
fi
if [[ -n "${_AIRFLOW_DB_UPGRADE:-}" || -n "${_AIRFLOW_DB_MIGRATE:-}" ]]; then
    airflow db migrate
fi
if [[ -n "${_AIRFLOW_WWW_USER_CREATE:-}" ]]; then
    airflow users create \
        --username "${_AIRFLOW_WWW_USER_USERNAME:-admin}" \
        --firstname "${_AIRFLOW_WWW_USER_FIRSTNAME:-Airflow}" \
        --lastname "${_AIRFLOW_WWW_USER_LASTNAME:-Admin}" \
        --email "${_AIRFLOW_WWW_USER_EMAIL:-airflowadmin@example.com}" \
        --role "${_AIRFLOW_WWW_USER_ROLE:-Admin}" \
        --password "${_AIRFLOW_WWW_USER_PASSWORD:?_AIRFLOW_WWW_USER_PASSWORD is empty}" || true
fi

case "${1:-}" in
    bash) shift; exec /bin/bash "$@" ;;
    python) shift; exec python "$@" ;;
    "") exec /bin/bash ;;
    airflow) shift ;;
esac
if [[ "${1:-}" =~ ^(scheduler|celery)$ && "${CONNECTION_CHECK_MAX_COUNT}" -gt 0 ]]; then
    wait_for_celery_broker
fi
exec airflow "$@"
