#!/usr/bin/env bash
# The entrypoint of Conveyor's image: refuse weak or example secrets (check_secrets.py names the variable),
# then hand over to the Airflow image's own entrypoint, which runs `python ...` and `bash ...` as they are
# and anything else as `airflow ...`. Nothing of Airflow, MLflow or the model server starts before the check.
set -euo pipefail
python "$(dirname "$(readlink -f "$0")")/check_secrets.py" --present
exec /entrypoint "$@"
