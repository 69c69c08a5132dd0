#!/usr/bin/env bash
# The lean MLflow tracking server on Slipway's store, serving artifacts over HTTP.
#   mlflow/start.sh [--port 5000] [--host 127.0.0.1]
# Store: sqlite under $SLIPWAY_HOME/mlflow by default; set SLIPWAY_MLFLOW_BACKEND to a PostgreSQL URL
# (postgresql://user@host:5432/db) for the production profile: nothing else changes.
# Artifacts (the weights): $SLIPWAY_HOME/mlflow/artifacts by default; set SLIPWAY_ARTIFACT_ROOT to an
# s3://bucket/prefix URI to keep them off the box (MLFLOW_S3_ENDPOINT_URL for MinIO or another
# S3-compatible endpoint; credentials from the standard AWS chain). Clients never need S3 access:
# the server proxies artifacts over HTTP.
# Lean settings, measured on a 2-core machine: no job execution, one worker: ~11 s and ~0.5 GB instead of ~60 s and 2.6 GB.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
home=${SLIPWAY_HOME:-$here/.slipway}
port=5000 host=127.0.0.1
while [ $# -gt 0 ]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    *) echo "mlflow/start.sh: unknown option $1 (use --port, --host)" >&2; exit 2 ;;
  esac
done
mkdir -p "$home/mlflow/artifacts" "$home/logs"
backend=${SLIPWAY_MLFLOW_BACKEND:-sqlite:///$home/mlflow/mlflow.db}
artifacts=${SLIPWAY_ARTIFACT_ROOT:-$home/mlflow/artifacts}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
echo "MLflow UI: http://$host:$port  (store: ${backend%%://*}, artifacts: $artifacts)" >&2
# Run from the home folder so the mlflow/ folder of this repo can never shadow the mlflow package.
cd "$home"
exec "$home/envs/core/bin/mlflow" server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers 1
