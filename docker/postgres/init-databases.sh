#!/usr/bin/env bash
# Conveyor's databases beside Airflow's metadata database: the MLflow store and the predictions warehouse,
# each with its own owner. The postgres image runs this once, on its first start (an empty data volume);
# it reads the names and passwords from its environment (docker-compose.yaml, from .env).
#
# Outside the image: PGHOST/PGPORT select the server; POSTGRES_USER and POSTGRES_DB the admin login.
set -euo pipefail

: "${POSTGRES_USER:?}" "${POSTGRES_DB:?}"
: "${MLFLOW_DB_USER:?}" "${MLFLOW_DB_PASSWORD:?}" "${MLFLOW_DB_NAME:?}"
: "${WAREHOUSE_DB_USER:?}" "${WAREHOUSE_DB_PASSWORD:?}" "${WAREHOUSE_DB_NAME:?}"

create_database() {  # create_database OWNER PASSWORD NAME
    echo "conveyor: creating database $3 owned by $1"
    # psql variables quote the names (:"x") and the password (:'x'): no value is pasted into SQL.
    psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -v owner="$1" -v password="$2" -v dbname="$3" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'password';
CREATE DATABASE :"dbname" OWNER :"owner";
REVOKE ALL ON DATABASE :"dbname" FROM PUBLIC;
SQL
}

create_database "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD" "$MLFLOW_DB_NAME"
create_database "$WAREHOUSE_DB_USER" "$WAREHOUSE_DB_PASSWORD" "$WAREHOUSE_DB_NAME"
