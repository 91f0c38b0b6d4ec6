#!/bin/sh
# Start the MLflow tracking server of the compose setup: basic-auth, PostgreSQL stores, artifacts served from a
# volume. Installed in the image as `tuner-mlflow-server`.
#
# Environment (docker/.env through compose.yaml):
#   POSTGRES_USER, PGPASSWORD          the PostgreSQL role; libpq reads the password, so no URL holds it
#   MLFLOW_ADMIN_USERNAME, MLFLOW_ADMIN_PASSWORD
#                                      the admin account, created on the first start (password >= 12 characters);
#                                      once it exists, changing these does not change it
#   MLFLOW_FLASK_SERVER_SECRET_KEY     the basic-auth app's CSRF key
#   POSTGRES_HOST (postgres), MLFLOW_DB (mlflow), MLFLOW_AUTH_DB (mlflow_auth), MLFLOW_ARTIFACTS (/mlflow/artifacts),
#   MLFLOW_ALLOWED_HOSTS, MLFLOW_SERVER_WORKERS (2), MLFLOW_AUTH_CONFIG_PATH
set -eu

: "${POSTGRES_USER:?}"
: "${PGPASSWORD:?set POSTGRES_PASSWORD in docker/.env}"
: "${MLFLOW_ADMIN_USERNAME:?set it in docker/.env}"
: "${MLFLOW_ADMIN_PASSWORD:?set it in docker/.env}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it in docker/.env}"

host=${POSTGRES_HOST:-postgres}
backend="postgresql+psycopg://${POSTGRES_USER}@${host}:5432/${MLFLOW_DB:-mlflow}"
auth_db="postgresql+psycopg://${POSTGRES_USER}@${host}:5432/${MLFLOW_AUTH_DB:-mlflow_auth}"

# The auth app reads its settings from an INI file: write it now, readable by this user only. configparser
# treats % as interpolation, so a % in the password is written as %%.
config=${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}
umask 077
mkdir -p "$(dirname "$config")"
password=$(printf '%s' "$MLFLOW_ADMIN_PASSWORD" | sed 's/%/%%/g')
cat >"$config" <<EOF
[mlflow]
default_permission = READ
database_uri = ${auth_db}
admin_username = ${MLFLOW_ADMIN_USERNAME}
admin_password = ${password}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
unset password MLFLOW_ADMIN_PASSWORD
export MLFLOW_AUTH_CONFIG_PATH="$config"

# Workers reach the server as http://mlflow:5000, the browser as 127.0.0.1 or localhost: the Host headers the
# server accepts (DNS-rebinding protection).
exec mlflow server \
    --app-name basic-auth \
    --host 0.0.0.0 \
    --port 5000 \
    --workers "${MLFLOW_SERVER_WORKERS:-2}" \
    --backend-store-uri "$backend" \
    --serve-artifacts \
    --artifacts-destination "${MLFLOW_ARTIFACTS:-/mlflow/artifacts}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*}" \
    "$@"
