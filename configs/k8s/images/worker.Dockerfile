# slipway-worker: the Prefect worker of the slipway-kubernetes pool (worker.yaml), from
# configs/envs/worker.lock: Prefect and prefect-kubernetes at core.lock's pins. It starts each flow
# run as a Job from slipway-core and runs no flow code itself, so it carries neither the checkout
# nor torch. From the repository root:
#   docker build -f configs/k8s/images/worker.Dockerfile -t ghcr.io/slipway/slipway-worker:0.1.0 .
FROM python:3.11-slim-bookworm

COPY configs/envs/build.sh configs/envs/worker.lock /opt/slipway/configs/envs/
RUN ln -s "$(SLIPWAY_ENVS=/opt/envs /opt/slipway/configs/envs/build.sh worker)" /opt/venv \
 && rm -rf /root/.cache

ENV PATH=/opt/venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["prefect", "worker", "start", "--pool=slipway-kubernetes", "--type=kubernetes"]
