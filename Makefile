# Slipway: `make demo` sets up and runs the release on the embedded defaults; `make test` tests.
SHELL := /bin/bash
export SLIPWAY_HOME ?= $(CURDIR)/.slipway
# Prefect keeps its database, results and cache under Slipway's home, never in ~/.prefect.
export PREFECT_HOME ?= $(SLIPWAY_HOME)/prefect
export PREFECT_LOCAL_STORAGE_PATH ?= $(SLIPWAY_HOME)/prefect/storage
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_LOGGING_LEVEL ?= INFO
# Slipway's own progress lines (tasks.*, flows.*) show in the Prefect UI beside Prefect's.
export PREFECT_LOGGING_EXTRA_LOGGERS ?= tasks,flows,evaluation
# Without a server, each flow process starts a temporary one; give it time on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
ENVS := $(SLIPWAY_HOME)/envs
PY := $(ENVS)/core/bin/python
# The one CLI (flows/cli.py); PYTHONPATH makes it run this checkout's code even where the shared
# core environment was set up from another clone.
export PYTHONPATH := $(CURDIR)
SLIPWAY := $(PY) -m flows.cli
# ENV=dev|staging|prod: `up`, `down`, `status`, rollouts and reverts in that environment
# (configs/environments/); without it, the Slipway home itself, as always.
ifdef ENV
export SLIPWAY_ENVIRONMENT := $(ENV)
endif
CONFIG ?= configs/models/smollm2-135m.yaml
DEMO_MODEL ?= smollm2-135m-instruct
DEMO_CANDIDATE ?= gptq-w8a8

.PHONY: setup demo rollback revert approve test lint stress bench drift cost up down status slo-rules bench-gateway bench-canary bench-loadgen clean lock mlflow-ui prefect-ui

## setup: build (or reuse) the core, quant and serve environments and the signing key. Idempotent.
setup:
	@mkdir -p $(ENVS)
	@# Once, before the parallel builds: three concurrent pip installs of uv fail "Text file busy".
	@command -v uv >/dev/null || python3 -m pip install -q "uv==0.13.9"
	@set -e; pids=(); for e in core quant serve; do \
	  (ln -sfn "$$(configs/envs/build.sh $$e)" $(ENVS)/$$e) & pids+=($$!); done; \
	  for p in $${pids[@]}; do wait $$p; done
	@uv pip install -q --no-deps --no-build-isolation --python $(PY) -e .
	@$(SLIPWAY) keys signing

## demo: release the embedded SmolLM2-135M-Instruct (pull, quantize, evaluate, sign, register),
## serve its champion (`make up`), then roll the int8 variant out against it under synthetic load.
## The stack stays up afterwards: `make down` stops it.
demo: setup
	$(SLIPWAY) release $(CONFIG)
	$(SLIPWAY) up
	PREFECT_API_URL=http://127.0.0.1:4200/api \
	  $(SLIPWAY) rollout run $(DEMO_MODEL) $(DEMO_CANDIDATE) --policy configs/rollout/demo.yaml
	PREFECT_API_URL=http://127.0.0.1:4200/api $(SLIPWAY) drift $(DEMO_MODEL) --since-rollout
	PREFECT_API_URL=http://127.0.0.1:4200/api $(SLIPWAY) cost --today

## rollback: withdraw MODEL's canary now (`make rollback MODEL=smollm2-135m-instruct`)
rollback: setup
	$(SLIPWAY) rollout rollback $(MODEL) --reason "$(or $(REASON),rolled back by hand)"

## revert: put MODEL's `previous` back as champion, verified (`make revert MODEL=... REASON=...`)
revert: setup
	$(SLIPWAY) revert $(MODEL) --reason "$(or $(REASON),reverted by hand)"

## approve: let MODEL's paused rollout step advance
approve: setup
	$(SLIPWAY) rollout approve $(MODEL)

## test: the test suite (unit and integration against the real parts).
test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: ruff (lint and format), the import-layer contract, and the README's command reference
lint: setup
	$(ENVS)/core/bin/ruff check .
	$(ENVS)/core/bin/ruff format --check .
	$(ENVS)/core/bin/lint-imports
	$(ENVS)/core/bin/cog --check README.md

## stress: the heavy fault, overload, fuzzing and crash-and-resume tests (marker `stress`; not in make test)
stress: setup
	$(PY) -m pytest -m stress $(PYTEST_ARGS)

## bench: every CPU benchmark, gathered into $(SLIPWAY_HOME)/bench/report.md and report.json
bench: setup
	$(SLIPWAY) bench

## drift: the drift check on the last whole hour of the usage log (flows/drift.py); MODEL=name for one model
drift: setup
	$(SLIPWAY) drift $(MODEL)

## cost: the cost report of yesterday (UTC) from the usage log (flows/cost.py); DAY=YYYY-MM-DD for another
cost: setup
	$(SLIPWAY) cost $(DAY)

## slo-rules: the SLOs' Prometheus rule file (configs/slo.yaml) in $(SLIPWAY_HOME)/prometheus; OUT=dir for another
slo-rules: setup
	$(SLIPWAY) slo rules $(if $(OUT),--out $(OUT))

## up: MLflow :5000, Prefect :4200 (worker, deployments), Prometheus :9190, Alertmanager :9193, the
## incident webhook :9095 and automations, a vLLM per verified champion, gateway :8000/v1
## (ENV=staging: that environment's stack, ports and alias, after its parity report against prod;
## SLIPWAY_MONITORING=required|off: no stack without Prometheus and Alertmanager | none of them)
up: setup
	$(SLIPWAY) up

## down: stop everything `make up` started and check that no process of it is left
down:
	$(SLIPWAY) down

## status: what `make up` started and whether each part answers
status:
	$(SLIPWAY) status

## bench-gateway: gateway vs LiteLLM vs a bare proxy on one mock upstream; $(SLIPWAY_HOME)/bench/gateway.json
bench-gateway: setup
	$(SLIPWAY) bench gateway

## bench-canary: simulated rollouts, Slipway's sequential analysis vs Flagger's defaults; bench/canary.{json,md}
bench-canary: setup
	$(SLIPWAY) bench canary --runs 1000 --aa-runs 3000

## bench-loadgen: the load generator vs `vllm bench serve` on one vLLM serving the embedded model (~8 min)
bench-loadgen: setup
	$(SLIPWAY) bench loadgen

## lock: re-resolve the lock files from configs/envs/*.in (worker and serve-cuda: the images only).
lock:
	@for e in core quant serve; do \
	  uv pip compile -q --python 3.11 --find-links /opt/wheels configs/envs/$$e.in -o configs/envs/$$e.lock; done
	@# The worker: Prefect and its Kubernetes worker type, at core's exact pins.
	@cd configs/envs && uv pip compile -q --python 3.11 worker.in -c core.lock -o worker.lock
	@# vLLM's CUDA build for the GPU image, resolved for the image's platform, not this machine's.
	@cd configs/envs && uv pip compile -q --python 3.11 --python-platform x86_64-manylinux_2_28 serve-cuda.in -o serve-cuda.lock

## mlflow-ui: the lean MLflow tracking server on the same store, at http://127.0.0.1:5000
mlflow-ui: setup
	mlflow/start.sh

## prefect-ui: the Prefect server on Slipway's Prefect home, at http://127.0.0.1:4200
prefect-ui: setup
	$(ENVS)/core/bin/prefect server start

## clean: remove all local state (the environments stay in ~/.cache/slipway/envs).
clean:
	rm -rf $(SLIPWAY_HOME)
