"""One vLLM server on the tiny model, shared by the evaluation tests that need a real server."""

from __future__ import annotations

from collections.abc import Iterator

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


@pytest.fixture
def tiny_gateway(tiny_server, home) -> Iterator[str]:
    """A gateway in this process serving the tiny server as model 'tiny-chat' to tenant alice
    (key KEY), its usage written every 0.1 s and the engine's counters read every 0.3 s."""
    backend = {
        "version": "1",
        "url": tiny_server.url,
        "served_model": SERVED,
        "digest": "sha256:" + "0" * 64,
        "attestation": SIGNER.attest("sha256:" + "0" * 64),
        "weight": 100,
        "role": "stable",
    }
    config = GatewayConfig.model_validate(
        {
            "admin_token_sha256": key_hash(ADMIN),
            "routes": [{"model": "tiny-chat", "backends": [backend]}],
            "tenants": [{"name": "alice", "key_sha256": key_hash(KEY)}],
            "usage": {"batch_interval_s": 0.1, "meter_interval_s": 0.3},
            "trust": SIGNER.trust(),
        }
    )
    with serve(build_app(config, home)) as url:
        yield url
