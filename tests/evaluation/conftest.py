"""One vLLM server on the tiny model, shared by the evaluation tests that need a real server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from configs.gateway import GatewayConfig
from configs.models import Serving
from evaluation.benchmarks.mock_upstream import serve
from serving.gateway.app import build_app
from serving.gateway.auth import key_hash
from serving.vllm import VLLMServer
from tests.conftest import make_home
from tests.serving.conftest import SIGNER

SERVED = "tiny"
KEY, ADMIN = "sk-test-usage-vllm", "adm-test-usage-vllm"


@pytest.fixture(scope="package")  # stopped when tests/evaluation ends: vLLM pins a core
def tiny_server(tiny_model_source, tmp_path_factory) -> Iterator[VLLMServer]:
    """vLLM (serve env) serving the tiny model as 'tiny', context 256, for tests/evaluation."""
    home = make_home(tmp_path_factory.mktemp("eval") / "slipway")
    serving = Serving(engine_args=["--max-model-len", "256"])
    with VLLMServer(tiny_model_source, SERVED, home, serving) as server:
        yield server


@contextmanager
def gateway_to(url: str, served: str, model: str, home, **config: object) -> Iterator[str]:
    """A gateway in this process serving the engine at `url` (its name `served`) as `model` to
    tenant alice (key KEY), its usage written every 0.1 s and the engine's counters read every
    0.3 s. `config`: gateway config fields over these (tenants, queue), and `backend`: fields of
    the one backend over its defaults."""
    digest = "sha256:" + "0" * 64
    backend = {
        "version": "1",
        "url": url,
        "served_model": served,
        "digest": digest,
        "attestation": SIGNER.attest(digest),
        "weight": 100,
        "role": "stable",
        **config.pop("backend", {}),
    }
    gateway = GatewayConfig.model_validate(
        {
            "admin_token_sha256": key_hash(ADMIN),
            "routes": [{"model": model, "backends": [backend]}],
            "tenants": [{"name": "alice", "key_sha256": key_hash(KEY)}],
            "usage": {"batch_interval_s": 0.1, "meter_interval_s": 0.3},
            "trust": SIGNER.trust(),
            **config,
        }
    )
    with serve(build_app(gateway, home)) as served_at:
        yield served_at


@pytest.fixture
def tiny_gateway(tiny_server, home) -> Iterator[str]:
    """gateway_to the tiny server, as model 'tiny-chat'."""
    with gateway_to(tiny_server.url, SERVED, "tiny-chat", home) as url:
        yield url
