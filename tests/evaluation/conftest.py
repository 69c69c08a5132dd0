"""One vLLM server on the tiny model, shared by the evaluation tests that need a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from configs.models import Serving
from serving.vllm import VLLMServer
from tests.conftest import make_home

SERVED = "tiny"


@pytest.fixture(scope="package")  # stopped when tests/evaluation ends: vLLM pins a core
def tiny_server(tiny_model_source, tmp_path_factory) -> Iterator[VLLMServer]:
    """vLLM (serve env) serving the tiny model as 'tiny', context 256, for tests/evaluation."""
    home = make_home(tmp_path_factory.mktemp("eval") / "slipway")
    serving = Serving(engine_args=["--max-model-len", "256"])
    with VLLMServer(tiny_model_source, SERVED, home, serving) as server:
        yield server
