#!/usr/bin/env bash
# Download wheels of the project's dependencies that a PyTorch CUDA image usually lacks, for a GPU machine
# without a package index (bench/gpu_check.sh installs them from TUNER_GPU_WHEELS). The versions are the ones
# installed in this checkout's .venv (make setup), so the GPU machine runs what the tests here ran.
#
#   bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]      # PYTHON_VERSION of the GPU machine, default 3.12
#
# numpy, pandas, scipy, scikit-learn, pyarrow, PyYAML, rich, requests and the like are taken from the image.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: bash bench/gpu_wheels.sh DIR [PYTHON_VERSION]}
python_version=${2:-3.12}
venv_python=.venv/bin/python
[[ -x $venv_python ]] || { echo "no $venv_python: run make setup first"; exit 2; }

names=(
    optuna cmaes colorlog alembic mako sqlalchemy
    mlflow mlflow-skinny mlflow-tracing databricks-sdk google-auth pyasn1 pyasn1-modules cachetools
    opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions importlib-metadata
    cryptography cffi pycparser fastapi starlette uvicorn flask flask-cors blinker itsdangerous gunicorn huey
    graphene graphql-core graphql-relay docker gitpython gitdb smmap sqlparse skops prettytable wcwidth
    python-dotenv bottle pydantic pydantic-core annotated-types typing-inspection typing-extensions plotly
    protobuf packaging click cloudpickle werkzeug jinja2 optuna-integration
)
pins=()
for name in "${names[@]}"; do
    version=$("$venv_python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    pins+=("$name==$version")
done
platforms=()
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d "$dest" "${pins[@]}"
echo "$(ls "$dest"/*.whl | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))"
