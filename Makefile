# Slipway: `make demo` sets up and runs the release on the embedded defaults; `make test` tests.
SHELL := /bin/bash
export SLIPWAY_HOME ?= $(CURDIR)/.slipway
# Prefect keeps its database, results and cache under Slipway's home, never in ~/.prefect.
export PREFECT_HOME ?= $(SLIPWAY_HOME)/prefect
export PREFECT_LOCAL_STORAGE_PATH ?= $(SLIPWAY_HOME)/prefect/storage
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= INFO
# Without a server, each flow process starts a temporary one; give it time on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
ENVS := $(SLIPWAY_HOME)/envs
PY := $(ENVS)/core/bin/python
CONFIG ?= configs/models/smollm2-135m.yaml

.PHONY: setup demo test up down status bench-gateway bench-canary clean lock mlflow-ui prefect-ui

## setup: build (or reuse) the core, quant and serve environments and the signing key. Idempotent.
setup:
	@mkdir -p $(ENVS)
	@set -e; pids=(); for e in core quant serve; do \
	  (ln -sfn "$$(configs/envs/build.sh $$e)" $(ENVS)/$$e) & pids+=($$!); done; \
	  for p in $${pids[@]}; do wait $$p; done
	@$(PY) -m tasks.signing keygen

## demo: the release flow on the embedded SmolLM2-135M-Instruct (pull, sign, verify, register).
demo: setup
	$(PY) -m flows.release $(CONFIG)

## test: the test suite (unit and integration against the real parts).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

## up: serve each verified champion: MLflow at :5000, one vLLM per champion, the gateway at http://127.0.0.1:8000/v1
up: setup
	$(PY) -m serving.stack up

## down: stop everything `make up` started and check that no process of it is left
down:
	$(PY) -m serving.stack down

## status: what `make up` started and whether each part answers
status:
	$(PY) -m serving.stack status

## bench-gateway: gateway vs LiteLLM vs a bare proxy on one mock upstream; $(SLIPWAY_HOME)/bench/gateway.json
bench-gateway: setup
	$(PY) evaluation/bench_gateway.py

## bench-canary: simulated rollouts, Slipway's sequential analysis vs Flagger's defaults; bench/canary.{json,md}
bench-canary: setup
	$(PY) -m evaluation.bench_canary --runs 1000

## lock: re-resolve the three lock files from configs/envs/*.in.
lock:
	@for e in core quant serve; do \
	  uv pip compile -q --python 3.11 --find-links /opt/wheels configs/envs/$$e.in -o configs/envs/$$e.lock; done

## mlflow-ui: the lean MLflow tracking server on the same store, at http://127.0.0.1:5000
mlflow-ui: setup
	mlflow/start.sh

## prefect-ui: the Prefect server on Slipway's Prefect home, at http://127.0.0.1:4200
prefect-ui: setup
	$(ENVS)/core/bin/prefect server start

## clean: remove all local state (the environments stay in ~/.cache/slipway/envs).
clean:
	rm -rf $(SLIPWAY_HOME)
