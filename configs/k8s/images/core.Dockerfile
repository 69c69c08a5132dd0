# slipway-core: the core environment (configs/envs/core.lock) and this checkout at /opt/slipway.
# It runs the gateway, MLflow, the Prefect server and every flow-run Job of the work pool
# (work-pool.json), so all of them run the pins `make test` tests. The environment is built by
# configs/envs/build.sh, as `make setup` builds it. From the repository root:
#   docker build -f configs/k8s/images/core.Dockerfile -t ghcr.io/slipway/slipway-core:0.1.0 .
FROM python:3.11-slim-bookworm

WORKDIR /opt/slipway
# The lock and its builder alone first, so the environment layer is rebuilt only when they change.
COPY configs/envs/build.sh configs/envs/core.lock configs/envs/
# The lock pins the CPU build of torch (torch==X+cpu), which only PyTorch's index has: fetch that
# one wheel into /opt/wheels, where build.sh looks for it, as on Slipway's build machines.
RUN pip download -q --no-deps --dest /opt/wheels --index-url https://download.pytorch.org/whl/cpu \
      "$(grep -oP '^torch==\S+' configs/envs/core.lock)" \
 && ln -s "$(SLIPWAY_ENVS=/opt/envs configs/envs/build.sh core)" /opt/venv \
 && rm -rf /opt/wheels /root/.cache

# The code, without tests/, .git or local state; installed editable without dependencies, as
# `make setup` does, so the lock alone decides every dependency.
COPY pyproject.toml README.md prefect.yaml ./
COPY configs/ configs/
COPY evaluation/ evaluation/
COPY flows/ flows/
COPY serving/ serving/
COPY tasks/ tasks/
RUN uv pip install -q --no-deps --no-build-isolation --python /opt/venv/bin/python -e .

ENV PATH=/opt/venv/bin:$PATH \
    SLIPWAY_REPO=/opt/slipway \
    SLIPWAY_HOME=/var/lib/slipway \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["python", "-m", "flows.cli", "--help"]
